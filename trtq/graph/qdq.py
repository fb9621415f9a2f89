"""Q/DQ placement and insertion for TensorRT explicit quantization.

TensorRT builds INT8 (or FP8) kernels where the graph says so: a
DequantizeLinear feeding a Conv/Gemm/MatMul tells it the input may be read in
reduced precision, and it fuses the Q/DQ pairs into the kernels around them.
So the rules here are TensorRT's fusion rules (ARCHITECTURE.md §Fusion rules):

* quantize the *inputs* of compute ops, never their outputs: activations
  per-tensor, constant weights per output channel; bias stays float;
* a residual ``Add`` whose main branch ends in a quantized Conv gets Q/DQ on its
  *other* (shortcut) input, which lets TensorRT fuse the add into the convolution;
  the main branch is the longer path from the two inputs' common ancestor;
* pooling between quantized neighbours gets Q/DQ on its input so the tensor
  stays INT8 through it;
* quantized tensors joined by range-preserving ops (MaxPool, Reshape, Transpose,
  Flatten, Squeeze/Unsqueeze, Slice, Pad, and Concat of quantized inputs) form a
  *range group* and share one scale: no requantization across them; except a Concat of
  unlike quantities (observed ranges more than :data:`MIXED_SCALE_RATIO` apart, such as a
  detector's box coordinates in pixels next to its class probabilities), whose inputs
  keep their own scales (:func:`mixed_scale_concats`);
* one Q/DQ pair per tensor, shared by every quantized consumer.

Placement happens in two steps. :func:`plan` decides from the graph alone which
nodes are candidates and which tensors need a range (:meth:`QuantPlan.activations`:
calibration observes exactly those); :meth:`QuantPlan.with_ranges` then leaves in
float every node whose input range turned out unusable (sentinel masks, NaN), and
:meth:`QuantPlan.shared_ranges` gives each range group its one range. Every node left
in float carries the reason. :func:`insert` then writes the pairs through
:mod:`trtq.graph.edit`; coverage (the share of multiply-accumulates that run quantized) is
read from the written graph by :mod:`trtq.graph.coverage`, not from the plan.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from functools import reduce

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtq.calib.histogram import Histogram
from trtq.calib.ranges import DEFAULT_METHOD, TensorRange, compute_range, weight_amax
from trtq.graph.edit import GraphEditor, numpy_dtype, representable_scale
from trtq.graph.fusions import Fusion, fusion_tensors
from trtq.graph.patterns import COMPUTE_OPS
from trtq.graph.shapes import RECURRENT_OPS

PRECISIONS = ("int8", "fp8")
#: Largest representable magnitude: amax maps onto it.
QMAX = {"int8": 127.0, "fp8": 448.0}
#: Below this many channels (outputs, or inputs of a non-grouped op) INT8 does not pay.
DEFAULT_MIN_CHANNELS = 16
#: Ops whose output holds their first input's values unchanged (Concat is handled apart).
RANGE_PRESERVING_OPS = frozenset(
    {"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Pad"}
)
#: Concat inputs whose ranges differ by more than this keep their own scales: a shared one
#: would leave the small input fewer than 127 / 16 = 8 levels (4 of INT8's 7 bits lost).
MIXED_SCALE_RATIO = 16.0


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


@dataclass
class QuantPlan:
    """Which nodes run quantized and which tensors get a Q/DQ pair."""

    decisions: list[NodeDecision]
    fusion_tensors: dict[str, Fusion] = field(default_factory=dict)
    #: Quantized tensors joined by range-preserving ops (MaxPool, Reshape, Concat...): each
    #: group gets one range, so TensorRT needs no requantization between its members.
    range_groups: list[tuple[str, ...]] = field(default_factory=list)
    #: Concat nodes whose quantized inputs keep their own scales, and why (mixed scales).
    separate_scales: dict[str, str] = field(default_factory=dict)

    def activations(self) -> list[str]:
        """Every tensor that gets a Q/DQ pair, in graph order, once: what calibration observes."""
        names = [d.activation for d in self.decisions if d.quantized and d.activation]
        return list(dict.fromkeys([*names, *self.fusion_tensors]))

    def shared_ranges(
        self,
        ranges: Mapping[str, TensorRange],
        histograms: Mapping[str, Histogram] | None = None,
        method: str = DEFAULT_METHOD,
        percentile: float = 99.99,
    ) -> dict[str, TensorRange]:
        """``ranges`` with every member of a range group given the group's one range.

        With the members' histograms the group's range is chosen by ``method`` from their
        merged histogram (the values of all members, so entropy, percentile and mse keep
        their meaning); without them (ranges from a TensorRT cache) it is the largest
        member range, so no member is clipped more than it was.
        """
        shared = dict(ranges)
        for group in self.range_groups:
            if histograms is not None and all(name in histograms for name in group):
                merged = reduce(Histogram.merge, (histograms[name] for name in group))
                found = compute_range(group[0], merged, method, percentile=percentile)
            else:
                found = max((ranges[name] for name in group), key=lambda r: r.amax)
            for name in group:
                shared[name] = replace(found, name=name)
        return shared

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
        return _refitted(decisions, ranges, graph)

    def with_float(
        self,
        nodes: Collection[str],
        reason: str,
        ranges: Mapping[str, TensorRange],
        graph: gs.Graph,
    ) -> QuantPlan:
        """The plan with ``nodes`` left in float for ``reason``; fusions re-derived.

        The fallback to a fidelity target (:mod:`trtq.tune`) moves nodes out of INT8 this
        way: a residual skip or pooling input that was quantized for their sake loses its
        Q/DQ pair with them, and range groups shrink to the tensors still quantized.
        """
        decisions = [
            replace(d, quantized=False, reason=reason) if d.quantized and d.name in nodes else d
            for d in self.decisions
        ]
        return _refitted(decisions, ranges, graph)


def _refitted(
    decisions: list[NodeDecision], ranges: Mapping[str, TensorRange], graph: gs.Graph
) -> QuantPlan:
    """A plan of ``decisions`` with the fusions and range groups its quantized nodes call for."""
    quantized = {d.name for d in decisions if d.quantized}
    fusion = {
        t: use
        for t, use in fusion_tensors(graph, quantized).items()
        if t in ranges and ranges[t].quantizable
    }
    return _with_groups(QuantPlan(decisions, fusion), graph, ranges)


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
    return _with_groups(QuantPlan(decisions, fusion_tensors(graph, quantized)), graph)


def _with_groups(
    plan: QuantPlan, graph: gs.Graph, ranges: Mapping[str, TensorRange] | None = None
) -> QuantPlan:
    """``plan`` with its range groups; with ``ranges`` (after calibration), Concats of unlike
    quantities are kept out of them."""
    quantized = plan.activations()
    apart = mixed_scale_concats(graph, quantized, ranges) if ranges is not None else {}
    groups = range_groups(graph, quantized, apart)
    return replace(plan, range_groups=groups, separate_scales=apart)


def mixed_scale_concats(
    graph: gs.Graph, quantized: list[str], ranges: Mapping[str, TensorRange]
) -> dict[str, str]:
    """Concats whose quantized inputs hold unlike quantities: {node name: reason}.

    A detector head concatenates box coordinates in pixels (0..640) with class
    probabilities (0..1); one scale for both would be 640/127 = 5 per step, and every
    probability would quantize to 0. When the observed ranges of a Concat's inputs differ
    by more than :data:`MIXED_SCALE_RATIO`, its inputs keep their own Q/DQ scales instead
    of joining a range group: TensorRT then requantizes at the Concat (a small cost), and
    neither input loses resolution.
    """
    members = set(quantized)
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "Concat":
            continue
        data = [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name]
        if len(data) < 2 or not all(t.name in members and t.name in ranges for t in data):
            continue
        small = min(data, key=lambda t: ranges[t.name].amax)
        large = max(data, key=lambda t: ranges[t.name].amax)
        ratio = ranges[large.name].amax / ranges[small.name].amax
        if ratio > MIXED_SCALE_RATIO:
            found[node.name] = (
                f"inputs of unlike scale: {small.name} (amax {ranges[small.name].amax:.4g}) and "
                f"{large.name} (amax {ranges[large.name].amax:.4g}) differ {ratio:.0f}x, more "
                f"than {MIXED_SCALE_RATIO:g}x; one shared scale would leave {small.name} "
                f"{127 / ratio:.1f} of 127 levels, so each input keeps its own scale "
                "(TensorRT requantizes at the Concat)"
            )
    return found


def range_groups(
    graph: gs.Graph, quantized: list[str], apart: Collection[str] = ()
) -> list[tuple[str, ...]]:
    """Quantized tensors that must share one range: joined through range-preserving ops.

    MaxPool, Reshape, Transpose, Flatten, Squeeze/Unsqueeze, Slice and Pad pass values
    through unchanged (a subset, rearranged, or padded), and TensorRT runs them in INT8
    between Q/DQ pairs only when the scales on both sides agree; different scales force a
    requantization. A Concat joins its inputs and output only when every input is
    quantized: TensorRT eliminates the concatenation when all inputs share one scale; the
    Concats named in ``apart`` (:func:`mixed_scale_concats`) join nothing.
    Groups (two tensors or more) keep the order of ``quantized``.
    """
    members = set(quantized)
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    def join(a: str, b: str) -> None:
        a, b = root(a), root(b)
        if a != b:
            parent[a] = b

    for node in graph.nodes:
        data = [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name]
        if not data or not node.outputs:
            continue
        if node.op in RANGE_PRESERVING_OPS and node.inputs[0] is data[0]:
            join(data[0].name, node.outputs[0].name)
        elif (
            node.op == "Concat" and node.name not in apart and all(t.name in members for t in data)
        ):
            for tensor in data:
                join(tensor.name, node.outputs[0].name)
    groups: dict[str, list[str]] = {}
    for name in quantized:
        groups.setdefault(root(name), []).append(name)
    return [tuple(group) for group in groups.values() if len(group) > 1]


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


def insert(
    model: onnx.ModelProto,
    plan: QuantPlan,
    ranges: Mapping[str, TensorRange],
    precision: str = "int8",
    *,
    scale_dtype: np.dtype | type | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with the planned Q/DQ pairs and weight DequantizeLinear nodes.

    Every name is allocated by :class:`~trtq.graph.edit.GraphEditor`. ``scale_dtype`` is
    the type the scales will finally be stored in when it is narrower than the tensors'
    (FP16 when :func:`trtq.graph.fp16.convert` runs next): every scale is then chosen
    among that type's normal numbers, and weights are quantized with the scale as stored,
    so converting the scales later changes no value.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    editor = GraphEditor(result)
    dequantized = {
        name: _quantize_activation(editor, name, ranges[name], precision, scale_dtype)
        for name in plan.activations()
    }
    weights: dict[tuple[str, int | None], str] = {}
    nodes = {n.name: n for n in result.graph.node}
    for d in plan.decisions:
        if not d.quantized:
            continue
        node = nodes[d.name]
        editor.replace_input(node, d.activation, dequantized[d.activation])
        key = (d.weight, d.weight_axis)
        if key not in weights:
            weights[key] = _quantize_weight(editor, d.weight, d.weight_axis, precision, scale_dtype)
        editor.replace_input(node, d.weight, weights[key])
    for name, use in plan.fusion_tensors.items():
        for consumer in use.consumers:
            editor.replace_input(nodes[consumer], name, dequantized[name])
    return editor.finish()


def _scale(
    raw: np.ndarray | float, dtype: np.dtype, narrowest: np.dtype | type | None
) -> np.ndarray:
    """``raw`` as a scale stored in ``dtype`` and exactly representable in ``narrowest`` too."""
    if narrowest is not None:
        raw = representable_scale(raw, narrowest)
    return representable_scale(raw, dtype)


def _zero_point(precision: str, shape: tuple[int, ...] = ()) -> np.ndarray:
    dtype = np.int8 if precision == "int8" else ml_dtypes.float8_e4m3fn
    return np.zeros(shape, dtype=dtype)


def _quantize_activation(
    editor: GraphEditor,
    tensor: str,
    found: TensorRange,
    precision: str,
    scale_dtype: np.dtype | type | None,
) -> str:
    """Add Q -> DQ after ``tensor``; return the DQ output for quantized consumers to read."""
    dtype = numpy_dtype(editor.elem_type(tensor) or onnx.TensorProto.FLOAT)
    scale = _scale(found.amax / QMAX[precision], dtype, scale_dtype)
    return editor.quantize_dequantize(tensor, scale, _zero_point(precision))


def _quantize_weight(
    editor: GraphEditor,
    weight: str,
    axis: int | None,
    precision: str,
    scale_dtype: np.dtype | type | None,
) -> str:
    """Store the weight in int8/fp8 with per-channel scales, behind a DequantizeLinear."""
    original = editor.initializer(weight)
    if original is None:
        raise ValueError(f"weight {weight} is not an initializer (normalize the model first)")
    values = original.astype(np.float32)
    qmax = QMAX[precision]
    scale = _scale(weight_amax(values, axis) / qmax, original.dtype, scale_dtype)
    broadcast = (
        scale
        if axis is None
        else np.expand_dims(scale, [d for d in range(values.ndim) if d != axis])
    )
    # Quantized with the scale as stored: a scale raised to a normal number re-quantizes.
    scaled = np.clip(values / broadcast.astype(np.float32), -qmax, qmax)
    if precision == "int8":
        stored = np.rint(scaled).astype(np.int8)
    else:
        stored = scaled.astype(ml_dtypes.float8_e4m3fn)
    suffix = "" if axis is None else f"_axis{axis}"
    return editor.dequantize_constant(
        f"{weight}{suffix}", stored, scale, _zero_point(precision, scale.shape), axis
    )
