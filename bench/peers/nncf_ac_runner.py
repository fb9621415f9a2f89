"""Intel NNCF's accuracy control: the most INT8 that keeps a validation metric, TensorRT-deployable.

``nncf.quantize_with_accuracy_control`` quantizes like ``nncf.quantize`` (PERFORMANCE preset,
fast bias correction), validates the result, and if the metric dropped more than ``max_drop``
reverts the most harmful quantizer groups to float, one per iteration, until it holds. The
metric here is trtq's ``--target-cosine`` measure, so both tools answer the same question:
the mean over the validation samples of each sample's output cosine against the FP32 model
(the worst output's, with several), computed as ``trtq.report.metrics.per_sample_cosine``
does (float64, all-zero pairs count as 1). FP32 scores 1.0, so ``max_drop`` 0.005 (absolute)
is ``--target-cosine 0.995``. Per-sample values are returned too, which NNCF uses to rank
quantizers on the samples that differ most.

Activations are quantized per tensor (``per_channel=False``): NNCF's default quantizes the
inputs of depthwise convolutions per channel, which TensorRT cannot run. UINT8 pairs are then
rewritten as signed INT8 (signed_qdq.py), after NNCF's own validation, as nncf_runner.py does;
the model as NNCF validated it is written next to OUTPUT too (``NAME.nncf.onnx``), so that the
bench can tell what the rewrite costs.

Run by bench/accuracy_budget.py in bench/envs/nncf/:
    python nncf_ac_runner.py MODEL CALIB_DIR EVAL_DIR OUTPUT STATS [--max-drop D] [--transformer]
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_feeds, write_stats


def per_sample_cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Each sample's cosine over its flattened values, float64, by trtq's rules (see docstring)."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    dot = np.einsum("ij,ij->i", ref, cand)
    ref_sq = np.einsum("ij,ij->i", ref, ref)
    cand_sq = np.einsum("ij,ij->i", cand, cand)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = dot / np.sqrt(ref_sq * cand_sq)
    cosine = np.where((ref_sq == 0) | (cand_sq == 0), 0.0, cosine)
    cosine = np.where((ref_sq == 0) & (cand_sq == 0), 1.0, cosine)
    return np.clip(cosine, -1.0, 1.0)


class CosineValidation:
    """NNCF's ``validation_fn``: (mean cosine vs FP32, one value per item); counts its calls.

    A validation item is the index of an evaluation feed; the FP32 outputs on every feed are
    computed once, up front. The candidate runs in ONNX Runtime with basic graph optimizations
    (Q/DQ as fake quantization), as the bench's evaluation runs every model. Calls on
    quantized candidates are counted (not NNCF's validations of the FP32 model itself).
    """

    def __init__(self, model, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.calls = 0  # on quantized candidates; NNCF also validates the FP32 model
        self.items = 0
        self.reference = self._outputs(model, range(len(feeds)))

    def _outputs(self, model, indices) -> list[list[np.ndarray]]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return [session.run(None, self.feeds[i]) for i in indices]

    def __call__(self, model, items) -> tuple[float, list[float]]:
        indices = [int(i) for i in items]
        if any(node.op_type == "QuantizeLinear" for node in model.graph.node):
            self.calls += 1
            self.items += len(indices)
        outputs = self._outputs(model, indices)
        # per_item[i][k]: output k's mean cosine over the samples of feed indices[i].
        per_item = np.array(
            [
                [
                    per_sample_cosine(ref, cand).mean()
                    for ref, cand in zip(self.reference[i], got, strict=True)
                ]
                for i, got in zip(indices, outputs, strict=True)
            ]
        )
        metric = float(per_item.mean(axis=0).min())  # the worst output's mean
        return metric, [float(value) for value in per_item.min(axis=1)]


class RestorerLog(logging.Handler):
    """What NNCF's accuracy restorer says it did, read off its log (it returns only the model):
    how many operations it reverted to float, and whether it gave up on the target."""

    REVERTED = re.compile(r"(\d+) out of (\d+) were reverted")

    def __init__(self) -> None:
        super().__init__()
        self.reverted: int | None = None
        self.quantized_operations: int | None = None
        self.gave_up = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        found = self.REVERTED.search(message)
        if found:
            self.reverted, self.quantized_operations = int(found[1]), int(found[2])
        if "could not achieve the required accuracy drop" in message:
            self.gave_up = True


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("calib", help="folder of .npz feeds: calibration")
    parser.add_argument("eval", help="folder of .npz feeds: validation (one sample each is best)")
    parser.add_argument("output", help="the quantized ONNX model to write")
    parser.add_argument("stats", help="JSON file for wall time, peak RSS and notes")
    parser.add_argument("--max-drop", type=float, default=0.005, help="absolute drop of the metric")
    parser.add_argument("--transformer", action="store_true", help="the model is a transformer")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        QuantizationParameters,
    )
    from signed_qdq import uint8_to_int8

    model = onnx.load(args.model)
    calib = load_feeds(args.calib)
    feeds = load_feeds(args.eval)
    validation = CosineValidation(model, feeds)
    restorer = RestorerLog()
    logging.getLogger("nncf").addHandler(restorer)
    options = {"subset_size": len(calib)}  # one item = one model call
    if args.transformer:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(calib),
        nncf.Dataset(list(range(len(feeds))), lambda index: feeds[index]),
        validation,
        max_drop=args.max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        advanced_quantization_parameters=AdvancedQuantizationParameters(
            activations_quantization_params=QuantizationParameters(per_channel=False)
        ),
        **options,
    )
    # What NNCF's validation saw, before the INT8 rewrite: the bench evaluates both.
    onnx.save(quantized, args.output.removesuffix(".onnx") + ".nncf.onnx")
    converted = uint8_to_int8(quantized)
    onnx.save(quantized, args.output)
    write_stats(
        args.stats,
        start,
        tool_version=f"nncf {nncf.__version__}",
        settings=(
            f"nncf.quantize_with_accuracy_control(max_drop={args.max_drop}, "
            "drop_type=ABSOLUTE, subset_size=calibration feeds) with activations per tensor "
            "(QuantizationParameters(per_channel=False)); PERFORMANCE preset, fast bias "
            "correction; metric: mean output cosine vs FP32 on the validation feeds"
            + (", model_type=TRANSFORMER" if args.transformer else "")
        ),
        validation_calls=validation.calls,
        validation_items=validation.items,
        validation_feeds=len(feeds),
        # None: the first quantized model met the target, the restorer never ran.
        reverted_operations=restorer.reverted,
        quantized_operations=restorer.quantized_operations,
        restorer_gave_up=restorer.gave_up,
        uint8_pairs_made_int8=converted,
    )


if __name__ == "__main__":
    main()
