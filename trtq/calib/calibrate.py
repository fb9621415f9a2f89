"""Calibration end to end: collect histograms, then choose a range per tensor.

:func:`calibrate_model` is what ``trtq calibrate`` (and ``trtq.calibrate``) runs: it
observes exactly the tensors ``trtq quantize`` will ask for with the same placement
options, plus, for a TensorRT cache, every float tensor of the model as given
(:mod:`trtq.calib.scope` says why those differ). :func:`calibrate` is the step below it
for callers that name the tensors themselves, as :func:`trtq.quantizer.quantize` does.
Each step lives in its own module (collect, histogram, ranges, cache), so it can be
changed alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from trtq.calib.cache import (
    ALGORITHMS,
    DEFAULT_TRT_VERSION,
    CalibrationStats,
    TrtCache,
    merge_stats,
)
from trtq.calib.collect import Batch, Collector, Shard, collect, parse_memory
from trtq.calib.histogram import DEFAULT_BINS
from trtq.calib.range_search import histogram_method
from trtq.calib.ranges import DEFAULT_METHOD, METHODS, TensorRange, compute_range
from trtq.calib.scope import (
    TENSOR_SETS,
    CalibrationScope,
    frozen_json,
    model_fingerprint,
    placement_json,
    plan_tensors,
    planning_graph,
    quant_plan,
    tensor_names,
    trt_tensors,
)
from trtq.errors import DataError, UserError
from trtq.graph import qdq
from trtq.graph.load import TensorSpec, check_model, model_inputs
from trtq.graph.normalize import infer_shapes
from trtq.graph.patterns import float_activations

log = logging.getLogger(__name__)

__all__ = [
    "calibrate",
    "calibrate_model",
    "choose_ranges",
    "data_inputs",
    "merge_files",
    "model_fingerprint",
    "trt_cache",
]


def calibrate(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    *,
    tensors: Sequence[str] | None = None,
    method: str = DEFAULT_METHOD,
    percentile: float = 99.99,
    bins: int = DEFAULT_BINS,
    max_memory: int | None = None,
    providers: Sequence[str] | None = None,
    shard: Shard | None = None,
    progress: bool = True,
    fingerprint: str | None = None,
    scope: CalibrationScope | None = None,
    collector: Collector | None = None,
) -> CalibrationStats:
    """Histograms of ``tensors`` of ``model`` and, unless sharded, ranges.

    ``model`` should already be normalised (:func:`trtq.calib.scope.planning_graph`);
    ``tensors`` defaults to the default quantize plan's. ``fingerprint`` (default: of
    ``model``) and ``scope`` are recorded in the statistics. ``collector`` observes the
    activations (default: :func:`~trtq.calib.collect.collect`, in this process).
    """
    targets = list(tensors) if tensors is not None else plan_tensors(model, qdq.PlacementOptions())
    collection = (collector or collect)(
        model,
        targets,
        batches,
        bins=bins,
        max_memory=max_memory,
        providers=providers,
        shard=shard,
        progress=progress,
    )
    stats = CalibrationStats(
        histograms=collection.histograms,
        num_samples=collection.num_samples,
        num_batches=collection.num_batches,
        model_sha256=fingerprint or model_fingerprint(model),
        shard=f"{shard.index}/{shard.count}" if shard else None,
        scope=scope,
    )
    if shard is None:
        stats.ranges = choose_ranges(stats, method, percentile)
    return stats


def data_inputs(model: onnx.ModelProto, frozen: Mapping[str, Any] | None) -> list[TensorSpec]:
    """The inputs calibration data must hold: the model's, less the frozen ones."""
    return [spec for spec in model_inputs(model) if spec.name not in (frozen or {})]


def calibrate_model(
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    *,
    placement: qdq.PlacementOptions | None = None,
    frozen: Mapping[str, np.ndarray] | None = None,
    tensors: str = "quantizable",
    method: str = DEFAULT_METHOD,
    percentile: float = 99.99,
    bins: int = DEFAULT_BINS,
    max_memory: int | None = None,
    providers: Sequence[str] | None = None,
    shard: Shard | None = None,
    progress: bool = True,
    collector: Collector | None = None,
) -> CalibrationStats:
    """The statistics ``trtq quantize`` needs for ``placement`` (and ``frozen``) on ``model``.

    ``tensors="quantizable"`` observes the quantize plan's tensors; ``"all"`` also every
    float tensor of the normalised graph and of ``model`` as given, which a complete
    TensorRT cache (:func:`trt_cache`) and FP16 decisions need. The tensors of the model
    as given are observed on it, in the same pass as the plan's tensors; only tensors
    that exist in the normalised graph alone take a second pass over the data.
    ``collector`` observes the activations (default: in this process).
    """
    placement = placement or qdq.PlacementOptions()
    if tensors not in TENSOR_SETS:
        raise UserError(f"unknown tensor set {tensors!r}", f"use one of: {', '.join(TENSOR_SETS)}")
    if method not in METHODS:
        raise UserError(
            f"unknown calibration method {method!r}", f"use one of: {', '.join(METHODS)}"
        )
    check_model(model)
    graph = planning_graph(model, placement, frozen)
    plan = quant_plan(graph, placement)
    targets = plan.activations()
    as_given: list[str] | None = None
    if tensors == "all":
        targets = list(dict.fromkeys([*targets, *float_activations(graph)]))
        # With inputs frozen, the model as given is not the network being calibrated.
        as_given = None if frozen else trt_tensors(model)
    scope = CalibrationScope(
        placement=placement_json(placement),
        method=method,
        percentile=percentile,
        frozen=frozen_json(frozen),
        tensors=tensors,
        trt_tensors=None if as_given is None else tuple(as_given),
        range_groups=tuple(tuple(group) for group in plan.range_groups),
    )
    options: dict[str, Any] = {
        "bins": bins,
        "max_memory": max_memory,
        "providers": providers,
        "shard": shard,
        "progress": progress,
    }
    collect_on = collector or collect
    if as_given is None:
        collection = collect_on(graph, targets, batches, **options)
        histograms = collection.histograms
    else:
        given = infer_shapes(model)
        names = tensor_names(given)
        on_given = list(dict.fromkeys([*as_given, *(t for t in targets if t in names)]))
        normalised_only = [t for t in targets if t not in names]
        if normalised_only and iter(batches) is batches:
            raise UserError(
                f"{len(normalised_only)} tensors exist only in the normalised graph (e.g. "
                f"{normalised_only[0]}) and need a second pass over the data, which can be read "
                "only once",
                "pass a file or folder (or a loader whose load_data() can be called again)",
            )
        collection = collect_on(given, on_given, batches, **options)
        histograms = collection.histograms
        if normalised_only:
            histograms.update(collect_on(graph, normalised_only, batches, **options).histograms)
    stats = CalibrationStats(
        histograms=histograms,
        num_samples=collection.num_samples,
        num_batches=collection.num_batches,
        model_sha256=model_fingerprint(model),
        shard=f"{shard.index}/{shard.count}" if shard else None,
        scope=scope,
    )
    if shard is None:
        stats.ranges = choose_ranges(stats, method, percentile)
    return stats


def choose_ranges(
    stats: CalibrationStats, method: str = DEFAULT_METHOD, percentile: float = 99.99
) -> dict[str, TensorRange]:
    """One range per observed tensor, in the order they were observed."""
    return {
        name: compute_range(name, hist, method, percentile=percentile)
        for name, hist in stats.histograms.items()
    }


def merge_files(
    paths: Sequence[str | Path], *, method: str | None = None, percentile: float | None = None
) -> CalibrationStats:
    """Merge shard stats files and choose ranges (default: by the method they were made for)."""
    sources = [str(p) for p in paths]
    stats = merge_stats([CalibrationStats.read(p) for p in paths], sources)
    stats.origin = f"the merge of {', '.join(sources)}"
    scope = stats.scope
    method = method or (scope.method if scope else DEFAULT_METHOD)
    percentile = percentile if percentile is not None else (scope.percentile if scope else 99.99)
    if scope is not None:
        stats.scope = scope.with_method(method, percentile)
    stats.ranges = choose_ranges(stats, method, percentile)
    return stats


def trt_cache(stats: CalibrationStats, *, trt_version: str) -> TrtCache:
    """A complete TensorRT cache from ``stats``, labelled with the method that chose its ranges.

    The label is that of the one method every range in the cache was chosen by, or
    ``TrtqMixedCalibration`` when they differ (an ``entropy`` run whose search fell back
    to ``mse`` on some tensors): ``EntropyCalibration2`` is claimed only for entropy.

    Complete means a scale for every float tensor of the model as given: the stats must
    have observed them (``tensors="all"``, implied by ``trtq calibrate --cache``), and
    each must be quantizable. A tensor with NaN or mask fills has no honest INT8 scale,
    and TensorRT's implicit INT8 would quantize it anyway, so no cache is written then.
    """
    source = stats.origin or "the statistics"
    scope = stats.scope
    if stats.shard is not None:
        raise UserError("a shard cannot write a cache", "merge the shards, then write it")
    if scope is None or scope.trt_tensors is None:
        why = (
            "inputs were frozen"
            if scope is not None and scope.frozen
            else "they were not asked for"
        )
        raise DataError(
            f"{source} did not observe the float tensors of the model as given ({why}), so a "
            "TensorRT cache from them would be partial",
            "calibrate with --cache (or --tensors all), without --freeze-input",
        )
    missing = [name for name in scope.trt_tensors if name not in stats.ranges]
    if missing:
        raise DataError(
            f"{source} has no range for {missing[0]!r}, which TensorRT asks for", "regenerate it"
        )
    for name in scope.trt_tensors:
        found = stats.ranges[name]
        if not found.quantizable:
            raise UserError(
                f"no complete TensorRT cache: tensor {name!r} {found.reason}, and TensorRT's "
                "implicit INT8 would quantize it anyway",
                "use trtq's graph mode (trtq quantize, or trtq build --int8), which keeps it in "
                "float; or drop --cache",
            )
    # The plan's range groups get their one range, as quantize gives them: trtq's graph
    # mode reading the cache builds the model --stats would, and TensorRT needs no
    # requantization across MaxPool & co.
    ranges = qdq.QuantPlan([], range_groups=list(scope.range_groups)).shared_ranges(
        stats.ranges, stats.histograms, scope.method, scope.percentile
    )
    # Every other observed tensor too (TensorRT ignores names it does not have), except
    # those left in float: trtq's graph mode reads this cache and must not quantize them.
    amax = {name: found.amax for name, found in ranges.items() if found.quantizable}
    methods = {ranges[name].method for name in amax} or {scope.method}
    guarded = [name for name in amax if _spike_guarded(scope.method, ranges[name])]
    if guarded:
        # Entropy as trtq runs it (the default): the KL search, with mse's range where the
        # search locked onto a spike. The cache is still the entropy calibration asked for.
        log.info(
            "entropy's spike guard chose mse's range for %d tensor(s), e.g. %s",
            len(guarded),
            guarded[0],
        )
        methods = {ranges[name].method for name in amax if name not in guarded} or {"entropy"}
    if len(methods) > 1:
        log.info(
            "the cache holds ranges of several methods (%s): labelled %s",
            ", ".join(sorted(methods)),
            ALGORITHMS["mixed"],
        )
    method = methods.pop() if len(methods) == 1 else "mixed"
    return TrtCache.from_amax(amax, method=method, trt_version=trt_version)


def _spike_guarded(method: str, found: TensorRange) -> bool:
    """Whether entropy's guard (:func:`trtq.calib.ranges.entropy_refusal`) chose it."""
    return method == "entropy" and found.method == "mse" and bool(found.reason)


def stats_for_cache(
    model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    placement: qdq.PlacementOptions | None,
    frozen: Mapping[str, np.ndarray],
    method: str,
    percentile: float,
    max_memory: int | str | None,
    providers: Sequence[str] | None,
    progress: bool,
    collector: Collector | None,
) -> CalibrationStats:
    """``quantize`` writing a TensorRT cache: calibrate as ``trtq calibrate --cache`` would."""
    if placement is None:
        raise UserError("a TensorRT cache holds INT8 ranges", "drop --cache with fp16/bf16")
    if frozen:
        raise UserError(
            "a TensorRT cache is for the model TensorRT parses, and --freeze-input changes it",
            "drop --cache, or calibrate the frozen model (trtq normalize --freeze-input) instead",
        )
    if iter(batches) is batches:
        raise UserError(
            "writing a TensorRT cache reads the data twice (calibration, then the check), "
            "but it can be read only once",
            "pass a file or folder, or a list of batches",
        )
    return calibrate_model(
        model,
        batches,
        placement=placement,
        tensors="all",
        method=histogram_method(method),
        percentile=percentile,
        max_memory=parse_memory(max_memory) if isinstance(max_memory, str) else max_memory,
        providers=providers,
        progress=progress,
        collector=collector,
    )


def cache_from(stats: CalibrationStats | None, path: Path) -> TrtCache:
    """The TensorRT cache ``quantize`` writes to ``path`` from the stats it calibrated."""
    if stats is None:
        raise UserError(f"nothing to write to {path}", "pass --calib DATA to calibrate")
    return trt_cache(stats, trt_version=DEFAULT_TRT_VERSION)
