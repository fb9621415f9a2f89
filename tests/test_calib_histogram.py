"""Streaming histograms: exact re-binning, exact merge, sentinel and NaN accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trtq.calib.histogram import SENTINEL_ABS, Histogram, _merge_bins


def hist_of(*batches: np.ndarray, bins: int = 2048) -> Histogram:
    h = Histogram.empty(bins)
    for batch in batches:
        h.update(batch)
    return h


def reference_counts(values: np.ndarray, range_: float, bins: int) -> np.ndarray:
    """np.histogram over [0, range): the obvious, independent way."""
    counts, _ = np.histogram(np.abs(values), bins=bins, range=(0.0, range_))
    return counts


def assert_same(a: Histogram, b: Histogram) -> None:
    np.testing.assert_array_equal(a.counts, b.counts)
    assert (a.range_exp, a.count, a.min, a.max) == (b.range_exp, b.count, b.min, b.max)
    assert (a.nan_count, a.sentinel_count) == (b.nan_count, b.sentinel_count)


def test_range_is_a_power_of_two_strictly_above_the_max():
    h = hist_of(np.array([-3.0, 0.5, 2.0]))
    assert h.range == 4.0 and h.amax == 3.0
    h = hist_of(np.array([4.0]))
    assert h.range == 8.0  # a value equal to a power of two goes below the next one


def test_counts_match_numpy_histogram():
    values = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    h = hist_of(values)
    np.testing.assert_array_equal(h.counts, reference_counts(values, h.range, h.bins))
    assert h.count == values.size
    assert h.min == float(values.min()) and h.max == float(values.max())


def test_growing_range_rebins_exactly():
    """A later, larger batch doubles the range; the result equals binning everything at once."""
    rng = np.random.default_rng(1)
    small = rng.standard_normal(10_000) * 0.01
    large = rng.standard_normal(10_000) * 50
    streamed = hist_of(small, large)
    at_once = hist_of(np.concatenate([small, large]))
    assert_same(streamed, at_once)
    np.testing.assert_array_equal(
        streamed.counts, reference_counts(np.concatenate([small, large]), streamed.range, 2048)
    )


def test_growth_by_more_than_the_bin_count_puts_old_values_in_bin_zero():
    h = hist_of(np.full(10, 1e-6), np.array([1e3]))
    assert h.counts[0] == 10 and h.counts.sum() == 11


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=50),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 5),
)
def test_merged_shards_equal_single_pass(batches, shards):
    """Order and sharding never change the histogram (bit-exact)."""
    arrays = [np.array(b, dtype=np.float32) for b in batches]
    single = hist_of(*arrays)
    parts = [hist_of(*arrays[k::shards]) for k in range(shards)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    assert_same(merged, single)
    assert_same(hist_of(*reversed(arrays)), single)


def test_sentinels_and_nans_are_counted_not_binned():
    mask = np.array([0.0, -3.4e38, -np.inf, 1.5, np.nan, -SENTINEL_ABS, 2.0], dtype=np.float32)
    h = hist_of(mask)
    assert h.nan_count == 1
    assert h.sentinel_count == 3
    assert h.count == 3 and h.amax == 2.0 and h.range == 4.0


def test_all_sentinel_batch_leaves_the_histogram_empty():
    h = hist_of(np.full(5, -np.inf, dtype=np.float32))
    assert h.count == 0 and h.range_exp is None and h.amax == 0.0 and h.sentinel_count == 5


def test_all_zeros_and_empty_batches():
    h = hist_of(np.zeros(100, np.float32), np.zeros(0, np.float32))
    assert h.count == 100 and h.counts[0] == 100 and h.amax == 0.0 and h.range > 0


def test_float16_and_integer_inputs():
    h16 = hist_of(np.array([0.5, -1.25], dtype=np.float16))
    h32 = hist_of(np.array([0.5, -1.25], dtype=np.float32))
    assert_same(h16, h32)
    assert hist_of(np.array([3, -7], dtype=np.int32)).amax == 7.0


def test_json_round_trip_is_exact():
    values = np.random.default_rng(2).laplace(size=5000).astype(np.float32)
    h = hist_of(values, np.array([np.nan, np.inf], np.float32))
    assert_same(Histogram.from_json(h.to_json()), h)
    empty = Histogram.empty(256)
    assert_same(Histogram.from_json(empty.to_json()), empty)


def test_bins_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        Histogram.empty(1000)
    with pytest.raises(ValueError, match="cannot merge"):
        Histogram.empty(256).merge(Histogram.empty(512))


def test_merge_bins_sums_groups():
    counts = np.arange(8, dtype=np.int64)
    np.testing.assert_array_equal(_merge_bins(counts, 1), [1, 5, 9, 13, 0, 0, 0, 0])
    np.testing.assert_array_equal(_merge_bins(counts, 3), [28, 0, 0, 0, 0, 0, 0, 0])
    assert math.isclose(_merge_bins(counts, 0).sum(), 28)
