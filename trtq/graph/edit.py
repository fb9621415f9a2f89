"""The one graph-editing layer: every tensor, node and initializer a pass adds goes through here.

Passes that rewrite a model (Q/DQ insertion, FP16/BF16 conversion, plugin rewrites,
normalisation) used to name what they made ``<tensor>_scale``, ``<tensor>_to_fp16`` and so
on without looking: a model whose own initializer was called ``x_scale`` had it silently
replaced. Two things here stop that:

* :class:`NameAllocator` reserves every name already in the model - tensor and node names,
  in the main graph and in every If/Loop/Scan body (a body may read an outer name) - and
  hands out fresh ones (``x_scale``, else ``x_scale_1``...);
* :class:`GraphEditor` adds Q/DQ pairs, weight DequantizeLinear nodes, casts and converted
  initializers through it, and finishes a rewrite the same way every time: dead nodes and
  initializers dropped, nodes in topological order, ``producer_name`` set to trtq.

**Why ModelProto behind the editor.** Q/DQ insertion and FP16/BF16 conversion rewrite the
same model one after the other. Conversion reads each node's ONNX schema and every tensor's
element type, which the ModelProto carries (after shape inference) and onnx-graphsurgeon
would only mirror; insertion only adds nodes next to named tensors. So both work on the
ModelProto, by name. Placement analysis (:func:`trtq.graph.qdq.plan`), which walks
producers and consumers, still reads an onnx-graphsurgeon graph, and the graphsurgeon
passes of :mod:`trtq.graph.normalize` and :mod:`trtq.graph.plugins` name what they add with
:meth:`NameAllocator.for_graph`.

**Retyped DequantizeLinear, never DQ -> Cast.** TensorRT fuses ``DequantizeLinear ->
Conv``, not ``DequantizeLinear -> Cast -> Conv`` (ARCHITECTURE.md §Invariants). So
:meth:`GraphEditor.cast` of a DequantizeLinear output makes a second DequantizeLinear that
reads the same quantized tensor with its scale in the wanted type (from opset 19 the
output type is the scale's type).

**Scales that exist in their stored type.** :func:`representable_scale` keeps every scale a
positive, finite, *normal* number of its dtype: FP16 flushes anything below 6.1e-5 to a
denormal or to zero, and a near-dead channel (|w| ~ 1e-7 after BatchNorm folding) would
otherwise get a scale of 0.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from trtq.graph.walk import all_graphs

PRODUCER_NAME = "trtq"
_LABELS = {
    TensorProto.FLOAT: "fp32",
    TensorProto.FLOAT16: "fp16",
    TensorProto.BFLOAT16: "bf16",
    TensorProto.DOUBLE: "fp64",
}


# --- names -------------------------------------------------------------------------------------


class NameAllocator:
    """Unique names: every name given at construction is taken; :meth:`fresh` never repeats one.

    One namespace for tensors and nodes alike: ONNX keeps them apart, but TensorRT names
    layers and tensors after them, and one set keeps reports unambiguous.
    """

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken = {name for name in taken if name}

    @classmethod
    def for_model(cls, model: onnx.ModelProto | onnx.GraphProto) -> NameAllocator:
        """Every name in ``model``, If/Loop/Scan bodies included."""
        graph = model.graph if isinstance(model, onnx.ModelProto) else model
        return cls(_proto_names(graph))

    @classmethod
    def for_graph(cls, graph: gs.Graph) -> NameAllocator:
        """Every name in an onnx-graphsurgeon ``graph``, subgraphs included."""
        return cls(_gs_names(graph))

    def __contains__(self, name: str) -> bool:
        return name in self._taken

    def reserve(self, name: str) -> str:
        """Mark ``name`` as taken (a name moved or kept by a pass) and return it."""
        self._taken.add(name)
        return name

    def fresh(self, base: str) -> str:
        """``base`` if nobody has it, else ``base_1``, ``base_2``...; the name is then taken."""
        name, index = base, 0
        while name in self._taken or not name:
            index += 1
            name = f"{base}_{index}"
        self._taken.add(name)
        return name


def _proto_names(graph: onnx.GraphProto) -> Iterator[str]:
    for sub in all_graphs(graph):
        for node in sub.node:
            yield node.name
            yield from node.input
            yield from node.output
        for value in (*sub.input, *sub.output, *sub.value_info):
            yield value.name
        for init in sub.initializer:
            yield init.name
        for sparse in sub.sparse_initializer:
            yield sparse.values.name


def _gs_names(graph: gs.Graph) -> Iterator[str]:
    for sub in gs_graphs(graph):
        for node in sub.nodes:
            yield node.name
            yield from (t.name for t in (*node.inputs, *node.outputs))
        yield from (t.name for t in (*sub.inputs, *sub.outputs))


def gs_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and, recursively, every subgraph held in a node attribute."""
    yield graph
    for node in graph.nodes:
        for attr in node.attrs.values():
            for sub in attr if isinstance(attr, list) else [attr]:
                if isinstance(sub, gs.Graph):
                    yield from gs_graphs(sub)


# --- values ------------------------------------------------------------------------------------


def numpy_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def _finfo(dtype: np.dtype):
    return ml_dtypes.finfo(dtype) if dtype == ml_dtypes.bfloat16 else np.finfo(dtype)


def representable_scale(scale: np.ndarray | float, dtype: np.dtype | type) -> np.ndarray:
    """``scale`` in ``dtype``, every value a positive, finite, normal number of that type.

    Values below the smallest normal number are raised to it (in FP16: 6.1e-5, so the
    tensors it scales must be re-quantized with the raised value), values beyond the
    largest finite one lowered to it.
    """
    dtype = np.dtype(dtype)
    info = _finfo(dtype)
    values = np.asarray(scale, dtype=np.float64)
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"a scale must be positive and finite, got {values.min()}")
    return np.clip(values, float(info.smallest_normal), float(info.max)).astype(dtype)


def to_float_type(array: np.ndarray, elem_type: int) -> np.ndarray:
    """A float array in ``elem_type``, clipped to its finite range (FP16 ends at 65504)."""
    dtype = numpy_dtype(elem_type)
    limit = float(_finfo(dtype).max)
    return np.clip(np.asarray(array, np.float64), -limit, limit).astype(dtype)


# --- the editor ----------------------------------------------------------------------------------


class GraphEditor:
    """Adds to and rewires the main graph of ``model`` (in place), with names from one allocator."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.names = NameAllocator.for_model(model)
        self._initializers = {init.name: init for init in self.graph.initializer}
        self._types = {
            v.name: v.type.tensor_type.elem_type
            for v in (*self.graph.input, *self.graph.value_info, *self.graph.output)
        }
        self._types.update({name: init.data_type for name, init in self._initializers.items()})
        self._producers = {out: node for node in self.graph.node for out in node.output if out}
        self._casts: dict[tuple[str, int], str] = {}
        self._converted: dict[tuple[str, int], str] = {}

    # reading

    def elem_type(self, tensor: str) -> int | None:
        """The element type of ``tensor`` if the model declares one, else None."""
        return self._types.get(tensor) or None

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return self._producers.get(tensor)

    def initializer(self, name: str) -> np.ndarray | None:
        found = self._initializers.get(name)
        return None if found is None else numpy_helper.to_array(found)

    # adding

    def add_initializer(self, base: str, array: np.ndarray) -> str:
        name = self.names.fresh(base)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        self.graph.initializer.append(tensor)
        self._initializers[name] = tensor
        self._types[name] = tensor.data_type
        return name

    def add_node(
        self,
        op: str,
        inputs: list[str],
        outputs: list[str],
        *,
        name: str,
        **attrs,
    ) -> onnx.NodeProto:
        """Append a node named fresh from ``name``; ``outputs`` must already be allocated."""
        node = helper.make_node(op, inputs, outputs, name=self.names.fresh(name), **attrs)
        self.graph.node.append(node)
        node = self.graph.node[-1]  # append copies: return (and remember) the graph's own node
        for out in outputs:
            self._producers[out] = node
        return node

    def _declare(self, tensor: str, elem_type: int) -> None:
        """Record the element type of a tensor this pass made (shape inference adds the rest)."""
        self._types[tensor] = elem_type

    def quantize_dequantize(self, tensor: str, scale: np.ndarray, zero_point: np.ndarray) -> str:
        """Add ``tensor -> QuantizeLinear -> DequantizeLinear``; return the DQ output's name.

        ``scale`` (per tensor) fixes the DQ output type; ``zero_point`` the quantized type.
        """
        scale_name = self.add_initializer(f"{tensor}_scale", scale)
        zero_name = self.add_initializer(f"{tensor}_zero_point", zero_point)
        quantized = self.names.fresh(f"{tensor}_quantized")
        output = self.names.fresh(f"{tensor}_dequantized")
        self.add_node(
            "QuantizeLinear",
            [tensor, scale_name, zero_name],
            [quantized],
            name=f"{tensor}_QuantizeLinear",
        )
        self.add_node(
            "DequantizeLinear",
            [quantized, scale_name, zero_name],
            [output],
            name=f"{tensor}_DequantizeLinear",
        )
        self._declare(quantized, self._types[zero_name])
        self._declare(output, self._types[scale_name])
        return output

    def dequantize_constant(
        self,
        base: str,
        stored: np.ndarray,
        scale: np.ndarray,
        zero_point: np.ndarray,
        axis: int | None,
    ) -> str:
        """Add a quantized initializer behind a DequantizeLinear; return the DQ output's name."""
        label = str(np.dtype(stored.dtype).name)
        label = "fp8" if "float8" in label else label
        stored_name = self.add_initializer(f"{base}_{label}", stored)
        scale_name = self.add_initializer(f"{base}_scale", scale)
        zero_name = self.add_initializer(f"{base}_zero_point", zero_point)
        output = self.names.fresh(f"{base}_dequantized")
        attrs = {} if axis is None else {"axis": axis}
        self.add_node(
            "DequantizeLinear",
            [stored_name, scale_name, zero_name],
            [output],
            name=f"{base}_DequantizeLinear",
            **attrs,
        )
        self._declare(output, self._types[scale_name])
        return output

    def converted_initializer(self, name: str, elem_type: int, *, scale: bool = False) -> str:
        """The float initializer ``name`` in ``elem_type``, made once (``name`` if it already is).

        A ``scale`` is made representable (:func:`representable_scale`); other values are
        clipped to the type's finite range. Converting back to a type the values came from
        exactly returns the original initializer rather than a copy.
        """
        if self._types.get(name) == elem_type:
            return name
        key = (name, elem_type)
        if key not in self._converted:
            values = self.initializer(name)
            if values is None:
                raise KeyError(f"{name} is not an initializer of the main graph")
            converted = (
                representable_scale(values, numpy_dtype(elem_type))
                if scale
                else to_float_type(values, elem_type)
            )
            new = self.add_initializer(f"{name}_{_LABELS.get(elem_type, elem_type)}", converted)
            self._converted[key] = new
            original_type = self._types[name]
            if np.array_equal(converted.astype(numpy_dtype(original_type)), values):
                self._converted[(new, original_type)] = name
        return self._converted[key]

    def cast(self, tensor: str, elem_type: int) -> str:
        """``tensor`` in ``elem_type``: a Cast, or for a DequantizeLinear output a retyped DQ.

        Made once per tensor and type, shared by every node that needs it.
        """
        key = (tensor, elem_type)
        if key in self._casts:
            return self._casts[key]
        label = _LABELS.get(elem_type, str(elem_type))
        producer = self._producers.get(tensor)
        if producer is not None and producer.op_type == "DequantizeLinear":
            output = self._retyped_dequantize(producer, elem_type, label)
        else:
            output = self.names.fresh(f"{tensor}_to_{label}")
            self.add_node("Cast", [tensor], [output], name=f"{tensor}_Cast_{label}", to=elem_type)
            self._declare(output, elem_type)
        self._casts[key] = output
        return output

    def _retyped_dequantize(self, dq: onnx.NodeProto, elem_type: int, label: str) -> str:
        """A second DequantizeLinear of ``dq``'s quantized input whose scale is ``elem_type``."""
        inputs = list(dq.input)
        inputs[1] = self.converted_initializer(inputs[1], elem_type, scale=True)
        output = self.names.fresh(f"{dq.output[0]}_{label}")
        node = self.add_node("DequantizeLinear", inputs, [output], name=f"{dq.name}_{label}")
        node.attribute.extend(dq.attribute)
        self._declare(output, elem_type)
        return output

    @staticmethod
    def replace_input(node: onnx.NodeProto, old: str, new: str) -> None:
        """Make ``node`` read ``new`` wherever it read ``old`` (a node may read a tensor twice)."""
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new

    def rename_output(self, old: str, new: str) -> None:
        """Rename a tensor of the main graph (its producer and every reader) to ``new``."""
        self.names.reserve(new)
        for node in self.graph.node:
            node.output[:] = [new if o == old else o for o in node.output]
            self.replace_input(node, old, new)
        if old in self._producers:
            self._producers[new] = self._producers.pop(old)
        if old in self._types:
            self._types[new] = self._types[old]

    # finishing

    def finish(self) -> onnx.ModelProto:
        """Drop what no longer feeds an output, order the nodes, stamp trtq as the producer."""
        _prune(self.graph)
        ordered = toposort(list(self.graph.node))
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        stamp_producer(self.model)
        return self.model


def stamp_producer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Mark ``model`` as written by this trtq (``producer_name``/``producer_version``)."""
    from trtq import __version__

    model.producer_name, model.producer_version = PRODUCER_NAME, __version__
    return model


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """Every name read by the nodes of ``node``'s subgraphs (outer-scope reads among them)."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            for inner in all_graphs(sub):
                for n in inner.node:
                    names.update(n.input)
    return names


def _prune(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads."""
    outputs = {v.name for v in graph.output}
    while True:
        read = set(outputs)
        for node in graph.node:
            read.update(node.input)
            read |= outer_reads(node)
        dead = [n for n in graph.node if not any(o in read for o in n.output if o)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read |= {v.name for v in graph.input}  # IR < 4: an initializer may be listed as an input
    kept = [init for init in graph.initializer if init.name in read]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` ordered so that every tensor is produced before it is read.

    A control-flow node depends on the outer-scope tensors its bodies read, not only on its
    inputs. Stable: among the nodes that are ready, the one that came first goes first, so
    a graph already in order keeps it. Nodes on a cycle (never in valid ONNX) go last.
    """
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    readers: list[list[int]] = [[] for _ in nodes]
    waiting = []
    for i, node in enumerate(nodes):
        needs = {producer[n] for n in (*node.input, *outer_reads(node)) if n in producer} - {i}
        for j in needs:
            readers[j].append(i)
        waiting.append(len(needs))
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(i)
        for j in readers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    placed = set(ordered)
    ordered += [i for i in range(len(nodes)) if i not in placed]
    return [nodes[i] for i in ordered]
