"""FP16/BF16 mixed precision expressed in the graph, for strongly typed TensorRT builds.

TensorRT 11 has no FP16 builder flag: a network computes in the types its
tensors carry. This module rewrites an FP32 model (or the float parts of a Q/DQ
model) so that most nodes compute in FP16 or BF16, keeps in FP32 the nodes
where reduced precision would hurt, and inserts Cast nodes at every boundary,
through :class:`~trtq.graph.edit.GraphEditor` (fresh names, one Cast per tensor).

Q/DQ nodes take the precision of their neighbours, never a Cast
(ARCHITECTURE.md §Fusion rules): a QuantizeLinear follows its input, a
DequantizeLinear goes low when a reader does, and a reader in the other precision
gets its own retyped DequantizeLinear (scale in its type). Scales converted to FP16
stay normal numbers (see :func:`trtq.graph.edit.representable_scale`).

Which float inputs and outputs of a node change type is read from the node's
ONNX schema: every type parameter (``T``, ``T2``…) bound to a float32 tensor is
switched together, so a DequantizeLinear's scale and output, or a Conv's input,
weight and bias, stay consistent; inputs the schema fixes to float32 (Resize's
``scales``) keep it. A node whose schema does not allow the reduced type stays
FP32. So do, each with its reason:

* nodes whose observed activations exceed ``max_abs`` (FP16 overflows at 65504,
  and sums of large values reach it long before; 512 is ModelOpt's threshold);
* nodes with a float weight outside FP16's range;
* reductions over more than ``max_reduction`` elements (the sum is rounded to
  11 bits of mantissa once per add);
* control flow (If/Loop/Scan) and ops outside the ONNX domain;
* what the user names (``keep_fp32_nodes`` regex, ``keep_fp32_ops``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from trtq.graph.edit import GraphEditor, numpy_dtype, to_float_type
from trtq.graph.shapes import Shapes

log = logging.getLogger(__name__)

LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_TYPE_STR = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}
FP16_MAX = 65504.0
DEFAULT_MAX_ABS = 512.0
DEFAULT_MAX_REDUCTION = 1 << 16
_REDUCTIONS = frozenset(
    {
        "ReduceSum",
        "ReduceMean",
        "ReduceProd",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "CumSum",
        "GlobalAveragePool",
        "GlobalLpPool",
    }
)
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Ops whose float output type comes from an attribute, not from an input.
_DTYPE_ATTRS = {
    "Cast": "to",
    "RandomNormal": "dtype",
    "RandomUniform": "dtype",
    "RandomNormalLike": "dtype",
    "RandomUniformLike": "dtype",
    "EyeLike": "dtype",
    "Bernoulli": "dtype",
}


@dataclass(frozen=True)
class MixedPrecisionOptions:
    precision: str = "fp16"
    keep_io_types: bool = True
    #: Activations above this stay FP32; None: 512 for FP16, no limit for BF16 (FP32's range).
    max_abs: float | None = None
    max_reduction: int = DEFAULT_MAX_REDUCTION
    keep_fp32_nodes: str | None = None
    keep_fp32_ops: frozenset[str] = frozenset()

    @property
    def activation_limit(self) -> float:
        if self.max_abs is not None:
            return self.max_abs
        return DEFAULT_MAX_ABS if self.precision == "fp16" else math.inf


@dataclass
class PrecisionPlan:
    """Per node: None = runs in reduced precision, else the reason it stays FP32."""

    reasons: dict[str, str | None] = field(default_factory=dict)

    def fp32_nodes(self) -> dict[str, str]:
        return {name: why for name, why in self.reasons.items() if why is not None}


def plan_precision(
    model: onnx.ModelProto,
    options: MixedPrecisionOptions,
    activation_amax: Mapping[str, float] | None = None,
    shapes: Shapes | None = None,
) -> PrecisionPlan:
    """Decide, for every node that touches float32 tensors, whether it may go low."""
    types = _tensor_types(model)
    weights = {init.name: init for init in model.graph.initializer}
    opset = _default_opset(model)
    pattern = re.compile(options.keep_fp32_nodes) if options.keep_fp32_nodes else None
    shapes = shapes or Shapes(model)
    plan = PrecisionPlan()
    for node in model.graph.node:
        if not _touches_float(node, types):
            continue
        plan.reasons[node.name] = _reason_to_keep(
            node, options, types, weights, opset, pattern, activation_amax or {}, shapes
        )
    _qdq_follow_neighbours(model.graph, plan, options.keep_io_types)
    return plan


def low_dtype(precision: str) -> np.dtype:
    """The numpy type of ``precision`` ("fp16" or "bf16")."""
    return numpy_dtype(LOW_TYPES[precision])


def _qdq_follow_neighbours(
    graph: onnx.GraphProto, plan: PrecisionPlan, keep_io_types: bool
) -> None:
    """Q/DQ nodes take the precision of what they sit between, so no Cast lands next to them.

    A DequantizeLinear read only by FP32 nodes stays FP32 (its readers would otherwise
    need a Cast between it and them, which TensorRT does not fuse); one read by a low node
    goes low, and its FP32 readers get a retyped copy in :func:`convert`. A QuantizeLinear
    follows its input's precision (its output is int8 either way).
    """
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def low(node: onnx.NodeProto) -> bool:
        return node.name in plan.reasons and plan.reasons[node.name] is None

    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not low(node):
            continue
        found = readers.get(node.output[0], [])
        if found and not any(low(reader) for reader in found):
            plan.reasons[node.name] = "DequantizeLinear read only by FP32 nodes"
    graph_inputs = {v.name for v in graph.input}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not low(node):
            continue
        source = producers.get(node.input[0])
        if source is None and node.input[0] in graph_inputs:
            low_input = not keep_io_types
        else:
            low_input = source is not None and low(source)
        if not low_input:
            plan.reasons[node.name] = f"QuantizeLinear of {node.input[0]}, which stays FP32"


def _reason_to_keep(node, options, types, weights, opset, pattern, amax, shapes) -> str | None:
    low = LOW_TYPES[options.precision]
    if pattern is not None and pattern.search(node.name):
        return "matches --keep-fp32-nodes"
    if node.op_type in options.keep_fp32_ops:
        return f"{node.op_type} in --keep-fp32-ops"
    if node.op_type in _CONTROL_FLOW:
        return "control flow: its bodies are kept in FP32"
    if node.domain not in ("", "ai.onnx"):
        return f"op of domain {node.domain}: no schema to convert it by"
    if _switchable_params(node, types, opset, low) is None:
        return f"{node.op_type} (opset {opset}) has no {options.precision.upper()} in its schema"
    limit = options.activation_limit
    for name in (*node.input, *node.output):
        if name in amax and amax[name] > limit:
            if math.isinf(amax[name]):
                return f"activation {name} holds mask fills (±inf or |x| >= 1e9)"
            return f"activation {name} reaches |x| = {amax[name]:.4g} > {limit:g}"
    if options.precision == "fp16":
        for name in node.input:
            if name in weights and weights[name].data_type == TensorProto.FLOAT:
                largest = float(np.max(np.abs(numpy_helper.to_array(weights[name])), initial=0))
                if largest > FP16_MAX:
                    return f"weight {name} reaches {largest:.4g}, beyond FP16's 65504"
    if node.op_type in _REDUCTIONS:
        reduced = _reduced_elements(node, shapes)
        if reduced > options.max_reduction:
            return f"reduces {reduced:,} elements (> {options.max_reduction:,})"
    return None


def _reduced_elements(node: onnx.NodeProto, shapes: Shapes) -> int:
    """How many input elements feed one output element (an estimate from shapes)."""
    x, y = shapes.shape(node.input[0]), shapes.shape(node.output[0])
    if x is None or y is None:
        return 0
    if node.op_type == "CumSum":
        return max(x) if x else 0
    return math.prod(x) // max(math.prod(y), 1)


def convert(
    model: onnx.ModelProto, plan: PrecisionPlan, options: MixedPrecisionOptions
) -> onnx.ModelProto:
    """Rewrite ``model`` (in place) to the plan's precisions, with a Cast at every boundary.

    A DequantizeLinear output read in the other precision gets a retyped DequantizeLinear
    (its scale in that type) instead of a Cast: TensorRT fuses DQ -> Conv, not
    DQ -> Cast -> Conv. Every added name comes from :class:`~trtq.graph.edit.GraphEditor`.
    """
    low = LOW_TYPES[options.precision]
    graph = model.graph
    editor = GraphEditor(model)
    types = _tensor_types(model)
    opset = _default_opset(model)
    weights = {init.name: init for init in graph.initializer}
    graph_inputs = {v.name for v in graph.input}
    # Pass 1: which tensors become low (outputs of low nodes, by their switched params).
    low_tensors: set[str] = set()
    switched: dict[str, set[str]] = {}
    for node in graph.node:
        if plan.reasons.get(node.name, "absent") is None:
            params = _switchable_params(node, types, opset, low) or set()
            switched[node.name] = params
            low_tensors.update(_outputs_with_params(node, params, opset))
    if not options.keep_io_types:
        low_tensors.update(n for n in graph_inputs if types.get(n) == TensorProto.FLOAT)

    for node in list(graph.node):
        params = switched.get(node.name)
        if params is not None:
            for index, name in enumerate(node.input):
                if not name:
                    continue
                if _param(node, index, opset, output=False) not in params:
                    if name in low_tensors:  # an input the schema fixes to float32
                        node.input[index] = editor.cast(name, TensorProto.FLOAT)
                    continue
                if name in weights and weights[name].data_type == TensorProto.FLOAT:
                    node.input[index] = editor.converted_initializer(
                        name, low, scale=_is_scale(node, index)
                    )
                elif name not in low_tensors and types.get(name) == TensorProto.FLOAT:
                    node.input[index] = editor.cast(name, low)
            _retype_attributes(node, low)
        else:
            for index, name in enumerate(node.input):
                if name in low_tensors:
                    node.input[index] = editor.cast(name, TensorProto.FLOAT)
    # Graph outputs keep their name and FP32 type: the low producer writes "<name>_<precision>".
    if options.keep_io_types:
        for output in graph.output:
            if output.name in low_tensors:
                inner = editor.names.fresh(f"{output.name}_{options.precision}")
                editor.rename_output(output.name, inner)
                low_tensors.discard(output.name)
                low_tensors.add(inner)
                editor.add_node(
                    "Cast",
                    [inner],
                    [output.name],
                    name=f"{output.name}_Cast_fp32",
                    to=TensorProto.FLOAT,
                )
    _retype_values(graph, low_tensors, low, keep_io_types=options.keep_io_types)
    return editor.finish()


def _is_scale(node: onnx.NodeProto, index: int) -> bool:
    """Whether input ``index`` of ``node`` is a QuantizeLinear/DequantizeLinear scale."""
    return node.op_type in _QDQ and index == 1


def _retype_attributes(node: onnx.NodeProto, low: int) -> None:
    """Attributes that carry a float32 element type (Cast ``to``, ConstantOfShape ``value``…)."""
    for attr in node.attribute:
        if attr.name == _DTYPE_ATTRS.get(node.op_type) and attr.i == TensorProto.FLOAT:
            attr.i = low
        elif (
            node.op_type == "ConstantOfShape"
            and attr.name == "value"
            and attr.t.data_type == TensorProto.FLOAT
        ):
            converted = to_float_type(numpy_helper.to_array(attr.t), low)
            attr.t.CopyFrom(numpy_helper.from_array(converted, attr.t.name))


def _retype_values(
    graph: onnx.GraphProto, low_tensors: set[str], low: int, *, keep_io_types: bool
) -> None:
    """Element types in value_info (and, without keep_io_types, graph I/O) follow the plan."""
    for value in graph.value_info:
        if value.name in low_tensors and value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = low
    if not keep_io_types:
        for value in (*graph.input, *graph.output):
            if value.name in low_tensors and value.type.tensor_type.elem_type == TensorProto.FLOAT:
                value.type.tensor_type.elem_type = low


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*graph.input, *graph.value_info, *graph.output)
    }
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def _default_opset(model: onnx.ModelProto) -> int:
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _touches_float(node: onnx.NodeProto, types: Mapping[str, int]) -> bool:
    return any(types.get(name) == TensorProto.FLOAT for name in (*node.input, *node.output) if name)


def _schema(node: onnx.NodeProto, opset: int):
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None


def _param(node: onnx.NodeProto, index: int, opset: int, *, output: bool) -> str | None:
    """The schema's type string for input/output ``index`` (variadic lists repeat the last)."""
    schema = _schema(node, opset)
    if schema is None:
        return None
    formal = schema.outputs if output else schema.inputs
    if not formal:
        return None
    return formal[min(index, len(formal) - 1)].type_str


def _switchable_params(
    node: onnx.NodeProto, types: Mapping[str, int], opset: int, low: int
) -> set[str] | None:
    """Type parameters bound to float32 here, if all of them allow ``low``; None if one does not."""
    schema = _schema(node, opset)
    if schema is None:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    bound = set()
    for output, names in ((False, node.input), (True, node.output)):
        for index, name in enumerate(names):
            if name and types.get(name) == TensorProto.FLOAT:
                param = _param(node, index, opset, output=output)
                if param in allowed:
                    bound.add(param)
    if node.op_type in _DTYPE_ATTRS or node.op_type == "ConstantOfShape":
        bound.update(p for p in allowed if _param(node, 0, opset, output=True) == p)
    if any(_TYPE_STR[low] not in allowed[p] for p in bound):
        return None
    return bound


def _outputs_with_params(node: onnx.NodeProto, params: set[str], opset: int) -> list[str]:
    return [
        name
        for index, name in enumerate(node.output)
        if name and _param(node, index, opset, output=True) in params
    ]
