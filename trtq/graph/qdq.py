"""Q/DQ placement and insertion for TensorRT explicit quantization.

TensorRT builds INT8 (or FP8) kernels where the graph says so: a
DequantizeLinear feeding a Conv/Gemm/MatMul tells it the input may be read in
reduced precision, and it fuses the Q/DQ pairs into the kernels around them.
So the rules here are TensorRT's fusion rules (DESIGN.md §5):

* quantize the *inputs* of compute ops, never their outputs: activations
  per-tensor, constant weights per output channel; bias stays float;
* a residual ``Add`` right after a quantized Conv gets Q/DQ on its *other*
  (skip) input, which lets TensorRT fuse the add into the convolution;
* pooling between quantized neighbours gets Q/DQ on its input so the tensor
  stays INT8 through it;
* one Q/DQ pair per tensor, shared by every quantized consumer.

Placement happens in two steps. :func:`plan` decides from the graph alone which
nodes are candidates and which tensors need a range (calibration observes
exactly those); :meth:`QuantPlan.with_ranges` then leaves in float every node
whose input range turned out unusable (sentinel masks, NaN). Every node left in
float carries the reason, and :meth:`QuantPlan.coverage` reports the share of
multiply-accumulates that run quantized.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from trtq.calib.ranges import TensorRange, weight_amax
from trtq.graph.patterns import COMPUTE_OPS
from trtq.graph.shapes import RECURRENT_OPS

PRECISIONS = ("int8", "fp8")
#: Largest representable magnitude: amax maps onto it.
QMAX = {"int8": 127.0, "fp8": 448.0}
#: Below this many channels (outputs, or inputs of a non-grouped op) INT8 does not pay.
DEFAULT_MIN_CHANNELS = 16
POOLING_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool"})
#: Ops a quantized tensor may pass through unchanged in meaning on its way to a pooling layer.
_PASS_THROUGH = frozenset(
    {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Reshape", "Flatten"}
)
_FORWARD = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})


@dataclass(frozen=True)
class PlacementOptions:
    """What to quantize. Defaults follow TensorRT's recommendations."""

    precision: str = "int8"
    include_ops: frozenset[str] = COMPUTE_OPS
    exclude_ops: frozenset[str] = frozenset()
    exclude_nodes: str | None = None  # regular expression on node names
    min_channels: int = DEFAULT_MIN_CHANNELS


@dataclass(frozen=True)
class NodeDecision:
    """One compute node: quantized or not, and why not."""

    name: str
    op: str
    macs: int
    quantized: bool
    reason: str | None = None
    activation: str | None = None  # the input that gets an activation Q/DQ
    weight: str | None = None  # the constant input quantized per channel
    weight_axis: int | None = None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "macs": self.macs,
            "quantized": self.quantized,
            "reason": self.reason,
            "activation": self.activation,
            "weight": self.weight,
            "weight_axis": self.weight_axis,
        }


@dataclass(frozen=True)
class Fusion:
    """A tensor quantized for fusion rather than as a compute input: why, and for whom."""

    reason: str
    consumers: tuple[str, ...]  # the nodes that read its DequantizeLinear output


@dataclass
class QuantPlan:
    """Which nodes run quantized and which tensors get a Q/DQ pair."""

    decisions: list[NodeDecision]
    fusion_tensors: dict[str, Fusion] = field(default_factory=dict)

    def activations(self) -> list[str]:
        """Every tensor that needs a calibrated range, in graph order, once."""
        names = [d.activation for d in self.decisions if d.quantized and d.activation]
        return list(dict.fromkeys([*names, *self.fusion_tensors]))

    def coverage(self) -> dict:
        total = sum(d.macs for d in self.decisions)
        quantized = sum(d.macs for d in self.decisions if d.quantized)
        return {
            "quantized_macs": quantized,
            "total_macs": total,
            "fraction": quantized / total if total else 0.0,
            "quantized_nodes": sum(d.quantized for d in self.decisions),
            "total_nodes": len(self.decisions),
        }

    def with_ranges(self, ranges: Mapping[str, TensorRange], graph: gs.Graph) -> QuantPlan:
        """Leave in float every node whose range is unusable, then re-derive the fusions.

        A residual skip or pooling input is only worth quantizing next to quantized
        compute, so fusions are recomputed from the nodes that are still quantized.
        """

        def usable(tensor: str) -> TensorRange | None:
            found = ranges.get(tensor)
            return None if found is not None and found.quantizable else found

        decisions = []
        for d in self.decisions:
            problem = usable(d.activation) if d.quantized and d.activation else None
            if d.quantized and d.activation and d.activation not in ranges:
                decisions.append(replace(d, quantized=False, reason="no calibrated range"))
            elif problem is not None:
                reason = f"input {d.activation}: {problem.reason}"
                decisions.append(replace(d, quantized=False, reason=reason))
            else:
                decisions.append(d)
        quantized = {d.name for d in decisions if d.quantized}
        fusion = {
            t: use
            for t, use in fusion_tensors(graph, quantized).items()
            if t in ranges and ranges[t].quantizable
        }
        return QuantPlan(decisions, fusion)


def plan(graph: gs.Graph, macs: Mapping[str, int], options: PlacementOptions) -> QuantPlan:
    """Decide placement from the graph alone (before calibration).

    ``macs`` maps node names to their multiply-accumulates (for coverage).
    """
    excluded = re.compile(options.exclude_nodes) if options.exclude_nodes else None
    decisions = []
    for node in graph.nodes:
        if node.op in COMPUTE_OPS or node.op in RECURRENT_OPS:
            decisions.append(_decide(node, macs.get(node.name, 0), options, excluded))
    decisions += _control_flow_nodes(graph, macs)
    quantized = {d.name for d in decisions if d.quantized}
    return QuantPlan(decisions, fusion_tensors(graph, quantized))


def fusion_tensors(graph: gs.Graph, quantized: set[str]) -> dict[str, Fusion]:
    """Residual skips and pooling inputs that keep TensorRT's INT8 fusions intact."""
    found = _residual_skips(graph, quantized)
    for name, use in _pooling_inputs(graph, quantized).items():
        if name in found:
            use = Fusion(found[name].reason, found[name].consumers + use.consumers)
        found[name] = use
    return found


def _decide(
    node: gs.Node, node_macs: int, options: PlacementOptions, excluded: re.Pattern | None
) -> NodeDecision:
    def floating(reason: str) -> NodeDecision:
        return NodeDecision(node.name, node.op, node_macs, False, reason)

    if node.op in RECURRENT_OPS:
        return floating("recurrent op: no Q/DQ fusion in TensorRT; runs in float")
    if node.op not in options.include_ops:
        return floating(f"{node.op} not in --include-ops")
    if node.op in options.exclude_ops:
        return floating(f"{node.op} in --exclude-ops")
    if excluded is not None and excluded.search(node.name):
        return floating("matches --exclude-nodes")
    activation, weight = _operands(node)
    if activation is None:
        return floating("no activation input (constant-only op)")
    if weight is None:
        if node.op == "MatMul":
            return floating("activation x activation MatMul (attention): kept in high precision")
        return floating("weight is not a constant: dynamic weights are not quantized")
    if activation.dtype is not None and not np.issubdtype(np.dtype(activation.dtype), np.floating):
        return floating(f"input {activation.name} is not float")
    tiny = _tiny(node, weight.values.shape, options.min_channels)
    if tiny:
        precision = options.precision.upper()
        return floating(
            f"tiny {tiny}: {precision} does not pay below {options.min_channels} channels"
        )
    return NodeDecision(
        node.name,
        node.op,
        node_macs,
        True,
        activation=activation.name,
        weight=weight.name,
        weight_axis=weight_axis(node, weight.values.ndim),
    )


def _operands(node: gs.Node) -> tuple[gs.Variable | None, gs.Constant | None]:
    """(activation input, constant weight) of a compute node; bias is not an operand."""
    first, second = node.inputs[0], node.inputs[1]
    if isinstance(first, gs.Constant) and not isinstance(second, gs.Constant):
        # MatMul(W, x): only possible for MatMul; the weight is then per-tensor.
        return (second, first) if node.op == "MatMul" else (None, None)
    if isinstance(first, gs.Constant):
        return None, None
    return first, second if isinstance(second, gs.Constant) else None


def weight_axis(node: gs.Node, rank: int) -> int | None:
    """The output-channel axis of a weight, or None for a per-tensor scale."""
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if isinstance(node.inputs[0], gs.Constant) or rank < 2:  # MatMul(W, x), or a [K] vector
        return None
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return rank - 1  # MatMul(x, W): W is [..., K, N]


def _tiny(node: gs.Node, weight_shape: tuple[int, ...], min_channels: int) -> str | None:
    """Why a compute op is too small for INT8, or None."""
    if node.op in ("Conv", "ConvTranspose"):
        group = int(node.attrs.get("group", 1))
        if node.op == "Conv":
            c_out, c_in = weight_shape[0], weight_shape[1] * group
        else:
            c_in, c_out = weight_shape[0], weight_shape[1] * group
        reduction = weight_shape[1] * int(np.prod(weight_shape[2:]))
        if c_out < min_channels:
            return _count(c_out, "output channel")
        if group == 1 and c_in < min_channels and reduction < min_channels:
            return _count(c_in, "input channel")
        return None
    if len(weight_shape) < 2:
        return None
    axis = weight_axis(node, len(weight_shape))
    outputs = weight_shape[axis] if axis is not None else weight_shape[-2]
    return _count(outputs, "output") if outputs < min_channels else None


def _count(n: int, noun: str) -> str:
    return f"({n} {noun}{'' if n == 1 else 's'})"


def _control_flow_nodes(graph: gs.Graph, macs: Mapping[str, int]) -> list[NodeDecision]:
    """Compute nodes inside If/Loop/Scan bodies: reported, never quantized."""
    found = []
    for node in graph.nodes:
        for attr in node.attrs.values():
            for sub in attr if isinstance(attr, list) else [attr]:
                if not isinstance(sub, gs.Graph):
                    continue
                for inner in sub.nodes:
                    if inner.op in COMPUTE_OPS or inner.op in RECURRENT_OPS:
                        reason = f"inside the body of {node.op} {node.name}: left in float"
                        found.append(
                            NodeDecision(
                                inner.name, inner.op, macs.get(inner.name, 0), False, reason
                            )
                        )
                found += _control_flow_nodes(sub, macs)
    return found


def _residual_skips(graph: gs.Graph, quantized: set[str]) -> dict[str, Fusion]:
    """Skip inputs of Adds that follow a quantized Conv: Q/DQ there lets TensorRT fuse the add."""
    skips: dict[str, Fusion] = {}
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2:
            continue
        a, b = add.inputs
        if isinstance(a, gs.Constant) or isinstance(b, gs.Constant) or a is b:
            continue
        for fused, skip in ((a, b), (b, a)):
            producer = fused.inputs[0] if fused.inputs else None
            if (
                producer is not None
                and producer.op == "Conv"
                and producer.name in quantized
                and len(fused.outputs) == 1
                and fused not in graph.outputs
            ):
                reason = f"residual skip of {add.name}: lets TensorRT fuse it into {producer.name}"
                earlier = skips[skip.name].consumers if skip.name in skips else ()
                skips[skip.name] = Fusion(reason, (*earlier, add.name))
                break
    return skips


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


def insert(
    graph: gs.Graph, plan: QuantPlan, ranges: Mapping[str, TensorRange], precision: str = "int8"
) -> gs.Graph:
    """Insert the planned Q/DQ pairs and weight DequantizeLinear nodes into ``graph``."""
    tensors = graph.tensors()
    dequantized = {
        name: _quantize_activation(graph, tensors[name], ranges[name], precision)
        for name in plan.activations()
    }
    weights: dict[tuple[str, int | None], gs.Variable] = {}
    nodes = {n.name: n for n in graph.nodes}
    for d in plan.decisions:
        if not d.quantized:
            continue
        node = nodes[d.name]
        _rewire(node, tensors[d.activation], dequantized[d.activation])
        key = (d.weight, d.weight_axis)
        if key not in weights:
            weights[key] = _quantize_weight(graph, tensors[d.weight], d.weight_axis, precision)
        _rewire(node, tensors[d.weight], weights[key])
    for name, use in plan.fusion_tensors.items():
        for consumer in use.consumers:
            _rewire(nodes[consumer], tensors[name], dequantized[name])
    return graph.cleanup().toposort()


def _rewire(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new


def _zero_point(precision: str, shape: tuple[int, ...] = ()) -> np.ndarray:
    dtype = np.int8 if precision == "int8" else ml_dtypes.float8_e4m3fn
    return np.zeros(shape, dtype=dtype)


def _quantize_activation(
    graph: gs.Graph, tensor: gs.Variable, found: TensorRange, precision: str
) -> gs.Variable:
    """Add Q -> DQ after ``tensor``; return the DQ output for quantized consumers to read."""
    dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
    scale = gs.Constant(f"{tensor.name}_scale", np.array(found.amax / QMAX[precision], dtype))
    zero = gs.Constant(f"{tensor.name}_zero_point", _zero_point(precision))
    quantized = gs.Variable(f"{tensor.name}_quantized", dtype=zero.values.dtype, shape=tensor.shape)
    output = gs.Variable(f"{tensor.name}_dequantized", dtype=dtype, shape=tensor.shape)
    graph.nodes.append(
        gs.Node(
            "QuantizeLinear",
            f"{tensor.name}_QuantizeLinear",
            inputs=[tensor, scale, zero],
            outputs=[quantized],
        )
    )
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            f"{tensor.name}_DequantizeLinear",
            inputs=[quantized, scale, zero],
            outputs=[output],
        )
    )
    return output


def _quantize_weight(
    graph: gs.Graph, weight: gs.Constant, axis: int | None, precision: str
) -> gs.Variable:
    """Store the weight in int8/fp8 with per-channel scales, behind a DequantizeLinear."""
    dtype = weight.values.dtype
    values = weight.values.astype(np.float32)
    amax = weight_amax(values, axis)
    scale = np.asarray(amax / QMAX[precision], dtype=dtype)
    broadcast = (
        scale
        if axis is None
        else np.expand_dims(scale, [d for d in range(values.ndim) if d != axis])
    )
    scaled = np.clip(values / broadcast, -QMAX[precision], QMAX[precision])
    if precision == "int8":
        stored = np.rint(scaled).astype(np.int8)
    else:
        stored = scaled.astype(ml_dtypes.float8_e4m3fn)
    suffix = "" if axis is None else f"_axis{axis}"
    q = gs.Constant(f"{weight.name}{suffix}_{precision}", stored)
    scale_c = gs.Constant(f"{weight.name}{suffix}_scale", scale)
    zero = gs.Constant(f"{weight.name}{suffix}_zero_point", _zero_point(precision, scale.shape))
    output = gs.Variable(
        f"{weight.name}{suffix}_dequantized", dtype=dtype, shape=list(values.shape)
    )
    attrs = {} if axis is None else {"axis": axis}
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            f"{weight.name}{suffix}_DequantizeLinear",
            attrs=attrs,
            inputs=[q, scale_c, zero],
            outputs=[output],
        )
    )
    return output
