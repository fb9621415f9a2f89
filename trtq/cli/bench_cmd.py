"""``trtq bench MODEL``: latency percentiles and throughput of a model or engine."""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from trtq.cli import flagtypes
from trtq.cli.common import add_command, add_data_arguments, open_data, print_json
from trtq.cli.run_cmd import add_runtime_arguments, load_engine
from trtq.errors import DataError, UserError

EPILOG = """\
examples:
  trtq bench calib_data/mnist_cnn.onnx --shapes input:1x1x28x28
  trtq bench model.engine --shapes x:8x3x224x224 --iterations 1000 --warmup 100 --json
  trtq bench model.onnx --data test.npz --batch-size 32 --threads 4

Inputs are random (floats in [0, 1), integers 0 or 1) of the --shapes given, or of the
model's static shapes, or of a TensorRT engine's profile opt shapes; with --data, the
data's batches are loaded once and cycled. Latency is measured per call around
engine.infer (input checks included, as a caller sees it), in milliseconds; throughput
is calls and samples per second of wall time over all threads."""

PERCENTILES = (50, 90, 99)
#: More threads than this only queue behind each other (and each holds a stack).
MAX_THREADS = 1024


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "bench",
        run,
        help="measure latency and throughput of a model or engine",
        description="Call MODEL repeatedly through trtq's runtime (ONNX Runtime for .onnx, "
        "TensorRT for .engine) and report latency percentiles and throughput. With "
        "--threads T, T threads share one engine, as a server's request handlers would.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument("model", help="ONNX model (.onnx) or TensorRT engine (.engine, .plan)")
    parser.add_argument(
        "--shapes",
        type=flagtypes.shapes,
        nargs="+",
        metavar="NAME:DIMS",
        help="input shapes, trtexec syntax: x:1x3x224x224 (several: a:1x3,b:1x128) "
        "(default: the model's static shapes)",
    )
    parser.add_argument("--data", help="use batches of this data instead of random inputs")
    parser.add_argument(
        "--iterations", type=flagtypes.count, default=200, help="timed calls in all"
    )
    parser.add_argument(
        "--warmup", type=flagtypes.integer(0), default=20, help="untimed calls first"
    )
    parser.add_argument(
        "--threads",
        type=flagtypes.integer(1, MAX_THREADS),
        default=1,
        help="threads calling the engine",
    )
    parser.add_argument(
        "--seed", type=flagtypes.integer(0), default=0, help="seed of the random inputs"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    add_runtime_arguments(parser)
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.data and args.shapes:
        raise UserError("--shapes and --data both give the inputs", "pass one of them")
    with load_engine(args) as engine:
        batches, source = _inputs(args, engine)
        result = measure(engine, batches, args.iterations, args.warmup, args.threads)
        breakdown = engine.bench_breakdown(batches[0], args.iterations)
        info = engine.info()
    report = {
        "model": args.model,
        **{key: value for key, value in info.items() if key != "path"},
        "inputs": source,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "threads": args.threads,
        **result,
        **({"breakdown_ms": breakdown} if breakdown else {}),
    }
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0


def _inputs(args: argparse.Namespace, engine) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The batches to cycle through, checked once here so timing sees ready feeds."""
    from trtq.runtime.base import input_shapes, parse_shapes, random_inputs

    if args.data:
        source = open_data(args, args.data, engine.tensor_specs())
        batches = [engine.check_inputs(batch) for batch in source]
        if not batches:
            raise DataError(f"{args.data} gave no batches", "pass data with at least one sample")
        first = batches[0]
        described = {
            "data": source.description,
            **{name: _shape_and_dtype(value) for name, value in first.items()},
        }
        return batches, described
    shapes = input_shapes(engine.inputs, parse_shapes(args.shapes))
    feeds = engine.check_inputs(random_inputs(engine.inputs, shapes, seed=args.seed))
    described = {"data": "random", **{n: _shape_and_dtype(v) for n, v in feeds.items()}}
    return [feeds], described


def _shape_and_dtype(array: Any) -> str:
    return f"{'x'.join(map(str, array.shape)) or 'scalar'} {array.dtype}"


def measure(
    engine, batches: list[dict[str, Any]], iterations: int, warmup: int, threads: int
) -> dict[str, Any]:
    """Latency percentiles (ms) and throughput of ``iterations`` calls over ``threads``.

    Warm-up calls run first, on one thread. Each thread gets an equal share of the calls
    and cycles through ``batches``; the threads start together (a barrier) and wall time
    runs from the start to the last thread's end.
    """
    from trtq.runtime.base import count_samples

    infer = engine.infer
    for i in range(warmup):
        infer(batches[i % len(batches)])
    shares = [iterations // threads + (t < iterations % threads) for t in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def worker(count: int, offset: int) -> tuple[list[int], int]:
        latencies, samples = [], 0
        clock = time.perf_counter_ns
        barrier.wait()
        for i in range(count):
            feeds = batches[(offset + i) % len(batches)]
            start = clock()
            infer(feeds)
            latencies.append(clock() - start)
            samples += count_samples(feeds)
        return latencies, samples

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(worker, count, t) for t, count in enumerate(shares)]
        barrier.wait()
        start = time.perf_counter()
        results = [future.result() for future in futures]
        wall = time.perf_counter() - start
    latencies_ms = np.array([ns for lat, _ in results for ns in lat], dtype=np.float64) / 1e6
    samples = sum(s for _, s in results)
    percentiles = np.percentile(latencies_ms, PERCENTILES)
    return {
        "latency_ms": {
            "mean": round(float(latencies_ms.mean()), 6),
            **{f"p{p}": round(float(v), 6) for p, v in zip(PERCENTILES, percentiles, strict=True)},
            "min": round(float(latencies_ms.min()), 6),
            "max": round(float(latencies_ms.max()), 6),
        },
        "throughput": {
            "inferences_per_s": round(iterations / wall, 3),
            "samples_per_s": round(samples / wall, 3),
        },
        "wall_seconds": round(wall, 6),
    }


def format_report(report: dict[str, Any]) -> str:
    backend = report["backend"]
    if report.get("providers"):
        backend += f": {', '.join(report['providers'])}"
    inputs = {k: v for k, v in report["inputs"].items() if k != "data"}
    lat, thr = report["latency_ms"], report["throughput"]
    threads = report["threads"]
    lines = [
        f"model       {report['model']} ({backend})",
        f"inputs      {', '.join(f'{n} {v}' for n, v in inputs.items())} "
        f"({report['inputs']['data']})",
        f"calls       {report['iterations']} after {report['warmup']} warm-up, "
        f"{threads} thread{'s' if threads != 1 else ''}",
        f"latency     mean {lat['mean']:.4f} ms, "
        + ", ".join(f"p{p} {lat[f'p{p}']:.4f}" for p in PERCENTILES)
        + f" (min {lat['min']:.4f}, max {lat['max']:.4f})",
        f"throughput  {thr['inferences_per_s']:,.1f} inferences/s, "
        f"{thr['samples_per_s']:,.1f} samples/s",
    ]
    breakdown = report.get("breakdown_ms")
    if breakdown:
        lines.append(
            "breakdown   " + ", ".join(f"{phase} {ms:.4f} ms" for phase, ms in breakdown.items())
        )
    return "\n".join(lines)
