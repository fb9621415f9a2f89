"""The public Python API: what ``trtq`` the command does, as functions.

``import trtq`` then ``trtq.quantize(...)``, ``trtq.calibrate(...)``,
``trtq.build(...)``, ``trtq.compare(...)``, ``trtq.load(...)``. Each takes paths
or in-memory objects, validates what it is given at this boundary, and returns a
typed result; the CLI modules (``trtq/cli/*_cmd.py``) are thin shells that parse
flags, call these and print. See ARCHITECTURE.md §The pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trtq import quantizer
from trtq.arguments import (
    ModelLike,
    check_bins,
    check_choice,
    check_count,
    check_regex,
    check_thresholds,
    evaluation_options,
    fallback_budget,
    fidelity_target,
    load_model_arg,
    op_names,
    reused,
    smooth_quant_option,
)
from trtq.calib.cache import DEFAULT_TRT_VERSION, CalibrationStats, TrtCache, trt_version_int
from trtq.calib.calibrate import (
    cache_from,
    calibrate_model,
    data_inputs,
    stats_for_cache,
    trt_cache,
)
from trtq.calib.collect import Shard, parse_memory
from trtq.calib.data import ImagePreprocess
from trtq.calib.data.in_memory import DataLike, as_batches
from trtq.calib.histogram import DEFAULT_BINS
from trtq.calib.range_search import QUANTIZE_METHODS
from trtq.calib.ranges import DEFAULT_METHOD, METHODS
from trtq.calib.ray_backend import collector_for
from trtq.calib.scope import TENSOR_SETS
from trtq.errors import GateFailedError, UserError
from trtq.fileio import save_model
from trtq.graph import fp16, qdq
from trtq.graph.load import model_inputs
from trtq.graph.patterns import COMPUTE_OPS
from trtq.quantizer import CalibrationOptions, QuantizeResult
from trtq.report.compare import (
    Comparison,
    compare_models,
    evaluate_gates,
    resolve_labels,
)
from trtq.report.verify import FidelityOptions
from trtq.runtime import load
from trtq.trt.pipeline import BuildOutcome, build
from trtq.tune.holdout import DEFAULT_EVAL_SAMPLES
from trtq.tune.sensitivity import Sensitivity, calibrate_and_measure

__all__ = [
    "BuildOutcome",
    "CalibrationStats",
    "Comparison",
    "QuantizeResult",
    "Sensitivity",
    "build",
    "calibrate",
    "compare",
    "load",
    "quantize",
    "sensitivity",
]

log = logging.getLogger(__name__)

#: ``precision`` of :func:`quantize`: Q/DQ (int8, fp8) or the whole graph (fp16, bf16).
PRECISIONS = (*qdq.PRECISIONS, *fp16.LOW_TYPES)
#: ``high_precision`` of :func:`quantize`: the type of what int8/fp8 leaves unquantized.
HIGH_PRECISIONS = ("fp32", *fp16.LOW_TYPES)


# --- quantize ---------------------------------------------------------------------------


def quantize(
    model: ModelLike,
    calib: DataLike | None = None,
    *,
    output: str | Path | None = None,
    precision: str = "int8",
    high_precision: str = "fp32",
    method: str = DEFAULT_METHOD,
    percentile: float = 99.99,
    stats: str | Path | CalibrationStats | None = None,
    cache: str | Path | TrtCache | None = None,
    include_ops: str | Iterable[str] = COMPUTE_OPS,
    exclude_ops: str | Iterable[str] = (),
    exclude_nodes: str | None = None,
    min_channels: int = qdq.DEFAULT_MIN_CHANNELS,
    keep_io_types: bool = True,
    max_abs: float | None = None,
    max_reduction: int = fp16.DEFAULT_MAX_REDUCTION,
    keep_fp32_nodes: str | None = None,
    keep_fp32_ops: str | Iterable[str] = (),
    freeze_inputs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    preprocess: ImagePreprocess | None = None,
    max_memory: int | str | None = None,
    providers: Sequence[str] | None = None,
    progress: bool = False,
    min_cosine: float | None = None,
    max_rel_l2: float | None = None,
    verify_samples: int | None = None,
    target_cosine: float | None = None,
    target_rel_l2: float | None = None,
    target_drop: float | None = None,
    eval_data: DataLike | None = None,
    eval_samples: int = DEFAULT_EVAL_SAMPLES,
    labels: np.ndarray | str | Path | None = None,
    label_output: str | None = None,
    workers: int = 1,
    ray: str | bool | None = None,
    bias_correction: bool = quantizer.DEFAULT_BIAS_CORRECTION,
    equalize: bool = quantizer.DEFAULT_EQUALIZE,
    smooth_quant: bool | float | None = quantizer.DEFAULT_SMOOTH_QUANT,
) -> QuantizeResult:
    """Quantize an FP32 model for TensorRT (``trtq quantize``); the written model is checked.

    ``precision`` int8/fp8 inserts Q/DQ pairs where TensorRT fuses them and leaves the
    rest in ``high_precision``; fp16/bf16 converts the whole graph. Ranges come from
    ``calib`` (a path in any format trtq reads, or an iterable of ``{input: array}``
    batches), or from ``stats`` / ``cache``: an object, or a path that is read when the
    file exists and written from this calibration when it does not. ``batch_size``,
    ``limit`` and ``preprocess`` shape data read from a path. The placement and
    mixed-precision options are those of ``trtq quantize --help``.

    The result is compared with the FP32 model on the first ``verify_samples`` samples
    of ``calib`` (default: up to 64, fewer where they would cost more than
    :data:`trtq.report.verify.CHECK_MACS` multiply-accumulates): cosine, relative L2, max
    abs error per output, in ``result.report["verification"]``; below the default floor a
    warning is logged.
    ``min_cosine`` / ``max_rel_l2`` make it a gate: when one breaks, the model is still
    written to ``output`` (to inspect it) and :class:`~trtq.errors.GateFailedError` is
    raised, carrying the result. Bad arguments raise :class:`~trtq.errors.UserError`.

    ``target_cosine`` / ``target_rel_l2`` / ``target_drop`` (accuracy points, needs
    labels) set a fidelity target instead: nodes move to ``high_precision``, most harmful
    per MAC first, until it holds on ``eval_samples`` samples of ``eval_data`` (default:
    held out of ``calib``, never setting a range), then come back to INT8 where they are
    not needed (:mod:`trtq.tune.fallback`, ``workers`` processes; every step is in
    ``result.report["fallback"]``, and the check runs on that data). ``labels`` as in
    :func:`compare`. If even every node in high precision misses the target,
    :class:`~trtq.tune.fallback.TargetUnreachableError` (a ``GateFailedError``) is raised
    and nothing is written.

    ``ray`` calibrates on a Ray cluster (``pip install 'trtq[ray]'``): True for a local
    instance, or an address as Ray takes it (``"auto"``, ``"ray://HOST:10001"``); the
    result is bit-identical to calibrating here (:mod:`trtq.calib.ray_backend`).

    ``smooth_quant`` (:mod:`trtq.graph.smooth`): None (default) smooths the MatMul/Gemm
    inputs with outlier channels (a transformer's LayerNorm outputs) and leaves the rest;
    True smooths every one it can, a float in (0, 1] does so with that alpha (default 0.5),
    False none. Not with ``stats``/``cache`` (automatic smoothing is then off).
    """
    check_choice("precision", precision, PRECISIONS)
    check_choice("high_precision", high_precision, HIGH_PRECISIONS)
    check_choice("method", method, QUANTIZE_METHODS)
    if precision in fp16.LOW_TYPES and high_precision != "fp32":
        raise UserError(
            f"high_precision {high_precision!r} with precision {precision!r}",
            "high_precision applies to int8/fp8 only: leave it at 'fp32'",
        )
    if not 0 < percentile <= 100:
        raise UserError(f"percentile must be in (0, 100], got {percentile}", "e.g. 99.99")
    check_thresholds(min_cosine, max_rel_l2)
    if verify_samples is not None:
        check_count("verify_samples", verify_samples)
    backend = collector_for(ray)  # a bad address fails before any work; contacted if needed
    loaded, model_path = load_model_arg(model, "model")
    budget = fallback_budget(
        loaded,
        fidelity_target(target_cosine, target_rel_l2, target_drop),
        evaluation_options(
            loaded,
            eval_data,
            eval_samples,
            labels,
            label_output,
            target_drop,
            batch_size,
            preprocess,
        ),
        workers,
        providers,
        progress,
        ray,
    )
    stats_given, stats_out = reused(stats, CalibrationStats, "stats")
    cache_given, cache_out = reused(cache, TrtCache, "cache")
    if equalize and (stats is not None or cache is not None):
        raise UserError(
            "equalize changes the activations that --stats/--cache ranges describe",
            "drop --equalize, or drop --stats/--cache",
        )
    smoothing, alpha = smooth_quant_option(smooth_quant, stats is not None or cache is not None)
    batches = None
    if calib is not None:
        batches = as_batches(
            calib, model_inputs(loaded), batch_size=batch_size, limit=limit, preprocess=preprocess
        )
    quantizing = precision in qdq.PRECISIONS
    low = high_precision if quantizing else precision
    placement = (
        qdq.PlacementOptions(
            precision=precision,
            include_ops=op_names(include_ops),
            exclude_ops=op_names(exclude_ops),
            exclude_nodes=exclude_nodes,
            min_channels=min_channels,
        )
        if quantizing
        else None
    )
    frozen = {name: np.asarray(value) for name, value in (freeze_inputs or {}).items()}
    with backend as collector:
        if cache_out is not None and stats_given is None and batches is not None:
            if budget is not None and budget.evaluation.data is None:
                raise UserError(
                    "writing a TensorRT cache calibrates on every batch of --calib, so none "
                    "could be held out to judge the target on",
                    "pass --eval DATA for the target",
                )
            # The cache must cover every tensor TensorRT asks for, not only the planned ones.
            stats_given = stats_for_cache(
                loaded,
                batches,
                placement,
                frozen,
                method,
                percentile,
                max_memory,
                providers,
                progress,
                collector,
            )
        result = quantizer.quantize(
            loaded,
            batches,
            placement=placement,
            mixed=None
            if low == "fp32"
            else fp16.MixedPrecisionOptions(
                precision=low,
                keep_io_types=keep_io_types,
                max_abs=max_abs,
                max_reduction=max_reduction,
                keep_fp32_nodes=keep_fp32_nodes,
                keep_fp32_ops=op_names(keep_fp32_ops),
            ),
            calibration=CalibrationOptions(
                method=method,
                percentile=percentile,
                max_memory=parse_memory(max_memory) if isinstance(max_memory, str) else max_memory,
                providers=providers,
                progress=progress,
                collector=collector,
                equalize=equalize,
                bias_correction=bias_correction,
                smooth_quant=smoothing,
                smooth_alpha=alpha,
            ),
            stats=stats_given,
            cache=cache_given,
            frozen=frozen,
            fidelity=FidelityOptions(verify_samples, min_cosine, max_rel_l2),
            budget=budget,
        )
    result.report = {
        "model": model_path,
        "output": None if output is None else str(output),
        # The stats file behind the ranges, read or written here (for `trtq report`).
        "stats": str(stats) if isinstance(stats, str | Path) and stats_out is None else None,
        **result.report,
    }
    # A complete, honestly labelled cache or none: refused before anything is written.
    cache_written = cache_from(result.stats, cache_out) if cache_out is not None else None
    if output is not None:
        save_model(result.model, output)
    if stats_out is not None and result.stats is not None:
        result.stats.write(stats_out)
        result.report["stats"] = str(stats_out)
    if cache_written is not None:
        cache_written.write(cache_out)
    if not result.passed:
        failed = [gate.detail for gate in result.verification.gates if not gate.passed]
        written = f" (the model was written to {output} to inspect; do not deploy it)"
        raise GateFailedError("; ".join(failed) + (written if output else ""), result)
    return result


# --- calibrate --------------------------------------------------------------------------


def calibrate(
    model: ModelLike,
    calib: DataLike,
    *,
    output: str | Path | None = None,
    cache: str | Path | None = None,
    method: str = DEFAULT_METHOD,
    percentile: float = 99.99,
    precision: str = "int8",
    include_ops: str | Iterable[str] = COMPUTE_OPS,
    exclude_ops: str | Iterable[str] = (),
    exclude_nodes: str | None = None,
    min_channels: int = qdq.DEFAULT_MIN_CHANNELS,
    tensors: str | None = None,
    freeze_inputs: Mapping[str, Any] | None = None,
    shard: str | Shard | None = None,
    bins: int = DEFAULT_BINS,
    batch_size: int | None = None,
    limit: int | None = None,
    preprocess: ImagePreprocess | None = None,
    max_memory: int | str | None = None,
    providers: Sequence[str] | None = None,
    trt_version: str = DEFAULT_TRT_VERSION,
    progress: bool = False,
    ray: str | bool | None = None,
) -> CalibrationStats:
    """Activation statistics for :func:`quantize` with the same options (``trtq calibrate``).

    Observes every tensor the quantize plan needs for ``precision`` and the placement
    options (those of :func:`quantize`), streaming ``calib`` (a path or batches) into
    histograms, and chooses ranges by ``method``. The statistics record the model's
    fingerprint and these options, and ``quantize(stats=...)`` refuses them for another
    model or other placement options. ``output`` writes them as JSON.

    ``cache`` also writes a TensorRT calibration cache for ``trtq build --calib-mode trt``:
    complete (every float tensor of the model as given, observed on it) and labelled with
    ``method`` (``EntropyCalibration2``, ``MinMaxCalibration``, or trtq's own
    ``TrtqMseCalibration`` / ``TrtqPercentileCalibration``, which TensorRT's calibrators
    cannot claim). ``tensors="all"`` (the default with ``cache``) observes those tensors
    without writing a cache, e.g. on a ``shard`` ("K/N") merged later. Nothing is written
    when anything fails.

    ``ray`` calibrates on a Ray cluster instead of a ``shard`` run by hand (``pip install
    'trtq[ray]'``): True for a local instance, or an address as Ray takes it (``"auto"``,
    ``"ray://HOST:10001"``). Workers read the data from its path; the statistics are
    bit-identical to calibrating here (:mod:`trtq.calib.ray_backend`).
    """
    check_choice("method", method, METHODS)
    check_choice("precision", precision, qdq.PRECISIONS)
    if not 0 < percentile <= 100:
        raise UserError(f"percentile must be in (0, 100], got {percentile}", "e.g. 99.99")
    tensors = tensors or ("all" if cache is not None else "quantizable")
    check_choice("tensors", tensors, TENSOR_SETS)
    check_bins(bins)
    check_regex("exclude_nodes", exclude_nodes)
    shard = Shard.parse(shard) if isinstance(shard, str) else shard
    backend = collector_for(ray)
    if ray not in (None, False) and shard is not None:
        raise UserError("shard with ray", "drop the shard: Ray shards the data itself")
    if cache is not None:
        trt_version_int(trt_version)  # a bad version fails before the data is read
        if shard is not None:
            raise UserError("a shard cannot write a cache", "merge the shards, then write it")
        if freeze_inputs:
            raise UserError(
                "a TensorRT cache is for the model TensorRT parses, and freezing inputs "
                "changes that model",
                "write the frozen model with trtq normalize --freeze-input ... -o FROZEN.onnx, "
                "then calibrate FROZEN.onnx with --cache",
            )
        if tensors != "all":
            raise UserError(
                "a TensorRT cache needs every float tensor observed",
                "drop --tensors quantizable (tensors='quantizable'); all is the cache's default",
            )
        if output is not None and Path(cache).resolve() == Path(output).resolve():
            raise UserError("the cache and the stats would be the same file", "name two files")
    loaded, _ = load_model_arg(model, "model")
    frozen = {name: np.asarray(value) for name, value in (freeze_inputs or {}).items()}
    batches = as_batches(
        calib,
        data_inputs(loaded, frozen),
        batch_size=batch_size,
        limit=limit,
        preprocess=preprocess,
    )
    with backend as collector:
        stats = calibrate_model(
            loaded,
            batches,
            placement=qdq.PlacementOptions(
                precision=precision,
                include_ops=op_names(include_ops),
                exclude_ops=op_names(exclude_ops),
                exclude_nodes=exclude_nodes,
                min_channels=min_channels,
            ),
            frozen=frozen,
            tensors=tensors,
            method=method,
            percentile=percentile,
            bins=bins,
            max_memory=parse_memory(max_memory) if isinstance(max_memory, str) else max_memory,
            providers=providers,
            shard=shard,
            progress=progress,
            collector=collector,
        )
    for found in stats.ranges.values():
        if not found.quantizable:
            log.warning("%s: not quantizable: %s", found.name, found.reason)
    cache_written = trt_cache(stats, trt_version=trt_version) if cache is not None else None
    if output is not None:
        stats.write(output)
    if cache_written is not None:
        cache_written.write(cache)
        log.info(
            "wrote TensorRT calibration cache %s (%d tensors)", cache, len(cache_written.scales)
        )
    return stats


# --- sensitivity, and fidelity targets -------------------------------------------------


def sensitivity(
    model: ModelLike,
    calib: DataLike,
    *,
    eval_data: DataLike | None = None,
    eval_samples: int = DEFAULT_EVAL_SAMPLES,
    workers: int = 1,
    precision: str = "int8",
    high_precision: str = "fp32",
    method: str = DEFAULT_METHOD,
    percentile: float = 99.99,
    include_ops: str | Iterable[str] = COMPUTE_OPS,
    exclude_ops: str | Iterable[str] = (),
    exclude_nodes: str | None = None,
    min_channels: int = qdq.DEFAULT_MIN_CHANNELS,
    freeze_inputs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    preprocess: ImagePreprocess | None = None,
    max_memory: int | str | None = None,
    providers: Sequence[str] | None = None,
    progress: bool = False,
    ray: str | bool | None = None,
) -> Sensitivity:
    """What quantizing each node costs at the outputs (``trtq sensitivity``).

    Calibrates once, as :func:`quantize` with the same options would, then measures every
    quantized node against FP32 with only that node quantized and with every node but
    that one (:mod:`trtq.tune.sensitivity`): cosine and relative L2 per output, next to
    its MACs. The figures come from ``eval_samples`` samples of ``eval_data``, by default
    held out of ``calib`` (they never set a range); ``workers`` processes share the
    2N + 1 evaluations, or with ``ray`` (True: a local instance, or an address as Ray
    takes it) the workers of a Ray cluster, which also calibrate.
    """
    check_choice("precision", precision, qdq.PRECISIONS)
    check_choice("high_precision", high_precision, HIGH_PRECISIONS)
    check_choice("method", method, METHODS)
    if not 0 < percentile <= 100:
        raise UserError(f"percentile must be in (0, 100], got {percentile}", "e.g. 99.99")
    check_count("workers", workers)
    check_regex("exclude_nodes", exclude_nodes)
    loaded, _ = load_model_arg(model, "model")
    evaluation = evaluation_options(
        loaded, eval_data, eval_samples, None, None, None, batch_size, preprocess
    )
    batches = as_batches(
        calib, model_inputs(loaded), batch_size=batch_size, limit=limit, preprocess=preprocess
    )
    batches, held_out = evaluation.split(batches, loaded)
    with collector_for(ray) as collector:
        return calibrate_and_measure(
            loaded,
            batches,
            held_out,
            CalibrationOptions(
                method=method,
                percentile=percentile,
                max_memory=parse_memory(max_memory) if isinstance(max_memory, str) else max_memory,
                providers=providers,
                progress=progress,
                collector=collector,
            ),
            qdq.PlacementOptions(
                precision=precision,
                include_ops=op_names(include_ops),
                exclude_ops=op_names(exclude_ops),
                exclude_nodes=exclude_nodes,
                min_channels=min_channels,
            ),
            high_precision,
            freeze_inputs,
            workers,
            ray,
        )


# --- compare ----------------------------------------------------------------------------


def compare(
    reference: ModelLike,
    candidate: ModelLike,
    data: DataLike,
    *,
    labels: np.ndarray | str | Path | None = None,
    label_output: str | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    preprocess: ImagePreprocess | None = None,
    providers: Sequence[str] | None = None,
    min_cosine: float | None = None,
    max_rel_l2: float | None = None,
    max_drop: float | None = None,
) -> Comparison:
    """Run both models on ``data`` and measure the candidate against the reference.

    Per output (matched by name): mean and min per-sample cosine, relative L2 error,
    max and mean abs error, top-1 agreement. ``labels`` (an array, or ``PATH[:KEY]`` of a
    .npy/.npz file; default: the ``labels`` array of an .npz ``data`` file) add the
    top-1 accuracy of both on ``label_output`` (default: the first output). Both models
    run in ONNX Runtime with basic graph optimizations, so Q/DQ is fake quantization, as
    TensorRT computes it. ``min_cosine``, ``max_rel_l2`` and ``max_drop`` (accuracy
    points, needs labels) are gates: when one breaks,
    :class:`~trtq.errors.GateFailedError` is raised, carrying the :class:`Comparison`.
    """
    check_thresholds(min_cosine, max_rel_l2)
    if max_drop is not None and not max_drop >= 0:
        raise UserError(f"max_drop must be >= 0 points, got {max_drop}", "e.g. 0.5")
    # Read both now so that a missing or non-ONNX model is reported before any work.
    ref_model, ref_path = load_model_arg(reference, "reference", load_external_data=False)
    _, cand_path = load_model_arg(candidate, "candidate", load_external_data=False)
    inputs = model_inputs(ref_model)
    batches = as_batches(data, inputs, batch_size=batch_size, limit=limit, preprocess=preprocess)
    label_array, labels_from = resolve_labels(labels, data, [spec.name for spec in inputs], limit)
    if max_drop is not None and label_array is None:
        raise UserError(
            "--max-drop needs labels",
            "pass labels (--labels PATH[:KEY]), or data in an .npz with a 'labels' array",
        )
    report = compare_models(
        reference,
        candidate,
        batches,
        label_array,
        label_output=label_output,
        providers=providers,
    )
    gates = evaluate_gates(report, min_cosine=min_cosine, max_rel_l2=max_rel_l2, max_drop=max_drop)
    comparison = Comparison(
        ref_path or "<onnx.ModelProto>",
        cand_path or "<onnx.ModelProto>",
        getattr(batches, "description", "batches given in Python"),
        labels_from,
        report,
        gates,
    )
    if not comparison.passed:
        raise GateFailedError(
            "; ".join(gate.detail for gate in gates if not gate.passed), comparison
        )
    return comparison
