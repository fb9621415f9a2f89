"""Concrete tensor shapes and multiply-accumulate counts from shape inference.

Coverage ("what share of the compute runs in INT8") is measured in
multiply-accumulates, which need concrete shapes. Shape inference leaves
dynamic dims symbolic (``batch``, ``height``…); they are resolved from a real
input batch by matching symbol names (the batch dim as 1 when counting per
sample), and a dim that stays unknown counts as 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from trtq.graph.walk import all_graphs


class Shapes:
    """Element type and (resolved) shape of every tensor shape inference knows."""

    def __init__(
        self,
        model: onnx.ModelProto,
        example: Mapping[str, np.ndarray] | None = None,
        *,
        per_sample: bool = False,
        observed: Mapping[str, tuple[int, ...]] | None = None,
    ):
        graph = model.graph
        #: Shapes seen on a real run; they win over shape inference (reshapes leave symbols).
        self._observed = dict(observed or {})
        self._infos = {}
        self._constants = {}
        for sub in all_graphs(graph):  # If/Loop bodies have value_info of their own
            self._infos.update({v.name: v for v in (*sub.input, *sub.value_info, *sub.output)})
            self._constants.update({init.name: tuple(init.dims) for init in sub.initializer})
        self._symbols = _symbols(graph.input, example or {}, per_sample)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Concrete shape of ``name`` (unknown symbolic dims as 1), or None if unknown."""
        if name in self._constants:
            return self._constants[name]
        if name in self._observed:
            return self._observed[name]
        info = self._infos.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        return tuple(
            d.dim_value if d.HasField("dim_value") else self._symbols.get(d.dim_param, 1)
            for d in info.type.tensor_type.shape.dim
        )

    def itemsize(self, name: str) -> int:
        info = self._infos.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            return 4
        return np.dtype(helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)).itemsize

    def nbytes(self, name: str) -> int:
        shape = self.shape(name)
        return (math.prod(shape) if shape is not None else 1) * self.itemsize(name)


def _symbols(inputs, example: Mapping[str, np.ndarray], per_sample: bool) -> dict[str, int]:
    """Sizes of symbolic dims, read off an example batch; batch dims are 1 when ``per_sample``."""
    symbols: dict[str, int] = {}
    batch_symbols = set()
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            batch_symbols.add(dims[0].dim_param)
        if value.name in example:
            for dim, actual in zip(dims, np.shape(example[value.name]), strict=False):
                if dim.dim_param:
                    symbols[dim.dim_param] = int(actual)
    if per_sample:
        symbols.update(dict.fromkeys(batch_symbols, 1))
    return symbols


RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})


def macs(node: onnx.NodeProto, shapes: Shapes) -> int:
    """Multiply-accumulates of a Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU/RNN (0 if unknown)."""
    out = shapes.shape(node.output[0])
    if node.op_type == "Conv":
        w = shapes.shape(node.input[1])
        if out is None or w is None:
            return 0
        return math.prod(out) * math.prod(w[1:])  # each output: C_in/group x kernel products
    if node.op_type == "ConvTranspose":
        x, w = shapes.shape(node.input[0]), shapes.shape(node.input[1])
        if x is None or w is None:
            return 0
        return math.prod(x) * math.prod(w[1:])  # each input scatters into C_out/group x kernel
    if node.op_type in RECURRENT_OPS:
        x, w, r = (shapes.shape(name) for name in node.input[:3])
        if w is None or r is None:
            return 0
        # Every step: each direction multiplies [input | hidden] by its gate weights. Inside
        # If/Loop bodies the sequence is often of unknown length: count one step then.
        steps = math.prod(x[:2]) if x is not None else 1
        return steps * w[0] * w[1] * (w[2] + r[2])
    if node.op_type in ("Gemm", "MatMul"):
        a = shapes.shape(node.input[0])
        if out is None or a is None or not a:
            return 0
        trans_a = node.op_type == "Gemm" and _attr(node, "transA", 0)
        k = a[0] if trans_a and len(a) == 2 else a[-1]
        return math.prod(out) * k
    return 0


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(helper.get_attribute_value(attr))
    return default
