"""Streaming, mergeable histograms of |x| for activation calibration.

Calibration must not keep activations around: each batch is folded into a
fixed-size histogram and dropped, so memory is independent of the number of
batches. The histogram covers [0, range) where ``range`` is always a power of
two, strictly above the largest value seen. When a later batch exceeds it, the
range doubles as often as needed and each new bin is the exact sum of 2, 4, 8…
old bins. Because bins, range and every scale factor are powers of two, a
value's bin index is ``floor(|x| * 2**k)`` computed exactly in floating point,
so the order in which batches (or shards) arrive does not change the result:
merging shard histograms gives bit-for-bit the histogram of a single pass.

Values that cannot be calibrated are counted, not binned: NaN, and
"sentinels" (infinities and magnitudes >= :data:`SENTINEL_ABS`, the -3.4e38 or
-1e9 fills of attention masks). A tensor that contains them is reported as not
quantizable by :mod:`trtq.calib.ranges`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_BINS = 2048
#: Magnitudes at or above this are mask fills, not signal (BERT-style masks use
#: -1e4 and are caught by range analysis instead; -1e9, -3.4e38 and -inf land here).
SENTINEL_ABS = 1e9
#: The smallest histogram range: below this every value is effectively zero.
MIN_RANGE_EXP = -64


@dataclass
class Histogram:
    """Histogram of |x| over [0, 2**range_exp) in ``len(counts)`` equal bins, plus running stats."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(DEFAULT_BINS, np.int64))
    range_exp: int | None = None  # None until a finite value has been seen
    count: int = 0  # finite, non-sentinel values binned
    min: float = math.inf
    max: float = -math.inf
    nan_count: int = 0
    sentinel_count: int = 0
    #: Sum of each update's largest |x|, and the number of updates (one per calibration batch):
    #: their ratio is the "mean of per-batch max" range candidate of the range search
    #: (:mod:`trtq.calib.range_search`). Free to keep (the batch max is computed anyway); not
    #: part of the statistics file nor of equality (sums of floats depend on merge order).
    batch_max_sum: float = field(default=0.0, compare=False)
    batch_updates: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        bins = len(self.counts)
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"the number of bins must be a power of two >= 2, got {bins}")

    @classmethod
    def empty(cls, bins: int = DEFAULT_BINS) -> Histogram:
        return cls(counts=np.zeros(bins, np.int64))

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def range(self) -> float:
        """Upper edge of the last bin (0.0 while nothing has been binned)."""
        return 0.0 if self.range_exp is None else math.ldexp(1.0, self.range_exp)

    @property
    def amax(self) -> float:
        """Largest |x| seen among binned values."""
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.range, self.bins + 1)

    def update(self, values: np.ndarray) -> None:
        """Fold one batch of a tensor's values into the histogram."""
        x = np.asarray(values)
        if x.size == 0:
            return
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        elif x.dtype.itemsize < 4:  # float16/bfloat16 activations: bin in float32
            x = x.astype(np.float32)
        x = x.ravel()
        low, high = float(x.min()), float(x.max())  # NaN if any value is NaN
        if not max(-low, high) < SENTINEL_ABS:  # also true for NaN and inf
            x = self._drop_unusable(x)
            if x.size == 0:
                return
            low, high = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, low), max(self.max, high)
        self.count += int(x.size)
        self.batch_max_sum += max(-low, high)
        self.batch_updates += 1
        self._grow_to(max(-low, high))
        # Bin index = floor(|x| * 2**k): exact, multiplying by a power of two only changes
        # the exponent. Done in place on the |x| buffer: calibration spends most of its
        # time here, so every pass over the data counts.
        index = np.abs(x)
        index *= math.ldexp(1.0, int(math.log2(self.bins)) - self.range_exp)
        self.counts += np.bincount(index.astype(np.intp), minlength=self.bins)

    def _drop_unusable(self, x: np.ndarray) -> np.ndarray:
        """Count NaN and sentinel values and return the rest."""
        usable = np.abs(x) < SENTINEL_ABS  # False for NaN and inf
        nans = int(np.isnan(x).sum())
        self.nan_count += nans
        self.sentinel_count += int(x.size - usable.sum()) - nans
        return x[usable]

    def _grow_to(self, largest: float) -> None:
        """Widen the range (by whole powers of two) so that ``largest`` < range."""
        needed = max(math.frexp(largest)[1], MIN_RANGE_EXP) if largest > 0 else MIN_RANGE_EXP
        if self.range_exp is None:
            self.range_exp = needed
        elif needed > self.range_exp:
            self.counts = _merge_bins(self.counts, needed - self.range_exp)
            self.range_exp = needed

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram equal to one built from both histograms' values."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        exps = [e for e in (self.range_exp, other.range_exp) if e is not None]
        merged = Histogram.empty(self.bins)
        if exps:
            merged.range_exp = max(exps)
            for part in (self, other):
                if part.range_exp is not None:
                    merged.counts += _merge_bins(part.counts, merged.range_exp - part.range_exp)
        merged.count = self.count + other.count
        merged.min, merged.max = min(self.min, other.min), max(self.max, other.max)
        merged.nan_count = self.nan_count + other.nan_count
        merged.sentinel_count = self.sentinel_count + other.sentinel_count
        merged.batch_max_sum = self.batch_max_sum + other.batch_max_sum
        merged.batch_updates = self.batch_updates + other.batch_updates
        return merged

    def to_json(self) -> dict:
        """A JSON-safe form that :meth:`from_json` restores exactly (floats as Python floats)."""
        nonzero = np.flatnonzero(self.counts)
        return {
            "bins": self.bins,
            "range_exp": self.range_exp,
            "count": self.count,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "nan_count": self.nan_count,
            "sentinel_count": self.sentinel_count,
            # Sparse: activations after ReLU or of small nets leave most bins empty.
            "nonzero_bins": nonzero.tolist(),
            "nonzero_counts": self.counts[nonzero].tolist(),
        }

    @classmethod
    def from_json(cls, data: dict) -> Histogram:
        counts = np.zeros(int(data["bins"]), np.int64)
        counts[np.asarray(data["nonzero_bins"], np.int64)] = data["nonzero_counts"]
        return cls(
            counts=counts,
            range_exp=data["range_exp"],
            count=int(data["count"]),
            min=math.inf if data["min"] is None else float(data["min"]),
            max=-math.inf if data["max"] is None else float(data["max"]),
            nan_count=int(data["nan_count"]),
            sentinel_count=int(data["sentinel_count"]),
        )


def _merge_bins(counts: np.ndarray, doublings: int) -> np.ndarray:
    """Re-bin ``counts`` for a range 2**doublings times larger: sum groups of adjacent bins."""
    if doublings <= 0:
        return counts.copy()
    bins = len(counts)
    factor = 1 << doublings
    merged = np.zeros(bins, np.int64)
    if factor >= bins:
        merged[0] = counts.sum()
    else:
        merged[: bins // factor] = counts.reshape(-1, factor).sum(axis=1)
    return merged
