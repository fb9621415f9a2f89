"""Intel NNCF post-training quantization of the ONNX model, made TensorRT-deployable.

Two settings (``--method``):

* ``default``: NNCF's defaults (preset PERFORMANCE: symmetric weights and activations,
  per-channel weights, fast bias correction). NNCF may then quantize some activations per
  channel (e.g. the inputs of depthwise Convs in MobileNetV3-like models), which TensorRT does
  not take: the bench's invariant check marks such a model as not deployable.
* ``per-tensor``: the same, with activations forced per tensor
  (``activations_quantization_params=QuantizationParameters(per_channel=False)``), the setting
  TensorRT can deploy.

``model_type=TRANSFORMER`` with ``--transformer``. NNCF writes UINT8 activations where a range
is non-negative; those pairs are rewritten as signed INT8 with zero point 0 (signed_qdq.py) so
that TensorRT accepts them; the stats say how many.

Run by bench/fidelity.py in bench/envs/nncf/:
    python nncf_runner.py MODEL CALIB_DIR OUTPUT STATS [--method default|per-tensor]
        [--transformer]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_feeds, parse_args, write_stats

METHODS = ("default", "per-tensor")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], METHODS)
    start = time.perf_counter()
    import nncf
    import onnx
    from signed_qdq import uint8_to_int8

    model = onnx.load(args.model)
    feeds = load_feeds(args.calib)
    options = {"subset_size": len(feeds)}  # one item = one model call
    settings = "nncf.quantize defaults (PERFORMANCE preset, fast bias correction)"
    if args.method == "per-tensor":
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            QuantizationParameters,
        )

        options["advanced_parameters"] = AdvancedQuantizationParameters(
            activations_quantization_params=QuantizationParameters(per_channel=False)
        )
        settings += ", activations per tensor (QuantizationParameters(per_channel=False))"
    if args.transformer:
        options["model_type"] = nncf.ModelType.TRANSFORMER
        settings += ", model_type=TRANSFORMER"
    quantized = nncf.quantize(model, nncf.Dataset(feeds), **options)
    converted = uint8_to_int8(quantized)
    onnx.save(quantized, args.output)
    write_stats(
        args.stats,
        start,
        tool_version=f"nncf {nncf.__version__}",
        settings=settings,
        uint8_pairs_made_int8=converted,
    )


if __name__ == "__main__":
    main()
