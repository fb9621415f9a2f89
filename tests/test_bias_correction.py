"""Bias correction: a planted mean error removed, held-out shift reduced, biases made and kept."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import trtq
from tests.helpers import run
from trtq.calib import bias_correction
from trtq.calib.bias_correction import correct_biases
from trtq.cli import main


def biased_depthwise_model() -> onnx.ModelProto:
    """A 3x3 depthwise Conv (no bias) whose INT8 weights all round the same way.

    Each channel's centre weight is 1.0, so the per-channel scale is 1/127; the eight others
    are 0.0045, which rounds up to 0.00787: every channel reads its positive input 3.4e-3 x 8
    too strongly, a mean error of about +2.7 % of the input mean on every output.
    """
    weight = np.full((16, 1, 3, 3), 0.0045, np.float32)
    weight[:, :, 1, 1] = 1.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=16, pads=[1] * 4)],
        "biased",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def positive_batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0.5, 1.5, (8, 16, 8, 8)).astype(np.float32)} for _ in range(count)]


def mean_shift(reference, quantized, batches, name: str = "x") -> np.ndarray:
    """Per-output-channel mean of (quantized - FP32) output on ``batches``."""
    shifts = []
    for batch in batches:
        expected, got = run(reference, batch)[0], run(quantized, batch)[0]
        axes = tuple(d for d in range(expected.ndim) if d != 1)
        shifts.append((got - expected).mean(axis=axes))
    return np.mean(shifts, axis=0)


def test_planted_mean_error_is_removed() -> None:
    model = biased_depthwise_model()
    plain = trtq.quantize(model, positive_batches(8, 0), bias_correction=False)
    corrected = trtq.quantize(model, positive_batches(8, 0), bias_correction=True)
    held_out = positive_batches(4, 1)
    before = np.abs(mean_shift(model, plain.model, held_out))
    after = np.abs(mean_shift(model, corrected.model, held_out))
    assert before.min() > 0.02  # the planted error is there
    assert after.max() < before.min() / 10
    record = corrected.report["bias_correction"]
    assert record["kept"] and record["samples"] == 64
    assert record["rel_l2_after"] < record["rel_l2_before"]
    (shift,) = record["corrected"]
    assert shift["node"] == "dw" and shift["created"]
    # The new bias has a fresh name and the Conv reads it; the written graph is valid.
    dw = next(n for n in corrected.model.graph.node if n.name == "dw")
    assert dw.input[2] == shift["bias"]
    assert "bias_correction" not in plain.report


def test_mnist_held_out_shift_is_reduced(mnist_model, mnist_test) -> None:
    calib = np.load(mnist_model.parent / "mnist_calib.npz")
    name = next(k for k in calib.files if k != "labels")
    batches = [{name: calib[name][i : i + 16].astype(np.float32)} for i in range(0, 128, 16)]
    plain = trtq.quantize(str(mnist_model), batches, bias_correction=False)
    corrected = trtq.quantize(str(mnist_model), batches, bias_correction=True)
    reference = onnx.load(mnist_model)
    held_out = [{name: mnist_test[name][i : i + 100].astype(np.float32)} for i in (0, 100, 200)]
    before = np.linalg.norm(mean_shift(reference, plain.model, held_out))
    after = np.linalg.norm(mean_shift(reference, corrected.model, held_out))
    assert after < before
    record = corrected.report["bias_correction"]
    assert record["kept"] and len(record["corrected"]) == 4  # the quantized Convs
    assert all(s["shift_norm"] > 0 for s in record["corrected"])


def gemm_and_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="gemm", transB=1),
            helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
            helper.make_node("MatMul", ["h_relu", "w2"], ["m"], name="matmul"),
            helper.make_node("Add", ["m", "b2"], ["y"], name="bias_add"),
        ],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])],
        [
            numpy_helper.from_array(rng.normal(0, 0.3, (32, 32)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.normal(0, 0.3, (32, 24)).astype(np.float32), "w2"),
            numpy_helper.from_array(np.zeros(24, np.float32), "b2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_gemm_gets_a_bias_and_matmul_corrects_the_add_after_it() -> None:
    model = gemm_and_matmul_model()
    rng = np.random.default_rng(3)
    batches = [{"x": rng.normal(0.5, 1.0, (16, 32)).astype(np.float32)} for _ in range(4)]
    result = trtq.quantize(model, batches, bias_correction=True)
    record = result.report["bias_correction"]
    found = {s["node"]: s for s in record["corrected"]}
    assert found["gemm"]["created"] and not found["matmul"]["created"]
    assert found["matmul"]["bias"] == "b2"
    gemm = next(n for n in result.model.graph.node if n.name == "gemm")
    assert len(gemm.input) == 3 and gemm.input[2] == found["gemm"]["bias"]


def test_corrections_that_do_not_help_are_dropped(monkeypatch) -> None:
    model = biased_depthwise_model()
    plain = trtq.quantize(model, positive_batches(2, 0), bias_correction=False)
    errors = iter([0.1, 0.2])  # measured before, after: worse
    monkeypatch.setattr(bias_correction, "_relative_l2", lambda got, expected: next(errors))
    result, record = correct_biases(model, plain.model, plain.plan, positive_batches(2, 0))
    assert not record.kept and record.shifts  # measured, then not applied
    assert result is plain.model


def test_cli_flags(tmp_path, mnist_model) -> None:
    report = tmp_path / "report.json"
    args = [
        "quantize",
        str(mnist_model),
        "--calib",
        str(mnist_model.parent / "mnist_calib.npz"),
        "--limit",
        "64",
        "-o",
        str(tmp_path / "out.onnx"),
        "--report",
        str(report),
        "--no-progress",
        "-q",
    ]
    assert main([*args, "--bias-correction", "--equalize"]) == 0
    written = json.loads(report.read_text())
    assert written["bias_correction"]["corrected"] and written["equalization"]["pairs"]
    assert main([*args, "--no-bias-correction", "--no-equalize"]) == 0
    written = json.loads(report.read_text())
    assert "bias_correction" not in written and "equalization" not in written


def test_equalize_refuses_reused_ranges(tmp_path, mnist_model) -> None:
    with pytest.raises(trtq.errors.UserError, match="equalize"):
        trtq.quantize(str(mnist_model), stats=tmp_path / "stats.json", equalize=True)
