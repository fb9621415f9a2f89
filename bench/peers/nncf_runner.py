"""Intel NNCF post-training quantization of the ONNX model, made TensorRT-deployable.

NNCF's defaults (preset PERFORMANCE: symmetric weights and activations, per-channel weights,
fast bias correction), ``model_type=TRANSFORMER`` with ``--transformer``. NNCF writes UINT8
activations where a range is non-negative; those pairs are rewritten as signed INT8 with zero
point 0 (signed_qdq.py) so that TensorRT accepts them; the stats say how many.

Run by bench/fidelity.py in bench/envs/nncf/:
    python nncf_runner.py MODEL CALIB_DIR OUTPUT STATS [--transformer]
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
    import nncf
    import onnx
    from signed_qdq import uint8_to_int8

    model = onnx.load(args.model)
    feeds = load_feeds(args.calib)
    options = {"subset_size": len(feeds)}  # one item = one model call
    if args.transformer:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(model, nncf.Dataset(feeds), **options)
    converted = uint8_to_int8(quantized)
    onnx.save(quantized, args.output)
    write_stats(
        args.stats,
        start,
        tool_version=f"nncf {nncf.__version__}",
        settings="nncf.quantize defaults (PERFORMANCE preset, fast bias correction)"
        + (", model_type=TRANSFORMER" if args.transformer else ""),
        uint8_pairs_made_int8=converted,
    )


if __name__ == "__main__":
    main()
