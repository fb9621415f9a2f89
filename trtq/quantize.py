"""``quantize()``: an FP32 ONNX model in, an explicitly quantized (Q/DQ) model out.

The stages, each in its own module:

1. :func:`trtq.graph.normalize.normalize` - the canonical graph;
2. :func:`trtq.graph.qdq.plan` - which nodes and tensors to quantize;
3. :func:`trtq.calib.calibrate.calibrate` - ranges for exactly those tensors
   (or ranges reused from a stats file / TensorRT cache);
4. :func:`trtq.graph.qdq.insert` - the Q/DQ pairs;
5. checks: ``onnx.checker`` and an ONNX Runtime session on the result.

The report lists every quantized tensor, every compute node left in float with
its reason, and the coverage: the share of multiply-accumulates that run in
reduced precision, because fidelity bought by leaving compute in float is not
fidelity.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from trtq import __version__
from trtq.calib.cache import CalibrationStats, TrtCache
from trtq.calib.calibrate import calibrate, choose_ranges
from trtq.calib.collect import Batch
from trtq.calib.ranges import DEFAULT_METHOD, TensorRange
from trtq.errors import ModelError, UserError
from trtq.graph import qdq
from trtq.graph.inspect import summarize
from trtq.graph.load import check_model
from trtq.graph.normalize import export, normalize, upgrade_opset
from trtq.graph.shapes import Shapes, macs

log = logging.getLogger(__name__)

#: Opset that introduced float8 QuantizeLinear/DequantizeLinear.
FP8_MIN_OPSET = 19


@dataclass(frozen=True)
class CalibrationOptions:
    method: str = DEFAULT_METHOD
    percentile: float = 99.99
    max_memory: int | None = None
    providers: Sequence[str] | None = None
    progress: bool = True


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    plan: qdq.QuantPlan
    ranges: dict[str, TensorRange]
    stats: CalibrationStats | None
    report: dict = field(default_factory=dict)


def quantize(
    model: onnx.ModelProto,
    batches: Iterable[Batch] | None = None,
    *,
    placement: qdq.PlacementOptions | None = None,
    calibration: CalibrationOptions | None = None,
    stats: CalibrationStats | None = None,
    cache: TrtCache | None = None,
) -> QuantizeResult:
    """Quantize ``model``; ranges come from ``batches``, or from ``stats`` or ``cache`` if given."""
    placement = placement or qdq.PlacementOptions()
    calibration = calibration or CalibrationOptions()
    if placement.precision not in qdq.PRECISIONS:
        raise UserError(
            f"unknown precision {placement.precision!r}", f"use one of {', '.join(qdq.PRECISIONS)}"
        )
    _refuse_quantized(model)
    check_model(model)
    model = normalize(model)
    if placement.precision == "fp8":
        model = upgrade_opset(model, FP8_MIN_OPSET)
    example = next(iter(batches), None) if batches is not None else None
    shapes = Shapes(model, example, per_sample=True)
    node_macs = {node.name: macs(node, shapes) for node in model.graph.node}
    graph = gs.import_onnx(model)
    plan = qdq.plan(graph, node_macs, placement)
    ranges, stats = _ranges(model, plan.activations(), batches, calibration, stats, cache)
    plan = plan.with_ranges(ranges)
    graph = qdq.insert(graph, plan, ranges, placement.precision)
    quantized = export(graph, like=model)
    _verify(quantized)
    report = build_report(plan, ranges, placement, calibration, stats)
    return QuantizeResult(quantized, plan, ranges, stats, report)


def _refuse_quantized(model: onnx.ModelProto) -> None:
    summary = summarize(model)
    if summary.already_quantized:
        ops = ", ".join(f"{op} x{n}" for op, n in summary.quantized_ops.items())
        raise ModelError(
            f"the model is already quantized ({ops}); quantizing again would stack scales",
            "build it directly: TensorRT reads its Q/DQ nodes as they are",
        )


def _ranges(
    model: onnx.ModelProto,
    tensors: list[str],
    batches: Iterable[Batch] | None,
    options: CalibrationOptions,
    stats: CalibrationStats | None,
    cache: TrtCache | None,
) -> tuple[dict[str, TensorRange], CalibrationStats | None]:
    """Ranges for ``tensors``: from a TensorRT cache, a stats file, or a fresh calibration."""
    if cache is not None:
        missing = [t for t in tensors if t not in cache.scales]
        _require_all(missing, "the calibration cache", "--cache")
        ranges = {
            t: TensorRange(t, cache.scales[t] * 127.0, f"cache ({cache.algorithm})")
            for t in tensors
        }
        return ranges, None
    if stats is None:
        if batches is None:
            raise UserError("no calibration data", "pass --calib DATA (or --stats / --cache)")
        stats = calibrate(
            model,
            batches,
            tensors=tensors,
            method=options.method,
            percentile=options.percentile,
            max_memory=options.max_memory,
            providers=options.providers,
            progress=options.progress,
        )
    else:
        _require_all([t for t in tensors if t not in stats.histograms], "the stats file", "--stats")
        stats.ranges = choose_ranges(stats, options.method, options.percentile)
    return dict(stats.ranges), stats


def _require_all(missing: list[str], what: str, flag: str) -> None:
    if missing:
        raise UserError(
            f"{what} has no range for {len(missing)} tensor(s) to quantize, e.g. {missing[0]}",
            f"recalibrate for this model and these options, or drop {flag}",
        )


def _verify(model: onnx.ModelProto) -> None:
    """The result must pass the ONNX checker and load in ONNX Runtime, or it is not written."""
    check_model(model, full=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types per failure
        raise RuntimeError(f"ONNX Runtime cannot load the quantized model: {exc}") from exc


def build_report(
    plan: qdq.QuantPlan,
    ranges: Mapping[str, TensorRange],
    placement: qdq.PlacementOptions,
    calibration: CalibrationOptions,
    stats: CalibrationStats | None,
) -> dict:
    """The machine-readable account of what was quantized, what was not, and why."""
    roles = {t: "activation" for t in plan.activations()}
    roles.update(plan.fusion_tensors)
    return {
        "trtq_version": __version__,
        "precision": placement.precision,
        "method": calibration.method,
        "coverage": plan.coverage(),
        "quantized_tensors": [
            {**ranges[t].to_json(), "role": roles[t]} for t in plan.activations()
        ],
        "quantized_nodes": [d.to_json() for d in plan.decisions if d.quantized],
        "float_nodes": [
            {"name": d.name, "op": d.op, "macs": d.macs, "reason": d.reason}
            for d in plan.decisions
            if not d.quantized
        ],
        "calibration": None
        if stats is None
        else {"samples": stats.num_samples, "batches": stats.num_batches},
    }
