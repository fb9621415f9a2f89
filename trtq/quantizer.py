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
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtq import __version__
from trtq.calib.cache import CalibrationStats, TrtCache
from trtq.calib.calibrate import calibrate, choose_ranges
from trtq.calib.collect import Batch, observe_shapes, peek
from trtq.calib.ranges import DEFAULT_METHOD, TensorRange
from trtq.errors import ModelError, UserError
from trtq.graph import fp16, qdq
from trtq.graph.inspect import summarize
from trtq.graph.load import check_model
from trtq.graph.normalize import export, infer_shapes, normalize, upgrade_opset
from trtq.graph.patterns import COMPUTE_OPS, float_activations
from trtq.graph.shapes import RECURRENT_OPS, Shapes, macs
from trtq.graph.walk import all_nodes
from trtq.report.verify import numeric_check

log = logging.getLogger(__name__)

#: Opset that introduced float8 QuantizeLinear/DequantizeLinear.
FP8_MIN_OPSET = 19
#: Opset from which Conv, pooling and most math ops accept bfloat16.
BF16_MIN_OPSET = 22


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


#: Q/DQ placement used when the caller does not say otherwise.
DEFAULT_PLACEMENT = qdq.PlacementOptions()


def quantize(
    model: onnx.ModelProto,
    batches: Iterable[Batch] | None = None,
    *,
    placement: qdq.PlacementOptions | None = DEFAULT_PLACEMENT,
    mixed: fp16.MixedPrecisionOptions | None = None,
    calibration: CalibrationOptions | None = None,
    stats: CalibrationStats | None = None,
    cache: TrtCache | None = None,
    frozen: Mapping[str, np.ndarray] | None = None,
) -> QuantizeResult:
    """Quantize ``model``: Q/DQ per ``placement`` (None: none), then FP16/BF16 per ``mixed``.

    Ranges come from ``batches``, or from ``stats`` or ``cache`` if given. With
    ``mixed``, every float activation is observed too, so that nodes with
    activations beyond FP16's comfort stay FP32. ``frozen`` inputs become
    constants (see :func:`trtq.graph.normalize.freeze_inputs`).
    """
    calibration = calibration or CalibrationOptions()
    if placement is None and mixed is None:
        raise UserError("nothing to do: no INT8/FP8 placement and no FP16/BF16", "pick a precision")
    if placement is not None and placement.precision not in qdq.PRECISIONS:
        raise UserError(
            f"unknown precision {placement.precision!r}", f"use one of {', '.join(qdq.PRECISIONS)}"
        )
    _refuse_quantized(model)
    check_model(model)
    model = normalize(model, frozen=frozen)
    if (placement is not None and placement.precision == "fp8") or (placement and mixed):
        # FP8 Q/DQ, and Q/DQ whose scales are FP16/BF16, need opset 19.
        model = upgrade_opset(model, FP8_MIN_OPSET)
    if mixed is not None and mixed.precision == "bf16":
        model = _upgrade_for_bf16(model)
    example, batches = peek(batches) if batches is not None else (None, None)
    shapes = Shapes(model, example, per_sample=True, observed=_observed(model, example))
    node_macs = {node.name: macs(node, shapes) for node in all_nodes(model.graph)}
    graph = gs.import_onnx(model)
    plan = qdq.plan(graph, node_macs, placement) if placement else qdq.QuantPlan([])
    observed = plan.activations()
    if mixed is not None and batches is not None and stats is None and cache is None:
        observed = list(dict.fromkeys([*observed, *float_activations(model)]))
    ranges, stats = _ranges(model, observed, batches, calibration, stats, cache)
    if placement is not None:
        plan = plan.with_ranges(ranges, graph)
        graph = qdq.insert(graph, plan, ranges, placement.precision)
    result = infer_shapes(export(graph, like=model))
    precision_plan = None
    if mixed is not None:
        # A tensor with mask fills (-3.4e38, -inf) is as far out of FP16's range as it gets.
        amax = (
            {n: math.inf if h.sentinel_count else h.amax for n, h in stats.histograms.items()}
            if stats
            else {}
        )
        precision_plan = fp16.plan_precision(result, mixed, amax, Shapes(result, example))
        result = infer_shapes(fp16.convert(result, precision_plan, mixed))
    check_model(result, full=True)
    verification = numeric_check(model, result, example, sum(node_macs.values()))
    report = build_report(plan, ranges, placement, calibration, stats)
    if mixed is not None:
        report["mixed_precision"] = _mixed_report(
            mixed, precision_plan, node_macs, plan, ranges, stats
        )
    report["verification"] = verification
    if not verification["outputs"] and not verification["backend"].startswith("none"):
        raise RuntimeError("the rewritten model produced no comparable outputs")
    return QuantizeResult(result, plan, ranges, stats, report)


def _observed(model: onnx.ModelProto, example: Batch | None) -> dict[str, tuple[int, ...]]:
    """Real shapes of the compute ops' operands and results, from one sample (for MACs)."""
    if example is None:
        return {}
    compute = [n for n in model.graph.node if n.op_type in COMPUTE_OPS | RECURRENT_OPS]
    return observe_shapes(
        model, [t for n in compute for t in (*n.input[:2], *n.output[:1])], example
    )


def _upgrade_for_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv, pooling and most math ops accept bfloat16 only from opset 22 on."""
    try:
        return upgrade_opset(model, BF16_MIN_OPSET)
    except ModelError as exc:
        log.warning("%s; ops without BF16 at this opset stay FP32", exc.problem)
        return model


def _mixed_report(
    options: fp16.MixedPrecisionOptions,
    plan: fp16.PrecisionPlan,
    node_macs: Mapping[str, int],
    qdq_plan: qdq.QuantPlan,
    ranges: Mapping[str, TensorRange],
    stats: CalibrationStats | None,
) -> dict:
    """FP16/BF16 part of the report: FP32 islands with reasons, and reduced-precision coverage."""
    quantized = {d.name for d in qdq_plan.decisions if d.quantized}
    total = sum(node_macs.values())
    reduced = sum(
        m for n, m in node_macs.items() if n in quantized or plan.reasons.get(n, "") is None
    )
    return {
        "precision": options.precision,
        "keep_io_types": options.keep_io_types,
        "activation_limit": options.activation_limit,
        "activations_observed": stats is not None,
        "fp32_nodes": [{"name": n, "reason": why} for n, why in plan.fp32_nodes().items()],
        "reduced_precision_nodes": sum(why is None for why in plan.reasons.values()),
        "coverage": {
            "reduced_macs": reduced,
            "total_macs": total,
            "fraction": reduced / total if total else 0.0,
        },
    }


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
    if not tensors:
        return {}, stats
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


def build_report(
    plan: qdq.QuantPlan,
    ranges: Mapping[str, TensorRange],
    placement: qdq.PlacementOptions | None,
    calibration: CalibrationOptions,
    stats: CalibrationStats | None,
) -> dict:
    """The machine-readable account of what was quantized, what was not, and why."""
    roles = {t: "activation" for t in plan.activations()}
    roles.update({name: use.reason for name, use in plan.fusion_tensors.items()})
    return {
        "trtq_version": __version__,
        "precision": placement.precision if placement else None,
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
