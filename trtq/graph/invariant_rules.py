"""The TensorRT invariant rules, one function each (the list is in :mod:`trtq.graph.invariants`).

A rule takes a :class:`~trtq.graph.qdq_view.ModelView` and yields a :class:`Finding` per
defect; :data:`RULES` is the order :func:`trtq.graph.invariants.check` runs them in. To add
a rule: write the function here, add it to :data:`RULES`, describe it in the invariants
module's docstring, and give it a sabotaged-graph test in ``tests/test_invariants.py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from trtq.graph.patterns import COMPUTE_OPS
from trtq.graph.qdq_view import (
    QDQ_OPS,
    ModelView,
    attribute,
    node_label,
    type_name,
)

ERROR, WARNING = "error", "warning"
#: Ops TensorRT fuses a DequantizeLinear into: the compute ops, and the residual Add it fuses
#: into the Conv before it (its Q/DQ sits on the shortcut input).
FUSING_OPS = COMPUTE_OPS | {"Add"}
#: Inputs TensorRT evaluates as shape tensors (int64, at build time): never quantized.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Slice": (1, 2, 3, 4),
    "Expand": (1,),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Tile": (1,),
    "Pad": (1,),
    "ConstantOfShape": (0,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "TopK": (1,),
    "OneHot": (1,),
}
#: Types TensorRT quantizes to; int4/FP4 only as stored weights (weight-only quantization).
QUANTIZED_TYPES = frozenset({TensorProto.INT8, TensorProto.FLOAT8E4M3FN})
WEIGHT_ONLY_TYPES = frozenset({TensorProto.INT4, TensorProto.FLOAT4E2M1})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
#: Smallest normal number of each scale dtype: below it a scale loses significant bits.
_SMALLEST_NORMAL = {
    TensorProto.FLOAT: float(np.finfo(np.float32).tiny),
    TensorProto.FLOAT16: float(np.finfo(np.float16).tiny),
    TensorProto.BFLOAT16: float(ml_dtypes.finfo(ml_dtypes.bfloat16).tiny),
}


@dataclass(frozen=True)
class Finding:
    """One broken invariant: which rule, where, and a one-line message that names the fix."""

    rule: str
    severity: str
    node: str | None
    tensor: str | None
    message: str

    def to_json(self) -> dict:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "node": self.node,
            "tensor": self.tensor,
            "message": self.message,
        }

    def __str__(self) -> str:
        return f"{self.severity} {self.rule} {self.node or '-'}: {self.message}"


# --- names ---------------------------------------------------------------------------------------


def _duplicate_tensor_names(view: ModelView) -> Iterator[Finding]:
    yield from _names_in(view.model.graph, frozenset())


def _names_in(graph: onnx.GraphProto, outer: frozenset[str]) -> Iterator[Finding]:
    inputs = {value.name for value in graph.input}
    definitions: list[tuple[str, onnx.NodeProto | None]] = [(v.name, None) for v in graph.input]
    definitions += [(init.name, None) for init in graph.initializer if init.name not in inputs]
    definitions += [(name, node) for node in graph.node for name in node.output if name]
    defined: set[str] = set()
    for name, node in definitions:
        if name in defined or name in outer:
            where = "in an enclosing graph" if name in outer else "twice in one graph"
            yield Finding(
                "duplicate-tensor-name",
                ERROR,
                node_label(node) if node is not None else None,
                name,
                f"tensor {name} is defined {where}: readers get the wrong tensor; rename one "
                "(names must be unique, subgraphs included)",
            )
        defined.add(name)
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _names_in(sub, outer | defined)


def _duplicate_node_names(view: ModelView) -> Iterator[Finding]:
    counts = Counter(node.name for node in view.nodes if node.name)
    for name, count in counts.items():
        if count > 1:
            yield Finding(
                "duplicate-node-name",
                WARNING,
                name,
                None,
                f"{count} nodes are named {name}: TensorRT layers, reports and per-layer "
                "settings cannot tell them apart; give each node a unique name",
            )


# --- the fused pattern ---------------------------------------------------------------------------


def _dq_not_direct(view: ModelView) -> Iterator[Finding]:
    for node in view.nodes:
        if node.op_type not in FUSING_OPS:
            continue
        for index, name in enumerate(node.input[:2]):
            if not name:
                continue
            hidden, source = view.upstream(name)
            if hidden and view.op(source) in QDQ_OPS:
                between = ", ".join(f"{n.op_type} {node_label(n)}" for n in reversed(hidden))
                yield Finding(
                    "dq-not-direct",
                    WARNING,
                    node_label(node),
                    name,
                    f"{node.op_type} input {index} reads {view.op(source)} "
                    f"{node_label(view.producer[source])} through {between}: TensorRT fuses only "
                    f"DequantizeLinear -> {node.op_type}, so the layer runs in float; feed the "
                    "DQ output directly (retype the DQ instead of casting after it)",
                )


def _qdq_pairs(view: ModelView) -> Iterator[Finding]:
    for node in view.qdq_nodes():
        if node.op_type == "QuantizeLinear":
            readers = view.consumers.get(node.output[0], [])
            others = [c for c, _ in readers if c.op_type != "DequantizeLinear"]
            if others:
                yield Finding(
                    "qdq-pair",
                    ERROR,
                    node_label(node),
                    node.output[0],
                    f"QuantizeLinear output is read by {others[0].op_type} "
                    f"{node_label(others[0])}: TensorRT needs Q immediately followed by "
                    "DequantizeLinear; move the DequantizeLinear right after the Q",
                )
            continue
        source = node.input[0]
        producer = view.producer.get(source)
        if source in view.constants or producer is None or producer.op_type == "QuantizeLinear":
            continue
        yield Finding(
            "qdq-pair",
            ERROR,
            node_label(node),
            source,
            f"DequantizeLinear reads {producer.op_type} {node_label(producer)}: TensorRT fuses "
            "constant -> DQ (weights) and Q -> DQ (activations) only; read the constant or the "
            "QuantizeLinear directly",
        )


def _qdq_mismatch(view: ModelView) -> Iterator[Finding]:
    for dq in view.qdq_nodes():
        q = view.producer.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        differences = []
        q_scale, dq_scale = view.array(q.input[1]), view.array(dq.input[1])
        if q_scale is not None and dq_scale is not None and not _same(q_scale, dq_scale):
            differences.append(f"scale {_brief(q_scale)} vs {_brief(dq_scale)}")
        q_zero, dq_zero = _zero_point(view, q), _zero_point(view, dq)
        if q_zero is not None and dq_zero is not None and not _same(q_zero, dq_zero):
            differences.append(f"zero point {_brief(q_zero)} vs {_brief(dq_zero)}")
        if (
            q_scale is not None
            and q_scale.size > 1
            and attribute(q, "axis", 1) != attribute(dq, "axis", 1)
        ):
            differences.append(f"axis {attribute(q, 'axis', 1)} vs {attribute(dq, 'axis', 1)}")
        if differences:
            yield Finding(
                "qdq-mismatch",
                ERROR,
                node_label(dq),
                dq.input[0],
                f"QuantizeLinear {node_label(q)} and this DequantizeLinear differ "
                f"({'; '.join(differences)}): the pair rescales the tensor instead of "
                "quantizing it; give both the same scale and zero-point tensors",
            )


def _zero_point(view: ModelView, node: onnx.NodeProto) -> np.ndarray | None:
    if len(node.input) > 2 and node.input[2]:
        return view.array(node.input[2])
    return np.zeros(())


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values (a missing zero point is a 0-d zero; [s] and s are the same scale)."""
    return a.size == b.size and bool(
        np.array_equal(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())
    )


def _brief(values: np.ndarray) -> str:
    flat = values.astype(np.float64).ravel()
    return f"{flat[0]:.6g}" if flat.size == 1 else f"[{flat[0]:.6g}, ... x{flat.size}]"


# --- scales and zero points ----------------------------------------------------------------------


def _parameters(view: ModelView, index: int) -> Iterator[tuple[onnx.NodeProto, str]]:
    """(first Q/DQ node reading it, name) of every scale (1) or zero point (2), once each:
    pairs share these tensors, and one defect is one finding."""
    seen: set[str] = set()
    for node in view.qdq_nodes():
        name = node.input[index] if len(node.input) > index else ""
        if name and name not in seen:
            seen.add(name)
            yield node, name


def _constant_parameters(view: ModelView) -> Iterator[Finding]:
    for index, what in ((1, "scale"), (2, "zero point")):
        for node, name in _parameters(view, index):
            if name not in view.constants:
                yield Finding(
                    "qdq-not-constant",
                    ERROR,
                    node_label(node),
                    name,
                    f"{node.op_type} {what} {name} is computed at run time: TensorRT needs "
                    f"build-time constant {what}s; store it as an initializer",
                )


def _scales(view: ModelView) -> Iterator[Finding]:
    for node, name in _parameters(view, 1):
        tensor = view.constants.get(name)
        if tensor is None or tensor.data_type not in _SMALLEST_NORMAL:
            continue
        values = numpy_helper.to_array(tensor).astype(np.float64).ravel()
        problem = _scale_problem(values, tensor.data_type)
        if problem:
            yield Finding(
                "scale-invalid",
                ERROR,
                node_label(node),
                name,
                f"scale {name} of {node.op_type} {problem}; TensorRT needs positive, finite, "
                "normal scales: floor the scale at the dtype's smallest normal number, or store "
                "it in float32",
            )


def _scale_problem(values: np.ndarray, data_type: int) -> str | None:
    dtype = type_name(data_type)
    where = lambda i: f" (channel {i})" if values.size > 1 else ""  # noqa: E731
    for test, what in (
        (~np.isfinite(values), "is not finite"),
        (values < 0, "is negative"),
        (values == 0, f"is 0 in {dtype}"),
    ):
        if np.any(test):
            index = int(np.argmax(test))
            return f"{what}{where(index)}: {values[index]:.6g}"
    tiny = _SMALLEST_NORMAL[data_type]
    below = values < tiny
    if np.any(below):
        index = int(np.argmax(below))
        return (
            f"is subnormal in {dtype}{where(index)}: {values[index]:.6g} < {tiny:.6g} keeps "
            "few significant bits and flush-to-zero kernels read it as 0"
        )
    return None


def _zero_points(view: ModelView) -> Iterator[Finding]:
    for node, name in _parameters(view, 2):
        values = view.array(name)
        if values is None:
            continue
        nonzero = values.astype(np.float64).ravel() != 0
        if np.any(nonzero):
            index = int(np.argmax(nonzero))
            yield Finding(
                "zero-point-nonzero",
                ERROR,
                node_label(node),
                name,
                f"zero point {name} of {node.op_type} is {values.ravel()[index]} "
                f"({int(nonzero.sum())} of {nonzero.size} non-zero): TensorRT quantizes "
                "symmetrically; requantize with zero points 0 (symmetric activations and weights)",
            )


def _quantized_types(view: ModelView) -> Iterator[Finding]:
    for node in view.qdq_nodes():
        if node.op_type == "DequantizeLinear" and view.op(node.input[0]) == "QuantizeLinear":
            continue  # its Q reports the pair
        found = view.quantized_type(node)
        if found is None or found in QUANTIZED_TYPES:
            continue
        source = node.input[0]
        if found in WEIGHT_ONLY_TYPES and source in view.constants:
            continue
        if found == TensorProto.UINT8:
            fix = "requantize to signed int8 with zero point 0 (symmetric)"
        elif found == TensorProto.INT32:
            fix = "keep biases in float (onnxruntime: extra_options QuantizeBias=False)"
        else:
            fix = "quantize to int8 or FP8 E4M3"
        yield Finding(
            "quantized-type",
            ERROR,
            node_label(node),
            node.output[0] if node.op_type == "QuantizeLinear" else source,
            f"{node.op_type} uses {type_name(found)}: TensorRT's Q/DQ take int8 or FP8 E4M3 "
            f"(int4/FP4 only for constant weights); {fix}",
        )


# --- axes ---------------------------------------------------------------------------------------


def _per_channel_axes(view: ModelView) -> Iterator[Finding]:
    for dq in view.qdq_nodes():
        if dq.op_type != "DequantizeLinear":
            continue
        scale = view.constants.get(dq.input[1])
        weight = view.weight_source(dq)
        if scale is None or weight is None or len(scale.dims) != 1:
            continue  # per-tensor (0-d scale), block-quantized (scale of the weight's rank)
        dims = tuple(view.constants[weight].dims)
        rank = len(dims)
        axis = int(attribute(dq, "axis", 1))
        axis = axis + rank if axis < 0 else axis
        for consumer, index in view.consumers.get(dq.output[0], []):
            if index != 1 or consumer.op_type not in COMPUTE_OPS:
                continue
            expected = _channel_axis(consumer, rank)
            if expected is None:
                problem = f"a {rank}-d weight has no output-channel axis; use one scale"
            elif axis != expected:
                problem = (
                    f"axis {axis}, but {consumer.op_type} {node_label(consumer)} has its output "
                    f"channels on axis {expected} of weight {list(dims)}; use axis={expected}"
                )
            elif scale.dims[0] != dims[axis]:
                problem = (
                    f"{scale.dims[0]} scales for {dims[axis]} channels on axis {axis} of weight "
                    f"{list(dims)}; give one scale per channel"
                )
            else:
                continue
            yield Finding(
                "per-channel-axis",
                ERROR,
                node_label(dq),
                dq.input[1],
                f"per-channel scale: {problem}",
            )


def _channel_axis(consumer: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of ``consumer``'s weight (input 1), None when it has none."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if attribute(consumer, "transB", 0) else 1
    return rank - 1 if rank >= 2 else None  # MatMul: [..., K, N]


def _per_channel_activations(view: ModelView) -> Iterator[Finding]:
    for q in view.qdq_nodes():
        scale = view.constants.get(q.input[1])
        if q.op_type != "QuantizeLinear" or scale is None or q.input[0] in view.constants:
            continue
        if int(np.prod(scale.dims, dtype=np.int64)) > 1:
            yield Finding(
                "per-channel-activation",
                ERROR,
                node_label(q),
                q.input[0],
                f"activation {q.input[0]} has {int(np.prod(scale.dims))} scales: TensorRT "
                "quantizes activations per tensor; use one scale",
            )


# --- where Q/DQ cannot go -----------------------------------------------------------------------


def _shape_tensors(view: ModelView) -> Iterator[Finding]:
    for node in view.nodes:
        for index in SHAPE_INPUTS.get(node.op_type, ()):
            if index >= len(node.input) or not node.input[index]:
                continue
            _, source = view.upstream(node.input[index])
            producer = view.producer.get(source)
            if producer is not None and producer.op_type in QDQ_OPS:
                yield Finding(
                    "qdq-on-shape-tensor",
                    ERROR,
                    node_label(producer),
                    source,
                    f"{producer.op_type} feeds input {index} of {node.op_type} {node_label(node)}, "
                    "a shape tensor TensorRT computes in int64 at build time; remove the Q/DQ",
                )


def _non_float_inputs(view: ModelView) -> Iterator[Finding]:
    for q in view.qdq_nodes():
        found = view.types.get(q.input[0])
        if q.op_type == "QuantizeLinear" and found is not None and found not in FLOAT_TYPES:
            yield Finding(
                "qdq-non-float",
                ERROR,
                node_label(q),
                q.input[0],
                f"QuantizeLinear quantizes {q.input[0]}, a {type_name(found)} tensor: TensorRT "
                "quantizes float tensors only; remove the Q/DQ pair",
            )


def _opset(view: ModelView) -> Iterator[Finding]:
    for node in view.qdq_nodes():
        scale = view.constants.get(node.input[1])
        needs = []
        if "axis" in {a.name for a in node.attribute} or (scale is not None and scale.dims):
            needs.append((13, "per-channel scales"))
        if scale is not None and scale.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            needs.append((19, f"{type_name(scale.data_type)} scales"))
        found = view.quantized_type(node)
        if found in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):
            needs.append((19, "FP8"))
        if found in (TensorProto.INT4, TensorProto.UINT4) or attribute(node, "block_size", 0):
            needs.append((21, "int4 and block quantization"))
        for opset, what in needs:
            if view.opset < opset:
                yield Finding(
                    "qdq-opset",
                    ERROR,
                    node_label(node),
                    node.input[1],
                    f"{node.op_type} with {what} needs opset >= {opset}, the model declares "
                    f"{view.opset}; convert it to opset {opset} (onnx.version_converter)",
                )
                break


RULES = (
    _duplicate_tensor_names,
    _duplicate_node_names,
    _dq_not_direct,
    _constant_parameters,
    _scales,
    _zero_points,
    _quantized_types,
    _per_channel_axes,
    _per_channel_activations,
    _qdq_pairs,
    _qdq_mismatch,
    _shape_tensors,
    _non_float_inputs,
    _opset,
)
