"""TensorRT invariants (`trtq.graph.invariants`), coverage from the final graph, `inspect --check`.

Each sabotage breaks one thing in an otherwise clean Q/DQ graph and must be caught by exactly
the rule for it; trtq's own output must be clean, and a defect in it is an internal error.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import CALIB_DATA
from onnx import TensorProto, helper, numpy_helper

from trtq.cli import main
from trtq.errors import EXIT_GATE_FAILED, EXIT_INTERNAL_ERROR
from trtq.graph import coverage
from trtq.graph.invariants import InvariantViolation, check, verify_written

MODEL = str(CALIB_DATA / "mnist_cnn.onnx")
CALIB = str(CALIB_DATA / "mnist_calib.npz")


# --- a clean Q/DQ graph, built by hand --------------------------------------------------------


def clean_model(opset: int = 17) -> onnx.ModelProto:
    """x -Q/DQ-> Conv(per-channel DQ weight) -> Relu -> Reshape -Q/DQ-> Gemm(transB=1)."""
    rng = np.random.default_rng(0)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    initializers = [
        init("x_scale", np.float32(0.05)),
        init("x_zero", np.int8(0)),
        init("w_int8", rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)),
        init("w_scale", np.full(8, 0.01, np.float32)),
        init("w_zero", np.zeros(8, np.int8)),
        init("shape", np.array([1, -1], np.int64)),
        init("f_scale", np.float32(0.1)),
        init("f_zero", np.int8(0)),
        init("g_int8", rng.integers(-127, 128, (10, 512)).astype(np.int8)),
        init("g_scale", np.full(10, 0.02, np.float32)),
        init("g_zero", np.zeros(10, np.int8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="x_dq"),
        helper.make_node(
            "DequantizeLinear", ["w_int8", "w_scale", "w_zero"], ["wd"], name="w_dq", axis=0
        ),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"),
        helper.make_node("QuantizeLinear", ["f", "f_scale", "f_zero"], ["fq"], name="f_q"),
        helper.make_node("DequantizeLinear", ["fq", "f_scale", "f_zero"], ["fd"], name="f_dq"),
        helper.make_node(
            "DequantizeLinear", ["g_int8", "g_scale", "g_zero"], ["gd"], name="g_dq", axis=0
        ),
        helper.make_node("Gemm", ["fd", "gd"], ["y"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "clean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rules(model: onnx.ModelProto) -> set[str]:
    return {finding.rule for finding in check(model)}


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def set_initializer(model: onnx.ModelProto, name: str, array) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(array), name))


def set_axis(model: onnx.ModelProto, name: str, axis: int) -> None:
    target = node(model, name)
    for attr in target.attribute:
        if attr.name == "axis":
            attr.i = axis
            return
    target.attribute.append(helper.make_attribute("axis", axis))


def test_clean_model_is_valid_onnx_and_has_no_findings():
    model = clean_model()
    onnx.checker.check_model(model, full_check=True)
    assert check(model) == []


# --- sabotage: each caught by exactly its rule --------------------------------------------------


def cast_between_dq_and_conv(model):
    node(model, "conv").input[0] = "xd_cast"
    model.graph.node.insert(
        3, helper.make_node("Cast", ["xd"], ["xd_cast"], name="cast", to=TensorProto.FLOAT)
    )


def identity_between_q_and_dq(model):
    node(model, "x_dq").input[0] = "xq_copy"
    model.graph.node.insert(1, helper.make_node("Identity", ["xq"], ["xq_copy"], name="copy"))


def duplicate_node_name(model):
    node(model, "relu").name = "conv"


def duplicate_tensor_name(model):
    # An initializer named like a computed tensor (as `x_scale` in models in the wild).
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.float32), "r"))


def dq_with_its_own_scale(model):
    model.graph.initializer.append(numpy_helper.from_array(np.float32(0.1), "x_scale_2"))
    node(model, "x_dq").input[1] = "x_scale_2"


def insert_before(model, name: str, *nodes: onnx.NodeProto) -> None:
    index = [n.name for n in model.graph.node].index(name)
    for offset, new in enumerate(nodes):
        model.graph.node.insert(index + offset, new)


def qdq_on_reshape_shape(model):
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1.0, -1.0], np.float32), "shape_float"),
            numpy_helper.from_array(np.float32(1.0), "s_scale"),
            numpy_helper.from_array(np.int8(0), "s_zero"),
        ]
    )
    insert_before(
        model,
        "flatten",
        helper.make_node("QuantizeLinear", ["shape_float", "s_scale", "s_zero"], ["sq"], name="q"),
        helper.make_node("DequantizeLinear", ["sq", "s_scale", "s_zero"], ["sd"], name="dq"),
        helper.make_node("Cast", ["sd"], ["s64"], name="s_cast", to=TensorProto.INT64),
    )
    node(model, "flatten").input[1] = "s64"


def q_on_integer_tensor(model):
    insert_before(
        model,
        "flatten",
        helper.make_node("Cast", ["r"], ["ri"], name="to_int", to=TensorProto.INT32),
        helper.make_node("QuantizeLinear", ["ri", "f_scale", "f_zero"], ["riq"], name="i_q"),
        helper.make_node("DequantizeLinear", ["riq", "f_scale", "f_zero"], ["rid"], name="i_dq"),
    )
    model.graph.output.append(helper.make_tensor_value_info("rid", TensorProto.FLOAT, None))


def runtime_scale(model):
    model.graph.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    node(model, "x_q").input[1] = node(model, "x_dq").input[1] = "s"


def per_channel_activation(model):
    set_initializer(model, "x_scale", np.full(4, 0.05, np.float32))
    set_initializer(model, "x_zero", np.zeros(4, np.int8))
    set_axis(model, "x_q", 1)
    set_axis(model, "x_dq", 1)


def set_opset(model, version: int) -> None:
    model.opset_import[0].version = version


def fp16_scale_below_normal(model):
    set_opset(model, 19)  # FP16 scales are ONNX from opset 19
    scale = np.full(8, 0.01, np.float16)
    scale[5] = 1e-6  # subnormal in FP16: about 4 significant bits
    set_initializer(model, "w_scale", scale)


SABOTAGES = {
    "cast between DQ and Conv": (cast_between_dq_and_conv, "dq-not-direct"),
    "zero scale": (lambda m: set_initializer(m, "x_scale", np.float32(0.0)), "scale-invalid"),
    "negative channel scale": (
        lambda m: set_initializer(m, "w_scale", np.array([0.01] * 7 + [-0.01], np.float32)),
        "scale-invalid",
    ),
    "subnormal FP16 scale": (fp16_scale_below_normal, "scale-invalid"),
    "non-zero zero point": (
        lambda m: set_initializer(m, "x_zero", np.int8(3)),
        "zero-point-nonzero",
    ),
    "uint8 zero point": (lambda m: set_initializer(m, "x_zero", np.uint8(0)), "quantized-type"),
    "per-channel axis off by one": (lambda m: set_axis(m, "w_dq", 1), "per-channel-axis"),
    "Gemm transB=1 weight on axis 1": (lambda m: set_axis(m, "g_dq", 1), "per-channel-axis"),
    "one scale too few": (
        lambda m: set_initializer(m, "w_scale", np.full(7, 0.01, np.float32)),
        "per-channel-axis",
    ),
    "per-channel activation": (per_channel_activation, "per-channel-activation"),
    "duplicate node names": (duplicate_node_name, "duplicate-node-name"),
    "duplicate tensor names": (duplicate_tensor_name, "duplicate-tensor-name"),
    "Q/DQ on a Reshape shape": (qdq_on_reshape_shape, "qdq-on-shape-tensor"),
    "Q on an integer tensor": (q_on_integer_tensor, "qdq-non-float"),
    "Identity between Q and DQ": (identity_between_q_and_dq, "qdq-pair"),
    "DQ with another scale than its Q": (dq_with_its_own_scale, "qdq-mismatch"),
    "scale computed at run time": (runtime_scale, "qdq-not-constant"),
    "per-channel below opset 13": (lambda m: set_opset(m, 11), "qdq-opset"),
}


@pytest.mark.parametrize("sabotage", SABOTAGES)
def test_each_sabotage_is_caught_by_exactly_its_rule(sabotage):
    damage, rule = SABOTAGES[sabotage]
    model = clean_model()
    damage(model)
    findings = check(model)
    assert {f.rule for f in findings} == {rule}, [str(f) for f in findings]
    for finding in findings:
        assert finding.node and finding.severity in ("error", "warning")
        assert "\n" not in finding.message and ";" in finding.message  # problem; fix


def test_findings_name_the_node_the_tensor_and_the_fix():
    model = clean_model()
    cast_between_dq_and_conv(model)
    (finding,) = check(model)
    assert (finding.node, finding.tensor) == ("conv", "xd_cast")
    assert "Cast cast" in finding.message and "x_dq" in finding.message
    assert "directly" in finding.message
    assert finding.to_json() == {
        "rule": "dq-not-direct",
        "severity": "warning",
        "node": "conv",
        "tensor": "xd_cast",
        "message": finding.message,
    }


def test_a_shared_zero_point_is_reported_once():
    model = clean_model()
    set_initializer(model, "x_zero", np.int8(3))  # read by x_q and x_dq
    assert [(f.rule, f.tensor) for f in check(model)] == [("zero-point-nonzero", "x_zero")]


def test_subgraphs_may_reuse_sibling_names_but_not_shadow_outer_ones():
    def branch(name: str, output: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Relu", ["y"], [output], name=name)],
            name,
            [],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        )

    def with_if(then_output: str, else_output: str) -> onnx.ModelProto:
        model = clean_model()
        model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
        model.graph.node.append(
            helper.make_node(
                "If",
                ["flag"],
                ["z"],
                name="if",
                then_branch=branch("then_relu", then_output),
                else_branch=branch("else_relu", else_output),
            )
        )
        return model

    assert check(with_if("inner", "inner")) == []  # siblings: separate scopes
    shadowing = check(with_if("inner", "c"))  # "c" is the Conv's output outside
    assert [(f.rule, f.node, f.tensor) for f in shadowing] == [
        ("duplicate-tensor-name", "else_relu", "c")
    ]


# --- coverage from the final graph, and trtq's own output ---------------------------------------


def test_coverage_counts_only_nodes_that_read_dequantize_directly():
    macs = {"conv": 300, "gemm": 100}
    full = {"fraction": 1.0, "quantized_nodes": 1, "total_nodes": 1}
    assert coverage.measure(clean_model(), macs) == {
        "quantized_macs": 400,
        "total_macs": 400,
        "fraction": 1.0,
        "quantized_nodes": 2,
        "total_nodes": 2,
        "by_op": {
            "Conv": {"quantized_macs": 300, "total_macs": 300, **full},
            "Gemm": {"quantized_macs": 100, "total_macs": 100, **full},
        },
    }
    broken = clean_model()
    cast_between_dq_and_conv(broken)
    measured = coverage.measure(broken, macs)
    assert coverage.quantized_compute_nodes(broken) == {"gemm"}
    assert (measured["quantized_macs"], measured["fraction"]) == (100, 0.25)
    assert measured["by_op"]["Conv"]["fraction"] == 0.0


def test_verify_written_raises_naming_rule_and_node():
    model = clean_model()
    verify_written(model, {"conv", "gemm"})
    cast_between_dq_and_conv(model)
    with pytest.raises(InvariantViolation, match="rule dq-not-direct at node conv") as raised:
        verify_written(model)
    assert not isinstance(raised.value, __import__("trtq").errors.UserError)


def test_verify_written_checks_the_plan_against_the_graph():
    with pytest.raises(InvariantViolation, match="unplanned-quantized at node gemm"):
        verify_written(clean_model(), {"conv"})
    with pytest.raises(InvariantViolation, match="planned-not-quantized at node relu"):
        verify_written(clean_model(), {"conv", "gemm", "relu"})


@pytest.fixture(scope="module")
def trtq_int8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own")
    out, report = folder / "mnist.int8.onnx", folder / "report.json"
    code = main(["quantize", MODEL, "--calib", CALIB, "-o", str(out), "--report", str(report),
                 "--no-progress", "-q"])  # fmt: skip
    assert code == 0
    return out, json.loads(report.read_text())


def test_trtq_output_has_no_findings_and_its_coverage_is_the_graphs(trtq_int8):
    path, report = trtq_int8
    model = onnx.load(path)
    assert check(model) == []
    quantized = coverage.quantized_compute_nodes(model)
    assert quantized == {node["name"] for node in report["quantized_nodes"]}
    assert report["coverage"]["quantized_nodes"] == len(quantized) == 4
    assert report["coverage"]["total_nodes"] == 6


def test_trtq_fp16_island_reads_dequantize_directly(tmp_path):
    """A quantized Conv kept FP32 inside an FP16 model: its DQs are retyped, never cast after."""
    out = tmp_path / "mixed.onnx"
    code = main(["quantize", MODEL, "--calib", CALIB, "-o", str(out), "--no-progress", "-q",
                 "--high-precision", "fp16", "--keep-fp32-nodes", "branch.1/Conv"])  # fmt: skip
    assert code == 0
    assert check(onnx.load(out)) == []


def test_a_broken_invariant_in_trtq_output_is_an_internal_error(monkeypatch, tmp_path, capsys):
    """A rewrite that hides a DequantizeLinear behind a Cast must stop trtq (exit 1), not ship."""
    import trtq.quantizer as quantizer

    real_check_model = quantizer.check_model

    def check_after_sabotage(model, *args, **kwargs):
        if kwargs.get("full"):  # the written model, right before its invariants are checked
            names = [n.name for n in model.graph.node]
            index = next(i for i, name in enumerate(names) if name.endswith("branch.1/Conv"))
            conv = model.graph.node[index]
            cast = helper.make_node("Cast", [conv.input[0]], ["hidden"], name="sabotage", to=1)
            conv.input[0] = "hidden"
            model.graph.node.insert(index, cast)
        return real_check_model(model, *args, **kwargs)

    monkeypatch.setattr(quantizer, "check_model", check_after_sabotage)
    out = tmp_path / "never.onnx"
    code = main(["quantize", MODEL, "--calib", CALIB, "-o", str(out), "--no-progress", "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_INTERNAL_ERROR
    assert "InvariantViolation" in err and "dq-not-direct" in err and "branch.1/Conv" in err
    assert not out.exists()


# --- trtq inspect --check ------------------------------------------------------------------------


def ort_quantized(path, **options) -> str:
    """The sample quantized by onnxruntime's quantize_static (QDQ format) with ``options``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    with np.load(CALIB, allow_pickle=False) as data:
        digits = data["input"][:64].astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": digits[i : i + 32]} for i in (0, 32)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(MODEL, str(path), Reader(), quant_format=QuantFormat.QDQ, **options)
    return str(path)


def inspect_check(capsys, *argv) -> tuple[int, str]:
    code = main(["inspect", "--check", *map(str, argv)])
    return code, capsys.readouterr().out


def test_inspect_check_on_onnxruntime_symmetric_output(tmp_path, capsys):
    """Symmetric int8 per channel is TensorRT's scheme, but onnxruntime also quantizes biases."""
    from onnxruntime.quantization import QuantType

    symmetric = {"ActivationSymmetric": True, "WeightSymmetric": True}
    model = ort_quantized(tmp_path / "ort.onnx", per_channel=True,
                          activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                          extra_options=symmetric)  # fmt: skip
    code, out = inspect_check(capsys, model)
    assert code == 0
    lines = out.strip().splitlines()
    assert all(line.startswith("error quantized-type ") for line in lines[:-1])
    assert all("int32" in line and "QuantizeBias=False" in line for line in lines[:-1])
    assert len(lines) - 1 == 6  # the bias of every Conv/BatchNorm and of the Gemm
    assert lines[-1].endswith("6 finding(s), 6 error(s)")

    assert inspect_check(capsys, model, "--strict")[0] == EXIT_GATE_FAILED
    code, out = inspect_check(capsys, model, "--json")
    findings = json.loads(out)
    assert code == 0 and len(findings) == 6
    assert set(findings[0]) == {"rule", "severity", "node", "tensor", "message"}

    float_bias = ort_quantized(tmp_path / "ort_float_bias.onnx", per_channel=True,
                               activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                               extra_options={**symmetric, "QuantizeBias": False})  # fmt: skip
    code, out = inspect_check(capsys, float_bias, "--strict")
    assert code == 0 and out.strip().endswith("no findings")


def test_inspect_check_on_onnxruntime_default_output(tmp_path, capsys):
    """onnxruntime's defaults (asymmetric activations, optionally uint8) are not TensorRT's."""
    from onnxruntime.quantization import QuantType

    default = ort_quantized(tmp_path / "default.onnx")
    code, out = inspect_check(capsys, default, "--json")
    assert code == 0
    assert {f["rule"] for f in json.loads(out)} == {"zero-point-nonzero", "quantized-type"}
    unsigned = ort_quantized(tmp_path / "uint8.onnx", activation_type=QuantType.QUInt8,
                             weight_type=QuantType.QUInt8)  # fmt: skip
    findings = json.loads(inspect_check(capsys, unsigned, "--json")[1])
    assert any(f["rule"] == "quantized-type" and "uint8" in f["message"] for f in findings)


def test_inspect_check_on_trtq_output(trtq_int8, capsys):
    path, _ = trtq_int8
    code, out = inspect_check(capsys, path, "--strict")
    assert code == 0 and out.strip() == f"{path}: no findings"
    code, out = inspect_check(capsys, path, "--json")
    assert code == 0 and json.loads(out) == []


def test_inspect_strict_needs_check(capsys):
    assert main(["inspect", MODEL, "--strict"]) == 2
    assert "--check" in capsys.readouterr().err
