"""Q/DQ placement and insertion (ARCHITECTURE.md §Fusion rules), checked on the ONNX and in ORT.

Every test builds a small FP32 model with onnx.helper (channel counts >= 16, so nothing is
left in float as "tiny" unless the test means it), quantizes it with :func:`trtq.quantizer.quantize`
and inspects the graph that comes out: where the QuantizeLinear/DequantizeLinear nodes are,
what they hold, and what the model computes.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import CALIB_DATA
from helpers import run
from onnx import TensorProto, helper, numpy_helper

from trtq.calib.ranges import TensorRange
from trtq.errors import ModelError
from trtq.graph import qdq
from trtq.graph.qdq import PlacementOptions
from trtq.quantizer import CalibrationOptions, QuantizeResult, quantize

RNG = np.random.default_rng(0)
OPSET = 17
QUIET = CalibrationOptions(progress=False)
#: Float32 round-off allowed on top of half a quantization step.
TINY = 1e-6


# --- building models -------------------------------------------------------------------------


def weights(*shape: int, axis: int | None = 0) -> np.ndarray:
    """Random weights whose magnitude differs per channel along ``axis`` (0.01..1 x N(0, 0.1)).

    Unequal channels make a per-channel scale on the wrong axis visible.
    """
    w = RNG.standard_normal(shape) * 0.1
    if axis is not None:
        gains = np.ones(len(shape), dtype=int)
        gains[axis] = shape[axis]
        w = w * RNG.uniform(0.01, 1.0, shape[axis]).reshape(gains)
    return w.astype(np.float32)


def value(name: str, *shape: int | str, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray],
    opset: int = OPSET,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "qdq_test",
        inputs,
        outputs,
        initializer=[numpy_helper.from_array(a, name) for name, a in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def batches_of(**shapes: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    """Two calibration batches of N(0, 1) data for each named input."""
    return [{name: normal(*shape) for name, shape in shapes.items()} for _ in range(2)]


def quantize_model(
    model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], **placement
) -> QuantizeResult:
    return quantize(model, batches, placement=PlacementOptions(**placement), calibration=QUIET)


def conv(x: str, w: str, y: str, name: str, bias: str | None = None, **attrs) -> onnx.NodeProto:
    inputs = [x, w] if bias is None else [x, w, bias]
    return helper.make_node("Conv", inputs, [y], name=name, pads=[1, 1, 1, 1], **attrs)


# --- reading the quantized graph -------------------------------------------------------------


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)


def consumers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    found = next(i for i in model.graph.initializer if i.name == name)
    return numpy_helper.to_array(found)


def attribute(n: onnx.NodeProto, name: str, default=None):
    found = next((a for a in n.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def reads_dequantized(model: onnx.ModelProto, tensor: str) -> bool:
    found = producer(model, tensor)
    return found is not None and found.op_type == "DequantizeLinear"


def quantizers_of(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in consumers(model, tensor) if n.op_type == "QuantizeLinear"]


def decision(result: QuantizeResult, name: str) -> qdq.NodeDecision:
    return next(d for d in result.plan.decisions if d.name == name)


def weight_input(model: onnx.ModelProto, name: str) -> str:
    """The input of node ``name`` that a weight DequantizeLinear (int8/fp8 initializer) feeds."""
    stored = {i.name for i in model.graph.initializer}
    (found,) = [
        t
        for t in node(model, name).input
        if reads_dequantized(model, t) and producer(model, t).input[0] in stored
    ]
    return found


def dequantized_weight(
    model: onnx.ModelProto, tensor: str
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(dequantized values, scales, axis) of the weight DequantizeLinear producing ``tensor``."""
    dq = producer(model, tensor)
    assert dq is not None and dq.op_type == "DequantizeLinear"
    stored, scale, zero = (initializer(model, name) for name in dq.input)
    assert not zero.astype(np.float32).any()
    axis = attribute(dq, "axis")
    shape = [1] * stored.ndim
    if axis is not None:
        shape[axis] = -1
    return stored.astype(np.float32) * scale.reshape(shape), scale, axis


def channel_amax(w: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.abs(w).max()
    return np.abs(w).max(axis=tuple(d for d in range(w.ndim) if d != axis))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- 1. Conv: activation per tensor, weight per output channel, bias and output untouched ---


def conv_relu_conv() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    arrays = {
        "w1": weights(32, 16, 3, 3),
        "b1": weights(32, axis=None),
        "w2": weights(32, 32, 3, 3),
    }
    model = make_model(
        [
            conv("x", "w1", "c1", "conv1", bias="b1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            conv("r1", "w2", "y", "conv2"),
        ],
        [value("x", "N", 16, 12, 12)],
        [value("y", "N", 32, 12, 12)],
        arrays,
    )
    return model, arrays


def test_conv_gets_activation_pair_and_per_channel_int8_weight():
    model, arrays = conv_relu_conv()
    batches = batches_of(x=(4, 16, 12, 12))
    result = quantize_model(model, batches)
    q = result.model
    conv1 = node(q, "conv1")

    # Activation: exactly one Q -> DQ pair, per-tensor scale = amax / 127, int8 zero point 0.
    (quant,) = quantizers_of(q, "x")
    (dequant,) = consumers(q, quant.output[0])
    assert dequant.op_type == "DequantizeLinear"
    assert conv1.input[0] == dequant.output[0]
    assert list(dequant.input[1:]) == list(quant.input[1:])
    scale, zero = initializer(q, quant.input[1]), initializer(q, quant.input[2])
    assert scale.shape == () and zero.shape == ()
    assert zero.dtype == np.int8 and zero == 0
    assert float(scale) == pytest.approx(result.ranges["x"].amax / 127, rel=1e-6)
    assert attribute(quant, "axis") is None

    # Weight: int8 initializer behind DequantizeLinear(axis=0), scale = max|w| per channel / 127.
    assert weight_input(q, "conv1") == conv1.input[1]
    dq = producer(q, conv1.input[1])
    assert attribute(dq, "axis") == 0
    stored = initializer(q, dq.input[0])
    assert stored.dtype == np.int8 and stored.shape == arrays["w1"].shape
    w_scale, w_zero = initializer(q, dq.input[1]), initializer(q, dq.input[2])
    np.testing.assert_allclose(w_scale, channel_amax(arrays["w1"], 0) / 127, rtol=1e-6)
    assert w_zero.dtype == np.int8 and w_zero.shape == (32,) and not w_zero.any()
    np.testing.assert_array_equal(stored, np.rint(arrays["w1"] / w_scale[:, None, None, None]))
    assert np.abs(stored).max(axis=(1, 2, 3)).tolist() == [127] * 32  # the full range is used
    assert "w1" not in {i.name for i in q.graph.initializer}  # no float copy left behind

    # Bias: a float initializer feeding the Conv directly.
    assert conv1.input[2] == "b1" and producer(q, "b1") is None
    np.testing.assert_array_equal(initializer(q, "b1"), arrays["b1"])

    # Outputs of compute ops are never quantized: c1 goes straight into Relu, whose output
    # (conv2's activation) is what gets a pair.
    assert [n.op_type for n in consumers(q, "c1")] == ["Relu"]
    assert len(quantizers_of(q, "r1")) == 1 and reads_dequantized(q, node(q, "conv2").input[0])

    # The graph output is untouched: same name, still produced by the Conv.
    assert [o.name for o in q.graph.output] == ["y"]
    assert producer(q, "y").op_type == "Conv" and quantizers_of(q, "y") == []
    assert ops(q).count("QuantizeLinear") == 2

    feeds = {"x": normal(8, 16, 12, 12)}
    assert cosine(run(model, feeds)[0], run(q, feeds)[0]) > 0.999


# --- 2. Weight axes ----------------------------------------------------------------------------


def weight_case(kind: str) -> tuple[onnx.ModelProto, dict, str, np.ndarray, int | None]:
    """(model, calibration batches, node name, original weight, expected axis) for ``kind``."""
    if kind == "ConvTranspose":  # W is [C_in, C_out / group, kh, kw]
        w = weights(32, 16, 3, 3, axis=1)
        n = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="op", strides=[2, 2])
        io = ([value("x", "N", 32, 8, 8)], [value("y", "N", 16, 17, 17)])
        shapes, axis = {"x": (4, 32, 8, 8)}, 1
    elif kind == "Gemm transB=1":  # W is [N, K]
        w = weights(32, 64, axis=0)
        n = helper.make_node("Gemm", ["x", "w"], ["y"], name="op", transB=1)
        io = ([value("x", "N", 64)], [value("y", "N", 32)])
        shapes, axis = {"x": (8, 64)}, 0
    elif kind == "Gemm transB=0":  # W is [K, N]
        w = weights(64, 32, axis=1)
        n = helper.make_node("Gemm", ["x", "w"], ["y"], name="op")
        io = ([value("x", "N", 64)], [value("y", "N", 32)])
        shapes, axis = {"x": (8, 64)}, 1
    elif kind == "MatMul [K, N]":
        w = weights(64, 32, axis=1)
        n = helper.make_node("MatMul", ["x", "w"], ["y"], name="op")
        io = ([value("x", "N", 10, 64)], [value("y", "N", 10, 32)])
        shapes, axis = {"x": (4, 10, 64)}, 1
    elif kind == "MatMul [B, K, N]":  # batched weights: the last axis is the output channel
        w = weights(3, 64, 32, axis=2)
        n = helper.make_node("MatMul", ["x", "w"], ["y"], name="op")
        io = ([value("x", "N", 3, 10, 64)], [value("y", "N", 3, 10, 32)])
        shapes, axis = {"x": (4, 3, 10, 64)}, 2
    elif kind == "MatMul(W, x)":  # weight on the left: one scale for the whole tensor
        w = weights(32, 64, axis=None)
        n = helper.make_node("MatMul", ["w", "x"], ["y"], name="op")
        io = ([value("x", "N", 64, 10)], [value("y", "N", 32, 10)])
        shapes, axis = {"x": (4, 64, 10)}, None
    else:
        raise AssertionError(kind)
    return make_model([n], *io, {"w": w}), batches_of(**shapes), "op", w, axis


@pytest.mark.parametrize(
    "kind",
    [
        "ConvTranspose",
        "Gemm transB=1",
        "Gemm transB=0",
        "MatMul [K, N]",
        "MatMul [B, K, N]",
        "MatMul(W, x)",
    ],
)
def test_weight_axis_and_dequantized_values(kind):
    """Per-channel scales sit on the output-channel axis; dq(w) is within half a step of w."""
    model, batches, name, w, axis = weight_case(kind)
    result = quantize_model(model, batches)
    d = decision(result, name)
    assert d.quantized and d.weight_axis == axis
    q = result.model
    restored, scale, dq_axis = dequantized_weight(q, weight_input(q, name))
    assert dq_axis == axis
    np.testing.assert_allclose(scale, channel_amax(w, axis) / 127, rtol=1e-6)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    step = scale.reshape(shape)
    assert np.all(np.abs(restored - w) <= step / 2 + TINY)
    feeds = batches[0]
    assert cosine(run(model, feeds)[0], run(q, feeds)[0]) > 0.999


def test_matmul_vector_weight_is_not_scaled_along_the_reduction_axis():
    """MatMul(x, w[K]) has no output-channel axis: per-channel scales along K cannot fold."""
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="op")],
        [value("x", "N", 64)],
        [value("y", "N")],
        {"w": weights(64, axis=None)},
    )
    d = decision(quantize_model(model, batches_of(x=(8, 64))), "op")
    assert not d.quantized or d.weight_axis is None


# --- 3. One Q/DQ pair per tensor ---------------------------------------------------------------


def test_one_pair_per_tensor_and_float_consumers_read_the_original():
    """x feeds two quantized Convs and a Sigmoid: one Q/DQ pair, and the Sigmoid reads x."""
    model = make_model(
        [
            conv("x", "wa", "ya", "conv_a"),
            conv("x", "wb", "yb", "conv_b"),
            helper.make_node("Concat", ["ya", "yb"], ["y"], name="concat", axis=1),
            helper.make_node("Sigmoid", ["x"], ["gate"], name="sigmoid"),
        ],
        [value("x", "N", 16, 8, 8)],
        [value("y", "N", 64, 8, 8), value("gate", "N", 16, 8, 8)],
        {"wa": weights(32, 16, 3, 3), "wb": weights(32, 16, 3, 3)},
    )
    result = quantize_model(model, batches_of(x=(4, 16, 8, 8)))
    q = result.model
    assert len(quantizers_of(q, "x")) == 1
    assert ops(q).count("QuantizeLinear") == 1
    a, b = node(q, "conv_a"), node(q, "conv_b")
    assert a.input[0] == b.input[0] and reads_dequantized(q, a.input[0])
    assert node(q, "sigmoid").input[0] == "x"
    feeds = {"x": normal(4, 16, 8, 8)}
    ref, got = run(model, feeds), run(q, feeds)
    np.testing.assert_array_equal(ref[1], got[1])  # the float branch is bit-exact
    assert cosine(ref[0], got[0]) > 0.999


# --- 4. Residual Add ---------------------------------------------------------------------------


def residual_model(
    extra: tuple[onnx.NodeProto, ...] = (), extra_outputs: tuple[onnx.ValueInfoProto, ...] = ()
) -> onnx.ModelProto:
    """y = Conv(x) + skip, skip a second input (an FPN lateral, a U-Net skip)."""
    return make_model(
        [
            conv("x", "w", "c", "conv", bias="b"),
            helper.make_node("Add", ["c", "skip"], ["sum"], name="residual_add"),
            helper.make_node("Relu", ["sum"], ["y"], name="relu"),
            *extra,
        ],
        [value("x", "N", 16, 8, 8), value("skip", "N", 32, 8, 8)],
        [value("y", "N", 32, 8, 8), *extra_outputs],
        {"w": weights(32, 16, 3, 3), "b": weights(32, axis=None)},
    )


def test_residual_add_quantizes_the_skip_not_the_conv_output():
    """Q/DQ on the skip input only, so that TensorRT fuses the Add into the Conv."""
    model = residual_model()
    result = quantize_model(model, batches_of(x=(4, 16, 8, 8), skip=(4, 32, 8, 8)))
    q = result.model
    add = node(q, "residual_add")
    conv_side, skip_side = add.input
    assert conv_side == "c" and producer(q, "c").op_type == "Conv"
    assert reads_dequantized(q, skip_side)
    assert producer(q, producer(q, skip_side).input[0]).input[0] == "skip"
    assert "residual" in result.plan.fusion_tensors["skip"].reason
    assert result.plan.fusion_tensors["skip"].consumers == ("residual_add",)
    roles = {t["name"]: t["role"] for t in result.report["quantized_tensors"]}
    assert "residual" in roles["skip"] and roles["x"] == "activation"
    feeds = {"x": normal(4, 16, 8, 8), "skip": normal(4, 32, 8, 8)}
    assert cosine(run(model, feeds)[0], run(q, feeds)[0]) > 0.999


def test_residual_skip_that_is_also_a_conv_input_shares_its_pair():
    """ResNet block: the block input feeds the first Conv and the Add; it gets one pair."""
    model = make_model(
        [
            conv("x", "w1", "c1", "conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            conv("r1", "w2", "c2", "conv2"),
            helper.make_node("Add", ["c2", "x"], ["sum"], name="residual_add"),
            helper.make_node("Relu", ["sum"], ["y"], name="relu2"),
        ],
        [value("x", "N", 32, 8, 8)],
        [value("y", "N", 32, 8, 8)],
        {"w1": weights(32, 32, 3, 3), "w2": weights(32, 32, 3, 3)},
    )
    result = quantize_model(model, batches_of(x=(4, 32, 8, 8)))
    q = result.model
    assert len(quantizers_of(q, "x")) == 1
    add = node(q, "residual_add")
    assert add.input[0] == "c2" and add.input[1] == node(q, "conv1").input[0]
    assert "residual" in result.plan.fusion_tensors["x"].reason


def test_residual_skip_pair_is_not_applied_to_other_adds():
    """skip also feeds a plain float Add (not after a Conv): that one must read skip itself."""
    model = residual_model(
        extra=(helper.make_node("Add", ["skip", "skip"], ["doubled"], name="float_add"),),
        extra_outputs=(value("doubled", "N", 32, 8, 8),),
    )
    q = quantize_model(model, batches_of(x=(4, 16, 8, 8), skip=(4, 32, 8, 8))).model
    assert reads_dequantized(q, node(q, "residual_add").input[1])
    assert list(node(q, "float_add").input) == ["skip", "skip"]


def test_residual_skip_pair_dropped_when_its_conv_stays_float():
    """The Conv's input holds a sentinel, so the Conv runs in float: no fusion, no skip Q/DQ."""
    model = residual_model()
    batches = batches_of(x=(4, 16, 8, 8), skip=(4, 32, 8, 8))
    batches[0]["x"][0, 0, 0, 0] = -3.4e38
    result = quantize_model(model, batches)
    assert not decision(result, "conv").quantized
    assert result.plan.fusion_tensors == {}
    assert "QuantizeLinear" not in ops(result.model)


def test_pooling_between_quantized_convs_keeps_int8():
    model = make_model(
        [
            conv("x", "w1", "c1", "conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node(
                "MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
            ),
            conv("p1", "w2", "y", "conv2"),
        ],
        [value("x", "N", 16, 16, 16)],
        [value("y", "N", 32, 8, 8)],
        {"w1": weights(32, 16, 3, 3), "w2": weights(32, 32, 3, 3)},
    )
    result = quantize_model(model, batches_of(x=(4, 16, 16, 16)))
    q = result.model
    assert reads_dequantized(q, node(q, "pool").input[0])
    assert "MaxPool" in result.plan.fusion_tensors["r1"].reason
    assert result.plan.fusion_tensors["r1"].consumers == ("pool",)
    assert reads_dequantized(q, node(q, "conv2").input[0])


# --- 5. Nodes left in float, with their reasons -----------------------------------------------


def attention_model() -> tuple[onnx.ModelProto, dict]:
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["y"], name="softmax", axis=-1),
    ]
    io = ([value("x", "N", 16, 64)], [value("y", "N", 16, 16)])
    return make_model(nodes, *io, {"wq": weights(64, 64), "wk": weights(64, 64)}), {
        "x": (4, 16, 64)
    }


def stem_head_model() -> tuple[onnx.ModelProto, dict]:
    nodes = [
        conv("x", "w1", "c1", "stem"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        conv("r1", "w2", "c2", "head"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="fc", transB=1),
    ]
    arrays = {"w1": weights(32, 16, 3, 3), "w2": weights(32, 32, 3, 3), "fc_w": weights(16, 32)}
    io = ([value("x", "N", 16, 8, 8)], [value("y", "N", 16)])
    return make_model(nodes, *io, arrays), {"x": (4, 16, 8, 8)}


def tiny_conv_model() -> tuple[onnx.ModelProto, dict]:
    nodes = [conv("x", "w1", "c1", "wide"), conv("c1", "w2", "y", "narrow")]
    arrays = {"w1": weights(32, 16, 3, 3), "w2": weights(8, 32, 3, 3)}
    io = ([value("x", "N", 16, 8, 8)], [value("y", "N", 8, 8, 8)])
    return make_model(nodes, *io, arrays), {"x": (4, 16, 8, 8)}


def lstm_model() -> tuple[onnx.ModelProto, dict]:
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["h"], name="lstm", hidden_size=32),
        helper.make_node("Squeeze", ["h", "axes"], ["hs"], name="squeeze"),
        helper.make_node("MatMul", ["hs", "proj"], ["y"], name="proj"),
    ]
    arrays = {
        "W": weights(1, 128, 16),
        "R": weights(1, 128, 32),
        "axes": np.array([1], np.int64),
        "proj": weights(32, 32, axis=1),
    }
    io = ([value("x", 10, "N", 16)], [value("y", 10, "N", 32)])
    return make_model(nodes, *io, arrays), {"x": (10, 4, 16)}


def if_model() -> tuple[onnx.ModelProto, dict]:
    """A Conv in each branch of an If; the weights live in the branch bodies."""

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(weights(32, 16, 3, 3), f"{name}_w")
        body = [conv("x", f"{name}_w", f"{name}_y", f"{name}_conv")]
        return helper.make_graph(
            body, name, [], [value(f"{name}_y", "N", 32, 8, 8)], initializer=[w]
        )

    nodes = [
        conv("x", "w0", "c0", "outer_conv"),
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["cond"], name="greater"),
        helper.make_node(
            "If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else")
        ),
    ]
    arrays = {"w0": weights(32, 16, 3, 3), "zero": np.array(0.0, np.float32)}
    io = ([value("x", "N", 16, 8, 8)], [value("y", "N", 32, 8, 8), value("c0", "N", 32, 8, 8)])
    return make_model(nodes, *io, arrays), {"x": (4, 16, 8, 8)}


#: case -> (model builder, placement options, float node, words of its reason, quantized nodes)
FLOAT_CASES = {
    "attention": (attention_model, {}, "scores", "attention", ["q_proj", "k_proj"]),
    "tiny": (tiny_conv_model, {}, "narrow", "tiny (8 output channels)", ["wide"]),
    "exclude_nodes": (
        stem_head_model,
        {"exclude_nodes": "^head$"},
        "head",
        "matches --exclude-nodes",
        ["stem", "fc"],
    ),
    "exclude_ops": (
        stem_head_model,
        {"exclude_ops": frozenset({"Gemm"})},
        "fc",
        "Gemm in --exclude-ops",
        ["stem", "head"],
    ),
    "recurrent": (lstm_model, {}, "lstm", "recurrent", ["proj"]),
    "if_body": (if_model, {}, "then_conv", "inside the body of If", ["outer_conv"]),
}


@pytest.mark.parametrize("case", list(FLOAT_CASES))
def test_left_in_float_with_reason(case):
    """The node stays float (its inputs are not dequantized), with the reason in the report."""
    build, placement, name, reason, quantized_names = FLOAT_CASES[case]
    model, shapes = build()
    batches = batches_of(**shapes)
    result = quantize_model(model, batches, **placement)
    d = decision(result, name)
    assert not d.quantized and reason in d.reason
    floats = {f["name"]: f["reason"] for f in result.report["float_nodes"]}
    assert reason in floats[name]
    for other in quantized_names:
        assert decision(result, other).quantized, other
    q = result.model
    top_level = {n.name for n in q.graph.node}
    if name in top_level:
        assert not any(reads_dequantized(q, t) for t in node(q, name).input if t)
    feeds = batches[0]
    assert cosine(run(model, feeds)[0], run(q, feeds)[0]) > 0.999


def test_if_branches_are_left_unchanged():
    model, shapes = if_model()
    result = quantize_model(model, batches_of(**shapes))
    assert {d.name for d in result.plan.decisions if not d.quantized} == {"then_conv", "else_conv"}
    branches = [a.g for a in node(result.model, "if").attribute]
    assert [[n.op_type for n in g.node] for g in branches] == [["Conv"], ["Conv"]]


def test_if_body_compute_counts_in_coverage():
    """Compute inside If bodies runs in float and must count against coverage."""
    model, shapes = if_model()
    result = quantize_model(model, batches_of(**shapes))
    assert decision(result, "then_conv").macs == decision(result, "outer_conv").macs > 0
    assert result.report["coverage"]["fraction"] < 1.0


# --- 6. Sentinel-filled activations ------------------------------------------------------------


def masked_model(op: str, fill: float) -> tuple[onnx.ModelProto, dict]:
    """A mask fill (Where(keep, x, fill)) feeding one compute op; x also feeds a clean one."""
    if op == "MatMul":
        nodes = [
            helper.make_node("MatMul", ["masked", "wa"], ["ya"], name="masked_op"),
            helper.make_node("MatMul", ["x", "wb"], ["yb"], name="clean_op"),
        ]
        x_shape, keep_shape, y_shape = ["N", 16, 64], ["N", 16, 1], ["N", 16, 32]
        arrays = {"wa": weights(64, 32, axis=1), "wb": weights(64, 32, axis=1)}
    else:
        nodes = [conv("masked", "wa", "ya", "masked_op"), conv("x", "wb", "yb", "clean_op")]
        x_shape, keep_shape, y_shape = ["N", 16, 8, 8], ["N", 1, 8, 8], ["N", 32, 8, 8]
        arrays = {"wa": weights(32, 16, 3, 3), "wb": weights(32, 16, 3, 3)}
    nodes.insert(0, helper.make_node("Where", ["keep", "x", "fill"], ["masked"], name="mask"))
    arrays["fill"] = np.array(fill, np.float32)
    model = make_model(
        nodes,
        [value("x", *x_shape), value("keep", *keep_shape, dtype=TensorProto.BOOL)],
        [value("ya", *y_shape), value("yb", *y_shape)],
        arrays,
    )
    return model, {"x": [4, *x_shape[1:]], "keep": [4, *keep_shape[1:]]}


@pytest.mark.parametrize(("op", "fill"), [("MatMul", -3.4e38), ("Conv", -np.inf)])
def test_sentinel_masked_input_stays_float(op, fill):
    """A tensor set by mask fills has no meaningful range: its consumer runs in float."""
    model, shapes = masked_model(op, fill)
    batches = [
        {"x": normal(*shapes["x"]), "keep": RNG.random(shapes["keep"]) > 0.3} for _ in range(2)
    ]
    result = quantize_model(model, batches)
    masked = decision(result, "masked_op")
    assert not masked.quantized and "sentinel" in masked.reason
    assert not result.ranges["masked"].quantizable
    assert decision(result, "clean_op").quantized
    q = result.model
    assert not any(reads_dequantized(q, t) for t in node(q, "masked_op").input)
    assert quantizers_of(q, "masked") == []

    feeds = {"x": normal(*shapes["x"]), "keep": np.ones(shapes["keep"], bool)}
    (ref_a, ref_b), (got_a, got_b) = run(model, feeds), run(q, feeds)
    assert np.isfinite(got_a).all() and np.isfinite(got_b).all()
    np.testing.assert_array_equal(got_a, ref_a)  # left in float: bit-exact
    assert cosine(ref_b, got_b) > 0.999


# --- 7. Coverage -------------------------------------------------------------------------------


def test_coverage_is_the_quantized_share_of_macs():
    """Conv MACs = output elements per sample x C_in/group x kh x kw; batch size does not count."""
    model = make_model(
        [
            conv("x", "w1", "c1", "conv1"),  # 16 -> 32, 16x16 -> 16x16
            helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
            conv("r1", "w2", "y", "conv2", strides=[2, 2], group=2),  # 32 -> 64, 16x16 -> 8x8
        ],
        [value("x", "N", 16, 16, 16)],
        [value("y", "N", 64, 8, 8)],
        {"w1": weights(32, 16, 3, 3), "w2": weights(64, 16, 3, 3)},
    )
    conv1_macs = (32 * 16 * 16) * 16 * 3 * 3  # 1,179,648
    conv2_macs = (64 * 8 * 8) * (32 // 2) * 3 * 3  # 589,824
    result = quantize_model(model, batches_of(x=(4, 16, 16, 16)), exclude_nodes="^conv2$")
    assert decision(result, "conv1").macs == conv1_macs
    assert decision(result, "conv2").macs == conv2_macs
    coverage = result.report["coverage"]
    assert coverage["quantized_macs"] == conv1_macs
    assert coverage["total_macs"] == conv1_macs + conv2_macs
    assert coverage["fraction"] == pytest.approx(2 / 3)
    assert (coverage["quantized_nodes"], coverage["total_nodes"]) == (1, 2)


def test_generator_batches_are_all_calibrated():
    """Taking a shape example from a one-shot iterator must not lose its first batch."""
    model, _ = conv_relu_conv()
    batches = batches_of(x=(4, 16, 12, 12)) + batches_of(x=(4, 16, 12, 12))
    result = quantize(model, (b for b in batches), calibration=QUIET)
    assert result.report["calibration"] == {"samples": 16, "batches": 4}
    single = quantize(model, (b for b in batches[:1]), calibration=QUIET)
    assert single.report["calibration"] == {"samples": 4, "batches": 1}


# --- 8. Already quantized ----------------------------------------------------------------------


def test_already_quantized_model_is_refused():
    """A QAT export, and trtq's own output: quantizing again would stack a second set of scales."""
    model, _ = conv_relu_conv()
    result = quantize_model(model, batches_of(x=(4, 16, 12, 12)))
    with pytest.raises(ModelError, match="already quantized"):
        quantize_model(result.model, batches_of(x=(4, 16, 12, 12)))

    qat = make_model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
            conv("xd", "w", "y", "conv"),
        ],
        [value("x", "N", 16, 8, 8)],
        [value("y", "N", 32, 8, 8)],
        {"s": np.array(0.02, np.float32), "z": np.array(0, np.int8), "w": weights(32, 16, 3, 3)},
    )
    with pytest.raises(ModelError, match="already quantized"):
        quantize_model(qat, batches_of(x=(4, 16, 8, 8)))


# --- 9. FP8 ------------------------------------------------------------------------------------


def ort_runs_float8() -> bool:
    """Whether this ONNX Runtime's CPU provider has float8 QuantizeLinear/DequantizeLinear."""
    model = make_model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        [value("x", 4)],
        [value("y", 4)],
        {"s": np.array(0.5, np.float32), "z": np.zeros((), ml_dtypes.float8_e4m3fn)},
        opset=19,
    )
    try:
        run(model, {"x": np.arange(4, dtype=np.float32)})
    except Exception:  # ORT raises its own types (NOT_IMPLEMENTED, INVALID_GRAPH)
        return False
    return True


def test_fp8_quantization():
    if not ort_runs_float8():
        pytest.skip("this ONNX Runtime's CPU provider cannot run float8 Q/DQ (opset 19)")
    model, arrays = conv_relu_conv()
    batches = batches_of(x=(4, 16, 12, 12))
    result = quantize_model(model, batches, precision="fp8")
    q = result.model
    assert result.report["precision"] == "fp8"
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 19
    onnx.checker.check_model(q, full_check=True)
    qdq_nodes = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq_nodes) == 6  # two activation pairs, two weight DequantizeLinears
    types = {i.name: i.data_type for i in q.graph.initializer}
    assert {types[n.input[2]] for n in qdq_nodes} == {TensorProto.FLOAT8E4M3FN}
    dq = producer(q, node(q, "conv1").input[1])
    assert types[dq.input[0]] == TensorProto.FLOAT8E4M3FN
    np.testing.assert_allclose(
        initializer(q, dq.input[1]), channel_amax(arrays["w1"], 0) / 448, rtol=1e-6
    )
    feeds = {"x": normal(8, 16, 12, 12)}
    assert cosine(run(model, feeds)[0], run(q, feeds)[0]) > 0.99


# --- direct use of plan / with_ranges / insert ------------------------------------------------


def test_plan_with_ranges_and_insert_directly():
    """The three steps without calibration: ranges from anywhere, unusable ones stay float."""
    model, _ = stem_head_model()
    graph = gs.import_onnx(model)
    plan = qdq.plan(graph, {}, PlacementOptions())
    # c2 feeds GlobalAveragePool -> Flatten -> the quantized Gemm: kept INT8 through the pool.
    assert plan.activations() == ["x", "r1", "f", "c2"]
    assert "GlobalAveragePool" in plan.fusion_tensors["c2"].reason
    amax = {"x": 4.0, "r1": 2.0, "f": 1.0, "c2": 8.0}
    ranges = {name: TensorRange(name, value, "max") for name, value in amax.items()}
    assert plan.with_ranges(ranges, graph) == plan

    nan = TensorRange("r1", 2.0, "max", quantizable=False, reason="produced NaN")
    narrowed = plan.with_ranges({**ranges, "r1": nan}, graph)
    assert [d.quantized for d in narrowed.decisions] == [True, False, True]
    assert narrowed.decisions[1].reason == "input r1: produced NaN"
    missing = plan.with_ranges({"x": ranges["x"]}, graph)
    assert [d.reason for d in missing.decisions if not d.quantized] == ["no calibrated range"] * 2
    assert missing.fusion_tensors == {}

    q = qdq.insert(model, plan, ranges)
    onnx.checker.check_model(q, full_check=True)
    scales = {
        n.input[0]: float(initializer(q, n.input[1]))
        for n in q.graph.node
        if n.op_type == "QuantizeLinear"
    }
    assert scales == pytest.approx({name: value / 127 for name, value in amax.items()})
    assert reads_dequantized(q, node(q, "gap").input[0])
    assert [o.name for o in q.graph.output] == ["y"] and producer(q, "y").op_type == "Gemm"
    feeds = {"x": normal(4, 16, 8, 8)}  # the ranges above are rough guesses, not calibrated
    assert cosine(run(model, feeds)[0], run(q, feeds)[0]) > 0.99


# --- 10. End to end on the embedded MNIST sample ---------------------------------------------


def test_mnist_int8_accuracy_and_coverage(mnist_model, mnist_test):
    """Real digits: INT8 within 0.5 points of FP32, >= 90 % of the MACs quantized, valid ONNX."""
    model = onnx.load(mnist_model)
    with np.load(CALIB_DATA / "mnist_calib.npz") as data:
        calib = data["input"].astype(np.float32)
    batches = [{"input": calib[i : i + 100]} for i in range(0, len(calib), 100)]
    result = quantize(model, batches, calibration=QUIET)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report["coverage"]["fraction"] >= 0.90

    feeds = {"input": mnist_test["input"].astype(np.float32)}
    labels = mnist_test["labels"]
    fp32 = float((run(model, feeds)[0].argmax(1) == labels).mean())
    int8 = float((run(result.model, feeds)[0].argmax(1) == labels).mean())
    expected = json.loads((CALIB_DATA / "mnist_cnn.json").read_text())["test_accuracy"]
    assert fp32 == pytest.approx(expected)
    assert int8 >= fp32 - 0.005, f"INT8 {int8:.3f} vs FP32 {fp32:.3f}"


def test_macs_come_from_real_shapes_where_inference_gives_up():
    """A reshape driven by a run-time shape: shape inference cannot size the MatMul."""
    w = numpy_helper.from_array(np.ones((16, 32), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
        ],
        "runtime_shape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    batches = [
        {"x": rng.standard_normal((4, 256)).astype(np.float32), "shape": np.array([-1, 16, 16])}
    ]
    result = quantize(model, batches, calibration=CalibrationOptions(progress=False))
    [decision] = result.report["quantized_nodes"]
    assert decision["macs"] == 16 * 16 * 32  # per sample: a [16, 16] @ [16, 32] product
