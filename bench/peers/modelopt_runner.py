"""NVIDIA ModelOpt ONNX PTQ on CPU: INT8, calibration on onnxruntime's CPU provider, float
parts in FP32 (``high_precision_dtype='fp32'``; its default fp16 is a TensorRT build choice,
not a quantization one, and would blur the comparison).

Run by bench/fidelity.py in bench/envs/modelopt/:
    python modelopt_runner.py MODEL CALIB_DIR OUTPUT STATS [--method max|entropy]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_feeds, parse_args, write_stats


def per_call_rows(feed: dict) -> dict:
    """A whole feed (a sequence and its state, e.g. a VAD's input [T, 576] with h, c [1, 1, 128])
    as ModelOpt can take it: its inputs must split along axis 0 together, so a one-row input
    (the state) is repeated for every row of the longest. ModelOpt then runs each row as its own
    call from that state: it cannot carry state from call to call."""
    import numpy as np

    rows = max(len(array) for array in feed.values())
    return {
        name: np.repeat(array, rows, axis=0) if len(array) == 1 and rows > 1 else array
        for name, array in feed.items()
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    start = time.perf_counter()
    from importlib.metadata import version

    import numpy as np
    from modelopt.onnx.quantization import quantize

    feeds = [per_call_rows(feed) for feed in load_feeds(args.calib)]
    names = list(feeds[0])
    # ModelOpt takes the calibration set as arrays keyed by input name and splits it along the
    # first axis into calls of the model's own batch size (unknown dims as 1).
    data = {name: np.concatenate([feed[name] for feed in feeds]) for name in names}
    method = "max" if args.method == "default" else args.method
    quantize(
        onnx_path=args.model,
        quantize_mode="int8",
        calibration_data=data,
        calibration_method=method,
        calibration_eps=["cpu"],
        high_precision_dtype="fp32",
        output_path=args.output,
    )
    write_stats(
        args.stats,
        start,
        tool_version=f"nvidia-modelopt {version('nvidia-modelopt')}",
        settings=f"modelopt.onnx.quantization.quantize int8, calibration_method={method}, "
        "calibration_eps=['cpu'], high_precision_dtype='fp32'",
    )


if __name__ == "__main__":
    main()
