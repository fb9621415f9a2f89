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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from trtq import __version__
from trtq.calib import bias_correction, range_search
from trtq.calib.bias_correction import BiasCorrector
from trtq.calib.cache import CalibrationStats, TrtCache
from trtq.calib.calibrate import calibrate, choose_ranges
from trtq.calib.collect import Batch, Collector, batch_size, observe_shapes, peek
from trtq.calib.ranges import DEFAULT_METHOD, TensorRange
from trtq.calib.scope import (
    CalibrationScope,
    check_reused,
    frozen_json,
    model_fingerprint,
    placement_json,
    planning_graph,
)
from trtq.errors import ModelError, UserError
from trtq.graph import coverage, fp16, invariants, qdq, smooth
from trtq.graph.equalize import equalize
from trtq.graph.inspect import summarize
from trtq.graph.load import check_model
from trtq.graph.normalize import infer_shapes, upgrade_opset
from trtq.graph.patterns import COMPUTE_OPS, float_activations
from trtq.graph.shapes import RECURRENT_OPS, Shapes, macs
from trtq.graph.walk import all_nodes
from trtq.report.verify import FidelityOptions, SampleKeeper, Verification, verify

if TYPE_CHECKING:
    from trtq.tune.fallback import Budget

log = logging.getLogger(__name__)

#: Opset from which Conv, pooling and most math ops accept bfloat16.
BF16_MIN_OPSET = 22


#: Weight algorithms on by default only where bench/weight_algorithms.py measured a gain.
DEFAULT_EQUALIZE = False
DEFAULT_BIAS_CORRECTION = False
#: SmoothQuant: None smooths only activations with outlier channels (graph.smooth).
DEFAULT_SMOOTH_QUANT: bool | None = None


@dataclass(frozen=True)
class CalibrationOptions:
    method: str = DEFAULT_METHOD
    percentile: float = 99.99
    max_memory: int | None = None
    providers: Sequence[str] | None = None
    progress: bool = True
    #: What observes the activations (None: this process; see trtq.calib.ray_backend).
    collector: Collector | None = None
    #: Cross-layer equalization of Conv -> Conv chains before calibration (graph.equalize).
    equalize: bool = DEFAULT_EQUALIZE
    #: Each quantized layer's mean output shift folded into its bias (calib.bias_correction).
    bias_correction: bool = DEFAULT_BIAS_CORRECTION
    #: SmoothQuant of MatMul/Gemm inputs (graph.smooth): True, False, or None for automatic
    #: (only activations with outlier channels; off when ranges are reused).
    smooth_quant: bool | None = DEFAULT_SMOOTH_QUANT
    smooth_alpha: float = smooth.DEFAULT_ALPHA


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    plan: qdq.QuantPlan
    ranges: dict[str, TensorRange]
    stats: CalibrationStats | None
    report: dict = field(default_factory=dict)
    #: The check after writing: figures against FP32, the data used, floor and gates.
    verification: Verification | None = None

    @property
    def passed(self) -> bool:
        """Every fidelity gate that was asked for passed (True when none was)."""
        return self.verification is None or self.verification.passed


#: Q/DQ placement used when the caller does not say otherwise.
DEFAULT_PLACEMENT = qdq.PlacementOptions()


@dataclass
class Prepared:
    """The pipeline up to the Q/DQ insertion: the graph as planned, its plan and its ranges."""

    model: onnx.ModelProto  # the planning graph: normalised, frozen inputs folded
    graph: gs.Graph
    plan: qdq.QuantPlan  # nodes whose range is unusable already left in float
    ranges: dict[str, TensorRange]  # one per tensor, shared within range groups
    stats: CalibrationStats | None
    node_macs: dict[str, int]
    example: Batch | None
    placement: qdq.PlacementOptions | None
    mixed: fp16.MixedPrecisionOptions | None
    #: The first samples of the data, kept for the check after writing (None: not asked).
    kept: SampleKeeper | None = None
    #: ``--method auto``: how each range was chosen by output error (range_search.SearchResult).
    range_search: dict | None = None
    #: What cross-layer equalization did (None: not asked).
    equalization: dict | None = None
    #: Calibration samples bias correction measures on (None: not asked, or no data).
    bias_samples: SampleKeeper | None = None
    #: What SmoothQuant did (None: not asked, or nothing to smooth).
    smoothing: dict | None = None


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
    fidelity: FidelityOptions | None = None,
    budget: Budget | None = None,
) -> QuantizeResult:
    """Quantize ``model``: Q/DQ per ``placement`` (None: none), then FP16/BF16 per ``mixed``.

    Ranges come from ``batches``, or from ``stats`` or ``cache`` if given. With
    ``mixed``, every float activation is observed too, so that nodes with
    activations beyond FP16's comfort stay FP32. ``frozen`` inputs become
    constants (see :func:`trtq.graph.normalize.freeze_inputs`).

    The result is checked against the FP32 model on the first samples of ``batches``, kept
    as calibration reads them (``fidelity.samples``, or as many as
    :data:`trtq.report.verify.CHECK_MACS` allows); its gates are recorded in
    ``result.verification``, and the caller decides what a failed one means.

    With a ``budget`` (:class:`trtq.tune.fallback.Budget`), nodes move to the high
    precision until its target holds on its evaluation data (by default held out of
    ``batches``, which then never set a range); the check runs on that data, and
    ``report["fallback"]`` lists every step.
    """
    calibration = calibration or CalibrationOptions()
    fidelity = fidelity or FidelityOptions()
    if fidelity.gated and batches is None:
        raise UserError(
            "a fidelity gate (--min-cosine/--max-rel-l2) needs data to compare with FP32",
            "pass --calib DATA too (ranges still come from --stats/--cache)",
        )
    if placement is None and mixed is None:
        raise UserError("nothing to do: no INT8/FP8 placement and no FP16/BF16", "pick a precision")
    if placement is not None and placement.precision not in qdq.PRECISIONS:
        raise UserError(
            f"unknown precision {placement.precision!r}", f"use one of {', '.join(qdq.PRECISIONS)}"
        )
    evaluation = None
    if budget is not None:
        if placement is None:
            raise UserError(
                "a fidelity target moves INT8/FP8 nodes to high precision, and there are none",
                "use --precision int8 or fp8",
            )
        batches, evaluation = budget.split(batches, model)
    check = fidelity if evaluation is None else None
    prepared = prepare(
        model,
        batches,
        placement=placement,
        mixed=mixed,
        calibration=calibration,
        stats=stats,
        cache=cache,
        frozen=frozen,
        check=check,
    )
    model, plan, ranges, stats = prepared.model, prepared.plan, prepared.ranges, prepared.stats
    node_macs = prepared.node_macs
    search = budget.search(prepared, evaluation) if budget and evaluation else None
    if search is not None:
        plan = search.plan
    corrector = None
    if prepared.bias_samples is not None:
        samples = prepared.bias_samples.samples()
        corrector = BiasCorrector(model, samples, calibration.providers)
    result, precision_plan = lower(
        model,
        plan,
        ranges,
        placement.precision if placement is not None else None,
        mixed,
        fp16_limits(stats),
        prepared.example,
        correct=corrector,
    )
    check_model(result, full=True)
    invariants.verify_written(result, {d.name for d in plan.decisions if d.quantized})
    checked = prepared.kept
    if evaluation is not None:  # checked on every sample the target was met on
        checked = evaluation.keeper(model)
        fidelity = replace(fidelity, samples=checked.limit)
    verification = verify(model, result, checked, sum(node_macs.values()), fidelity)
    report = build_report(
        plan, ranges, placement, calibration, stats, coverage.measure(result, node_macs)
    )
    if mixed is not None:
        report["mixed_precision"] = _mixed_report(
            mixed, precision_plan, node_macs, plan, ranges, stats
        )
    if prepared.range_search is not None:
        report["range_search"] = prepared.range_search
    if prepared.equalization is not None:
        report["equalization"] = prepared.equalization
    if prepared.smoothing is not None:
        report["smooth_quant"] = prepared.smoothing
    if corrector is not None and corrector.record is not None:
        report["bias_correction"] = corrector.record.to_json()
    if search is not None:
        report["fallback"] = search.to_json()
    report["verification"] = verification.to_json()
    if not verification.outputs and not verification.backend.startswith("none"):
        raise RuntimeError("the rewritten model produced no comparable outputs")
    return QuantizeResult(result, plan, ranges, stats, report, verification)


def prepare(
    model: onnx.ModelProto,
    batches: Iterable[Batch] | None,
    *,
    placement: qdq.PlacementOptions | None,
    mixed: fp16.MixedPrecisionOptions | None,
    calibration: CalibrationOptions,
    stats: CalibrationStats | None = None,
    cache: TrtCache | None = None,
    frozen: Mapping[str, np.ndarray] | None = None,
    check: FidelityOptions | None = None,
) -> Prepared:
    """Stages 1-3 of :func:`quantize`: the planning graph, the plan, the ranges.

    ``trtq sensitivity`` starts from here too. The samples of ``batches`` the ``check``
    after writing runs on are kept as calibration reads them.
    """
    _refuse_quantized(model)
    check_model(model)
    # --method auto: histograms and start ranges by its start method, then the search.
    searching = calibration.method == range_search.AUTO and placement is not None
    calibration = replace(calibration, method=range_search.histogram_method(calibration.method))
    # Reused ranges are validated, and checked against this model and placement, first.
    check_reused(model, stats, cache, placement=placement, frozen=frozen, method=calibration.method)
    fresh_stats = stats is None and cache is None
    fingerprint = model_fingerprint(model) if fresh_stats else None
    # The same graph `trtq calibrate` plans on, so both observe the same tensors.
    model = planning_graph(model, placement, frozen, mixed=mixed is not None)
    equalization = None
    if calibration.equalize and placement is not None:
        model, equalization = _equalized(model, fresh_stats)
    example, batches = peek(batches) if batches is not None else (None, None)
    shapes = Shapes(model, example, per_sample=True, observed=_observed(model, example))
    node_macs = {node.name: macs(node, shapes) for node in all_nodes(model.graph)}
    smoothing = None
    if placement is not None and batches is not None and calibration.smooth_quant is not False:
        samples = smooth.samples_for(sum(node_macs.values()))
        model, batches, smoothing = _smoothed(model, batches, calibration, fresh_stats, samples)
        # It scales weights and adds Muls (no MACs), and changes no shape: the MACs stand.
        node_macs = {node.name: node_macs.get(node.name, 0) for node in all_nodes(model.graph)}
    if mixed is not None and mixed.precision == "bf16":
        model = _upgrade_for_bf16(model)  # may rewrite nodes: their MACs are counted again
        shapes = Shapes(model, example, per_sample=True, observed=_observed(model, example))
        node_macs = {node.name: macs(node, shapes) for node in all_nodes(model.graph)}
    kept = None
    if batches is not None and check is not None:
        kept = SampleKeeper(batches, check.samples_for(sum(node_macs.values())), model)
    if kept is not None:
        batches = kept.stream()
    sampled = None
    if searching and batches is not None:
        sampled = SampleKeeper(batches, range_search.DEFAULT_SAMPLES, model)
        batches = sampled.stream()
    bias_samples = None
    if calibration.bias_correction and placement is not None and batches is not None:
        bias_samples = SampleKeeper(batches, bias_correction.DEFAULT_SAMPLES, model)
        batches = bias_samples.stream()
    graph = gs.import_onnx(model)
    plan = qdq.plan(graph, node_macs, placement) if placement else qdq.QuantPlan([])
    observed = plan.activations()
    if mixed is not None and batches is not None and stats is None and cache is None:
        observed = list(dict.fromkeys([*observed, *float_activations(model)]))
    ranges, stats = _ranges(model, observed, batches, calibration, stats, cache, fingerprint)
    if fresh_stats and stats is not None:  # written by --stats: say what they were made for
        stats.model_sha256 = fingerprint or stats.model_sha256
        stats.scope = CalibrationScope(
            placement=placement_json(placement) if placement else None,
            method=calibration.method,
            percentile=calibration.percentile,
            frozen=frozen_json(frozen),
            tensors="all" if mixed is not None else "quantizable",
        )
    if placement is not None:
        plan = plan.with_ranges(ranges, graph)
        histograms = stats.histograms if stats is not None else None
        ranges = plan.shared_ranges(ranges, histograms, calibration.method, calibration.percentile)
    searched = None
    if searching:
        searched = range_search.search(
            model,
            plan,
            ranges,
            stats.histograms if stats is not None else None,
            sampled.samples() if sampled is not None else [],
            precision=placement.precision,
            percentile=calibration.percentile,
            start_method=calibration.method,
            providers=calibration.providers,
        )
        ranges = searched.ranges
    return Prepared(
        model,
        graph,
        plan,
        ranges,
        stats,
        node_macs,
        example,
        placement,
        mixed,
        kept,
        searched.to_json() if searched is not None else None,
        equalization,
        bias_samples,
        smoothing,
    )


def lower(
    model: onnx.ModelProto,
    plan: qdq.QuantPlan,
    ranges: Mapping[str, TensorRange],
    precision: str | None,
    mixed: fp16.MixedPrecisionOptions | None,
    fp16_amax: Mapping[str, float],
    example: Batch | None,
    *,
    correct: BiasCorrector | None = None,
) -> tuple[onnx.ModelProto, fp16.PrecisionPlan | None]:
    """Stages 4-5 of :func:`quantize`: the Q/DQ pairs of ``plan``, then FP16/BF16 per ``mixed``.

    ``precision`` None inserts no Q/DQ. A fidelity search (:mod:`trtq.tune`) builds each
    candidate with this function, so the model it settles on is the model written.
    ``correct`` folds each quantized layer's mean output shift into its bias, measured on
    the Q/DQ graph before any FP16 conversion.
    """
    if precision is not None:
        # Scales are chosen among FP16/BF16 numbers when the model is converted next.
        low = fp16.low_dtype(mixed.precision) if mixed is not None else None
        result = qdq.insert(model, plan, ranges, precision, scale_dtype=low)
        if correct is not None:
            result = correct(result, plan)
    else:
        result = onnx.ModelProto()
        result.CopyFrom(model)  # fp16.convert rewrites in place; model stays the reference
    result = infer_shapes(result)
    precision_plan = None
    if mixed is not None:
        precision_plan = fp16.plan_precision(result, mixed, fp16_amax, Shapes(result, example))
        result = infer_shapes(fp16.convert(result, precision_plan, mixed))
    return result, precision_plan


def _equalized(model: onnx.ModelProto, fresh: bool) -> tuple[onnx.ModelProto, dict]:
    """Cross-layer equalization (:mod:`trtq.graph.equalize`), before calibration observes."""
    if not fresh:
        raise UserError(
            "cross-layer equalization changes the activations that reused ranges "
            "(--stats/--cache) were observed on",
            "drop --equalize, or calibrate here with --calib",
        )
    model, record = equalize(model)
    return model, record.to_json()


def _smoothed(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    calibration: CalibrationOptions,
    fresh: bool,
    samples: int,
) -> tuple[onnx.ModelProto, Iterable[Batch], dict | None]:
    """SmoothQuant (:mod:`trtq.graph.smooth`) on per-channel maxima of the first ``samples``
    samples, before calibration observes; returns the batches to calibrate on (the same)."""
    explicit = calibration.smooth_quant is True
    if not fresh:
        if explicit:
            raise UserError(
                "SmoothQuant changes the activations that reused ranges (--stats/--cache) "
                "were observed on",
                "drop --smooth-quant, or calibrate here with --calib",
            )
        return model, batches, None
    sites, _ = smooth.find_sites(model)
    if not explicit:
        sites = smooth.automatic_sites(sites)
    if not sites:
        return model, batches, None
    taken, batches = smooth.first_batches(batches, samples, model)
    tensors = {site.tensor: site.axis for site in sites}
    maxima = smooth.channel_maxima(model, tensors, taken, calibration.providers)
    model, record = smooth.smooth(model, maxima, calibration.smooth_alpha, automatic=not explicit)
    record.samples = sum(batch_size(b, model) for b in taken)
    return model, batches, record.to_json()


def fp16_limits(stats: CalibrationStats | None) -> dict[str, float]:
    """Observed |x| per tensor for the FP16/BF16 plan; a tensor with mask fills (-3.4e38,
    -inf) is as far out of FP16's range as it gets."""
    if stats is None:
        return {}
    return {n: math.inf if h.sentinel_count else h.amax for n, h in stats.histograms.items()}


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
    fingerprint: str | None = None,
) -> tuple[dict[str, TensorRange], CalibrationStats | None]:
    """Ranges for ``tensors``: from a TensorRT cache, a stats file, or a fresh calibration
    (whose statistics record ``fingerprint``, the model as given, not the planning graph)."""
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
            collector=options.collector,
            fingerprint=fingerprint,
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
    measured_coverage: dict,
) -> dict:
    """The machine-readable account of what was quantized, what was not, and why.

    ``measured_coverage`` is read off the written graph (:func:`trtq.graph.coverage.measure`):
    what TensorRT will run quantized, not what the plan meant to.
    """
    roles = {t: "activation" for t in plan.activations()}
    roles.update({name: use.reason for name, use in plan.fusion_tensors.items()})
    return {
        "trtq_version": __version__,
        # What produced the figures: onnx wrote the graph, ONNX Runtime calibrated and checked it.
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "precision": placement.precision if placement else None,
        "method": calibration.method,
        "percentile": calibration.percentile,
        "coverage": measured_coverage,
        "quantized_tensors": [
            {**ranges[t].to_json(), "role": roles[t]} for t in plan.activations()
        ],
        # Tensors joined by range-preserving ops (MaxPool, Reshape, Concat...): one scale each.
        "range_groups": [list(group) for group in plan.range_groups],
        # Concats of unlike quantities (boxes in pixels next to probabilities): no shared scale.
        "separate_scales": [
            {"node": name, "reason": why} for name, why in plan.separate_scales.items()
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
