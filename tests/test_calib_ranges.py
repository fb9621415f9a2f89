"""Range selection: entropy against a loop-by-loop reference, properties, degenerate tensors."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from trtq.calib.histogram import Histogram
from trtq.calib.ranges import (
    METHODS,
    MIN_AMAX,
    TensorRange,
    _kl_divergences,
    compute_range,
    entropy_amax,
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


def reference_entropy(hist: Histogram, num_levels: int = 128) -> tuple[float, list[float]]:
    """IInt8EntropyCalibrator2 as published (GTC 2017), one candidate and one level at a time.

    Returns amax and the KL divergence of every candidate i = num_levels…bins. Only the
    final normalise-and-sum of each candidate uses numpy; building P, merging into levels
    and expanding Q back over the non-empty bins are explicit loops.
    """
    counts = [int(v) for v in hist.counts]
    bins = len(counts)
    divergences = []
    best_i, best_kl = 0, math.inf
    for i in range(num_levels, bins + 1):
        p = np.array(counts[:i], dtype=np.float64)
        p[i - 1] += sum(counts[i:])  # outliers go into the last kept bin
        q = np.zeros(i)
        per_level = i // num_levels
        for level in range(num_levels):
            start = level * per_level
            stop = i if level == num_levels - 1 else start + per_level
            nonempty = [k for k in range(start, stop) if counts[k] > 0]
            share = sum(counts[start:stop]) / max(len(nonempty), 1)
            for k in nonempty:
                q[k] = share
        support = p > 0
        if np.any(q[support] == 0):  # also when Q is all zero: nothing kept below bin i
            kl = math.inf
        else:
            p /= p.sum()
            q /= q.sum()
            kl = float(np.sum(p[support] * np.log(p[support] / q[support])))
        divergences.append(kl)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return min(best_i * hist.range / bins, hist.amax), divergences


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
        # KL is exactly 0 just past the smallest value and again past the largest; the
        # prefix sums give 0 or ±1 ulp there, and the published tie rule picks the first.
        return np.repeat([0.18, -0.31, 0.62, -0.82], [1400, 2400, 600, 5600])
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def mnist_conv_inputs(mnist_model) -> dict[str, Histogram]:
    """Histograms of the inputs of the MNIST CNN's 2nd and 3rd Conv over 256 real digits."""
    model = onnx.load(mnist_model)
    names = [n.input[0] for n in model.graph.node if n.op_type == "Conv"][1:3]
    for name in names:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with np.load(mnist_model.parent / "mnist_calib.npz") as data:
        digits = data["input"][:256].astype(np.float32)
    return {
        name: hist_of(out)
        for name, out in zip(names, session.run(names, {"input": digits}), strict=True)
    }


def check_against_reference(hist: Histogram) -> None:
    expected, divergences = reference_entropy(hist)
    assert entropy_amax(hist, flatten_zero_bin=False) == pytest.approx(expected, rel=1e-6)
    # The default search runs the same algorithm on counts whose bin 0 is set to bin 1's.
    flattened = Histogram.from_json(hist.to_json())
    flattened.counts[0] = flattened.counts[1]
    if flattened.counts.any():
        assert entropy_amax(hist) == pytest.approx(reference_entropy(flattened)[0], rel=1e-6)
    _, kl = _kl_divergences(hist.counts, 128)
    reference = np.array(divergences)
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
    ],
)
def test_entropy_matches_loop_reference_on_synthetic_data(kind):
    check_against_reference(hist_of(synthetic(kind)))


def test_entropy_matches_loop_reference_on_mnist_activations(mnist_conv_inputs):
    assert len(mnist_conv_inputs) == 2
    for hist in mnist_conv_inputs.values():
        assert hist.bins == 2048 and hist.count > 100_000
        check_against_reference(hist)


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
    assert entropy_amax(h, flatten_zero_bin=False) < 0.35 * h.amax
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
