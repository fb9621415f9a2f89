"""The bench's own helpers that its peer comparison rests on: NNCF's UINT8 Q/DQ pairs made
signed INT8 for TensorRT (bench/peers/signed_qdq.py) and the task metrics
(bench/task_metrics.py). No peer, no network: the helpers are plain onnx/numpy."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import run

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path[:0] = [str(BENCH), str(BENCH / "peers")]

import signed_qdq  # noqa: E402
import task_metrics  # noqa: E402


def _uint8_qdq_model(scale: float, zero_point: int) -> onnx.ModelProto:
    """x -> QuantizeLinear(uint8) -> DequantizeLinear -> y, with the Q output declared uint8."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
        initializer=[
            numpy_helper.from_array(np.array(scale, np.float32), "s"),
            numpy_helper.from_array(np.array(zero_point, np.uint8), "zp"),
        ],
        value_info=[
            helper.make_tensor_value_info("q", TensorProto.UINT8, [64]),
            helper.make_tensor_value_info("zp", TensorProto.UINT8, []),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_nonnegative_uint8_pair_becomes_int8_over_the_same_range():
    """NNCF's post-ReLU pair (zero point 0) keeps its range [0, 255 s] at scale 255 s / 127."""
    model = _uint8_qdq_model(0.01, 0)
    x = {"x": np.linspace(0, 2.55, 64, dtype=np.float32)}
    before = run(model, x)[0]
    assert signed_qdq.uint8_to_int8(model) == 1
    onnx.checker.check_model(model, full_check=True)  # declared types agree with inference
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["zp"].dtype == np.int8 and inits["zp"] == 0
    assert inits["s"] == pytest.approx(0.01 * 255 / 127)
    after = run(model, x)[0]
    assert after.max() == pytest.approx(2.55, rel=1e-6)  # the top of the range survives
    assert np.abs(after - before).max() <= inits["s"] / 2 + 1e-6  # one coarser step at most


def test_zero_point_128_maps_exactly():
    model = _uint8_qdq_model(0.02, 128)
    x = {"x": np.linspace(-2.56, 2.54, 64, dtype=np.float32)}
    before = run(model, x)[0]
    signed_qdq.uint8_to_int8(model)
    np.testing.assert_array_equal(run(model, x)[0], before)


def test_signed_scale_covers_the_larger_side_of_an_asymmetric_grid():
    scale = signed_qdq.signed_scale(np.array([1.0, 1.0], np.float32), np.array([10, 200]))
    np.testing.assert_allclose(scale, [245 / 127, 200 / 127], rtol=1e-6)


def test_int8_models_are_left_alone():
    model = _uint8_qdq_model(0.01, 0)
    signed_qdq.uint8_to_int8(model)
    snapshot = model.SerializeToString()
    assert signed_qdq.uint8_to_int8(model) == 0
    assert model.SerializeToString() == snapshot


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    steps = [0, 3, 3, 0, 3, 5, 5, 0]  # "3 3 5": a blank separates the repeated 3
    probabilities = np.eye(6)[steps][None]
    assert task_metrics.ctc_greedy(probabilities) == [(3, 3, 5)]
    changed = np.eye(6)[[0, 3, 3, 3, 3, 5, 5, 0]][None]  # the blank lost: "3 5"
    result = task_metrics.strings_unchanged(
        [probabilities, probabilities], [probabilities, changed]
    )
    assert result == {"strings_unchanged": 0.5, "lines": 2}


def test_mask_iou_pools_pixels_over_images():
    a = np.zeros((1, 1, 4, 4))
    a[..., :2, :] = 0.9  # 8 text pixels
    b = np.zeros((1, 1, 4, 4))
    b[..., :1, :] = 0.9  # 4 of them found
    assert task_metrics.mask_iou([a, a], [a, b]) == {"mask_iou": 12 / 16}


def test_side_iou_of_boxes_around_one_anchor():
    box = np.array([1.0, 1.0, 1.0, 1.0])  # 2 x 2 around the anchor
    assert task_metrics.side_iou(box, box) == pytest.approx(1.0)
    half = np.array([0.0, 1.0, 1.0, 1.0])  # 1 x 2, inside
    assert task_metrics.side_iou(box, half) == pytest.approx(0.5)


def test_dfl_decodes_the_expected_distance():
    logits = np.full(4 * 8, -50.0)
    logits[[2, 8 + 5, 16 + 0, 24 + 7]] = 50.0  # one-hot bins 2, 5, 0, 7
    np.testing.assert_allclose(task_metrics.dfl_distances(logits), [2, 5, 0, 7], atol=1e-9)


def test_detector_agreement_on_found_anchors_only():
    scores = np.array([[[0.9, 0.1], [0.05, 0.1]]])  # anchor 0 found (class 0), anchor 1 not
    boxes = np.full((1, 2, 32), -50.0)
    boxes[..., [2, 10, 18, 26]] = 50.0  # every side 2 bins
    moved = scores.copy()
    moved[0, 1, 1] = 0.35  # drift on an unfound anchor counts in the drift only
    ref, cand = [[scores, boxes]], [[moved, boxes]]
    result = task_metrics.detector_agreement(ref, cand, levels=1)
    assert result["box_iou"] == pytest.approx(1.0)
    assert result["class_agreement"] == 1.0
    assert result["score_drift_max"] == pytest.approx(0.25)
    assert result["anchors_found"] == 1


def test_speech_agreement_counts_flipped_decisions():
    ref = np.array([0.9, 0.8, 0.1, 0.2])
    cand = np.array([0.9, 0.4, 0.1, 0.2])
    result = task_metrics.speech_agreement([ref], [cand])
    assert result["frames_agree"] == 0.75
    assert result["prob_drift_max"] == pytest.approx(0.4)


def test_spearman_ranks_with_ties():
    a = np.array([1.0, 2.0, 2.0, 3.0])
    assert task_metrics.spearman(a, a * 10) == pytest.approx(1.0)
    assert task_metrics.spearman(a, -a) == pytest.approx(-1.0)
    np.testing.assert_allclose(task_metrics._ranks(a), [0, 1.5, 1.5, 3])


def test_sentence_similarity_ignores_scale_but_not_direction():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(12, 8))
    same = task_metrics.sentence_similarity([embeddings[:6], embeddings[6:]], [embeddings * 3])
    assert same["spearman"] == pytest.approx(1.0) and same["pairs"] == 66
    noisy = embeddings + rng.normal(scale=2.0, size=embeddings.shape)
    assert task_metrics.sentence_similarity([embeddings], [noisy])["spearman"] < 0.9


# ------------------------------------------------- bench/quantize_cost.py, accuracy_budget.py


def test_line_fit_recovers_a_line_and_refuses_one_point():
    import quantize_cost

    fit = quantize_cost.line_fit([(1, 3.0), (2, 5.0), (4, 9.0)])
    assert fit["slope"] == pytest.approx(2.0)
    assert fit["intercept"] == pytest.approx(1.0)
    assert fit["r2"] == pytest.approx(1.0)
    assert quantize_cost.line_fit([(2, 1.0), (2, 3.0)]) is None


def test_spread_keeps_the_ends_and_spaces_the_rest():
    import quantize_cost

    names = [f"n{i}" for i in range(10)]
    assert quantize_cost.spread(names, 3) == ["n0", "n4", "n9"]  # round(4.5) == 4
    assert quantize_cost.spread(names, 1) == ["n0"]
    assert quantize_cost.spread(names, 20) == names


def test_sets_that_share_a_sample_are_refused():
    import accuracy_budget

    accuracy_budget.refuse_shared({"calibration": {b"a"}, "eval": {b"b"}, "test": {b"c"}})
    with pytest.raises(SystemExit, match="the test set shares a sample"):
        accuracy_budget.refuse_shared({"calibration": {b"a"}, "eval": {b"b"}, "test": {b"a"}})
