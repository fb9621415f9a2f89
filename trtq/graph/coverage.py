"""Which compute nodes of a written model run quantized, read off the final graph.

TensorRT runs a Conv, ConvTranspose, Gemm or MatMul in INT8/FP8 when both its operands (the
activation and the weight; the bias aside) come straight out of a DequantizeLinear: that is
the pattern it fuses (ARCHITECTURE.md §Invariants). So coverage is measured on the graph as
written, not taken from the placement plan: a node the plan quantized but whose Q/DQ got lost
or hidden behind a Cast in a later rewrite runs in float, and must be counted in float.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from trtq.graph.patterns import COMPUTE_OPS
from trtq.graph.shapes import RECURRENT_OPS
from trtq.graph.walk import all_nodes

#: The nodes coverage is a share of: every op that carries the model's multiply-accumulates.
COUNTED_OPS = COMPUTE_OPS | RECURRENT_OPS


def quantized_compute_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the compute nodes whose two operands both read a DequantizeLinear directly."""
    dequantized = {
        name
        for node in all_nodes(model.graph)
        if node.op_type == "DequantizeLinear"
        for name in node.output
    }
    return {
        node.name
        for node in all_nodes(model.graph)
        if node.op_type in COMPUTE_OPS
        and len(node.input) >= 2
        and all(name in dequantized for name in node.input[:2])
    }


def measure(model: onnx.ModelProto, macs: Mapping[str, int]) -> dict:
    """Share of multiply-accumulates (``macs``: per node name) that run quantized in ``model``.

    Nodes inside If/Loop/Scan bodies and recurrent ops count in the total: they are compute
    TensorRT runs, in float. ``by_op`` holds the same figures per op type.
    """
    quantized = quantized_compute_nodes(model)
    counted = [node for node in all_nodes(model.graph) if node.op_type in COUNTED_OPS]
    by_op = {
        op: _share([n.name for n in counted if n.op_type == op], quantized, macs)
        for op in sorted({n.op_type for n in counted})
    }
    return {**_share([n.name for n in counted], quantized, macs), "by_op": by_op}


def _share(names: list[str], quantized: set[str], macs: Mapping[str, int]) -> dict:
    total = sum(macs.get(name, 0) for name in names)
    reduced = sum(macs.get(name, 0) for name in names if name in quantized)
    return {
        "quantized_macs": reduced,
        "total_macs": total,
        "fraction": reduced / total if total else 0.0,
        "quantized_nodes": sum(name in quantized for name in names),
        "total_nodes": len(names),
    }
