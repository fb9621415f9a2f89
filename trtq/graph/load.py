"""Load ONNX models from files or bytes, with errors a user can act on."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

from trtq.errors import ModelError
from trtq.proto import serialized

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
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ModelError(
            f"{path} is not an ONNX model (protobuf decoding failed)",
            "pass a .onnx file exported by your framework",
        ) from exc
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {_one_line(exc)}", "check the file") from exc
    _check_looks_like_onnx(model, str(path))
    # Checked even when the data is not read here: ONNX Runtime reads it later, and a file
    # shorter than declared would fail there with a message naming neither file nor tensor.
    check_external_data(model, path)
    if load_external_data:
        try:
            load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelError(
                f"cannot read the external data of {path}: {_one_line(exc)}",
                "keep the external-data files next to the model, as exported",
            ) from exc
    return model


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external-data tensor's file exists in the model's folder and holds its bytes.

    Sizes are checked against the files before anything is read, so a truncated copy (or
    a header claiming more than the file has) is one line naming the tensor and the file,
    not a numpy or ONNX Runtime error, and nothing is allocated for data that is not there.
    """
    folder = path.parent
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = f"tensor '{tensor.name}' of {path}"
        try:
            info = ExternalDataInfo(tensor)
        except ValueError as exc:
            raise ModelError(f"{where} has bad external data fields: {exc}", "re-export") from exc
        location = Path(os.path.normpath(info.location or "."))
        if location.is_absolute() or location.parts[:1] in (("..",), (".",)):
            raise ModelError(
                f"{where} keeps its data at {info.location!r}, outside the model's folder",
                "keep the external-data files in the model's folder, as exported",
            )
        file = folder / location
        if not file.is_file():
            raise ModelError(
                f"external data file {file.name} of {where} is missing",
                "copy it next to the model, as exported",
            )
        needed = _tensor_bytes(tensor)
        if info.length is not None and needed is not None and info.length != needed:
            raise ModelError(
                f"{where} declares {info.length} bytes of external data, but its shape "
                f"{list(tensor.dims)} needs {needed}",
                "re-export the model",
            )
        length = info.length if info.length is not None else needed
        offset = info.offset or 0
        size = file.stat().st_size
        if length is not None and offset + length > size:
            raise ModelError(
                f"external data file {file.name} is {size} bytes, shorter than the "
                f"{offset + length} that {where} needs (offset {offset} + {length} bytes)",
                "the file was cut short: copy the complete file next to the model",
            )


#: Element types that pack several values per byte (``Name`` of TensorProto.DataType).
_SUB_BYTE_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of a tensor's raw data, from its shape and type (None for strings and unknowns)."""
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    try:
        kind = onnx.TensorProto.DataType.Name(tensor.data_type)
    except ValueError:
        return None
    if kind in _SUB_BYTE_BITS:
        return (count * _SUB_BYTE_BITS[kind] + 7) // 8
    if kind in ("STRING", "UNDEFINED"):
        return None
    try:
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of ``graph`` and of every subgraph in it."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
        for subgraph in _subgraphs(node):
            yield from _all_tensors(subgraph)


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
    """Run onnx.checker and turn its failure into a one-line ModelError.

    Models of IR version 3 and older (opset <= 8 exports) are checked by IR 4's rules,
    which ONNX Runtime applies to them too: an initializer need not be listed as a graph
    input (IR 3 required it), and one that is listed is a constant with a default, not
    data to feed (:func:`model_inputs` leaves it out).
    """
    model = with_ir_version(model, OLD_IR_RULES_UNTIL + 1)
    data = serialized(model)
    if data is None:
        log.debug("model over 2 GB: skipping onnx.checker on the in-memory proto")
        return
    try:
        onnx.checker.check_model(data, full_check=full)
    except onnx.checker.ValidationError as exc:
        # Exporters often leave graph outputs without a shape, which the checker requires
        # and ONNX Runtime does not: accept the model if shape inference supplies them.
        try:
            onnx.checker.check_model(onnx.shape_inference.infer_shapes(model), full_check=full)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
            first = str(exc).strip().splitlines()[0]
            explained = explain_op_error(model, first)
            raise ModelError(
                f"the model is not valid ONNX: {explained or first}", "re-export the model"
            ) from exc


#: IR version 3 required every initializer to be a graph input; IR 4 dropped the rule.
OLD_IR_RULES_UNTIL = 3


def with_ir_version(model: onnx.ModelProto, least: int) -> onnx.ModelProto:
    """``model`` if its IR version is at least ``least``, else a copy declaring ``least``.

    Raising the IR version of an old model changes no graph content; it only lets the
    newer rules (initializers that are not inputs) apply, as ONNX Runtime does.
    """
    if model.ir_version >= least:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = least
    return copy


#: What onnx and ONNX Runtime say about an op they do not know, as regular expressions
#: with named groups ``op`` and/or ``domain``.
_UNKNOWN_OP_MESSAGES = (
    re.compile(r"(?P<domain>[\w.]*):(?P<op>\w+)\(-?\d+\) is not a registered function/op"),
    re.compile(r"No opset import for domain '(?P<domain>[^']*)'"),
    re.compile(r"No Op registered for (?P<op>\w+) with domain_version of \d+"),
    re.compile(r"Could not find an implementation for (?P<op>\w+)\(\d+\)"),
)


def explain_op_error(model: onnx.ModelProto | None, message: str) -> str | None:
    """The node an onnx or ONNX Runtime message about an unknown op or domain is about.

    Both name the op type or domain but not the node, and the node's name is what a
    user searches the exporter's graph for. None when ``message`` is about something
    else, or the node is not found.
    """
    for pattern in _UNKNOWN_OP_MESSAGES:
        match = pattern.search(message)
        if match is None:
            continue
        op, domain = match.groupdict().get("op"), match.groupdict().get("domain")
        node = _find_node(model.graph, op, domain) if model is not None else None
        if node is None:
            return None
        which = f"node '{node.name}'" if node.name else "an unnamed node"
        domain_text = f"domain '{node.domain}'" if node.domain else "the default domain"
        return f"{which} is op {node.op_type} of {domain_text} ({match.group(0)})"
    return None


def _find_node(graph: onnx.GraphProto, op: str | None, domain: str | None) -> onnx.NodeProto | None:
    """The first node (subgraphs included) of op type ``op`` in ``domain`` (None: any)."""
    for node in graph.node:
        if (op is None or node.op_type == op) and (domain is None or node.domain == domain):
            return node
        for subgraph in _subgraphs(node):
            found = _find_node(subgraph, op, domain)
            if found is not None:
                return found
    return None


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies of If, Loop and Scan nodes."""
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
