"""`trtq compare` and the metrics behind it: hand-computed values, streaming, CLI gates."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from trtq.cli import main
from trtq.errors import EXIT_GATE_FAILED, EXIT_USER_ERROR
from trtq.report.compare import compare_models, evaluate_gates
from trtq.report.metrics import LabelAccuracy, OutputAgreement, per_sample_cosine

# --------------------------------------------------------------------------- metrics


def agreement(reference, candidate):
    acc = OutputAgreement()
    acc.update(np.asarray(reference), np.asarray(candidate))
    return acc.result()


def test_identical_outputs_agree_perfectly():
    logits = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
    result = agreement(logits, logits)
    assert result.cosine_mean == 1.0 and result.cosine_min == 1.0
    assert result.rel_l2 == 0.0 and result.max_abs == 0.0 and result.mean_abs == 0.0
    assert result.top1 == 1.0
    assert result.samples == 16


def test_known_perturbation():
    reference = np.array([[3.0, 4.0], [1.0, 0.0]])
    candidate = np.array([[4.0, 3.0], [1.0, 0.0]])
    result = agreement(reference, candidate)
    # Sample 0: cosine (12 + 12) / 25; sample 1 unchanged.
    assert result.cosine_min == pytest.approx(24 / 25)
    assert result.cosine_mean == pytest.approx((24 / 25 + 1) / 2)
    # diff = [[1, -1], [0, 0]]: ||diff|| = sqrt(2), ||ref|| = sqrt(26).
    assert result.rel_l2 == pytest.approx(math.sqrt(2 / 26))
    assert result.max_abs == 1.0
    assert result.mean_abs == pytest.approx(2 / 4)
    # argmax: sample 0 flips (1 -> 0), sample 1 stays.
    assert result.top1 == 0.5


def test_cosine_of_zero_vectors():
    zeros, ones = np.zeros((1, 3)), np.ones((1, 3))
    assert per_sample_cosine(zeros, zeros).tolist() == [1.0]
    assert per_sample_cosine(zeros, ones).tolist() == [0.0]
    assert per_sample_cosine(ones, -ones).tolist() == [-1.0]


def test_nan_in_candidate_shows_in_cosine():
    reference = np.ones((2, 3))
    candidate = reference.copy()
    candidate[1, 0] = np.nan
    result = agreement(reference, candidate)
    assert math.isnan(result.cosine_mean) and math.isnan(result.cosine_min)


@pytest.mark.parametrize(
    ("shape", "positions"),
    [((4, 10), 4), ((2, 5, 5, 3), 50), ((4,), None), ((4, 1), None)],
)
def test_top1_agreement_over_last_axis_or_na(shape, positions):
    rng = np.random.default_rng(1)
    reference = rng.normal(size=shape)
    candidate = reference + rng.normal(scale=0.5, size=shape)
    result = agreement(reference, candidate)
    if positions is None:
        assert result.top1 is None
    else:
        expected = np.mean(reference.argmax(-1) == candidate.argmax(-1))
        assert result.top1 == pytest.approx(expected)


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(50, 4, 7)).astype(np.float32)
    candidate = reference + rng.normal(scale=0.1, size=reference.shape).astype(np.float32)
    streamed = OutputAgreement()
    for start, stop in [(0, 7), (7, 8), (8, 30), (30, 50)]:
        streamed.update(reference[start:stop], candidate[start:stop])
    one_shot = agreement(reference, candidate)
    for field, value in vars(streamed.result()).items():
        if field == "error_histogram":  # histograms merge bit for bit, whatever the batches
            assert np.array_equal(value.counts, one_shot.error_histogram.counts)
            continue
        assert value == pytest.approx(getattr(one_shot, field), rel=1e-12), field


def test_label_accuracy_streams():
    logits = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    labels = np.array([0, 1, 2, 0, 0, 3])
    accuracy = LabelAccuracy()
    accuracy.update(logits[:4], labels[:4])
    accuracy.update(logits[4:], labels[4:])
    assert accuracy.accuracy == pytest.approx(4 / 6)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        OutputAgreement().update(np.zeros((2, 3)), np.zeros((2, 4)))


# --------------------------------------------------------------------------- models


def trtq(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def perturbed_model(mnist_model, tmp_path_factory):
    """The sample model with 10% noise on one conv weight: close, but not a 0.9999 match."""
    model = onnx.load(str(mnist_model))
    weight = next(w for w in model.graph.initializer if w.name == "features.2.0.weight")
    values = numpy_helper.to_array(weight)
    noise = np.random.default_rng(0).normal(scale=0.1 * values.std(), size=values.shape)
    weight.CopyFrom(numpy_helper.from_array((values + noise).astype(np.float32), weight.name))
    path = tmp_path_factory.mktemp("models") / "perturbed.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def unlabelled_data(mnist_test, tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, input=mnist_test["input"][:32])
    return path


def test_compare_model_with_itself(mnist_model, capsys):
    data = mnist_model.parent / "mnist_test.npz"
    code, out, err = trtq(capsys, "compare", mnist_model, mnist_model, "--data", data)
    assert code == 0
    assert f"using the labels in {data}:labels" in err
    assert "logits     1.000000    1.000000" in out
    assert "100.00%" in out
    assert "reference 99.30%, candidate 99.30%, drop 0.00 pts" in out


def test_compare_json_with_itself(mnist_model, capsys):
    data = mnist_model.parent / "mnist_test.npz"
    code, out, _ = trtq(
        capsys,
        "compare",
        mnist_model,
        mnist_model,
        "--data",
        data,
        "--batch-size",
        "200",
        "--json",
        "--max-drop",
        "0",
    )
    assert code == 0
    report = json.loads(out)
    assert report["samples"] == 1000 and report["batches"] == 5
    assert report["outputs"]["logits"]["cosine_mean"] == 1.0
    assert report["outputs"]["logits"]["top1_agreement"] == 1.0
    assert report["accuracy"]["reference"] == pytest.approx(0.993)
    assert report["accuracy"]["drop_points"] == 0.0
    assert report["gates"][0]["name"] == "max-drop" and report["passed"] is True


def test_cosine_gate_breaks_on_perturbed_model(mnist_model, perturbed_model, capsys):
    data = mnist_model.parent / "mnist_test.npz"
    argv = ["compare", mnist_model, perturbed_model, "--data", data, "--limit", "200"]
    code, out, err = trtq(capsys, *argv, "--min-cosine", "0.9999", "--json")
    assert code == EXIT_GATE_FAILED
    report = json.loads(out)
    cosine = report["outputs"]["logits"]["cosine_mean"]
    assert 0.9 < cosine < 0.9999
    assert report["accuracy"]["samples"] == 200
    assert report["passed"] is False and report["gates"][0]["passed"] is False
    gate_lines = [line for line in err.splitlines() if line.startswith("trtq: gate failed: ")]
    assert len(gate_lines) == 1 and "min-cosine" in gate_lines[0] and "logits" in gate_lines[0]
    code, _, _ = trtq(capsys, *argv, "--min-cosine", "0.9")
    assert code == 0


def test_compare_models_api(mnist_model, perturbed_model, mnist_test):
    batches = [{"input": mnist_test["input"][i : i + 16].astype(np.float32)} for i in (0, 16)]
    report = compare_models(mnist_model, perturbed_model, batches, mnist_test["labels"][:32])
    assert report.samples == 32 and report.batches == 2
    assert report.outputs["logits"].cosine_mean < 1.0
    gates = evaluate_gates(report, min_cosine=0.5, max_drop=100)
    assert [g.passed for g in gates] == [True, True]
    assert json.loads(json.dumps(report.to_json()))["accuracy"]["samples"] == 32


def test_mismatched_output_names(mnist_model, unlabelled_data, tmp_path, capsys):
    model = onnx.load(str(mnist_model))
    model.graph.output[0].name = "scores"
    for node in model.graph.node:
        node.output[:] = ["scores" if name == "logits" else name for name in node.output]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(model, str(renamed))
    code, _, err = trtq(capsys, "compare", mnist_model, renamed, "--data", unlabelled_data)
    assert code == EXIT_USER_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trtq: error: ")
    assert "'logits'" in lines[0] and "'scores'" in lines[0]


def test_max_drop_needs_labels(mnist_model, unlabelled_data, capsys):
    code, _, err = trtq(
        capsys, "compare", mnist_model, mnist_model, "--data", unlabelled_data, "--max-drop", "1"
    )
    assert code == EXIT_USER_ERROR
    assert err.strip().startswith("trtq: error: --max-drop needs labels")


def test_explicit_labels_must_match_sample_count(mnist_model, unlabelled_data, tmp_path, capsys):
    labels = tmp_path / "labels.npz"
    np.savez(labels, digits=np.arange(10))
    code, _, err = trtq(
        capsys,
        "compare",
        mnist_model,
        mnist_model,
        "--data",
        unlabelled_data,
        "--labels",
        f"{labels}:digits",
    )
    assert code == EXIT_USER_ERROR
    assert "10 labels for 32 samples" in err
