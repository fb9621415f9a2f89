"""Which tensors calibration must observe.

Until Q/DQ placement decides tensor by tensor, the quantizable activations are
the non-constant inputs of the compute ops TensorRT runs in INT8 (ARCHITECTURE.md §Fusion rules):
Conv, ConvTranspose, Gemm and MatMul.
"""

from __future__ import annotations

import onnx

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
)


def compute_op_inputs(model: onnx.ModelProto) -> list[str]:
    """Activation inputs (not weights, not bias) of the compute ops, in graph order, once each."""
    constants = _constant_names(model)
    seen: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        # Inputs 0 and 1 are the operands; Conv/Gemm's third input is the bias.
        for name in node.input[:2]:
            if name and name not in constants:
                seen.setdefault(name)
    return list(seen)


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Every float tensor the network computes, graph inputs included.

    TensorRT's implicit (weak-typed) INT8 mode wants a scale for every tensor,
    so a calibration cache for it covers all of them.
    """
    constants = _constant_names(model)
    types = {v.name: v.type.tensor_type.elem_type for v in _typed_values(model)}
    names: dict[str, None] = {}
    for value in model.graph.input:
        if value.name not in constants:
            names.setdefault(value.name)
    for node in model.graph.node:
        for name in node.output:
            if name and name not in constants:
                names.setdefault(name)
    return [n for n in names if types.get(n) in _FLOAT_TYPES]


def _typed_values(model: onnx.ModelProto):
    yield from model.graph.input
    yield from model.graph.value_info
    yield from model.graph.output


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    names.update(n.output[0] for n in model.graph.node if n.op_type == "Constant")
    return names
