"""onnxruntime ``quantize_static`` set up for TensorRT: QDQ, symmetric INT8 activations and
weights, per-channel weights, bias left in float (``QuantizeBias=False``).

Run by bench/fidelity.py in bench/envs/ort/ (see bench/peer_envs.py):
    python ort_runner.py MODEL CALIB_DIR OUTPUT STATS [--method MinMax|Entropy|Percentile]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_feeds, parse_args, write_stats


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    start = time.perf_counter()
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    feeds = load_feeds(args.calib)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.position = 0

        def get_next(self):
            if self.position >= len(feeds):
                return None
            self.position += 1
            return feeds[self.position - 1]

        def rewind(self) -> None:
            self.position = 0

    method = "MinMax" if args.method == "default" else args.method
    source = args.model
    if args.preprocess:  # shape inference and BatchNormalization folding, as trtq normalizes;
        # its symbolic shape inference needs sympy, which is not installed: ONNX's runs instead
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source = str(Path(args.output).with_suffix(".pre.onnx"))
        quant_pre_process(args.model, source, skip_symbolic_shape=True)
    quantize_static(
        source,
        args.output,
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
        },
    )
    write_stats(
        args.stats,
        start,
        tool_version=f"onnxruntime {onnxruntime.__version__}",
        settings=f"quantize_static {method}, QDQ, QInt8/QInt8 symmetric, per-channel, "
        "QuantizeBias=False"
        + (", quant_pre_process(skip_symbolic_shape=True)" if args.preprocess else ""),
    )


if __name__ == "__main__":
    main()
