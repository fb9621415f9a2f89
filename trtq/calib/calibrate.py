"""Calibration end to end: collect histograms, then choose a range per tensor.

This is the one function the CLI and ``trtq quantize`` call; each step lives in
its own module (collect, histogram, ranges, cache) so it can be changed alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import onnx

from trtq.calib.cache import CalibrationStats
from trtq.calib.collect import Batch, Shard, collect
from trtq.calib.histogram import DEFAULT_BINS
from trtq.calib.ranges import DEFAULT_METHOD, TensorRange, compute_range
from trtq.graph.patterns import compute_op_inputs


def model_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of the serialized model: shards must come from the same graph to be merged."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()


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
) -> CalibrationStats:
    """Histograms of ``tensors`` (default: compute-op activations) and, unless sharded, ranges.

    ``model`` should already be normalised (:func:`trtq.graph.normalize.normalize`):
    calibration observes the graph that will be quantized.
    """
    targets = list(tensors) if tensors is not None else compute_op_inputs(model)
    collection = collect(
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
        model_sha256=model_fingerprint(model),
        shard=f"{shard.index}/{shard.count}" if shard else None,
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
