"""bench/fidelity.py's deployability marking and issue 12's verdict, without running a peer.

The bench judges trtq's default against the best *TensorRT-deployable* peer setting: a peer
figure bought with something TensorRT cannot run (per-channel activation scales) must not be
the bar, and a tie at the printed precision must not read as a loss. These are the pure
functions that decide it, fed the dicts the evaluation child writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtq.calib.ranges import DEFAULT_METHOD
from trtq.graph.invariants import check

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path[:0] = [str(BENCH), str(BENCH / "peers")]

import _common  # noqa: E402
import fidelity  # noqa: E402


def _conv_model(activation_scales: int) -> onnx.ModelProto:
    """x -> Q/DQ (``activation_scales`` scales on axis 1) -> Conv with a per-channel int8
    weight: per tensor with 1, per channel (what TensorRT rejects) with 4."""
    scale = np.full(activation_scales, 0.02, np.float32)
    if activation_scales == 1:
        scale = scale.reshape(())
    weight = np.ones((8, 4, 3, 3), np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q", axis=1),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq", axis=1),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wdq", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
        initializer=[
            numpy_helper.from_array(scale, "xs"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), "xz"),
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.full(8, 0.01, np.float32), "ws"),
            numpy_helper.from_array(np.zeros(8, np.int8), "wz"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_per_channel_activations_are_not_deployable_per_tensor_ones_are():
    rejected = fidelity.deployability([f.to_json() for f in check(_conv_model(4))])
    assert rejected["deployable"] is False
    assert rejected["errors"] == {"per-channel-activation": 1}
    assert fidelity.findings_text(rejected) == "per-channel-activation x1 (error)"
    accepted = fidelity.deployability([f.to_json() for f in check(_conv_model(1))])
    assert accepted == {"deployable": True, "errors": {}, "warnings": {}, "findings": []}
    assert fidelity.findings_text(accepted) == ""


def test_warnings_alone_leave_a_model_deployable():
    findings = [
        {"rule": "dq-not-direct", "severity": "warning"},
        {"rule": "dq-not-direct", "severity": "warning"},
    ]
    summary = fidelity.deployability(findings)
    assert summary["deployable"] is True
    assert fidelity.findings_text(summary) == "dq-not-direct x2 (warning)"


def test_a_non_deployable_row_is_marked_in_the_table():
    base = {"tool": "nncf", "coverage": 0.9, "coverage_source": "graph", "cosine_mean": 0.99}
    table = fidelity.format_table(
        [
            {**base, "method": "default", "deployable": False},
            {**base, "method": "per-tensor", "deployable": True},
        ]
    )
    methods = [line.split()[1] for line in table.splitlines()[1:]]
    assert methods == ["default*", "per-tensor"]


def _candidate(tool, method, cosine, *, deployable=True, coverage=0.99, **extra):
    fidelity_figures = {"cosine_mean": cosine, "accuracy": extra.pop("accuracy", None)}
    fidelity_figures["top1_agreement"] = extra.pop("top1", 1.0)
    return {
        "tool": tool,
        "method": method,
        "run": {"error": ""},
        "coverage": {"fraction": coverage},
        "fidelity": {"heldout": fidelity_figures, "ood": fidelity_figures},
        "invariants": {"deployable": deployable},
        **extra,
    }


def test_the_bar_is_the_best_deployable_peer_not_the_best_peer():
    candidates = [
        _candidate("trtq", "entropy", 0.9990),
        _candidate("nncf", "default", 0.9999, deployable=False),
        _candidate("nncf", "per-tensor", 0.9980, top1=0.5),
    ]
    result = fidelity.verdict(candidates, "entropy", None, "heldout")
    cosine, top1 = result["figures"]
    assert (cosine["peer"], cosine["outcome"]) == ("nncf/per-tensor", "BEATS")
    assert (top1["figure"], top1["outcome"]) == ("top1_agreement", "BEATS")
    assert result["peers_not_deployable"] == ["nncf/default"]
    assert result["met"] is True
    line = fidelity.format_verdict(result)
    assert line.startswith("trtq entropy vs best deployable peer (nncf per-tensor): cosine mean")
    assert line.endswith("coverage 99.00% >= 90% OK: MET")


def test_each_figure_meets_its_own_best_peer_and_a_loss_is_not_met():
    candidates = [
        _candidate("trtq", "entropy", 0.9990, task={"spearman": 0.990}),
        _candidate("ort", "MinMax", 0.9980, task={"spearman": 0.995}),
        _candidate("modelopt", "max", 0.9985, task={"spearman": 0.980}),
    ]
    result = fidelity.verdict(candidates, "entropy", "sentence_similarity", "heldout")
    cosine, spearman = result["figures"]
    assert (cosine["peer"], cosine["outcome"]) == ("modelopt/max", "BEATS")
    assert (spearman["figure"], spearman["peer"]) == ("spearman", "ort/MinMax")
    assert spearman["outcome"] == "LOSES" and result["met"] is False
    line = fidelity.format_verdict(result)
    assert "Spearman 0.9900 vs 0.9950 (ort MinMax) LOSES" in line and line.endswith("NOT MET")


def test_a_difference_the_table_cannot_show_is_a_tie():
    candidates = [
        _candidate("trtq", "entropy", 0.99999910, accuracy=0.993),
        _candidate("nncf", "per-tensor", 0.99999940, accuracy=0.993),
    ]
    result = fidelity.verdict(candidates, "entropy", None, "heldout")
    assert [f["outcome"] for f in result["figures"]] == ["TIES", "TIES"]
    assert result["figures"][1]["figure"] == "accuracy"  # labelled data: accuracy, not top-1
    assert result["met"] is True


def test_low_coverage_or_a_failed_trtq_row_is_not_met():
    low = [_candidate("trtq", "entropy", 0.9999, coverage=0.85), _candidate("ort", "x", 0.9)]
    result = fidelity.verdict(low, "entropy", None, "heldout")
    assert result["met"] is False
    assert "coverage 85.00% < 90% BELOW" in fidelity.format_verdict(result)
    failed = _candidate("trtq", "entropy", 0.9999)
    failed["run"]["error"] = "exit status 1: boom"
    result = fidelity.verdict([failed, _candidate("ort", "x", 0.9)], "entropy", None, "heldout")
    assert result["met"] is False and "boom" in result["error"]


def test_task_models_compare_cosine_alone_off_the_held_out_set():
    candidates = [
        _candidate("trtq", "entropy", 0.95, task={"mask_iou": 0.9}),
        _candidate("nncf", "per-tensor", 0.94, task={"mask_iou": 0.95}),
    ]
    result = fidelity.verdict(candidates, "entropy", "mask_iou", "ood")
    assert [f["figure"] for f in result["figures"]] == ["cosine_mean"]


def test_no_deployable_peer_is_said_not_passed_off_as_a_win():
    candidates = [
        _candidate("trtq", "entropy", 0.99),
        _candidate("nncf", "default", 0.999, deployable=False),
    ]
    result = fidelity.verdict(candidates, "entropy", None, "heldout")
    assert {f["outcome"] for f in result["figures"]} == {"no deployable peer"}
    assert result["met"] is False


def test_the_verdict_judges_trtqs_own_default_in_a_default_run():
    assert fidelity.TRTQ_METHODS[0] == DEFAULT_METHOD
    assert fidelity.parse_args([]).methods[0] == DEFAULT_METHOD
    assert fidelity.parse_args([]).nncf_methods == ["default", "per-tensor"]


def test_a_runner_refuses_a_setting_it_does_not_know(monkeypatch, capsys):
    argv = ["runner", "m.onnx", "calib", "out.onnx", "stats.json", "--method", "per-tensor"]
    monkeypatch.setattr(sys, "argv", argv)
    assert _common.parse_args("x", ("default", "per-tensor")).method == "per-tensor"
    monkeypatch.setattr(sys, "argv", argv[:-2])
    assert _common.parse_args("x", ("default", "per-tensor")).method == "default"
    monkeypatch.setattr(sys, "argv", [*argv[:-1], "per-chanel"])
    with pytest.raises(SystemExit):
        _common.parse_args("x", ("default", "per-tensor"))
    assert "invalid choice" in capsys.readouterr().err
