"""A model as the TensorRT invariant rules see it (:mod:`trtq.graph.invariants`).

Each rule asks the same questions of a graph - who produces this tensor, who reads it, is
it a constant and what are its values, what is its element type - across the main graph
and every If/Loop/Scan body. :class:`ModelView` answers them once, so each rule is a short
function over it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtq.graph.walk import all_graphs, all_nodes

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Ops that move a tensor without computing on it: between a DequantizeLinear and its compute
#: consumer they hide the pattern TensorRT fuses.
HIDING_OPS = frozenset({"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})


class ModelView:
    """Name -> producer / consumers / constant / element type, across the model and its subgraphs.

    Names are resolved model-wide: with unique names (the first rule) that is exact, and a
    subgraph reading an outer-scope tensor finds its producer too.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(all_nodes(model.graph))
        self.opset = next(
            (int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0
        )
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producer.setdefault(name, node)
            for index, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, index))
        self.constants: dict[str, TensorProto] = {}
        for graph in all_graphs(model.graph):
            for init in graph.initializer:
                self.constants.setdefault(init.name, init)
        for node in self.nodes:
            value = constant_node_value(node)
            if value is not None:
                self.constants.setdefault(node.output[0], value)
            elif node.op_type == "Identity" and node.input and node.input[0] in self.constants:
                self.constants.setdefault(node.output[0], self.constants[node.input[0]])
        self.types = element_types(model)
        self.types.update({name: t.data_type for name, t in self.constants.items()})

    def qdq_nodes(self) -> Iterator[onnx.NodeProto]:
        return (n for n in self.nodes if n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx"))

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def op(self, name: str) -> str | None:
        producer = self.producer.get(name)
        return producer.op_type if producer is not None else None

    def quantized_type(self, node: onnx.NodeProto) -> int | None:
        """The low-precision type of a Q's output or a DQ's input (None when unknown)."""
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "QuantizeLinear":
            if zero_point is not None:
                return self.types.get(zero_point)
            declared = attribute(node, "output_dtype", 0)
            return declared or TensorProto.UINT8  # ONNX's default without a zero point
        found = self.types.get(node.input[0])
        if found is None and zero_point is not None:
            found = self.types.get(zero_point)
        return found

    def weight_source(self, dq: onnx.NodeProto) -> str | None:
        """The constant a weight DQ dequantizes: its input, or the input of its constant Q."""
        if dq.input[0] in self.constants:
            return dq.input[0]
        producer = self.producer.get(dq.input[0])
        if producer is not None and producer.op_type == "QuantizeLinear":
            return producer.input[0] if producer.input[0] in self.constants else None
        return None

    def upstream(self, name: str) -> tuple[list[onnx.NodeProto], str]:
        """Walk up from ``name`` through :data:`HIDING_OPS`: (the hiding nodes, where it stops)."""
        hidden: list[onnx.NodeProto] = []
        while (producer := self.producer.get(name)) is not None and producer.op_type in HIDING_OPS:
            if len(hidden) > len(self.nodes) or not producer.input:  # a cycle: a broken model
                break
            hidden.append(producer)
            name = producer.input[0]
        return hidden, name


def constant_node_value(node: onnx.NodeProto) -> TensorProto | None:
    if node.op_type != "Constant" or not node.attribute or not node.output:
        return None
    attr = node.attribute[0]
    if attr.type == onnx.AttributeProto.TENSOR:
        return attr.t
    value = helper.get_attribute_value(attr)
    if attr.name in ("value_float", "value_floats"):
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32))
    if attr.name in ("value_int", "value_ints"):
        return numpy_helper.from_array(np.asarray(value, dtype=np.int64))
    return None  # sparse or string constants: never a scale, zero point or weight


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types declared in the model, completed by ONNX type inference where it works."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):
        inferred = model  # e.g. over 2 GB: the declared types are all there is
    types: dict[str, int] = {}
    for graph in all_graphs(inferred.graph):
        for value in (*graph.input, *graph.value_info, *graph.output):
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                types[value.name] = value.type.tensor_type.elem_type
    return types


def attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def node_label(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def type_name(elem_type: int | None) -> str:
    return "unknown" if elem_type is None else TensorProto.DataType.Name(elem_type).lower()
