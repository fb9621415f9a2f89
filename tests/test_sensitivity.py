"""`trtq sensitivity`: per node, the output error alone and with every other node quantized.

On the MNIST sample and on a model with one planted harmful node (tests/helpers.py): the
planted node tops the table, the figures come from samples that never set a range, the
evaluations are cached and give the same figures in worker processes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import CALIB_DATA
from helpers import planted_batches, planted_outlier_model

import trtq
from trtq.report.compare import ComparisonReport
from trtq.tune.evaluate import Evaluations
from trtq.tune.holdout import EvaluationOptions, HeldOut
from trtq.tune.sensitivity import format_table

MNIST = CALIB_DATA / "mnist_cnn.onnx"
MNIST_CALIB = CALIB_DATA / "mnist_calib.npz"


def trtq_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trtq", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def mnist_sweep():
    return trtq.sensitivity(MNIST, MNIST_CALIB, eval_samples=32)


@pytest.fixture(scope="module")
def planted_sweep():
    return trtq.sensitivity(planted_outlier_model(), planted_batches(), eval_samples=32)


def test_every_quantized_node_is_measured_alone_and_with_the_others(mnist_sweep):
    names = [n.node.name for n in mnist_sweep.nodes]
    assert len(names) == 4 and len(set(names)) == 4
    assert all(n.node.macs > 0 for n in mnist_sweep.nodes)
    # The full plan, 4 nodes alone, 4 all-but-one: 2N + 1 models, none twice.
    assert mnist_sweep.evaluations == 9
    for node in mnist_sweep.nodes:
        for score in (node.alone, node.all_but):
            assert score.samples == mnist_sweep.full.samples >= 32
            agreement = score.outputs["logits"]
            assert 0.99 < agreement.cosine_mean <= 1.0 and 0 < agreement.rel_l2 < 0.1
        # Quantizing one node does less harm than quantizing all of them.
        assert node.alone.outputs["logits"].rel_l2 < mnist_sweep.full.outputs["logits"].rel_l2
    harms = [n.harm for n in mnist_sweep.nodes]
    assert harms == sorted(harms, reverse=True)


def test_figures_come_from_samples_held_out_of_calibration(mnist_sweep):
    assert "held out of" in mnist_sweep.data and "mnist_calib.npz" in mnist_sweep.data
    assert mnist_sweep.data.startswith(f"{mnist_sweep.full.samples} samples")


def test_the_planted_node_tops_the_table(planted_sweep):
    first, *rest = planted_sweep.nodes
    assert first.node.name == "conv_c"
    # Alone, it wipes the output out; the others barely touch it.
    assert first.alone.outputs["y"].cosine_mean < 0.5
    assert all(n.alone.outputs["y"].cosine_mean > 0.999 for n in rest)
    # Interactions show: everything but conv_c is fine, everything but any other node is not.
    assert first.all_but.outputs["y"].cosine_mean > 0.999
    assert all(n.all_but.outputs["y"].cosine_mean < 0.5 for n in rest)
    assert planted_sweep.full.outputs["y"].cosine_mean < 0.5


def test_json_and_table(planted_sweep):
    payload = json.loads(json.dumps(planted_sweep.to_json()))  # strict JSON throughout
    node = payload["nodes"][0]
    assert node["name"] == "conv_c"
    assert set(node) >= {"name", "op", "macs", "harm", "alone", "all_but"}
    assert set(node["alone"]["outputs"]["y"]) >= {"cosine_mean", "rel_l2"}
    assert payload["evaluations"] == 7 and payload["precision"] == "int8"
    table = format_table(planted_sweep)
    rows = [line for line in table.splitlines() if line.startswith("conv_")]
    assert rows[0].split()[0] == "conv_c" and len(rows) == 3
    assert "147,456" in rows[0]  # MACs next to the figures


def test_two_workers_give_the_same_figures(mnist_sweep):
    pooled = trtq.sensitivity(MNIST, MNIST_CALIB, eval_samples=32, workers=2)
    assert [n.node.name for n in pooled.nodes] == [n.node.name for n in mnist_sweep.nodes]
    assert pooled.evaluations == mnist_sweep.evaluations and pooled.workers == 2
    for mine, theirs in zip(pooled.nodes, mnist_sweep.nodes, strict=True):
        for a, b in ((mine.alone, theirs.alone), (mine.all_but, theirs.all_but)):
            assert a.outputs["logits"].cosine_mean == pytest.approx(
                b.outputs["logits"].cosine_mean, abs=1e-6
            )
            assert a.outputs["logits"].rel_l2 == pytest.approx(b.outputs["logits"].rel_l2, rel=1e-4)


def test_separate_evaluation_data(tmp_path):
    found = trtq.sensitivity(
        MNIST, MNIST_CALIB, eval_data=CALIB_DATA / "mnist_test.npz", eval_samples=20, limit=64
    )
    assert found.full.samples == 20
    assert found.data.startswith("the first 20 samples of") and "mnist_test.npz" in found.data


class _Counting:
    """An executor that scores configurations with a stand-in and records what it was sent."""

    def __init__(self, score: ComparisonReport) -> None:
        self.sent: list[frozenset[str]] = []
        self._score = score

    def map(self, configurations, ranking=False):
        self.sent += configurations
        return iter([self._score] * len(configurations))

    def close(self) -> None:
        pass


def test_cached_evaluations_are_not_run_again(mnist_sweep):
    executor = _Counting(mnist_sweep.full)
    with Evaluations(executor) as evaluate:
        a, b = frozenset({"a"}), frozenset({"b"})
        evaluate([a, b, a])
        evaluate([b])
        evaluate.one(frozenset({"b"}))
        assert executor.sent == [a, b] and evaluate.runs == 2
        evaluate([a, frozenset()])
    assert executor.sent == [a, b, frozenset()] and evaluate.runs == 3


def test_held_out_batches_never_reach_calibration():
    model = planted_outlier_model()
    batches = planted_batches(samples=160, batch=16)  # 10 batches
    held = HeldOut(batches, 32, model)
    seen = [b["x"] for b in held.calibration()]
    again = [b["x"] for b in held.calibration()]  # a second pass holds out the same ones
    kept = held.batches()
    assert len(kept) == 2 and len(seen) == 8 and len(again) == 8
    assert all(np.array_equal(x, y) for x, y in zip(seen, again, strict=True))
    ids = {id(b["x"]) for b in batches}
    assert {id(x) for x in seen} | {id(b["x"]) for b in kept} == ids
    assert not {id(x) for x in seen} & {id(b["x"]) for b in kept}
    # Spread over the data, not the last two.
    positions = [next(i for i, b in enumerate(batches) if b["x"] is k["x"]) for k in kept]
    assert positions == [2, 7]
    assert held.description.startswith("32 samples (2 batches, spread over the data)")


def test_a_one_shot_stream_holds_out_its_last_batches():
    model = planted_outlier_model()
    batches = planted_batches(samples=160, batch=16)
    calibration, evaluation = EvaluationOptions(samples=40).split(iter(batches), model)
    seen = list(calibration)
    assert len(seen) == 7 and all(s is b for s, b in zip(seen, batches, strict=False))
    assert [b["x"] is x["x"] for b, x in zip(evaluation.batches(), batches[7:], strict=True)]
    assert "the last ones" in evaluation.description


def test_too_little_data_to_hold_out_is_refused():
    args = ["sensitivity", str(MNIST), "--calib", str(MNIST_CALIB), "--no-progress"]
    result = trtq_cli(*args, "--limit", "8")  # one batch: nothing left to calibrate on
    assert result.returncode == 2
    assert "too small to hold out 64 samples" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # Two batches: one is held out, with a warning that it is fewer samples than asked.
    result = trtq_cli(*args, "--limit", "16")
    assert result.returncode == 0, result.stderr
    assert "only 8 of the 64 evaluation samples asked for are held out" in result.stderr


def test_cli_table_json_and_report(tmp_path):
    report = tmp_path / "sensitivity.json"
    args = ["sensitivity", str(MNIST), "--calib", str(MNIST_CALIB), "--eval-samples", "16"]
    text = trtq_cli(*args, "--no-progress", "--report", str(report))
    assert text.returncode == 0, text.stderr
    assert (
        "alone: cosine" in text.stdout and "/features/features.2/features.2.0/Conv" in text.stdout
    )
    stored = json.loads(report.read_text())
    assert stored["model"] == str(MNIST) and len(stored["nodes"]) == 4
    printed = trtq_cli(*args, "--no-progress", "--json")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["nodes"] == stored["nodes"]
