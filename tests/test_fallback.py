"""`trtq quantize --target-*`: nodes move to high precision until the target holds, or exit 3.

The planted model (tests/helpers.py) has exactly one node INT8 destroys: the fallback must
move it and nothing else. On the MNIST sample: a target the full plan meets costs one
evaluation; a stricter one moves nodes and brings back those not needed; worker processes
give the same steps; a target beyond reach exits 3 and writes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from conftest import CALIB_DATA
from helpers import planted_batches, planted_outlier_model

import trtq
from trtq.errors import UserError
from trtq.graph.coverage import quantized_compute_nodes
from trtq.tune.fallback import TargetUnreachableError

MNIST = CALIB_DATA / "mnist_cnn.onnx"
MNIST_CALIB = CALIB_DATA / "mnist_calib.npz"
MNIST_TEST = CALIB_DATA / "mnist_test.npz"


def trtq_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trtq", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def planted():
    return trtq.quantize(planted_outlier_model(), planted_batches(), target_cosine=0.99)


@pytest.fixture(scope="module")
def strict_mnist():
    """A target between the full plan (0.9998) and FP32: some nodes must move."""
    return trtq.quantize(MNIST, MNIST_CALIB, target_cosine=0.99995, eval_samples=32)


def test_the_planted_node_and_only_it_falls_back(planted):
    found = planted.report["fallback"]
    assert found["moved"] == ["conv_c"]
    floats = {n["name"]: n["reason"] for n in planted.report["float_nodes"]}
    assert set(floats) == {"conv_c"} and floats["conv_c"].startswith("sensitivity fallback")
    # The written graph agrees: conv_b and conv_a read DequantizeLinear, conv_c does not.
    assert quantized_compute_nodes(planted.model) == {"conv_a", "conv_b"}
    assert found["harm"][0]["node"] == "conv_c"
    assert planted.report["coverage"]["fraction"] == pytest.approx(found["steps"][-2]["coverage"])


def test_every_step_is_reported(planted):
    steps = planted.report["fallback"]["steps"]
    assert [(s["action"], s["node"], s["precision"]) for s in steps] == [
        ("start", None, None),
        ("all high precision", None, None),
        ("fall back", "conv_c", "fp32"),
        ("restore", "conv_c", "int8"),
    ]
    assert [s["met"] for s in steps] == [False, True, True, False]
    assert steps[0]["outputs"]["y"]["cosine_mean"] < 0.5
    assert steps[2]["outputs"]["y"]["cosine_mean"] >= 0.99
    assert [s["coverage"] for s in steps] == pytest.approx([1.0, 0.0, 10 / 19, 1.0])


def test_the_check_runs_on_the_data_the_target_was_met_on(planted):
    check = planted.verification
    met = planted.report["fallback"]["steps"][2]["outputs"]["y"]
    assert check.outputs["y"].cosine_mean == pytest.approx(met["cosine_mean"], abs=1e-9)
    assert check.outputs["y"].rel_l2 == pytest.approx(met["rel_l2"], rel=1e-6)
    assert "held out of" in check.source and check.samples == 64


def test_a_target_the_full_plan_meets_costs_one_evaluation():
    result = trtq.quantize(MNIST, MNIST_CALIB, target_cosine=0.99, eval_samples=32)
    found = result.report["fallback"]
    assert found["evaluations"] == 1 and found["moved"] == []
    assert [s["action"] for s in found["steps"]] == ["start"]
    assert result.report["coverage"]["quantized_nodes"] == 4


def test_a_strict_target_moves_nodes_then_brings_back_what_it_can(strict_mnist):
    found = strict_mnist.report["fallback"]
    steps = found["steps"]
    moved = [s["node"] for s in steps if s["action"] == "fall back"]
    restored = [s for s in steps if s["action"] == "restore"]
    assert 1 <= len(moved) < 4 and steps[len(moved) + 1]["met"]
    assert not any(s["met"] for s in steps[: len(moved) + 1] if s["action"] != "all high precision")
    # Every node moved is tried back, least harmful first (reverse order of moving).
    assert [s["node"] for s in restored] == moved[::-1]
    kept_back = {s["node"] for s in restored if s["kept"]}
    assert set(found["moved"]) == set(moved) - kept_back
    assert strict_mnist.verification.outputs["logits"].cosine_mean >= 0.99995
    # Bounded cost: full plan, all high precision, 4 alone, one per step (some cached).
    assert found["evaluations"] <= 2 + 4 + len(moved) + len(restored)


def test_two_workers_take_the_same_steps(strict_mnist):
    pooled = trtq.quantize(
        MNIST, MNIST_CALIB, target_cosine=0.99995, eval_samples=32, workers=2
    ).report["fallback"]
    single = strict_mnist.report["fallback"]
    assert pooled["workers"] == 2
    assert pooled["moved"] == single["moved"]
    assert [(s["action"], s["node"], s["met"], s["kept"]) for s in pooled["steps"]] == [
        (s["action"], s["node"], s["met"], s["kept"]) for s in single["steps"]
    ]
    for mine, theirs in zip(pooled["steps"], single["steps"], strict=True):
        a, b = mine["outputs"]["logits"], theirs["outputs"]["logits"]
        assert a["cosine_mean"] == pytest.approx(b["cosine_mean"], abs=1e-6)


def test_an_unreachable_target_exits_3_and_writes_nothing(tmp_path):
    out = tmp_path / "x.onnx"
    result = trtq_cli(
        "quantize",
        str(MNIST),
        "--calib",
        str(MNIST_CALIB),
        "--high-precision",
        "fp16",
        "--target-cosine",
        "1",
        "--eval-samples",
        "16",
        "-o",
        str(out),
        "--no-progress",
    )
    assert result.returncode == 3, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "cannot be met even with all 4 quantized nodes in FP16" in line
    assert "--high-precision fp32" in line
    assert "every node in FP16" in result.stdout
    assert not out.exists()


def test_the_api_raises_the_unreachable_target_with_its_steps():
    with pytest.raises(TargetUnreachableError) as raised:
        trtq.quantize(
            planted_outlier_model(), planted_batches(), high_precision="fp16", target_cosine=1.0
        )
    steps = raised.value.result.steps
    assert [s.action for s in steps] == ["start", "all high precision"]


def test_accuracy_target_with_labelled_evaluation_data(tmp_path):
    out = tmp_path / "x.onnx"
    report = tmp_path / "r.json"
    result = trtq_cli(
        "quantize",
        str(MNIST),
        "--calib",
        str(MNIST_CALIB),
        "--target-drop",
        "0.5",
        "--eval",
        str(MNIST_TEST),
        "--eval-samples",
        "100",
        "-o",
        str(out),
        "--report",
        str(report),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(report.read_text())["fallback"]
    start = found["steps"][0]
    assert start["accuracy"]["samples"] == 100 and start["accuracy"]["drop_points"] <= 0.5
    assert found["data"].startswith("the first 100 samples of") and "mnist_test" in found["data"]
    assert "target accuracy drop <= 0.5 pts" in result.stdout
    onnx.checker.check_model(onnx.load(out))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target-drop", "1"], "needs labelled evaluation data"),
        (["--eval", str(MNIST_TEST)], "evaluation data is for a fidelity target"),
        (["--target-cosine", "1.5"], "argument --target-cosine"),
        (["--target-cosine", "0.9", "--precision", "fp16"], "there are none"),
    ],
)
def test_bad_target_flags_are_one_line_errors(tmp_path, flags, message):
    out = tmp_path / "x.onnx"
    result = trtq_cli("quantize", str(MNIST), "--calib", str(MNIST_CALIB), "-o", str(out), *flags)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_workers_must_be_positive():
    with pytest.raises(UserError, match="workers must be a positive integer"):
        trtq.quantize(MNIST, MNIST_CALIB, target_cosine=0.99, workers=0)


def test_writing_a_cache_leaves_nothing_to_hold_out(tmp_path):
    cache = tmp_path / "x.cache"
    result = trtq_cli(
        "quantize",
        str(MNIST),
        "--calib",
        str(MNIST_CALIB),
        "--target-cosine",
        "0.99",
        "--cache",
        str(cache),
        "-o",
        str(tmp_path / "x.onnx"),
    )
    assert result.returncode == 2
    assert "none could be held out" in result.stderr and "--eval DATA" in result.stderr
    assert not cache.exists()
