"""Tensors quantized for TensorRT's fusions rather than as compute inputs (:mod:`trtq.graph.qdq`).

Two fusions need a Q/DQ pair on a tensor that no quantized compute op reads directly:

* a residual ``Add`` after a quantized Conv: TensorRT fuses the add into the Conv of the
  *main* branch when the other (shortcut) input is quantized too, so the shortcut gets
  the pair; which input is the main branch is read from the structure
  (:func:`main_branch`: the longer path back to the two inputs' common ancestor);
* pooling between quantized neighbours: a Q/DQ on the pooling input keeps the tensor in
  INT8 through it.

:func:`fusion_tensors` finds both, given the nodes the plan quantizes
(ARCHITECTURE.md §Fusion rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx_graphsurgeon as gs

POOLING_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool"})
#: Ops a quantized tensor may pass through unchanged in meaning on its way to a pooling layer.
_PASS_THROUGH = frozenset(
    {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Reshape", "Flatten"}
)
_FORWARD = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})


@dataclass(frozen=True)
class Fusion:
    """A tensor quantized for fusion rather than as a compute input: why, and for whom."""

    reason: str
    consumers: tuple[str, ...]  # the nodes that read its DequantizeLinear output


def fusion_tensors(graph: gs.Graph, quantized: set[str]) -> dict[str, Fusion]:
    """Residual skips and pooling inputs that keep TensorRT's INT8 fusions intact."""
    found = _residual_skips(graph, quantized)
    for name, use in _pooling_inputs(graph, quantized).items():
        if name in found:
            use = Fusion(found[name].reason, found[name].consumers + use.consumers)
        found[name] = use
    return found


def _residual_skips(graph: gs.Graph, quantized: set[str]) -> dict[str, Fusion]:
    """Shortcut inputs of Adds whose main branch ends in a quantized Conv.

    TensorRT fuses a residual Add into the Conv of the main branch when the other input
    reads a DequantizeLinear; that other input (the shortcut) gets the Q/DQ pair. Which
    input is the main branch is read from the structure (:func:`main_branch`), not from
    the input order: exporters write ``x + f(x)`` and ``f(x) + x`` alike.
    """
    skips: dict[str, Fusion] = {}
    depth: dict[str, int] | None = None
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2:
            continue
        a, b = add.inputs
        if isinstance(a, gs.Constant) or isinstance(b, gs.Constant) or a is b:
            continue
        if not (_quantized_conv_output(a, quantized) or _quantized_conv_output(b, quantized)):
            continue
        depth = depth if depth is not None else _depths(graph)
        main = main_branch(a, b, depth)
        if main is None:  # branches of equal length: take the one a quantized Conv ends
            main = a if _quantized_conv_output(a, quantized) else b
        skip = b if main is a else a
        if not _quantized_conv_output(main, quantized) or main in graph.outputs:
            continue
        if len(main.outputs) != 1:  # the Conv output is read elsewhere: no fusion
            continue
        conv = main.inputs[0]
        reason = f"residual skip of {add.name}: lets TensorRT fuse it into {conv.name}"
        earlier = skips[skip.name].consumers if skip.name in skips else ()
        skips[skip.name] = Fusion(reason, (*earlier, add.name))
    return skips


def _quantized_conv_output(tensor: gs.Tensor, quantized: set[str]) -> bool:
    producer = tensor.inputs[0] if tensor.inputs else None
    return producer is not None and producer.op == "Conv" and producer.name in quantized


def main_branch(a: gs.Tensor, b: gs.Tensor, depth: Mapping[str, int]) -> gs.Tensor | None:
    """Of the two inputs of a residual Add, the one at the end of the longer branch.

    Both branches start at their nearest common ancestor (the block input of ``x + f(x)``);
    the shortcut is the shorter path from it (none at all for an identity shortcut, one
    Conv for a projection), the main branch the longer one. Inputs with no common
    ancestor are compared by their longest path from the graph inputs. None when the two
    paths are equally long.
    """
    above_a, above_b = _ancestors(a), _ancestors(b)
    common = above_a.keys() & above_b.keys()
    if common:
        start = max(common, key=lambda name: (depth.get(name, 0), name))
        length_a = _longest_path(start, a, above_a, depth)
        length_b = _longest_path(start, b, above_b, depth)
    else:
        length_a, length_b = depth.get(a.name, 0), depth.get(b.name, 0)
    if length_a == length_b:
        return None
    return a if length_a > length_b else b


def _ancestors(tensor: gs.Tensor) -> dict[str, gs.Tensor]:
    """``tensor`` and every non-constant tensor it is computed from, by name."""
    found = {tensor.name: tensor}
    stack = [tensor]
    while stack:
        current = stack.pop()
        for producer in current.inputs:
            for source in producer.inputs:
                if isinstance(source, gs.Constant) or not source.name or source.name in found:
                    continue
                found[source.name] = source
                stack.append(source)
    return found


def _longest_path(
    start: str, end: gs.Tensor, above: Mapping[str, gs.Tensor], depth: Mapping[str, int]
) -> int:
    """Nodes on the longest path from tensor ``start`` to ``end`` (``above``: end's ancestors)."""
    length = {start: 0}
    for name in sorted(above, key=lambda n: depth.get(n, 0)):
        tensor = above[name]
        if name == start or not tensor.inputs:
            continue
        reached = [length[t.name] for t in tensor.inputs[0].inputs if t.name in length]
        if reached:
            length[name] = max(reached) + 1
    return length.get(end.name, 0)


def _depths(graph: gs.Graph) -> dict[str, int]:
    """Longest path (in nodes) from the graph inputs to every tensor: a topological rank."""
    depth: dict[str, int] = {}
    for node in graph.nodes:
        stack = [(out, False) for out in node.outputs]
        while stack:
            tensor, sources_done = stack.pop()
            if tensor.name in depth:
                continue
            producer = tensor.inputs[0] if tensor.inputs else None
            sources = [] if producer is None else _variables(producer.inputs)
            if sources_done or not sources:
                depth[tensor.name] = (producer is not None) + max(
                    (depth.get(t.name, 0) for t in sources), default=0
                )
            else:
                stack.append((tensor, True))
                stack.extend((t, False) for t in sources if t.name not in depth)
    return depth


def _variables(tensors: list[gs.Tensor]) -> list[gs.Tensor]:
    return [t for t in tensors if not isinstance(t, gs.Constant) and t.name]


def _pooling_inputs(graph: gs.Graph, quantized: set[str]) -> dict[str, Fusion]:
    """Inputs of pooling layers between a quantized producer and quantized consumers."""
    found: dict[str, Fusion] = {}
    for pool in graph.nodes:
        if pool.op not in POOLING_OPS or isinstance(pool.inputs[0], gs.Constant):
            continue
        if _fed_by_quantized(pool.inputs[0], quantized) and _feeds_only_quantized(
            pool.outputs[0], quantized, graph
        ):
            name = pool.inputs[0].name
            earlier = found[name].consumers if name in found else ()
            reason = f"input of {pool.op} {pool.name}: keeps INT8 through it"
            found[name] = Fusion(reason, (*earlier, pool.name))
    return found


def _fed_by_quantized(tensor: gs.Tensor, quantized: set[str]) -> bool:
    """Whether ``tensor`` comes, through activations, from a quantized op or a residual Add."""
    while tensor.inputs:
        producer = tensor.inputs[0]
        if producer.name in quantized or producer.op == "Add":
            return True
        if producer.op not in _PASS_THROUGH or not producer.inputs:
            return False
        tensor = producer.inputs[0]
    return False


def _feeds_only_quantized(tensor: gs.Tensor, quantized: set[str], graph: gs.Graph) -> bool:
    """Whether every use of ``tensor`` (through reshapes) is the activation of a quantized op."""
    if tensor in graph.outputs or not tensor.outputs:
        return False
    for consumer in tensor.outputs:
        if consumer.op in _FORWARD:
            if not _feeds_only_quantized(consumer.outputs[0], quantized, graph):
                return False
        elif consumer.name not in quantized or consumer.inputs[0] is not tensor:
            return False
    return True
