"""Loading models from files and bytes, and detecting prior quantization."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtq.errors import ModelError
from trtq.graph.inspect import summarize
from trtq.graph.load import TensorSpec, check_model, load_model, model_inputs, model_outputs


def test_load_from_path_and_bytes_agree(mnist_model):
    from_path = load_model(mnist_model)
    from_bytes = load_model(mnist_model.read_bytes())
    assert from_path.SerializeToString() == from_bytes.SerializeToString()


def test_sample_io_specs(mnist_model):
    model = load_model(mnist_model)
    [inp] = model_inputs(model)
    assert inp == TensorSpec("input", np.dtype("float32"), ("batch", 1, 28, 28))
    assert not inp.is_static
    [out] = model_outputs(model)
    assert out.name == "logits" and out.shape[1] == 10


def test_external_data_is_loaded(tmp_path, mnist_model):
    model = load_model(mnist_model)
    path = tmp_path / "ext.onnx"
    onnx.save(
        load_model(mnist_model),
        path,
        save_as_external_data=True,
        location="ext.weights",
        size_threshold=0,
    )
    assert (tmp_path / "ext.weights").stat().st_size > 100_000
    loaded = load_model(path)
    for a, b in zip(model.graph.initializer, loaded.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_missing_external_data_is_a_model_error(tmp_path, mnist_model):
    path = tmp_path / "ext.onnx"
    onnx.save(load_model(mnist_model), path, save_as_external_data=True, location="w.bin")
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ModelError, match="external data"):
        load_model(path)


@pytest.mark.parametrize(
    "content",
    [b"this is a text file, not a model\n", bytes(range(256)) * 4, b""],
    ids=["text", "binary", "empty"],
)
def test_not_onnx_is_a_model_error(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="is not an ONNX model"):
        load_model(path)
    with pytest.raises(ModelError, match="is not an ONNX model"):
        load_model(content)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is a folder"):
        load_model(tmp_path)


def test_invalid_model_is_reported_in_one_line():
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", 1, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="not valid ONNX") as info:
        check_model(model)
    assert "\n" not in info.value.message


def test_initializers_listed_as_inputs_are_not_model_inputs():
    """Exporters before IR 4 list every weight in graph.input too."""
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    assert [t.name for t in model_inputs(model)] == ["x"]


def qdq_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
        helper.make_node("Relu", ["xd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "zp"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_summary_detects_prior_quantization(mnist_model):
    assert not summarize(load_model(mnist_model)).already_quantized
    summary = summarize(qdq_model())
    assert summary.already_quantized
    assert summary.quantized_ops == {"QuantizeLinear": 1, "DequantizeLinear": 1}


def test_summary_detects_onnxruntime_qoperator_models():
    node = helper.make_node("ConvInteger", ["x", "w"], ["y"], kernel_shape=[1, 1])
    graph = helper.make_graph(
        [node],
        "qop",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1, 4, 4])],
        initializer=[numpy_helper.from_array(np.ones((1, 1, 1, 1), np.uint8), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert summarize(model).quantized_ops == {"ConvInteger": 1}


def test_summary_counts_ops(mnist_model):
    summary = summarize(load_model(mnist_model))
    assert summary.opset == 17
    assert summary.op_counts["Conv"] >= 3
    assert summary.num_nodes == sum(summary.op_counts.values())
    assert summary.num_parameters > 10_000
