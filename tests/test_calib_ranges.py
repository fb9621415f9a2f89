"""Range selection: entropy against a loop reference, spikes, properties, degenerate tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest

import trtq
from trtq.calib.histogram import Histogram
from trtq.calib.ranges import (
    ENTROPY_MAX_CLIPPED,
    ENTROPY_MAX_ERROR_RATIO,
    METHODS,
    MIN_AMAX,
    TensorRange,
    _kl_divergences,
    clipped_share,
    compute_range,
    entropy_amax,
    error_ratio,
    max_amax,
    mse_amax,
    percentile_amax,
    safe_amax,
    weight_amax,
)
from trtq.errors import UserError


def hist_of(values: np.ndarray, bins: int = 2048) -> Histogram:
    h = Histogram.empty(bins)
    h.update(values)
    return h


def reference_entropy(
    hist: Histogram, num_levels: int = 128, *, flatten_zero_bin: bool = True, merge="linspace"
) -> tuple[float, np.ndarray]:
    """The entropy search as NVIDIA's reference runs it, one candidate at a time.

    Returns amax and the KL divergence of every candidate i = num_levels…bins. Written
    from the description, independently of trtq's prefix sums: per candidate, bins are
    assigned to levels with ``digitize`` against ``linspace(0, i, num_levels + 1)``
    (``merge="remainder"``: ``i // num_levels`` bins per level, the whole remainder in
    the last, as trtq did before), Q is each level's count spread over its non-empty
    bins, and KL(P‖Q) is summed over P's support. A candidate that keeps nothing (Q
    empty) is infinite. The minimum's ties within 1e-12 go to the largest i.
    """
    counts = hist.counts.astype(np.float64)
    if flatten_zero_bin:
        counts[0] = counts[1]
    divergences = []
    for i in range(num_levels, len(counts) + 1):
        kept = counts[:i]
        if merge == "linspace":
            level = np.digitize(np.arange(i), np.linspace(0, i, num_levels + 1)) - 1
        else:
            level = np.minimum(np.arange(i) // (i // num_levels), num_levels - 1)
        nonempty = kept > 0
        level_sum = np.bincount(level, weights=kept, minlength=num_levels)
        level_nonempty = np.bincount(level, weights=nonempty, minlength=num_levels)
        q = np.where(nonempty, level_sum[level] / np.maximum(level_nonempty[level], 1), 0.0)
        p = kept.copy()
        p[-1] += counts[i:].sum()  # the clipped tail goes into the last kept bin
        support = p > 0
        if q.sum() == 0 or np.any(q[support] == 0):
            divergences.append(math.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        divergences.append(float(np.sum(p[support] * np.log(p[support] / q[support]))))
    kl = np.array(divergences)
    best = num_levels + int(np.flatnonzero(kl <= kl.min() + 1e-12)[-1])
    return min(best * hist.range / hist.bins, hist.amax), kl


def synthetic(kind: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    n = 200_000
    if kind == "gaussian":
        return rng.standard_normal(n)
    if kind == "laplacian":
        return rng.laplace(size=n)
    if kind == "relu":
        return np.concatenate([np.zeros(n // 2), np.abs(rng.standard_normal(n // 2))])
    if kind == "student_t_outliers":
        return np.concatenate([rng.standard_t(2, n), [250.0, -600.0, 900.0]])
    if kind == "discrete":  # few distinct values: runs of candidates with KL exactly 0
        return rng.choice([0.0, 0.25, 1.0, 1.5, 3.0], size=n, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    if kind == "few_values_away_from_zero":
        # KL is exactly 0 past the smallest value and again past the largest; the prefix
        # sums give 0 or ±1 ulp there, and the tie goes to the largest candidate.
        return np.repeat([0.18, -0.31, 0.62, -0.82], [1400, 2400, 600, 5600])
    if kind == "spiky":
        return spiky_activation(rng)
    raise AssertionError(kind)


def spiky_activation(rng: np.random.Generator) -> np.ndarray:
    """Like the MNIST CNN's first MaxPool: a third exact zeros, the constant responses of 32
    channels to a blank background (spikes below 0.6) and a thin spread of values up to 7.7."""
    zeros = np.zeros(100_000)
    spikes = np.repeat(rng.uniform(0.05, 0.6, 32), 4_000)
    body = rng.uniform(0.0, 7.7, 60_000)
    return rng.permutation(np.concatenate([zeros, spikes, body]))


@pytest.fixture(scope="module")
def mnist_histograms(mnist_model) -> dict[str, Histogram]:
    """trtq's own histograms of the MNIST CNN's quantized activations over 256 real digits."""
    stats = trtq.calibrate(mnist_model, mnist_model.parent / "mnist_calib.npz", limit=256)
    return stats.histograms


def check_against_reference(hist: Histogram) -> None:
    """Bit-for-bit amax (with and without bin-0 flattening), KL curve to 1e-10."""
    for flatten in (False, True):  # the KL curve checked is the default's, flattened
        expected, reference = reference_entropy(hist, flatten_zero_bin=flatten)
        assert entropy_amax(hist, flatten_zero_bin=flatten) == expected
    counts = hist.counts.copy()
    counts[0] = counts[1]
    candidates, kl = _kl_divergences(counts, 128)
    np.testing.assert_array_equal(candidates, np.arange(128, hist.bins + 1))
    np.testing.assert_array_equal(np.isinf(kl), np.isinf(reference))
    finite = np.isfinite(reference)
    np.testing.assert_allclose(kl[finite], reference[finite], rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "kind",
    [
        "gaussian",
        "laplacian",
        "relu",
        "student_t_outliers",
        "discrete",
        "few_values_away_from_zero",
        "spiky",
    ],
)
def test_entropy_matches_loop_reference_on_synthetic_data(kind):
    check_against_reference(hist_of(synthetic(kind)))


def test_entropy_matches_loop_reference_on_mnist_activations(mnist_histograms):
    assert len(mnist_histograms) == 5
    for hist in mnist_histograms.values():
        assert hist.bins == 2048 and hist.count > 500_000
        check_against_reference(hist)


def test_levels_split_the_remainder_instead_of_piling_it_on_the_last():
    """Each level holds floor or ceil(i/128) bins; the old merge put up to 127 extra bins in
    the last level, which moved amax on real data and favoured i = 127 mod 128."""
    for kind in ("gaussian", "laplacian", "relu"):
        h = hist_of(synthetic(kind))
        linspace, _ = reference_entropy(h)
        remainder, _ = reference_entropy(h, merge="remainder")
        assert entropy_amax(h) == linspace != remainder
    # The level starts trtq derives agree with digitize(linspace) for every candidate.
    for i in (128, 129, 255, 256, 383, 1000, 2047, 2048):
        level = np.digitize(np.arange(i), np.linspace(0, i, 129)) - 1
        sizes = np.bincount(level, minlength=128)
        assert set(sizes) <= {i // 128, -(-i // 128)} and sizes.sum() == i


def test_entropy_ties_go_to_the_largest_candidate():
    """Four distinct values: KL is 0 both past the smallest and past the largest; like the
    reference, the largest candidate wins, so nothing is clipped."""
    h = hist_of(synthetic("few_values_away_from_zero"))
    assert entropy_amax(h) == h.amax == 0.82


def test_spiky_histogram_falls_back_to_mse_and_says_why():
    """The KL minimum sits just above the spikes and clips the body; it is refused."""
    h = hist_of(synthetic("spiky"))
    refused = entropy_amax(h)
    assert refused < 0.1 * h.amax and clipped_share(h, refused) > ENTROPY_MAX_CLIPPED
    r = compute_range("pool", h, "entropy")
    assert (r.method, r.quantizable) == ("mse", True)
    assert r.amax == mse_amax(h) and 0.5 * h.amax < r.amax <= h.amax
    assert clipped_share(h, r.amax) < 0.01
    assert r.reason.startswith(f"entropy's KL minimum, amax {refused:.4g} of max {h.amax:.4g}")
    assert f"clips {clipped_share(h, refused):.1%} of the non-zero values" in r.reason
    assert "spike" in r.reason and r.reason.endswith(f"mse chose amax {r.amax:.4g}")


def hot_channel_activation(rng: np.random.Generator) -> np.ndarray:
    """Like PP-OCRv4's recognizer's residual sums (p2o.Add.103): a body piling up against
    0.044, and 2 % of the values, a few hot channels, around 0.36."""
    n = 200_000
    ramp = rng.uniform(0, 0.044, n // 2)
    edge = 0.044 - rng.exponential(0.002, n // 4)
    hot = rng.normal(0.36, 0.03, n // 50)
    magnitudes = np.concatenate([ramp, edge, hot])
    return rng.permutation(magnitudes * rng.choice([-1.0, 1.0], magnitudes.size))


def test_entropy_clipping_a_population_of_outliers_falls_back_to_mse():
    """Few values clipped (under the spike guard's share) but the hot channels' signal lost:
    the squared error, not the count, refuses it."""
    h = hist_of(hot_channel_activation(np.random.default_rng(0)))
    refused = entropy_amax(h)
    assert refused < 0.15 * h.amax and clipped_share(h, refused) <= ENTROPY_MAX_CLIPPED
    ratio = error_ratio(h, refused)
    assert ratio > 100 * ENTROPY_MAX_ERROR_RATIO
    r = compute_range("residual", h, "entropy")
    assert (r.method, r.amax) == ("mse", mse_amax(h)) and r.amax > 0.8 * h.amax
    assert error_ratio(h, r.amax) == 1.0
    assert f"costs {ratio:.3g} times the smallest squared error" in r.reason
    assert "population of outliers" in r.reason


def test_error_ratio_is_one_at_mse_and_grows_with_clipping():
    h = hist_of(synthetic("laplacian"))
    assert error_ratio(h, mse_amax(h)) == 1.0
    ratios = [error_ratio(h, f * h.amax) for f in (0.8, 0.4, 0.2, 0.1)]
    assert ratios == sorted(ratios) and ratios[-1] > ENTROPY_MAX_ERROR_RATIO


def test_entropy_is_kept_where_it_clips_a_tail(mnist_histograms):
    for kind in ("gaussian", "laplacian", "relu", "student_t_outliers"):
        h = hist_of(synthetic(kind))
        r = compute_range("t", h, "entropy")
        assert (r.method, r.amax, r.reason) == ("entropy", entropy_amax(h), None)
    # The MNIST sample: the first MaxPool's spikes (the blank background) are refused; the
    # deeper activations keep TensorRT's threshold.
    ranges = {name: compute_range(name, h, "entropy") for name, h in mnist_histograms.items()}
    refused = [name for name, r in ranges.items() if r.method == "mse"]
    assert refused == ["/features/features.1/MaxPool_output_0"]
    assert "spike" in ranges[refused[0]].reason
    assert all(r.reason is None for name, r in ranges.items() if name not in refused)


def test_clipped_share_leaves_bin_zero_out():
    h = hist_of(np.concatenate([np.zeros(1000), np.arange(100) + 0.5]))  # 0.5, 1.5, … 99.5
    assert clipped_share(h, h.amax) == 0.0  # nothing lies above the exact max
    assert clipped_share(h, 90.0) == 10 / 100  # 90.5…99.5 of the 100 non-zero values
    assert clipped_share(h, 89.0) == 11 / 100
    assert clipped_share(hist_of(np.zeros(10)), 0.0) == 0.0


def test_max_is_the_exact_max():
    x = np.random.default_rng(1).standard_normal(10_001).astype(np.float32)
    r = compute_range("t", hist_of(x), "max")
    assert r.amax == float(np.abs(x).max())
    assert (r.method, r.quantizable, r.reason) == ("max", True, None)


def test_percentile_is_the_bin_edge_above_the_quantile():
    x = np.random.default_rng(2).laplace(size=100_003)
    h = hist_of(x)
    width = h.range / h.bins
    percentiles = (50, 90, 99, 99.9, 99.99, 100)
    amaxes = [percentile_amax(h, p) for p in percentiles]
    assert amaxes == sorted(amaxes)
    assert amaxes[-1] == h.amax  # 100 %: the last value's bin edge, capped at the exact max
    for p, amax in zip(percentiles[:-1], amaxes[:-1], strict=True):
        quantile = np.quantile(np.abs(x), p / 100, method="inverted_cdf")
        assert amax - width <= quantile < amax
    # Exactly reaching the share counts: 2 of 4 values lie in 2.0's bin or below.
    assert percentile_amax(hist_of(np.array([1.0, -2.0, 3.0, 4.0])), 50) == 2.0 + 8 / 2048


def test_flattening_the_zero_bin_keeps_relu_outputs_from_being_crushed():
    """Half exact zeros (a ReLU output): the published search clips most of the signal."""
    x = np.maximum(synthetic("gaussian"), 0.0)
    h = hist_of(x)
    assert entropy_amax(h, flatten_zero_bin=False) < 0.45 * h.amax
    assert entropy_amax(h) > 0.5 * h.amax


def test_entropy_for_gaussian_data_clips_the_tail_only():
    h = hist_of(synthetic("gaussian"))
    amax = entropy_amax(h)
    assert 2.0 < amax < 5.0 and amax <= h.amax


def analytic_mse_optimum(tail_sq_error, clipped_fraction) -> float:
    """argmin over t of in-range rounding error (t/127)²/12 plus the clipped squared error."""
    t = np.linspace(1.0, 20.0, 19_001)
    error = (1 - clipped_fraction(t)) * (t / 127) ** 2 / 12 + tail_sq_error(t)
    return float(t[np.argmin(error)])


def test_mse_lands_on_the_analytic_optimum():
    """Standard normal: ≈3.92σ; Laplace(b=1): ≈9.88b (the known 8-bit clipping optima)."""
    erfc = np.vectorize(math.erfc)

    def gaussian_tail(t):  # 2 E[(X - t)²; X > t]
        tail = 0.5 * erfc(t / math.sqrt(2))
        return 2 * ((1 + t**2) * tail - t * np.exp(-(t**2) / 2) / math.sqrt(2 * math.pi))

    gaussian = analytic_mse_optimum(gaussian_tail, lambda t: erfc(t / math.sqrt(2)))
    laplace = analytic_mse_optimum(lambda t: 2 * np.exp(-t), lambda t: np.exp(-t))
    assert gaussian == pytest.approx(3.92, abs=0.01) and laplace == pytest.approx(9.88, abs=0.01)
    assert mse_amax(hist_of(synthetic("gaussian"))) == pytest.approx(gaussian, rel=0.05)
    assert mse_amax(hist_of(synthetic("laplacian"))) == pytest.approx(laplace, rel=0.1)


def reference_mse(hist: Histogram, num_levels: int = 128) -> float:
    """The MSE threshold by brute force: every bin edge, every bin at its centre."""
    width = hist.range / hist.bins
    centres = (np.arange(hist.bins) + 0.5) * width
    best_t, best_error = 0.0, math.inf
    for k in range(1, hist.bins + 1):
        t = k * width
        error = 0.0
        for count, centre in zip(hist.counts, centres, strict=True):
            if count and centre < t:
                error += count * (t / (num_levels - 1)) ** 2 / 12
            elif count:
                error += count * (centre - t) ** 2
        if error < best_error:
            best_t, best_error = t, error
    return min(best_t, hist.amax)


@pytest.mark.parametrize("kind", ["gaussian", "relu", "student_t_outliers"])
def test_mse_matches_brute_force(kind):
    hist = hist_of(synthetic(kind), bins=256)  # 256 x 256 bins keeps the loops fast
    assert mse_amax(hist) == pytest.approx(reference_mse(hist), rel=1e-12)
    assert mse_amax(hist, num_levels=16) == pytest.approx(reference_mse(hist, 16), rel=1e-12)


def test_uniform_data_is_not_clipped():
    h = hist_of(np.random.default_rng(3).uniform(-1.0, 1.0, 200_000))
    for method in ("entropy", "mse", "percentile"):
        assert 0.98 * h.amax <= compute_range("t", h, method).amax <= h.amax


def test_every_method_caps_at_the_exact_max():
    for kind in ("gaussian", "relu", "student_t_outliers"):
        h = hist_of(synthetic(kind))
        for method in METHODS:
            assert 0 < compute_range("t", h, method).amax <= h.amax


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_tensors_get_a_usable_scale(method):
    def check(r: TensorRange) -> None:
        assert math.isfinite(r.amax) and r.amax > 0
        assert math.isfinite(r.scale) and r.scale > 0 and r.scale == r.amax / 127

    zeros = compute_range("zeros", hist_of(np.zeros(1000)), method)
    constant = compute_range("constant", hist_of(np.full(1000, -3.0)), method)
    off_edge = compute_range("off_edge", hist_of(np.full(1000, 2.7)), method)  # not a bin edge
    empty = compute_range("empty", Histogram.empty(), method)
    tiny = compute_range("tiny", hist_of(np.full(10, 1e-30)), method)
    for r in (zeros, constant, off_edge, empty, tiny):
        check(r)
        assert r.quantizable and r.reason is None
    assert zeros.amax == 1.0 and empty.amax == 1.0
    assert constant.amax == 3.0 and off_edge.amax == 2.7
    assert tiny.amax == MIN_AMAX

    nan = compute_range("nan", hist_of(np.array([1.0, np.nan, -2.0, np.nan])), method)
    check(nan)
    assert not nan.quantizable and "NaN" in nan.reason and nan.amax == 2.0
    mask = np.where(np.arange(64) % 4 == 0, -3.4e38, 0.5).astype(np.float32)
    for values in (mask, np.array([-np.inf, 0.5, -np.inf, 0.25, -np.inf])):
        r = compute_range("mask", hist_of(values), method)
        check(r)
        assert not r.quantizable and r.amax == 0.5
        assert "attention mask" in r.reason and r.reason.endswith("left in float")
    only_sentinels = compute_range("all_masked", hist_of(np.full(8, -np.inf)), method)
    check(only_sentinels)
    assert not only_sentinels.quantizable and only_sentinels.amax == 1.0


def test_unquantizable_reason_counts_both_problems():
    r = compute_range("t", hist_of(np.array([np.nan, np.inf, -1e10, 1.0])))
    assert r.reason == (
        "produced NaN 1 time during calibration; 2 values are +-inf or |x| >= 1e+09: "
        "a sentinel-filled tensor such as an attention mask; left in float"
    )


def test_to_json():
    r = compute_range("conv_in", hist_of(np.array([0.5, -1.27])), "max")
    assert r.to_json() == {
        "name": "conv_in",
        "amax": 1.27,
        "scale": 1.27 / 127,
        "method": "max",
        "quantizable": True,
        "reason": None,
    }


def test_safe_amax():
    assert safe_amax(2.5) == 2.5 and isinstance(safe_amax(2.5), float)
    for bad in (0.0, -1.0, math.nan, math.inf, -math.inf):
        assert safe_amax(bad) == 1.0
    assert safe_amax(1e-300) == MIN_AMAX
    out = safe_amax(np.array([0.0, 3.0, np.nan, 1e-30]))
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, [1.0, 3.0, 1.0, MIN_AMAX])


def test_weight_amax_per_channel():
    rng = np.random.default_rng(4)
    conv = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)  # Conv [N, C, kh, kw]: axis 0
    conv[2] = 0.0
    expected = np.abs(conv).reshape(4, -1).max(axis=1).astype(np.float64)
    expected[2] = 1.0  # an all-zero channel still gets a usable scale
    np.testing.assert_array_equal(weight_amax(conv, 0), expected)

    matmul = rng.standard_normal((5, 3))  # MatMul [K, N]: axis 1
    matmul[:, 1] = 0.0
    expected = np.abs(matmul).max(axis=0)
    expected[1] = 1.0
    np.testing.assert_array_equal(weight_amax(matmul, 1), expected)
    np.testing.assert_array_equal(weight_amax(matmul, -1), expected)

    per_tensor = weight_amax(conv, None)
    assert per_tensor.shape == () and per_tensor == np.abs(conv).max()
    assert weight_amax(np.zeros((2, 2)), None) == 1.0
    with pytest.raises(ValueError, match="out of range"):
        weight_amax(matmul, 2)


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError) as err:
        compute_range("t", hist_of(np.ones(4)), "kl")
    assert "'kl'" in str(err.value)
    for method in METHODS:
        assert method in str(err.value)


@pytest.mark.parametrize("percentile", [0.0, -1.0, 100.5, math.nan])
def test_bad_percentile_is_a_user_error(percentile):
    with pytest.raises(UserError, match="percentile"):
        compute_range("t", hist_of(np.ones(4)), "percentile", percentile=percentile)


def test_raw_amax_of_an_empty_histogram_is_zero_until_made_safe():
    empty = Histogram.empty()
    assert max_amax(empty) == entropy_amax(empty) == percentile_amax(empty, 99.0) == 0.0
    assert mse_amax(empty) == 0.0 and safe_amax(max_amax(empty)) == 1.0
