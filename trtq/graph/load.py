"""Load ONNX models from files or bytes, with errors a user can act on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from trtq.errors import ModelError

log = logging.getLogger(__name__)

#: A dimension is either a fixed size or the name of a dynamic one ("?" when unnamed).
Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a graph input or output."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def shape_str(self) -> str:
        return "x".join(str(d) for d in self.shape) if self.shape else "scalar"

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype), "shape": list(self.shape)}


def load_model(source: str | Path | bytes, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX model from a path or from serialized bytes.

    External-data tensors are read from the model's folder. Any failure is
    reported as a :class:`ModelError` that names the file and what to check,
    instead of protobuf's decoding traceback.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _parse(bytes(source), "<bytes>")
    path = Path(source)
    if not path.exists():
        raise ModelError(f"model file not found: {path}", "check the path")
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not an ONNX model file", "pass the .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except DecodeError as exc:
        raise ModelError(
            f"{path} is not an ONNX model (protobuf decoding failed)",
            "pass a .onnx file exported by your framework",
        ) from exc
    except (OSError, onnx.checker.ValidationError) as exc:
        raise ModelError(
            f"cannot read {path} or its external data ({exc})",
            "keep the external-data files next to the model, as exported",
        ) from exc
    _check_looks_like_onnx(model, str(path))
    return model


def _parse(data: bytes, name: str) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
    except DecodeError as exc:
        raise ModelError(
            f"{name} is not an ONNX model (protobuf decoding failed)",
            "pass the bytes of a .onnx file",
        ) from exc
    _check_looks_like_onnx(model, name)
    return model


def _check_looks_like_onnx(model: onnx.ModelProto, name: str) -> None:
    # Protobuf happily decodes many random byte strings into an empty message.
    if not model.graph.node and not model.graph.output:
        raise ModelError(
            f"{name} is not an ONNX model (no graph in it)",
            "pass a .onnx file exported by your framework",
        )


def check_model(model: onnx.ModelProto, *, full: bool = False) -> None:
    """Run onnx.checker and turn its failure into a one-line ModelError."""
    if model.ByteSize() > onnx.checker.MAXIMUM_PROTOBUF:
        log.debug("model over 2 GB: skipping onnx.checker on the in-memory proto")
        return
    try:
        onnx.checker.check_model(model, full_check=full)
    except onnx.checker.ValidationError as exc:
        # Exporters often leave graph outputs without a shape, which the checker requires
        # and ONNX Runtime does not: accept the model if shape inference supplies them.
        try:
            onnx.checker.check_model(onnx.shape_inference.infer_shapes(model), full_check=full)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
            first = str(exc).strip().splitlines()[0]
            raise ModelError(
                f"the model is not valid ONNX: {first}", "re-export the model"
            ) from exc


def model_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The inputs a caller must feed (initializers listed as inputs by old exporters excluded)."""
    weights = {init.name for init in model.graph.initializer}
    return [_spec(v) for v in model.graph.input if v.name not in weights]


def model_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(v) for v in model.graph.output]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    elem = tensor_type.elem_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else np.dtype("float32")
    dims: list[Dim] = []
    if tensor_type.HasField("shape"):
        for d in tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or "?")
    return TensorSpec(value.name, dtype, tuple(dims))
