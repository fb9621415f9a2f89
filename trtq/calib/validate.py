"""The one gate every activation range passes on its way into trtq.

Ranges reach trtq from TensorRT calibration caches, trtq's stats files (histograms and
chosen ranges), ``trtq calibrate --merge`` and the Python API. A single bad value (a
scale of 0, NaN, a denormal, FLT_MAX, a negative bin count) does not crash anything: it
quietly writes a model that is numerically wrong. So nothing here repairs a value; each
function refuses it with one line naming the source and the tensor, and the callers
(:mod:`trtq.calib.cache` when reading, :func:`trtq.quantizer.quantize` for objects
handed over in Python, :func:`trtq.calib.cache.merge_stats`) call these functions and
nothing else to decide whether a range is usable.

The limits follow trtq's own rules: an amax at or above
:data:`~trtq.calib.histogram.SENTINEL_ABS` is what calibration counts as a mask fill,
never as a range; a float32 scale below the smallest normal float32 is flushed to zero
by GPU kernels (and :data:`~trtq.calib.ranges.MIN_AMAX` keeps trtq's own scales well
above it); counts beyond 2**53 are no longer exact in JSON numbers or float64.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from trtq.calib.histogram import MIN_RANGE_EXP, SENTINEL_ABS, Histogram
from trtq.calib.ranges import INT8_MAX, METHODS, TensorRange
from trtq.errors import DataError

if TYPE_CHECKING:
    from trtq.calib.cache import CalibrationStats

#: The smallest normal float32: a smaller scale is denormal, and GPUs flush it to zero.
MIN_SCALE = float(np.finfo(np.float32).tiny)
#: The largest count a JSON number or a float64 still holds exactly.
MAX_COUNT = 2**53
#: More bins than any calibration needs (trtq's default is 2048; ``--bins`` takes up to 65536).
MAX_BINS = 1 << 16
#: Bins a stats file may make trtq allocate in all (8 bytes each: 1 GiB), checked before any
#: is: a small file must not claim gigabytes of histograms.
MAX_TOTAL_BINS = 1 << 27
#: A histogram range beyond 2**30 (> SENTINEL_ABS) can hold no usable value.
_MAX_RANGE_EXP = math.frexp(SENTINEL_ABS)[1]
_REGENERATE = "regenerate it with trtq calibrate (or fix that entry)"


def check_scale(source: str, tensor: str, scale: Any) -> float:
    """A TensorRT cache scale (amax / 127): finite, positive, normal, below the sentinel rule."""
    value = _number(source, tensor, "scale", scale)
    _check_magnitude(source, tensor, "scale", value, value * INT8_MAX)
    return value


def check_amax(source: str, tensor: str, amax: Any) -> float:
    """A range's amax: a scale ``amax / 127`` that :func:`check_scale` would accept."""
    value = _number(source, tensor, "amax", amax)
    _check_magnitude(source, tensor, "amax", value / INT8_MAX, value)
    return value


def check_range(source: str, tensor: str, found: Any) -> TensorRange:
    """A chosen range: a :class:`TensorRange` for ``tensor`` with a usable amax."""
    if not isinstance(found, TensorRange):
        raise DataError(
            f"{source}: the range of tensor {tensor!r} is not a TensorRange", _REGENERATE
        )
    if found.name != tensor:
        raise DataError(
            f"{source}: the range filed under tensor {tensor!r} names {found.name!r}", _REGENERATE
        )
    check_amax(source, tensor, found.amax)
    return found


def cache_scales(source: str, entries: Iterable[tuple[int, str, Any]]) -> dict[str, float]:
    """``(line, tensor, scale)`` entries of a cache as a dict; each tensor once, each scale usable.

    A tensor listed twice is refused rather than resolved: which of two scales TensorRT
    would take is not documented, and a repeated line means the file was edited or spliced.
    """
    scales: dict[str, float] = {}
    lines: dict[str, int] = {}
    for line, tensor, scale in entries:
        if tensor in scales:
            raise DataError(
                f"{source} line {line} repeats tensor {tensor!r} (first on line {lines[tensor]})",
                "keep one line per tensor; regenerate the cache",
            )
        scales[tensor] = check_scale(source, tensor, scale)
        lines[tensor] = line
    return scales


def check_cache(source: str, scales: Mapping[str, Any]) -> None:
    """Every scale of an in-memory cache (the Python API hands them over as a dict)."""
    if not isinstance(scales, Mapping):
        raise DataError(f"{source}: scales must map tensor names to floats", "pass a dict")
    for tensor, scale in scales.items():
        check_scale(source, str(tensor), scale)


def histograms_from_json(source: str, data: Any) -> dict[str, Histogram]:
    """The histograms of a stats file: one bin count for all, within budget, each checked."""
    if not isinstance(data, Mapping):
        raise DataError(f"{source}: histograms is not an object", _REGENERATE)
    declared = {}
    for tensor, hist in data.items():
        bins = hist.get("bins") if isinstance(hist, Mapping) else None
        declared[str(tensor)] = _count(source, str(tensor), "bins", bins)
        _check_bins(source, str(tensor), declared[str(tensor)])
    sizes = sorted(set(declared.values()))
    if len(sizes) > 1:
        raise DataError(f"{source} mixes histograms of {sizes} bins", "calibrate with one --bins")
    total = sum(declared.values())
    if total > MAX_TOTAL_BINS:
        raise DataError(
            f"{source} declares {len(declared)} histograms of {sizes[0]} bins "
            f"({total * 8 / 2**30:.1f} GiB), more than trtq reads",
            "calibrate with fewer --bins",
        )
    return {
        str(tensor): histogram_from_json(source, str(tensor), hist) for tensor, hist in data.items()
    }


def histogram_from_json(source: str, tensor: str, data: Any) -> Histogram:
    """A histogram from a stats file, built only after its structure and numbers check out."""
    if not isinstance(data, Mapping):
        raise DataError(
            f"{source}: the histogram of tensor {tensor!r} is not an object", _REGENERATE
        )
    fields = ("bins", "range_exp", "count", "min", "max", "nan_count", "sentinel_count")
    missing = [f for f in (*fields, "nonzero_bins", "nonzero_counts") if f not in data]
    if missing:
        raise DataError(
            f"{source}: the histogram of tensor {tensor!r} lacks {', '.join(missing)}", _REGENERATE
        )
    bins = _count(source, tensor, "bins", data["bins"])
    _check_bins(source, tensor, bins)
    index = [
        _count(source, tensor, "a bin index", i)
        for i in _list(source, tensor, data, "nonzero_bins")
    ]
    values = [
        _count(source, tensor, "a bin count", c)
        for c in _list(source, tensor, data, "nonzero_counts")
    ]
    if len(index) != len(values):
        raise DataError(
            f"{source}: tensor {tensor!r} has {len(index)} bin indices but {len(values)} counts",
            _REGENERATE,
        )
    if any(b <= a for a, b in itertools.pairwise(index)) or (index and index[-1] >= bins):
        raise DataError(
            f"{source}: tensor {tensor!r} has bin indices not increasing within 0..{bins - 1}",
            _REGENERATE,
        )
    counts = np.zeros(bins, np.int64)
    counts[np.asarray(index, np.int64)] = values
    range_exp = data["range_exp"]
    if range_exp is not None:
        range_exp = _integer(source, tensor, "range_exp", range_exp)
    hist = Histogram(
        counts=counts,
        range_exp=range_exp,
        count=_count(source, tensor, "count", data["count"]),
        min=math.inf if data["min"] is None else _number(source, tensor, "min", data["min"]),
        max=-math.inf if data["max"] is None else _number(source, tensor, "max", data["max"]),
        nan_count=_count(source, tensor, "nan_count", data["nan_count"]),
        sentinel_count=_count(source, tensor, "sentinel_count", data["sentinel_count"]),
    )
    check_histogram(source, tensor, hist)
    return hist


def check_histogram(source: str, tensor: str, hist: Any) -> None:
    """A histogram is what :class:`Histogram.update` could have produced, or it is refused.

    Its counts are non-negative integers adding up to ``count``; ``min``/``max`` are finite,
    below the sentinel limit, and the largest |x| lands in the highest non-empty bin (the
    binning is exact, see :mod:`trtq.calib.histogram`), so a hand-edited max is caught.
    """
    if not isinstance(hist, Histogram):
        raise DataError(
            f"{source}: the histogram of tensor {tensor!r} is not a Histogram", _REGENERATE
        )
    where = f"{source}: tensor {tensor!r}"
    _check_bins(source, tensor, hist.bins)
    counts = np.asarray(hist.counts)
    if counts.dtype.kind not in "iu" or counts.ndim != 1:
        raise DataError(f"{where} has non-integer bin counts", _REGENERATE)
    if (counts < 0).any():
        raise DataError(f"{where} has a negative bin count ({int(counts.min())})", _REGENERATE)
    for label in ("count", "nan_count", "sentinel_count"):
        _count(source, tensor, label, getattr(hist, label))
    total = int(counts.sum(dtype=object))
    if total != hist.count:
        raise DataError(
            f"{where} counts {hist.count} values but its bins hold {total}", _REGENERATE
        )
    if hist.count == 0:
        if hist.range_exp is not None or math.isfinite(hist.min) or math.isfinite(hist.max):
            raise DataError(f"{where} has a range but no values", _REGENERATE)
        return
    if hist.range_exp is None or not MIN_RANGE_EXP <= hist.range_exp <= _MAX_RANGE_EXP:
        raise DataError(
            f"{where} has range_exp {hist.range_exp}, outside {MIN_RANGE_EXP}..{_MAX_RANGE_EXP}",
            _REGENERATE,
        )
    for label, value in (("min", hist.min), ("max", hist.max)):
        if not math.isfinite(value) or abs(value) >= SENTINEL_ABS:
            raise DataError(
                f"{where} has {label} {value}: not a finite value below {SENTINEL_ABS:g}",
                _REGENERATE,
            )
    if hist.min > hist.max:
        raise DataError(f"{where} has min {hist.min} above max {hist.max}", _REGENERATE)
    amax = max(abs(hist.min), abs(hist.max))
    highest = int(np.flatnonzero(counts)[-1])
    expected = int(math.ldexp(amax, int(math.log2(hist.bins)) - hist.range_exp))
    if expected != highest:
        raise DataError(
            f"{where} has largest |x| {amax:g}, which belongs in bin {expected}, but its highest "
            f"non-empty bin is {highest}",
            _REGENERATE,
        )


def check_stats(stats: CalibrationStats, source: str) -> None:
    """Every histogram and range of a stats object, its sample counts, one bin count for all."""
    from trtq.calib.cache import CalibrationStats

    if not isinstance(stats, CalibrationStats):
        raise DataError(f"{source} is not CalibrationStats", "pass what trtq.calibrate returns")
    samples, batches = (_sample_count(source, v) for v in (stats.num_samples, stats.num_batches))
    if samples < 1 or batches < 1:
        raise DataError(f"{source} claims {samples} samples in {batches} batches", _REGENERATE)
    if not isinstance(stats.histograms, Mapping):
        raise DataError(f"{source}: histograms must map tensor names to Histograms", _REGENERATE)
    for tensor, hist in stats.histograms.items():
        check_histogram(source, tensor, hist)
    sizes = {h.bins for h in stats.histograms.values()}
    if len(sizes) > 1:
        raise DataError(
            f"{source} mixes histograms of {sorted(sizes)} bins", "calibrate with one --bins"
        )
    for tensor, found in stats.ranges.items():
        check_range(source, tensor, found)
        if tensor not in stats.histograms:
            raise DataError(
                f"{source} has a range but no histogram for tensor {tensor!r}", _REGENERATE
            )
        if found.method not in METHODS:
            raise DataError(
                f"{source}: tensor {tensor!r} has range method {found.method!r}",
                f"expected one of {', '.join(METHODS)}; regenerate it",
            )


def _check_magnitude(source: str, tensor: str, label: str, scale: float, amax: float) -> None:
    value = amax if label == "amax" else scale
    if scale <= 0:
        problem = "zero" if scale == 0 else "negative"
    elif scale < MIN_SCALE:
        problem = f"denormal as a float32 scale (below {MIN_SCALE:.3g})"
    elif amax >= SENTINEL_ABS:
        problem = f"a range of {amax:.3g}, at or beyond {SENTINEL_ABS:g} (a mask fill, not data)"
    else:
        return
    raise DataError(f"{source}: tensor {tensor!r} has {label} {value!r}: {problem}", _REGENERATE)


def _number(source: str, tensor: str, label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(
            f"{source}: tensor {tensor!r} has {label} {value!r}: not a number", _REGENERATE
        )
    number = float(value)
    if not math.isfinite(number):
        raise DataError(
            f"{source}: tensor {tensor!r} has {label} {number}: not finite", _REGENERATE
        )
    return number


def _integer(source: str, tensor: str, label: str, value: Any) -> int:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(
            f"{source}: tensor {tensor!r} has {label} {value!r}: not an integer", _REGENERATE
        )
    return int(value)


def _count(source: str, tensor: str, label: str, value: Any) -> int:
    number = _integer(source, tensor, label, value)
    if not 0 <= number <= MAX_COUNT:
        raise DataError(
            f"{source}: tensor {tensor!r} has {label} {number}: outside 0..2**53", _REGENERATE
        )
    return number


def _sample_count(source: str, value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or not 0 <= value <= MAX_COUNT
    ):
        raise DataError(f"{source} has a sample or batch count of {value!r}", _REGENERATE)
    return int(value)


def _check_bins(source: str, tensor: str, bins: int) -> None:
    if not 2 <= bins <= MAX_BINS or bins & (bins - 1):
        raise DataError(
            f"{source}: tensor {tensor!r} has {bins} bins: not a power of two in 2..{MAX_BINS}",
            _REGENERATE,
        )


def _list(source: str, tensor: str, data: Mapping, key: str) -> list:
    value = data[key]
    if not isinstance(value, list):
        raise DataError(f"{source}: tensor {tensor!r} has {key} that is not a list", _REGENERATE)
    return value
