"""trtq.proto: protobuf's 2 GB limit found by serializing, not by ByteSize()."""

from __future__ import annotations

import onnx
from google.protobuf.message import EncodeError
from onnx import helper

from trtq.proto import serialized


def small_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph)


def test_a_model_under_the_limit_comes_back_as_its_bytes():
    model = small_model()
    data = serialized(model)
    assert data == model.SerializeToString()
    assert onnx.load_model_from_string(data) == model


def test_bytes_at_or_over_the_limit_are_refused():
    model = small_model()
    size = len(model.SerializeToString())
    assert serialized(model, limit=size) is None
    assert serialized(model, limit=size + 1) is not None


class _Oversized:
    """Stands for a message over 2 GB: upb raises EncodeError instead of serializing it."""

    def SerializeToString(self, deterministic: bool = False) -> bytes:
        raise EncodeError("Failed to serialize proto")


def test_a_message_protobuf_cannot_serialize_is_over_the_limit():
    assert serialized(_Oversized()) is None  # type: ignore[arg-type]


def test_deterministic_bytes_are_stable():
    model = small_model()
    assert serialized(model, deterministic=True) == serialized(model, deterministic=True)
