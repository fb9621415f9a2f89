"""``--method auto`` (per-tensor ranges chosen by output error) and Concats of unlike scales.

The planted model has two independent branches, each a MatMul on its own input:

* ``a`` is a uniform body in [-1, 1] with rare spikes of 20 that carry signal (one in 80
  samples): clipping them (percentile, entropy) wrecks ``out_a``; it wants ``max``;
* ``b`` is N(0, 1) with one calibration value of 1000, outside the samples the search
  measures on and absent from the held-out data: ``max`` and ``mse`` (which weighs that
  single clipped value heavily) let it stretch the scale until the body rounds to 0; it
  wants a percentile.

No single method gets both right, so the search must choose per tensor.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import onnx
import pytest
from helpers import checked_model, float_value, run
from onnx import helper

from trtq.calib import range_search
from trtq.calib.histogram import Histogram
from trtq.calib.range_search import AUTO, candidates
from trtq.calib.ranges import METHODS
from trtq.errors import UserError
from trtq.graph import qdq
from trtq.quantizer import CalibrationOptions, quantize

WIDTH = 256
SPIKE = 20.0
SPIKE_EVERY = 80  # samples


def planted_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return checked_model(
        [
            helper.make_node("MatMul", ["a", "wa"], ["out_a"], name="matmul_a"),
            helper.make_node("MatMul", ["b", "wb"], ["out_b"], name="matmul_b"),
        ],
        [float_value("a", "N", WIDTH), float_value("b", "N", WIDTH)],
        [float_value("out_a", "N", 32), float_value("out_b", "N", 32)],
        {
            "wa": (rng.standard_normal((WIDTH, 32)) * 0.1).astype(np.float32),
            "wb": (rng.standard_normal((WIDTH, 32)) * 0.1).astype(np.float32),
        },
    )


def planted_data(samples: int, seed: int, *, outlier_at: int | None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (samples, WIDTH)).astype(np.float32)
    for row in range(0, samples, SPIKE_EVERY):  # the first sample of the search carries one
        a[row, rng.integers(WIDTH)] = SPIKE * rng.choice([-1, 1])
    b = rng.standard_normal((samples, WIDTH)).astype(np.float32)
    if outlier_at is not None:
        b[outlier_at, 0] = 1000.0
    return {"a": a, "b": b}


def batches_of(data: dict[str, np.ndarray], size: int = 16) -> list[dict[str, np.ndarray]]:
    count = len(next(iter(data.values())))
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, count, size)]


#: 640 calibration samples; the outlier of b sits after the 16 the search measures on.
CALIBRATION = batches_of(planted_data(640, 1, outlier_at=300))
HELD_OUT = planted_data(160, 2, outlier_at=None)


def output_error(model: onnx.ModelProto, quantized: onnx.ModelProto) -> float:
    """Root mean square over outputs of the relative L2 error against FP32 (held-out)."""
    feeds = dict(HELD_OUT)
    errors = []
    for ref, got in zip(run(model, feeds), run(quantized, feeds), strict=True):
        errors.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return math.sqrt(np.mean(np.square(errors)))


def quantized_with(model: onnx.ModelProto, method: str):
    return quantize(model, CALIBRATION, calibration=CalibrationOptions(method, progress=False))


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, quantized_with(model, AUTO)


def test_auto_beats_every_single_method_on_the_planted_model(planted):
    model, auto = planted
    single = {m: output_error(model, quantized_with(model, m).model) for m in METHODS}
    found = output_error(model, auto.model)
    assert found <= min(single.values()), (found, single)
    # Not a tie with a lucky method: each single method gets one of the two tensors wrong.
    assert found < 0.5 * min(single.values()), (found, single)
    ranges = auto.ranges
    assert ranges["a"].amax > SPIKE / 2  # the spikes are kept (the body ends at 1)
    assert ranges["b"].amax < 10  # the stray 1000 is clipped
    assert "percentile" in ranges["b"].method


def test_search_cost_is_bounded_and_one_session_serves_every_trial(monkeypatch):
    model = planted_model()
    opened, runs = [], []

    def counting(opener):
        def open_counted(*args, **kwargs):
            session = opener(*args, **kwargs)
            opened.append(session)
            original, index = session.run, len(opened)

            def run_counted(names, feeds, *rest):
                runs.append(index)
                return original(names, feeds, *rest)

            session.run = run_counted
            return session

        return open_counted

    for opener in ("open_session", "reference_session"):
        monkeypatch.setattr(range_search, opener, counting(getattr(range_search, opener)))
    result = quantized_with(model, AUTO)
    found = result.report["range_search"]
    assert len(opened) == 2  # the quantized evaluation copy and the FP32 reference, once each
    parts = runs.count(2)  # FP32 outputs computed once: one run per part of the samples
    assert parts == 2  # the 16 samples, cut in two halves
    assert runs.count(1) == found["evaluations"] * parts
    # 1 + sum over units of (candidates - 1), each unit at most 8 candidates.
    units = found["choices"]
    assert found["bound"] == 1 + sum(len(u["candidates"]) - 1 for u in units)
    assert found["evaluations"] <= found["bound"] <= 1 + len(units) * 7


def test_report_records_each_choice_with_the_error_before_and_after(planted):
    _, auto = planted
    report = auto.report
    assert report["method"] == AUTO
    search = report["range_search"]
    assert search["start_method"] == range_search.START_METHOD
    assert search["samples"] == range_search.DEFAULT_SAMPLES
    assert search["after"]["rel_l2"] < search["before"]["rel_l2"]
    assert search["changed"] >= 1
    by_tensor = {t["name"]: t for t in report["quantized_tensors"]}
    for choice in search["choices"]:
        assert choice["after"]["rel_l2"] <= choice["before"]["rel_l2"]
        assert choice["chosen"]["method"] in choice["candidates"]
        for name in choice["tensors"]:
            entry = by_tensor[name]
            assert entry["method"] == choice["chosen"]["method"]
            assert entry["amax"] == pytest.approx(choice["chosen"]["amax"])
            assert entry["reason"].startswith("range search: ")
            assert "output relative L2 vs FP32" in entry["reason"]


def test_candidates_cover_every_method_and_drop_duplicates():
    hist = Histogram.empty()
    rng = np.random.default_rng(3)
    for _ in range(4):
        hist.update(rng.standard_normal(5000))
    found = candidates(hist, 99.99)
    assert {"max", "percentile 99.9", "mse"} <= found.keys()
    assert hist.batch_updates == 4  # one per batch, for the mean-of-batch-max candidate
    assert min(found.values()) > 0
    values = sorted(found.values())
    assert all(b > a * (1 + range_search.SAME_AMAX) for a, b in itertools.pairwise(values))
    constant = Histogram.empty()
    constant.update(np.full(100, 2.0))
    assert set(candidates(constant).values()) == {2.0}  # one candidate: nothing to search


def test_auto_needs_histograms_and_samples():
    model = planted_model()
    with pytest.raises(UserError, match="TensorRT cache"):
        range_search.search(model, qdq.QuantPlan([]), {}, None, [])
    stats = quantized_with(model, "mse").stats
    with pytest.raises(UserError, match="pass --calib"):
        quantize(model, None, calibration=CalibrationOptions(AUTO, progress=False), stats=stats)


# --- Concat of unlike quantities ---------------------------------------------------------------


def conv(x: str, w: str, y: str, name: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], name=name, pads=[1, 1, 1, 1])


def detector_head() -> onnx.ModelProto:
    """Boxes in pixels (0..640) concatenated with sigmoid scores (0..1) into the output; each
    also read by a quantized Conv (a refinement stage), so both are quantized tensors."""
    rng = np.random.default_rng(5)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    return checked_model(
        [
            conv("x", "w_feat", "feat_pre", "conv_feat"),
            helper.make_node("Relu", ["feat_pre"], ["feat"], name="relu"),
            conv("feat", "w_box", "box_logits", "conv_box"),
            helper.make_node("Sigmoid", ["box_logits"], ["box_unit"], name="box_sigmoid"),
            helper.make_node("Mul", ["box_unit", "pixels"], ["boxes"], name="to_pixels"),
            conv("feat", "w_cls", "cls_logits", "conv_cls"),
            helper.make_node("Sigmoid", ["cls_logits"], ["scores"], name="cls_sigmoid"),
            helper.make_node("Concat", ["boxes", "scores"], ["detections"], name="concat", axis=1),
            conv("boxes", "w_box_ref", "box_refined", "conv_box_refine"),
            conv("scores", "w_cls_ref", "score_refined", "conv_score_refine"),
        ],
        [float_value("x", "N", 16, 8, 8)],
        [
            float_value("detections", "N", 64, 8, 8),
            float_value("box_refined", "N", 32, 8, 8),
            float_value("score_refined", "N", 32, 8, 8),
        ],
        {
            "w_feat": w(32, 16, 3, 3),
            "w_box": w(32, 32, 3, 3),
            "pixels": np.array(640.0, np.float32),
            "w_cls": w(32, 32, 3, 3),
            "w_box_ref": w(32, 32, 3, 3),
            "w_cls_ref": w(32, 32, 3, 3),
        },
    )


def score_error(model: onnx.ModelProto, quantized: onnx.ModelProto, x: np.ndarray) -> float:
    """Relative L2 error vs FP32 of the output computed from the scores."""
    names = [o.name for o in model.graph.output]
    ref = dict(zip(names, run(model, {"x": x}), strict=True))["score_refined"]
    got = dict(zip(names, run(quantized, {"x": x}), strict=True))["score_refined"]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_concat_of_boxes_and_scores_keeps_their_scales_apart(monkeypatch):
    model = detector_head()
    rng = np.random.default_rng(6)
    batches = [{"x": rng.standard_normal((8, 16, 8, 8)).astype(np.float32)} for _ in range(4)]
    held_out = rng.standard_normal((16, 16, 8, 8)).astype(np.float32)
    quiet = CalibrationOptions(progress=False)
    result = quantize(model, batches, calibration=quiet)
    assert not any({"boxes", "scores"} <= set(group) for group in result.plan.range_groups)
    assert result.ranges["boxes"].amax > 16 * result.ranges["scores"].amax
    (split,) = result.report["separate_scales"]
    assert split["node"] == "concat"
    assert "unlike scale" in split["reason"] and "scores" in split["reason"]
    kept = score_error(model, result.model, held_out)
    assert kept < 0.05
    # Control: with one shared scale (the rule off), the scores round to nothing.
    monkeypatch.setattr(qdq, "MIXED_SCALE_RATIO", math.inf)
    shared = quantize(model, batches, calibration=quiet)
    assert any({"boxes", "scores"} <= set(group) for group in shared.plan.range_groups)
    assert shared.report["separate_scales"] == []
    assert score_error(model, shared.model, held_out) > 0.9  # every score rounded to 0


# --- the command line --------------------------------------------------------------------------


def test_cli_method_auto_on_mnist(tmp_path, capsys):
    from conftest import CALIB_DATA

    from trtq.cli import main

    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    argv = ["quantize", CALIB_DATA / "mnist_cnn.onnx", "--calib", CALIB_DATA / "mnist_calib.npz"]
    argv += ["-o", out, "--report", report, "--method", "auto", "--no-progress", "--limit", "64"]
    assert main([str(a) for a in argv]) == 0
    assert "(method auto)" in capsys.readouterr().out
    found = json.loads(report.read_text())
    search = found["range_search"]
    assert search["evaluations"] <= search["bound"]
    assert search["after"]["rel_l2"] <= search["before"]["rel_l2"]
    assert all(t["reason"].startswith("range search: ") for t in found["quantized_tensors"])
    assert found["verification"]["outputs"]["logits"]["cosine_mean"] > 0.999
