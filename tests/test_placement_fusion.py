"""Q/DQ patterns TensorRT fuses, one defect per test (ARCHITECTURE.md §Fusion rules).

Each test builds a small FP32 model with onnx.helper, quantizes it with
:func:`trtq.quantizer.quantize` and checks the graph that comes out and what it computes:
generated names never replace the model's own tensors, no Cast sits between a
DequantizeLinear and its reader under ``--high-precision fp16``, scales stay non-zero in
FP16, range-preserving ops share one scale, and the residual Add's Q/DQ goes on the
shortcut chosen by structure.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import CALIB_DATA
from helpers import checked_model, float_value, run
from onnx import TensorProto, helper, numpy_helper

from trtq import __version__
from trtq.calib.histogram import Histogram
from trtq.calib.ranges import TensorRange, compute_range
from trtq.graph import fp16, qdq
from trtq.quantizer import CalibrationOptions, quantize

RNG = np.random.default_rng(7)
QUIET = CalibrationOptions(progress=False)
FP16 = fp16.MixedPrecisionOptions(precision="fp16")


# --- building and reading models ---------------------------------------------------------------


def weights(*shape: int, gain: float = 0.1) -> np.ndarray:
    return (RNG.standard_normal(shape) * gain).astype(np.float32)


def normal(*shape: int, gain: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * gain).astype(np.float32)


def conv(x: str, w: str, y: str, name: str, bias: str | None = None) -> onnx.NodeProto:
    inputs = [x, w] if bias is None else [x, w, bias]
    return helper.make_node("Conv", inputs, [y], name=name, pads=[1, 1, 1, 1])


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(initializers(model)[name])


def quantizer_scale(model: onnx.ModelProto, tensor: str) -> float:
    (q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
    return float(array(model, q.input[1]))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def relative_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    diff = candidate.astype(np.float64) - reference
    return float(np.linalg.norm(diff) / np.linalg.norm(reference))


def assert_faithful(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict) -> None:
    """Cosine alone misses a uniform scale error; relative L2 does not."""
    for ref, got in zip(run(reference, feeds), run(candidate, feeds), strict=True):
        assert cosine(ref, got) >= 0.999
        assert relative_l2(ref, got) <= 0.05


def assert_no_cast_after_dequantize(model: onnx.ModelProto) -> None:
    for cast in (n for n in model.graph.node if n.op_type == "Cast"):
        source = producer(model, cast.input[0])
        assert source is None or source.op_type != "DequantizeLinear", cast.name


def dequantizer_of(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    found = producer(model, tensor)
    assert found is not None and found.op_type == "DequantizeLinear", tensor
    return found


def scale_type(model: onnx.ModelProto, dq: onnx.NodeProto) -> int:
    return initializers(model)[dq.input[1]].data_type


# --- names -------------------------------------------------------------------------------------


def test_initializer_named_like_a_generated_scale_keeps_its_value():
    """y = Conv(x) * x_scale: the model's own x_scale (32) is not trtq's Q/DQ scale of x."""
    model = checked_model(
        [
            conv("x", "w", "c", "conv"),
            helper.make_node("Mul", ["c", "x_scale"], ["y"], name="gain"),
        ],
        [float_value("x", "N", 16, 8, 8)],
        [float_value("y", "N", 32, 8, 8)],
        {"w": weights(32, 16, 3, 3), "x_scale": np.array(32.0, np.float32)},
    )
    batches = [{"x": normal(8, 16, 8, 8)} for _ in range(2)]
    q = quantize(model, batches, calibration=QUIET).model
    assert float(array(q, node(q, "gain").input[1])) == 32.0
    dq = dequantizer_of(q, node(q, "conv").input[0])
    assert dq.input[1] != "x_scale"
    assert_faithful(model, q, {"x": normal(8, 16, 8, 8)})


def test_written_models_say_trtq_produced_them():
    model = checked_model(
        [conv("x", "w", "y", "conv")],
        [float_value("x", "N", 16, 8, 8)],
        [float_value("y", "N", 32, 8, 8)],
        {"w": weights(32, 16, 3, 3)},
    )
    model.producer_name, model.producer_version = "pytorch", "2.4"
    batches = [{"x": normal(4, 16, 8, 8)}]
    int8 = quantize(model, batches, calibration=QUIET).model
    half = quantize(model, batches, placement=None, mixed=FP16, calibration=QUIET).model
    for written in (int8, half):
        assert (written.producer_name, written.producer_version) == ("trtq", __version__)


# --- INT8 + FP16: DequantizeLinear feeds its reader directly ----------------------------------


def test_fp32_island_reads_its_dequantize_nodes_directly():
    """x * 1000 keeps conv1, conv2 and the residual Add in FP32 under FP16 (> 512).

    Their DequantizeLinear nodes (weights, activations and the Add's shortcut) stay FP32
    and feed them directly; the FP16 Conv after the island reads an FP16 one.
    """
    model = checked_model(
        [
            conv("x", "w1", "c1", "conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            conv("r1", "w2", "c2", "conv2"),
            helper.make_node("Add", ["c2", "r1"], ["sum"], name="residual"),
            helper.make_node("Mul", ["sum", "shrink"], ["small"], name="shrink"),
            conv("small", "w3", "y", "conv3"),
        ],
        [float_value("x", "N", 32, 8, 8)],
        [float_value("y", "N", 32, 8, 8)],
        {
            "w1": weights(32, 32, 3, 3),
            "w2": weights(32, 32, 3, 3),
            "w3": weights(32, 32, 3, 3),
            "shrink": np.array(1e-4, np.float32),
        },
    )
    batches = [{"x": normal(8, 32, 8, 8, gain=1000.0)} for _ in range(2)]
    result = quantize(model, batches, mixed=FP16, calibration=QUIET)
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    kept = {n["name"] for n in result.report["mixed_precision"]["fp32_nodes"]}
    assert {"conv1", "conv2", "residual"} <= kept and "conv3" not in kept
    assert_no_cast_after_dequantize(q)
    for name in ("conv1", "conv2"):
        for tensor in node(q, name).input[:2]:
            assert scale_type(q, dequantizer_of(q, tensor)) == TensorProto.FLOAT
    shortcut = dequantizer_of(q, node(q, "residual").input[1])
    assert scale_type(q, shortcut) == TensorProto.FLOAT
    for tensor in node(q, "conv3").input[:2]:
        assert scale_type(q, dequantizer_of(q, tensor)) == TensorProto.FLOAT16
    assert_faithful(model, q, {"x": normal(8, 32, 8, 8, gain=1000.0)})


def test_dequantize_shared_by_fp16_and_fp32_readers_is_retyped_for_each():
    """x feeds conv_a (FP16) and conv_b (FP32: its output passes 512): one Q, two DQs."""
    model = checked_model(
        [conv("x", "wa", "ya", "conv_a"), conv("x", "wb", "yb", "conv_b")],
        [float_value("x", "N", 32, 8, 8)],
        [float_value("ya", "N", 32, 8, 8), float_value("yb", "N", 32, 8, 8)],
        {"wa": weights(32, 32, 3, 3), "wb": weights(32, 32, 3, 3, gain=300.0)},
    )
    batches = [{"x": normal(8, 32, 8, 8)} for _ in range(2)]
    q = quantize(model, batches, mixed=FP16, calibration=QUIET).model
    onnx.checker.check_model(q, full_check=True)
    assert_no_cast_after_dequantize(q)
    dq_a = dequantizer_of(q, node(q, "conv_a").input[0])
    dq_b = dequantizer_of(q, node(q, "conv_b").input[0])
    assert dq_a.input[0] == dq_b.input[0]  # one QuantizeLinear, read by both
    assert scale_type(q, dq_a) == TensorProto.FLOAT16
    assert scale_type(q, dq_b) == TensorProto.FLOAT
    assert float(array(q, dq_a.input[1])) == float(array(q, dq_b.input[1]))
    assert len([n for n in q.graph.node if n.op_type == "QuantizeLinear"]) == 1
    assert_faithful(model, q, {"x": normal(8, 32, 8, 8)})


# --- scales ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixed", [None, FP16], ids=["fp32", "fp16"])
def test_near_dead_channel_gets_a_normal_nonzero_scale(mixed):
    """|w| ~ 1e-7 in one channel (BatchNorm folding makes such channels): scale is not 0."""
    w = weights(32, 16, 3, 3)
    w[5] *= 1e-6
    model = checked_model(
        [conv("x", "w", "y", "conv", bias="b")],
        [float_value("x", "N", 16, 8, 8)],
        [float_value("y", "N", 32, 8, 8)],
        {"w": w, "b": weights(32)},
    )
    batches = [{"x": normal(8, 16, 8, 8)} for _ in range(2)]
    q = quantize(model, batches, mixed=mixed, calibration=QUIET).model
    dq = dequantizer_of(q, node(q, "conv").input[1])
    scales = array(q, dq.input[1])
    tiny = np.finfo(scales.dtype).smallest_normal
    assert scales.dtype == (np.float32 if mixed is None else np.float16)
    assert np.all(np.isfinite(scales)) and np.all(scales >= tiny)
    restored = (
        array(q, dq.input[0]).astype(np.float32) * scales.astype(np.float32)[:, None, None, None]
    )
    assert np.all(np.abs(restored - w) <= scales.astype(np.float32)[:, None, None, None] / 2 + 1e-6)
    assert_faithful(model, q, {"x": normal(8, 16, 8, 8)})


# --- ranges through range-preserving ops --------------------------------------------------------


def test_maxpool_input_and_output_share_one_scale_on_mnist(mnist_model):
    with np.load(CALIB_DATA / "mnist_calib.npz", allow_pickle=False) as data:
        calib = data["input"][:128].astype(np.float32)
    batches = [{"input": calib[i : i + 32]} for i in range(0, len(calib), 32)]
    model = onnx.load(mnist_model)
    result = quantize(model, batches, calibration=QUIET)
    q = result.model
    pools = [n for n in q.graph.node if n.op_type == "MaxPool"]
    checked = 0
    for pool in pools:
        source = producer(q, pool.input[0])
        readers = [n for n in q.graph.node if pool.output[0] in n.input]
        if source.op_type == "DequantizeLinear" and readers[0].op_type == "QuantizeLinear":
            before = float(array(q, source.input[1]))
            after = quantizer_scale(q, pool.output[0])
            assert before == after, pool.name
            checked += 1
    assert checked == 1  # features.4: between the residual block and the last Conv
    assert [set(group) for group in result.plan.range_groups] == [
        {"/features/features.3/Relu_output_0", "/features/features.4/MaxPool_output_0"}
    ]
    assert result.report["range_groups"] == [list(result.plan.range_groups[0])]


def test_concat_of_quantized_tensors_and_a_transpose_share_one_scale():
    """ra, rb (each a Conv input) -> Concat -> conv_c, and ra -> Transpose -> conv_t: one scale."""
    model = checked_model(
        [
            conv("x", "wa", "ca", "conv_a"),
            helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
            conv("x", "wb", "cb", "conv_b"),
            helper.make_node("Relu", ["cb"], ["rb"], name="relu_b"),
            conv("ra", "wd", "yd", "conv_d"),
            conv("rb", "we", "ye", "conv_e"),
            helper.make_node("Concat", ["ra", "rb"], ["cat"], name="concat", axis=1),
            conv("cat", "wc", "yc", "conv_c"),
            helper.make_node("Transpose", ["ra"], ["rat"], name="flip", perm=[0, 1, 3, 2]),
            conv("rat", "wt", "yt", "conv_t"),
        ],
        [float_value("x", "N", 16, 8, 8)],
        [
            float_value("yc", "N", 32, 8, 8),
            float_value("yd", "N", 32, 8, 8),
            float_value("ye", "N", 32, 8, 8),
            float_value("yt", "N", 32, 8, 8),
        ],
        {
            "wa": weights(32, 16, 3, 3),
            "wb": weights(32, 16, 3, 3, gain=0.05),  # rb's own range is about half ra's
            "wd": weights(32, 32, 3, 3),
            "we": weights(32, 32, 3, 3),
            "wc": weights(32, 64, 3, 3),
            "wt": weights(32, 32, 3, 3),
        },
    )
    batches = [{"x": normal(8, 16, 8, 8)} for _ in range(2)]
    result = quantize(model, batches, calibration=QUIET)
    assert [set(group) for group in result.plan.range_groups] == [{"ra", "rb", "cat", "rat"}]
    q = result.model
    scales = {quantizer_scale(q, tensor) for tensor in ("ra", "rb", "cat", "rat")}
    assert len(scales) == 1
    assert_faithful(model, q, {"x": normal(8, 16, 8, 8)})


def test_shared_range_comes_from_the_merged_histograms():
    small, large = Histogram.empty(), Histogram.empty()
    small.update(RNG.standard_normal(10_000))
    large.update(RNG.standard_normal(10_000) * 4)
    plan = qdq.QuantPlan([], range_groups=[("a", "b")])
    ranges = {"a": compute_range("a", small), "b": compute_range("b", large)}
    shared = plan.shared_ranges(ranges, {"a": small, "b": large}, "percentile", 99.0)
    expected = compute_range("a", small.merge(large), "percentile", percentile=99.0).amax
    assert shared["a"].amax == shared["b"].amax == expected
    assert (shared["a"].name, shared["b"].name) == ("a", "b")
    # Without histograms (ranges from a TensorRT cache): the largest range, clipping nobody more.
    cached = {n: TensorRange(n, amax, "cache") for n, amax in (("a", 1.0), ("b", 3.0))}
    assert {r.amax for r in plan.shared_ranges(cached).values()} == {3.0}


# --- residual Add ------------------------------------------------------------------------------


@pytest.mark.parametrize("shortcut_first", [False, True], ids=["main+shortcut", "shortcut+main"])
def test_residual_add_quantizes_the_shortcut_found_by_structure(shortcut_first):
    """ResNet projection block: both Add inputs are Conv outputs; the 1x1 shortcut is shorter."""
    add_inputs = ["proj", "c2"] if shortcut_first else ["c2", "proj"]
    model = checked_model(
        [
            conv("x", "w1", "c1", "conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            conv("r1", "w2", "c2", "conv2"),
            helper.make_node("Conv", ["x", "wp"], ["proj"], name="projection"),
            helper.make_node("Add", add_inputs, ["sum"], name="residual"),
            helper.make_node("Relu", ["sum"], ["y"], name="relu2"),
        ],
        [float_value("x", "N", 16, 8, 8)],
        [float_value("y", "N", 32, 8, 8)],
        {"w1": weights(32, 16, 3, 3), "w2": weights(32, 32, 3, 3), "wp": weights(32, 16, 1, 1)},
    )
    batches = [{"x": normal(8, 16, 8, 8)} for _ in range(2)]
    result = quantize(model, batches, calibration=QUIET)
    assert set(result.plan.fusion_tensors) == {"proj"}
    assert "fuse it into conv2" in result.plan.fusion_tensors["proj"].reason
    q = result.model
    add = node(q, "residual")
    main, shortcut = (add.input[1], add.input[0]) if shortcut_first else tuple(add.input)
    assert main == "c2" and producer(q, "c2").op_type == "Conv"
    assert producer(q, dequantizer_of(q, shortcut).input[0]).input[0] == "proj"
    assert_faithful(model, q, {"x": normal(8, 16, 8, 8)})
