"""Benchmark: per-call overhead of trtq's ONNX Runtime backend over a raw ``session.run``.

Why: ``trtq.load("model.onnx")`` puts input checks and a dict of outputs around
``InferenceSession.run``. Serving small models at batch 1 is where such a wrapper
shows, so this measures it there: the embedded MNIST CNN (``calib_data/mnist_cnn.onnx``),
one real test digit as float32 ``[1, 1, 28, 28]``.

How: both paths call the *same* ``InferenceSession`` (the engine's), in the same
process, so the difference is the wrapper and nothing else (no second session, thread
pool or graph optimization to differ):

* raw: ``session.run(None, {"input": x})``;
* trtq: ``engine.infer({"input": x})`` (checks, ``run`` with precomputed output names,
  outputs as a dict).

After a warm-up, ``--rounds`` rounds alternate which path goes first; in each round each
path makes ``--calls`` calls timed together with ``time.perf_counter_ns``. Per-call time
is the round's total / calls; reported figures are medians over rounds, and the overhead
is the median of the per-round differences (trtq - raw), which cancels drift (frequency
scaling, other load) shared by a round. Also shown: the checks alone
(``engine.check_inputs``), and the uint8 input path, which adds a cast to float32.

Target: overhead <= max(5% of raw, 20 µs) per call. Prints PASS/FAIL; exits 0 either
way (a measurement, not a test). ``--json`` prints the figures as JSON.
Run ``.venv/bin/python bench/runtime.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trtq  # noqa: E402  (the checkout's trtq, installed or not)

MODEL = REPO / "calib_data" / "mnist_cnn.onnx"
TEST_DATA = REPO / "calib_data" / "mnist_test.npz"
TARGET_PERCENT = 5.0
TARGET_MICROSECONDS = 20.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=300, help="calls per path per round")
    parser.add_argument("--warmup", type=int, default=300, help="untimed calls per path first")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    with np.load(TEST_DATA, allow_pickle=False) as data:
        digit = data["input"][:1]
    x = digit.astype(np.float32)
    engine = trtq.load(MODEL)
    session = engine.session
    feeds = {"input": x}
    feeds_uint8 = {"input": digit}
    assert np.array_equal(session.run(None, feeds)[0], engine.infer(feeds)["logits"])

    paths: dict[str, Callable[[], object]] = {
        "raw": lambda: session.run(None, feeds),
        "trtq": lambda: engine.infer(feeds),
        "trtq_uint8": lambda: engine.infer(feeds_uint8),
        "checks_only": lambda: engine.check_inputs(feeds),
    }
    for call in paths.values():
        for _ in range(args.warmup):
            call()
    per_round: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for round_index in range(args.rounds):
        for name in order if round_index % 2 == 0 else reversed(order):
            per_round[name].append(_time_calls(paths[name], args.calls))

    raw = statistics.median(per_round["raw"])
    trtq_us = statistics.median(per_round["trtq"])
    overhead = statistics.median(
        t - r for t, r in zip(per_round["trtq"], per_round["raw"], strict=True)
    )
    budget = max(TARGET_PERCENT / 100 * raw, TARGET_MICROSECONDS)
    result = {
        "model": str(MODEL.relative_to(REPO)),
        "input": "input 1x1x28x28 float32 (one real MNIST test digit)",
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "raw_us": round(raw, 2),
        "trtq_us": round(trtq_us, 2),
        "overhead_us": round(overhead, 2),
        "overhead_percent": round(100 * overhead / raw, 2),
        "checks_only_us": round(statistics.median(per_round["checks_only"]), 3),
        "trtq_uint8_us": round(statistics.median(per_round["trtq_uint8"]), 2),
        "target": f"overhead <= max({TARGET_PERCENT:g}% of raw, {TARGET_MICROSECONDS:g} us) "
        f"= {budget:.2f} us",
        "passed": overhead <= budget,
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_table(result))
    return 0


def _time_calls(call: Callable[[], object], calls: int) -> float:
    """Mean microseconds per call over ``calls`` back-to-back calls."""
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(calls):
        call()
    return (clock() - start) / calls / 1000


def _table(r: dict) -> str:
    return "\n".join(
        [
            f"trtq ONNX Runtime backend vs raw InferenceSession.run: {r['model']}, {r['input']}",
            f"onnxruntime {r['onnxruntime']}, numpy {r['numpy']}, Python {r['python']}, "
            f"{r['cpus']} CPUs; {r['rounds']} interleaved rounds x {r['calls_per_round']} calls",
            "",
            f"  raw session.run          {r['raw_us']:9.2f} us/call",
            f"  trtq engine.infer        {r['trtq_us']:9.2f} us/call",
            f"  overhead (trtq - raw)    {r['overhead_us']:9.2f} us  "
            f"({r['overhead_percent']:.2f}%)",
            f"  checks alone             {r['checks_only_us']:9.3f} us/call",
            f"  trtq with uint8 input    {r['trtq_uint8_us']:9.2f} us/call (cast to float32)",
            "",
            f"{'PASS' if r['passed'] else 'FAIL'}: {r['target']}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
