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

import numpy as np
import onnx
import pytest
from conftest import CALIB_DATA
from helpers import planted_batches, planted_outlier_model

import trtq
from trtq.errors import UserError
from trtq.graph.coverage import quantized_compute_nodes
from trtq.tune import evaluate, fallback
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
    order = [h["node"] for h in found["harm"]]
    falls = [s for s in steps if s["action"] == "fall back"]
    restored = [s for s in steps if s["action"] == "restore"]
    # Each fall-back step puts a prefix of the order in FP32: its last node is the step's.
    for s in falls:
        assert s["node"] == order[s["in_high_precision"] - 1] and s["precision"] == "fp32"
    # Galloping then bisection: the prefix kept is the shortest that met, one longer than
    # the longest that missed (or the first).
    held = min(s["in_high_precision"] for s in falls if s["met"])
    missed = [s["in_high_precision"] for s in falls if not s["met"]]
    assert held == 1 or held - 1 in missed
    assert falls[0]["in_high_precision"] == 1
    # Every node moved is tried back, least harmful first.
    assert [s["node"] for s in restored] == order[:held][::-1]
    kept_back = {s["node"] for s in restored if s["kept"]}
    assert set(found["moved"]) == set(order[:held]) - kept_back
    assert strict_mnist.verification.outputs["logits"].cosine_mean >= 0.99995
    # Bounded cost: full plan, all high precision, 4 alone, one per step (some cached).
    assert found["evaluations"] <= 2 + 4 + len(falls) + len(restored)


def test_falling_back_gallops_then_bisects(monkeypatch):
    """On an order of 100 nodes where the target holds from the 37th on, the fall-back
    tries 1, 2, 4, ..., 64 nodes, then bisects 32..64: 12 evaluations, not 37."""
    order = [f"n{i}" for i in range(100)]
    tried = []

    class Scores:
        def one(self, configuration):
            tried.append(len(configuration))
            return len(configuration)

    def record(action, node, configuration, score):
        assert action == "fall back" and node == order[len(configuration) - 1]
        return score >= 37

    floats = fallback._fall_back(Scores(), order, record)
    assert floats == frozenset(order[:37])
    assert tried == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]


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


def test_single_nodes_are_ranked_on_the_batches_the_full_plan_errs_most_on(monkeypatch):
    """With a ranking budget of 16 samples, the sensitivity pass runs on the one batch of 16
    that carries the most error (the all-zero batches carry none: FP32 and INT8 agree
    there), and every step that decides the target runs all 64 samples."""
    monkeypatch.setattr(evaluate, "RANKING_MACS", 1)
    monkeypatch.setattr(evaluate, "MIN_RANKING_SAMPLES", 16)
    chosen = []

    def recording(job, shares):
        ranked = evaluate.with_ranking(job, shares)
        chosen.append((list(shares), ranked.ranking))
        return ranked

    monkeypatch.setattr(fallback, "with_ranking", recording)
    x = np.random.default_rng(3).normal(size=(16, 16, 8, 8)).astype(np.float32)
    eval_batches = [{"x": np.zeros_like(x)}, {"x": x}, {"x": np.zeros_like(x)}, {"x": 2 * x}]
    result = trtq.quantize(
        planted_outlier_model(), planted_batches(), target_cosine=0.99, eval_data=eval_batches
    )
    found = result.report["fallback"]
    assert found["moved"] == ["conv_c"] and found["harm"][0]["node"] == "conv_c"
    assert found["ranking_evaluations"] == 3 and found["ranking_samples"] == 16
    assert {s["samples"] for s in found["steps"]} == {64}
    ((shares, ranking),) = chosen
    assert shares[0] == shares[2] == 0.0 and min(shares[1], shares[3]) > 0
    assert ranking in ((1,), (3,)) and shares[ranking[0]] == max(shares)


def _job(sizes: tuple[int, ...], macs_per_sample: int) -> evaluate.Job:
    """A job with only what choosing the ranking batches reads."""
    return evaluate.Job(
        model=b"",
        plan=None,
        ranges={},
        precision="int8",
        mixed=None,
        fp16_amax={},
        example=None,
        batches=tuple({} for _ in sizes),
        reference=(),
        sizes=sizes,
        macs_per_sample=macs_per_sample,
    )


def test_the_ranking_batches_fit_the_budget_and_keep_data_order(monkeypatch):
    monkeypatch.setattr(evaluate, "RANKING_MACS", 1000)
    monkeypatch.setattr(evaluate, "MIN_RANKING_SAMPLES", 4)
    shares = [0.1, 0.5, 0.0, 0.3, 0.2]
    # 1000 MACs afford 10 samples of 100: the two largest batches of 4 and the next one.
    assert evaluate.with_ranking(_job((4,) * 5, 100), shares).ranking == (1, 3, 4)
    # Ties go to the earlier batch.
    assert evaluate.with_ranking(_job((4,) * 5, 100), [0.2] * 5).ranking == (0, 1, 2)
    # Never fewer than MIN_RANKING_SAMPLES, whatever a sample costs.
    assert evaluate.with_ranking(_job((4,) * 5, 10**9), shares).ranking == (1,)
    # Whole feeds (size 0) are one sample each.
    assert evaluate.with_ranking(_job((0,) * 20, 100), [i / 20 for i in range(20)]).ranking == (
        tuple(range(10, 20))
    )
    # All of them needed: no ranking part, a ranking run is a whole run.
    assert evaluate.with_ranking(_job((4,) * 2, 100), [0.5, 0.5]).ranking is None
