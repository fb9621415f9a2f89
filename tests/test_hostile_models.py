"""Hostile models and loader scripts (issue 13, class 5): one line and exit 2, or it works.

* Old-IR exports (IR version 3, opset 7, initializers listed as graph inputs or not)
  load, calibrate and quantize end to end.
* onnx and ONNX Runtime failures are named where they happen: an op of an unknown
  domain names the node; external data shorter than declared names the file and the
  tensor; an invalid model given to ``compare`` or ``run`` names the model.
* Loader scripts that raise, call ``sys.exit``, return None, or yield non-dicts, ragged
  or non-numeric data are reported as the script's fault.

Every failing case also checks that no output file was written.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR, DataError, ModelError, UserError
from trtq.graph.load import check_model, load_model, model_inputs
from trtq.sessions import describe, open_session

REPO = Path(__file__).resolve().parent.parent
MNIST = REPO / "calib_data" / "mnist_cnn.onnx"
RNG = np.random.default_rng(13)


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("trtq: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


# --- old IR versions ---------------------------------------------------------------------


def old_ir_model(*, initializers_as_inputs: bool) -> onnx.ModelProto:
    """An opset-7, IR-3 export: Conv(4 -> 16) + Relu + Flatten + Gemm(576 -> 16)."""
    weights = [
        numpy_helper.from_array(RNG.normal(0, 0.2, (16, 4, 3, 3)).astype(np.float32), "conv.w"),
        numpy_helper.from_array(RNG.normal(0, 0.1, 16).astype(np.float32), "conv.b"),
        numpy_helper.from_array(RNG.normal(0, 0.05, (16, 576)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(RNG.normal(0, 0.1, 16).astype(np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], "conv", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("Flatten", ["r"], ["f"], "flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], "fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(w.name, w.data_type, w.dims) for w in weights]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    graph = helper.make_graph(nodes, "old_export", inputs, [output], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    return model


@pytest.fixture(scope="module")
def old_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("old") / "x.npz"
    np.savez(path, x=RNG.random((32, 4, 8, 8), dtype=np.float32))
    return path


@pytest.mark.parametrize("initializers_as_inputs", [True, False], ids=["listed", "unlisted"])
def test_old_ir_model_loads_and_feeds_only_its_data_input(initializers_as_inputs):
    model = old_ir_model(initializers_as_inputs=initializers_as_inputs)
    check_model(model)  # IR 3 with unlisted initializers: what ONNX Runtime accepts too
    assert model.ir_version == 3, "checking must not change the caller's model"
    assert [spec.name for spec in model_inputs(model)] == ["x"]


@pytest.mark.parametrize("initializers_as_inputs", [True, False], ids=["listed", "unlisted"])
def test_old_ir_model_quantizes_end_to_end(capsys, tmp_path, old_data, initializers_as_inputs):
    source = save(old_ir_model(initializers_as_inputs=initializers_as_inputs), tmp_path / "m.onnx")
    output = tmp_path / "m.int8.onnx"
    code, _, err = cli(capsys, "quantize", source, "--calib", old_data, "-o", output, "-q")
    assert code == 0, err
    quantized = onnx.load(output)
    onnx.checker.check_model(quantized, full_check=True)
    ops = [node.op_type for node in quantized.graph.node]
    assert ops.count("QuantizeLinear") >= 2, ops  # the Conv's and the Gemm's activations
    assert {"Conv", "Gemm"} <= set(ops)
    assert quantized.ir_version >= 7  # opset 13's IR, not 3
    x = np.load(old_data)["x"][:8]
    reference = open_session(source).run(None, {"x": x})[0]
    actual = open_session(output).run(None, {"x": x})[0]
    cosine = np.sum(reference * actual, 1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(actual, axis=1)
    )
    assert cosine.min() > 0.99, cosine


# --- unknown ops and domains -------------------------------------------------------------


def custom_op_model(*, import_domain: bool) -> onnx.ModelProto:
    """MatMul, then an op of domain 'com.acme' that neither onnx nor ONNX Runtime knows."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], "matmul"),
        helper.make_node("Frobnicate", ["m"], ["y"], "acme_frob", domain="com.acme"),
    ]
    graph = helper.make_graph(
        nodes,
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [weight],
    )
    opsets = [helper.make_opsetid("", 13)]
    if import_domain:
        opsets.append(helper.make_opsetid("com.acme", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def x4_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("x4") / "x4.npz"
    np.savez(path, x=RNG.random((8, 4), dtype=np.float32))
    return path


@pytest.mark.parametrize("import_domain", [True, False], ids=["imported", "not-imported"])
@pytest.mark.parametrize("command", ["quantize", "calibrate-cache", "compare", "run"])
def test_unknown_op_domain_names_the_node(capsys, tmp_path, x4_data, command, import_domain):
    model = save(custom_op_model(import_domain=import_domain), tmp_path / "custom.onnx")
    out = tmp_path / "out"
    argv = {
        "quantize": ["quantize", model, "--calib", x4_data, "-o", out],
        # --cache observes every activation, so ONNX Runtime has to build the whole graph
        "calibrate-cache": ["calibrate", model, "--calib", x4_data, "-o", out, "--cache", out],
        "compare": ["compare", model, model, "--data", x4_data],
        "run": ["run", model, "--data", x4_data, "--save-outputs", out],
    }[command]
    if command == "calibrate-cache":
        argv[-1] = tmp_path / "out.cache"
    code, _, err = cli(capsys, *argv, "--no-progress" if "calibrate" in command else "-q")
    assert_one_line_error(code, err, "node 'acme_frob'", "Frobnicate", "domain 'com.acme'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]


# --- external data -----------------------------------------------------------------------


def matmul_model() -> onnx.ModelProto:
    """x [N, 4] @ a 4x4 float weight 'w' (64 bytes)."""
    weight = numpy_helper.from_array(RNG.random((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "matmul")],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def external_data_model(folder: Path) -> Path:
    """:func:`matmul_model` with its weight in ``w.data``."""
    path = folder / "model.onnx"
    onnx.save(matmul_model(), path, save_as_external_data=True, location="w.data", size_threshold=0)
    return path


def _truncate(path: Path) -> None:
    with open(path.parent / "w.data", "r+b") as data:
        data.truncate(20)


def _point_outside(path: Path) -> None:
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../w.data"
    onnx.save(model, path)


def _lie_about_length(path: Path) -> None:
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = "32"
    onnx.save(model, path)


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (_truncate, ("w.data is 20 bytes, shorter than the 64", "tensor 'w'")),
        (lambda path: (path.parent / "w.data").unlink(), ("w.data", "is missing")),
        (_point_outside, ("'../w.data'", "outside the model's folder")),
        (_lie_about_length, ("declares 32 bytes", "needs 64")),
    ],
    ids=["truncated", "missing", "outside", "length"],
)
@pytest.mark.parametrize("command", ["inspect", "quantize", "compare", "run"])
def test_bad_external_data_is_named(capsys, tmp_path, x4_data, command, damage, fragments):
    model = external_data_model(tmp_path)
    damage(model)
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "out"
    argv = {
        "inspect": ["inspect", model],
        "quantize": ["quantize", model, "--calib", x4_data, "-o", out],
        "compare": ["compare", model, model, "--data", x4_data],
        "run": ["run", model, "--data", x4_data, "--save-outputs", out],
    }[command]
    code, _, err = cli(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert sorted(tmp_path.iterdir()) == before


def test_intact_external_data_still_loads(tmp_path):
    model = load_model(external_data_model(tmp_path))
    assert model.graph.initializer[0].raw_data and not model.graph.initializer[0].external_data


# --- invalid models and ONNX Runtime failures --------------------------------------------


def dangling_input_model() -> onnx.ModelProto:
    """A Relu reading a tensor nothing produces: onnx and ONNX Runtime both refuse it."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"], "relu")],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("command", ["compare", "run", "quantize"])
def test_invalid_model_is_one_line(capsys, tmp_path, x4_data, command):
    model = save(dangling_input_model(), tmp_path / "broken.onnx")
    out = tmp_path / "out.onnx"
    argv = {
        "compare": [
            "compare",
            save(matmul_model(), tmp_path / "ok.onnx"),
            model,
            "--data",
            x4_data,
        ],
        "run": ["run", model, "--data", x4_data],
        "quantize": ["quantize", model, "--calib", x4_data, "-o", out],
    }[command]
    code, _, err = cli(capsys, *argv)
    line = assert_one_line_error(code, err, "nowhere")
    assert "broken.onnx" in line or "not valid ONNX" in line, line
    assert not out.exists()


def test_compare_reference_that_is_not_onnx(capsys, tmp_path, x4_data):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x08\x07" + bytes(range(200)))
    code, _, err = cli(capsys, "compare", bogus, MNIST, "--data", x4_data)
    assert_one_line_error(code, err, "bogus.onnx")


def test_session_errors_are_classified_and_named():
    model = custom_op_model(import_domain=True)
    with pytest.raises(ModelError) as info:
        open_session(model, name="custom.onnx")
    message = str(info.value)
    assert "\n" not in message and "custom.onnx" in message and "node 'acme_frob'" in message

    reshape = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], "to_pairs")],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [2])],
    )
    session = open_session(
        helper.make_model(reshape, opset_imports=[helper.make_opsetid("", 17)]), name="pairs"
    )
    np.testing.assert_array_equal(session.run(None, {"x": np.ones(2, np.float32)})[0], [1, 1])
    with pytest.raises(UserError) as info:  # a node fails on this data
        session.run(None, {"x": np.ones(3, np.float32)})
    assert "ONNX Runtime failed running pairs" in str(info.value)
    assert "\n" not in str(info.value) and "[ONNXRuntimeError]" not in str(info.value)
    with pytest.raises(DataError, match="refused the inputs of pairs"):  # wrong dtype
        session.run(None, {"x": np.ones(2, np.int64)})


def test_describe_keeps_the_first_line_without_status_prefixes():
    error = RuntimeError(
        "[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from m.onnx failed:This is "
        "an invalid model.\nsecond line"
    )
    assert describe(error) == "This is an invalid model."
    assert describe(RuntimeError("")) == "RuntimeError"


# --- loader scripts ----------------------------------------------------------------------

GOOD_BATCH = "np.zeros((2, 1, 28, 28), np.float32)"

LOADERS = [
    (
        "raises",
        "def load_data():\n    raise ValueError('no data here')\n",
        "load_data() raised ValueError: no data here",
    ),
    (
        "raises-midway",
        f"def load_data():\n    yield {{'input': {GOOD_BATCH}}}\n    raise OSError('disk gone')\n",
        "load_data() raised OSError: disk gone",
    ),
    ("exits", "def load_data():\n    sys.exit(3)\n", "load_data() raised SystemExit: 3"),
    ("exits-on-import", "sys.exit('bye')\n", "cannot import loader script"),
    ("returns-none", "def load_data():\n    return None\n", "load_data() returned None"),
    (
        "returns-a-dict",
        f"def load_data():\n    return {{'input': {GOOD_BATCH}}}\n",
        "load_data() returned a dict, not batches",
    ),
    ("returns-a-number", "def load_data():\n    return 42\n", "returned a int"),
    (
        "yields-arrays",
        f"def load_data():\n    yield {GOOD_BATCH}\n",
        "batch 0 of",
    ),
    (
        "yields-ragged",
        "def load_data():\n    yield {'input': [[1.0, 2.0], [3.0]]}\n",
        "input 'input' in batch 0",
    ),
    (
        "yields-strings",
        "def load_data():\n    yield {'input': 'pixels'}\n",
        "holds str data of dtype <U6, not numbers",
    ),
    (
        "yields-objects",
        "def load_data():\n    yield {'input': object()}\n",
        "holds object data",
    ),
    ("no-load-data", "DATA = 1\n", "defines no load_data() function"),
]


@pytest.mark.parametrize(
    ("body", "fragment"), [case[1:] for case in LOADERS], ids=[case[0] for case in LOADERS]
)
def test_misbehaving_loader_script_is_one_line(capsys, tmp_path, body, fragment):
    script = tmp_path / "loader.py"
    script.write_text("import sys\nimport numpy as np\n\n" + textwrap.dedent(body))
    out = tmp_path / "stats.json"
    code, _, err = cli(capsys, "calibrate", MNIST, "--calib", script, "-o", out, "--no-progress")
    line = assert_one_line_error(code, err, fragment)
    assert "loader.py" in line
    assert not out.exists()


def test_ctrl_c_in_a_loader_script_still_interrupts(capsys, tmp_path):
    script = tmp_path / "loader.py"
    script.write_text("def load_data():\n    raise KeyboardInterrupt\n")
    out = tmp_path / "stats.json"
    code, _, err = cli(capsys, "calibrate", MNIST, "--calib", script, "-o", out, "--no-progress")
    assert code == 130 and "interrupted" in err
    assert not out.exists()
