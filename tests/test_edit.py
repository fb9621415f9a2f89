"""The graph-editing layer (:mod:`trtq.graph.edit`) and the passes that name things through it.

Unit tests of the name allocator, representable scales, retyped DequantizeLinear and the
topological order; then every pass that adds names, run on models whose own names collide
with what the pass would call its additions; and a hypothesis test that quantizes small
networks whose tensor and node names collide with every name trtq generates.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import CALIB_DATA
from helpers import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from trtq import __version__
from trtq.graph import fp16
from trtq.graph.edit import GraphEditor, NameAllocator, representable_scale, toposort
from trtq.graph.normalize import export, fold_batchnorm, name_nodes
from trtq.graph.plugins import reference_evaluator, use_plugins
from trtq.quantizer import CalibrationOptions, quantize
from trtq.sessions import open_session

RNG = np.random.default_rng(11)
QUIET = CalibrationOptions(progress=False)


def value(name: str, *shape: int | str, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def model_of(nodes, inputs, outputs, initializers=None, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "edit_test",
        inputs,
        outputs,
        initializer=[numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def all_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(every tensor a node or initializer defines, every node name) of the main graph."""
    graph = model.graph
    tensors = [i.name for i in graph.initializer] + [v.name for v in graph.input]
    tensors += [o for n in graph.node for o in n.output if o]
    return tensors, [n.name for n in graph.node]


def assert_unique_names(model: onnx.ModelProto) -> None:
    tensors, nodes = all_names(model)
    assert len(tensors) == len(set(tensors)), sorted(t for t in tensors if tensors.count(t) > 1)
    assert all(nodes) and len(nodes) == len(set(nodes)), nodes


# --- NameAllocator ------------------------------------------------------------------------------


def test_fresh_names_avoid_every_name_subgraphs_included():
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x_scale"], name="x_QuantizeLinear")],
        "then",
        [],
        [value("x_scale", 2)],
    )
    model = model_of(
        [
            helper.make_node(
                "If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch
            )
        ],
        [value("cond", dtype=TensorProto.BOOL), value("x", 2)],
        [value("y", 2)],
    )
    names = NameAllocator.for_model(model)
    assert names.fresh("x_scale") == "x_scale_1"
    assert names.fresh("x_scale") == "x_scale_2"
    assert names.fresh("x_QuantizeLinear") == "x_QuantizeLinear_1"
    assert names.fresh("free") == "free" and "free" in names
    graph_names = NameAllocator.for_graph(gs.import_onnx(model))
    assert graph_names.fresh("x_scale") == "x_scale_1"


# --- scales -------------------------------------------------------------------------------------


def test_representable_scale_is_a_normal_number_of_its_type():
    tiny = np.array([1e-9, 1e-7 / 127, 0.5, 1e6])
    half = representable_scale(tiny, np.float16)
    assert half.dtype == np.float16
    assert half[0] == half[1] == np.finfo(np.float16).smallest_normal
    assert half[2] == 0.5 and half[3] == np.finfo(np.float16).max
    single = representable_scale(tiny, np.float32)
    np.testing.assert_allclose(single[:2], tiny[:2].astype(np.float32))
    brain = representable_scale(np.array(1e-39), ml_dtypes.bfloat16)
    assert float(brain) >= float(ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_normal)
    for bad in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError):
            representable_scale(bad, np.float32)


# --- GraphEditor --------------------------------------------------------------------------------


def qdq_model() -> onnx.ModelProto:
    """x -> Q -> DQ -> Relu (fp32), scale 0.5 as an fp16-representable fp32 value."""
    return model_of(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dequant"),
            helper.make_node("Relu", ["d"], ["y"], name="relu"),
        ],
        [value("x", 4)],
        [value("y", 4)],
        {"s": np.array(0.5, np.float32), "z": np.array(0, np.int8)},
        opset=19,
    )


def test_cast_of_a_dequantize_output_is_a_retyped_dequantize():
    model = qdq_model()
    editor = GraphEditor(model)
    half = editor.cast("d", TensorProto.FLOAT16)
    assert editor.cast("d", TensorProto.FLOAT16) == half  # made once
    retyped = editor.producer(half)
    assert retyped.op_type == "DequantizeLinear" and retyped.input[0] == "q"
    scale = editor.initializer(retyped.input[1])
    assert scale.dtype == np.float16 and float(scale) == 0.5
    # Back to fp32: the original scale, not a copy of the fp16 one.
    assert editor.converted_initializer(retyped.input[1], TensorProto.FLOAT, scale=True) == "s"
    plain = editor.cast("x", TensorProto.FLOAT16)
    assert editor.producer(plain).op_type == "Cast"
    relu = next(n for n in model.graph.node if n.name == "relu")
    editor.replace_input(relu, "d", half)
    finished = editor.finish()
    assert (finished.producer_name, finished.producer_version) == ("trtq", __version__)
    assert [n.name for n in finished.graph.node if n.op_type == "Cast"] == []  # unused: pruned
    assert "dequant" not in [n.name for n in finished.graph.node]  # nothing reads d now
    assert [n.op_type for n in finished.graph.node] == [
        "QuantizeLinear",
        "DequantizeLinear",
        "Relu",
    ]
    assert_unique_names(finished)


def test_toposort_orders_control_flow_after_what_its_bodies_read():
    body = helper.make_graph(
        [helper.make_node("Relu", ["late"], ["out"], name="inner")], "then", [], [value("out", 2)]
    )
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body, else_branch=body),
        helper.make_node("Neg", ["x"], ["late"], name="neg"),
    ]
    assert [n.name for n in toposort(nodes)] == ["neg", "if"]


# --- passes that name what they add ----------------------------------------------------------


def test_name_nodes_never_takes_a_name_the_model_uses():
    model = model_of(
        [
            helper.make_node("Relu", ["x"], ["a"]),  # unnamed: would become Relu_0
            helper.make_node("Relu", ["a"], ["Relu_0"], name="Relu_0"),
        ],
        [value("x", 2)],
        [value("Relu_0", 2)],
    )
    graph = name_nodes(gs.import_onnx(model))
    names = [n.name for n in graph.nodes]
    assert names[1] == "Relu_0" and names[0] not in ("", "Relu_0")


def test_folded_batchnorm_weights_do_not_replace_a_tensor_of_that_name():
    w = RNG.standard_normal((4, 2, 1, 1)).astype(np.float32)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    model = model_of(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
            helper.make_node("Add", ["n", "n_folded_weight"], ["y"], name="add"),
        ],
        [value("x", 1, 2, 3, 3)],
        [value("y", 1, 4, 3, 3)],
        {
            "w": w,
            "g": ones * 2,
            "b": zeros,
            "m": zeros,
            "v": ones,
            "n_folded_weight": np.full((1, 4, 1, 1), 7.0, np.float32),
        },
    )
    folded = export(fold_batchnorm(gs.import_onnx(model)), like=model)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    assert_unique_names(folded)
    feeds = {"x": RNG.standard_normal((1, 2, 3, 3)).astype(np.float32)}
    np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)
    assert (folded.producer_name, folded.producer_version) == ("trtq", __version__)


def test_plugin_window_does_not_replace_a_tensor_of_that_name():
    """STFT without a window gets ones; the model's own 'stft_rectangular_window' is kept."""
    frame, step = 16, 8
    model = model_of(
        [
            helper.make_node("Unsqueeze", ["audio", "axis"], ["signal"], name="unsqueeze"),
            helper.make_node("STFT", ["signal", "step", "", "length"], ["spec"], name="stft"),
            helper.make_node("Mul", ["audio", "stft_rectangular_window"], ["scaled"], name="mul"),
        ],
        [value("audio", 1, 64)],
        [value("spec", 1, 7, frame // 2 + 1, 2), value("scaled", 1, 64)],
        {
            "axis": np.array([-1], np.int64),
            "step": np.array(step, np.int64),
            "length": np.array(frame, np.int64),
            "stft_rectangular_window": np.full(64, 3.0, np.float32),
        },
    )
    rewritten = use_plugins(model, ["stft"])
    assert_unique_names(rewritten)
    assert (rewritten.producer_name, rewritten.producer_version) == ("trtq", __version__)
    audio = RNG.standard_normal((1, 64)).astype(np.float32)
    expected = open_session(model).run(None, {"audio": audio})
    got = reference_evaluator(rewritten).run(None, {"audio": audio})
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[1], audio * 3.0)


# --- hypothesis: names that collide with everything trtq generates ------------------------------

#: What trtq appends to a tensor's name for what it adds next to it (Q/DQ, weights, casts,
#: BatchNorm folding, retyped DQs), and what name_nodes calls unnamed nodes.
GENERATED_SUFFIXES = (
    "_scale",
    "_zero_point",
    "_quantized",
    "_dequantized",
    "_QuantizeLinear",
    "_DequantizeLinear",
    "_axis0_int8",
    "_axis0_scale",
    "_axis0_zero_point",
    "_axis0_dequantized",
    "_axis0_DequantizeLinear",
    "_folded_weight",
    "_folded_bias",
    "_folded_weight_axis0_scale",
    "_folded_weight_axis0_int8",
    "_to_fp16",
    "_to_fp32",
    "_Cast_fp16",
    "_Cast_fp32",
    "_fp16",
    "_scale_fp16",
    "_dequantized_fp32",
    "_1",
)
NODE_NAMES = ("Conv_0", "Relu_1", "Conv_2", "MaxPool_6", "Mul_8")
#: Tensor roles of the network below, with their default names.
TENSORS = ("x", "w0", "c0", "r0", "w1", "b1", "c1", "g", "beta", "mean", "var", "n1", "r1")
TENSORS += ("p1", "w2", "c2", "k", "y")
NODES = ("conv0", "relu0", "conv1", "bn1", "relu1", "pool", "conv2", "mul")


def collision_network(t: dict[str, str], n: dict[str, str]) -> onnx.ModelProto:
    """digits [N,1,28,28] -> Conv(1->16, float: tiny) -> Relu -> Conv+BN -> Relu -> MaxPool
    -> Conv -> Mul(k): two quantized Convs, a pooling Q/DQ, a folded BatchNorm."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    nodes = [
        helper.make_node("Conv", [t["x"], t["w0"]], [t["c0"]], name=n["conv0"], pads=[1] * 4),
        helper.make_node("Relu", [t["c0"]], [t["r0"]], name=n["relu0"]),
        helper.make_node(
            "Conv", [t["r0"], t["w1"], t["b1"]], [t["c1"]], name=n["conv1"], pads=[1] * 4
        ),
        helper.make_node(
            "BatchNormalization",
            [t["c1"], t["g"], t["beta"], t["mean"], t["var"]],
            [t["n1"]],
            name=n["bn1"],
        ),
        helper.make_node("Relu", [t["n1"]], [t["r1"]], name=n["relu1"]),
        helper.make_node(
            "MaxPool", [t["r1"]], [t["p1"]], name=n["pool"], kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Conv", [t["p1"], t["w2"]], [t["c2"]], name=n["conv2"], pads=[1] * 4),
        helper.make_node("Mul", [t["c2"], t["k"]], [t["y"]], name=n["mul"]),
    ]
    initializers = {
        t["w0"]: w(16, 1, 3, 3),
        t["w1"]: w(32, 16, 3, 3),
        t["b1"]: (rng.standard_normal(32) * 0.1).astype(np.float32),
        t["g"]: rng.uniform(0.5, 1.5, 32).astype(np.float32),
        t["beta"]: (rng.standard_normal(32) * 0.1).astype(np.float32),
        t["mean"]: (rng.standard_normal(32) * 0.1).astype(np.float32),
        t["var"]: rng.uniform(0.5, 1.5, 32).astype(np.float32),
        t["w2"]: w(32, 32, 3, 3),
        t["k"]: np.array(4.0, np.float32),
    }
    model = model_of(nodes, [value(t["x"], "N", 1, 28, 28)], [value(t["y"], "N", 32, 14, 14)])
    model.graph.initializer.extend(numpy_helper.from_array(a, k) for k, a in initializers.items())
    onnx.checker.check_model(model, full_check=True)
    return model


@st.composite
def colliding_names(draw) -> tuple[dict[str, str], dict[str, str]]:
    """Names for every role, each its default or another role's name plus a generated suffix."""
    tensors: dict[str, str] = {}
    nodes: dict[str, str] = {}
    for role in draw(st.permutations(TENSORS + NODES)):
        named = [*tensors.values(), *nodes.values()]
        candidates = [role, *NODE_NAMES, *(f"{b}{s}" for b in named for s in GENERATED_SUFFIXES)]
        if role in NODES:
            free = [c for c in candidates if c not in nodes.values()]
            nodes[role] = draw(st.sampled_from(["", *free]))
        else:
            tensors[role] = draw(st.sampled_from([c for c in candidates if c not in named]))
    return tensors, nodes


@pytest.fixture(scope="module")
def digits() -> tuple[list[np.ndarray], np.ndarray]:
    with np.load(CALIB_DATA / "mnist_calib.npz", allow_pickle=False) as data:
        calib = data["input"][:64].astype(np.float32)
    with np.load(CALIB_DATA / "mnist_test.npz", allow_pickle=False) as data:
        test = data["input"][:64].astype(np.float32)
    return [calib[:32], calib[32:]], test


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(names=colliding_names(), half=st.booleans())
def test_colliding_names_quantize_faithfully_with_unique_names(names, half, digits):
    tensors, nodes = names
    model = collision_network(tensors, nodes)
    calib, test = digits
    mixed = fp16.MixedPrecisionOptions(precision="fp16") if half else None
    batches = [{tensors["x"]: batch} for batch in calib]
    result = quantize(model, batches, mixed=mixed, calibration=QUIET)
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    assert_unique_names(q)
    assert result.report["coverage"]["quantized_nodes"] == 2
    mul = next(node for node in q.graph.node if node.op_type == "Mul")
    k = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}[mul.input[1]]
    assert float(k) == 4.0
    reference = run(model, {tensors["x"]: test})[0].astype(np.float64)
    got = run(q, {tensors["x"]: test})[0].astype(np.float64)
    cos = float(reference.ravel() @ got.ravel()) / np.linalg.norm(reference) / np.linalg.norm(got)
    assert cos >= 0.999
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) <= 0.05
