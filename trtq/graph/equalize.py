"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction") for chains of convolutions.

Why: TensorRT reads activations per tensor and weights per output channel. A depthwise
convolution's per-channel weight ranges can differ by 100x or more, and so do its output
channels: one per-tensor scale on its output then wastes most of the INT8 levels on the
small channels. For ``y = W2 f(W1 x + b1)`` with ``f`` positively homogeneous
(``f(x / s) = f(x) / s`` for ``s > 0``, per channel), dividing output channel ``i`` of the
first convolution (weights and bias) by ``s_i`` and multiplying input channel ``i`` of the
second by ``s_i`` leaves the function unchanged. With ``s_i = sqrt(r1_i / r2_i)`` (``r`` the
channel's max |weight|) both channels end with range ``sqrt(r1_i * r2_i)``: the first
layer's channels, and so the tensor between them, become alike.

What may sit between the two convolutions (each the only reader of its input, none a graph
output): Relu, LeakyRelu, PRelu, Clip with min 0 and no max, MaxPool, AveragePool,
GlobalAveragePool, and an Add of a per-channel constant (a bias written as its own node,
scaled with the first layer's). **Clip(0, 6) (ReLU6) is skipped**: ``min(x / s, 6)`` is
``min(x, 6) / s`` only where the clip is not reached, which no weight-only rule can know,
and changing the clip bound per channel would turn ReLU6 into an op TensorRT does not fuse;
the pair is reported with that reason rather than changing the FP32 function. HardSwish,
Sigmoid and the like are not homogeneous: such pairs are never considered.

Chains longer than two (conv -> conv -> conv) are equalised pair by pair, repeated until
the scales settle (a layer in the middle is rescaled on both sides). Only weight values
change; every node and tensor keeps its name. A weight or bias that another node also
reads is copied first, under a fresh name from :class:`~trtq.graph.edit.NameAllocator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from trtq.graph.edit import NameAllocator

#: Ops with f(x / s) = f(x) / s per channel for s > 0 (Clip only as a plain ReLU, below).
HOMOGENEOUS_OPS = frozenset(
    {"Relu", "LeakyRelu", "PRelu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Add"}
)
#: Scales are kept within [1 / LIMIT, LIMIT]: a near-dead channel must not blow up its partner.
SCALE_LIMIT = 1e4
MAX_SWEEPS = 20
#: A sweep whose scales all lie within this of 1 ends the iteration.
TOLERANCE = 1e-3


@dataclass
class EqualizedPair:
    """Two convolutions equalised through the ops between them, and what it did."""

    first: str
    second: str
    between: tuple[str, ...]
    scale_min: float = 1.0  # the cumulative factor dividing the first layer's channels
    scale_max: float = 1.0
    ratio_before: float = 0.0  # max/min per-channel weight range of the first layer
    ratio_after: float = 0.0

    def to_json(self) -> dict:
        return {
            "first": self.first,
            "second": self.second,
            "between": list(self.between),
            "scale_min": self.scale_min,
            "scale_max": self.scale_max,
            "range_ratio_before": self.ratio_before,
            "range_ratio_after": self.ratio_after,
        }


@dataclass
class Equalization:
    """What :func:`equalize` did: the pairs rescaled, the pairs left alone and why."""

    pairs: list[EqualizedPair] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    sweeps: int = 0

    def to_json(self) -> dict:
        return {
            "pairs": [p.to_json() for p in self.pairs],
            "skipped": list(self.skipped),
            "sweeps": self.sweeps,
        }


@dataclass
class _Pair:
    first: onnx.NodeProto
    second: onnx.NodeProto
    between: list[onnx.NodeProto]
    total: np.ndarray  # cumulative scale per channel


def equalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Equalization]:
    """A copy of ``model`` with every equalisable Conv -> Conv pair equalised (see the module).

    ``model`` should be normalised (BatchNorm folded, weights as initializers).
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    weights = _Weights(result)
    record = Equalization()
    pairs = _find_pairs(result, weights, record)
    for pair in pairs:
        weights.own(pair.first, 1)
        weights.own(pair.first, 2)
        weights.own(pair.second, 1)
        for node in pair.between:
            if node.op_type == "Add":
                weights.own(node, _constant_input(node, weights))
    before = {id(p): _range_ratio(_output_ranges(weights.get(p.first.input[1]))) for p in pairs}
    for sweep in range(1, MAX_SWEEPS + 1):
        record.sweeps = sweep
        moved = 0.0
        for pair in pairs:
            moved = max(moved, _equalize_pair(pair, weights))
        if moved <= TOLERANCE:
            break
    for pair in pairs:
        ranges = _output_ranges(weights.get(pair.first.input[1]))
        record.pairs.append(
            EqualizedPair(
                pair.first.name,
                pair.second.name,
                tuple(n.name for n in pair.between),
                float(pair.total.min()),
                float(pair.total.max()),
                before[id(pair)],
                _range_ratio(ranges),
            )
        )
    return result, record


# --- finding pairs ------------------------------------------------------------------------------


def _find_pairs(model: onnx.ModelProto, weights: _Weights, record: Equalization) -> list[_Pair]:
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}
    pairs = []
    for first in graph.node:
        if not _equalisable_conv(first, weights):
            continue
        weight = weights.get(first.input[1])
        channels, rank = weight.shape[0], weight.ndim
        between: list[onnx.NodeProto] = []
        tensor = first.output[0]
        while tensor not in outputs and len(readers.get(tensor, [])) == 1:
            user = readers[tensor][0]
            if user.op_type == "Conv":
                if (
                    user.input[0] == tensor
                    and _equalisable_conv(user, weights)
                    and _input_channels(user, weights) == channels
                ):
                    pairs.append(_Pair(first, user, between, np.ones(channels)))
                break
            reason = _why_not_homogeneous(user, weights, channels, rank)
            if reason is not None:
                # Said only where equalising would otherwise have reached another Conv.
                after = readers.get(user.output[0], [])
                if len(after) == 1 and after[0].op_type == "Conv":
                    record.skipped.append(
                        {"first": first.name, "second": after[0].name, "reason": reason}
                    )
                break
            between.append(user)
            tensor = user.output[0]
    return pairs


def _equalisable_conv(node: onnx.NodeProto, weights: _Weights) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    weight = weights.get(node.input[1])
    if weight is None or weight.ndim < 3:
        return False
    return len(node.input) < 3 or not node.input[2] or weights.get(node.input[2]) is not None


def _input_channels(conv: onnx.NodeProto, weights: _Weights) -> int:
    return weights.get(conv.input[1]).shape[1] * _group(conv)


def _group(conv: onnx.NodeProto) -> int:
    return next((a.i for a in conv.attribute if a.name == "group"), 1)


def _why_not_homogeneous(
    node: onnx.NodeProto, weights: _Weights, channels: int, rank: int
) -> str | None:
    """None when ``node`` commutes with a positive per-channel scale, else why not."""
    if node.op_type not in HOMOGENEOUS_OPS:
        return f"{node.op_type} {node.name} is not positively homogeneous"
    if node.op_type == "Clip":
        low = weights.scalar(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        high = weights.scalar(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if low != 0.0 or (high is not None and np.isfinite(high)):
            return (
                f"Clip {node.name} ({low}, {high}) is not a plain ReLU: scaling would move its "
                "bound (ReLU6 pairs are skipped to keep the FP32 function exact)"
            )
    if node.op_type == "PRelu":
        slope = weights.get(node.input[1])
        if slope is None or slope.size not in (1, channels):
            return f"PRelu {node.name} has no constant per-channel slope"
    if node.op_type == "Add":
        index = _constant_input(node, weights)
        if index is None or _per_channel(weights.get(node.input[index]), channels, rank) is None:
            return f"Add {node.name} does not add a per-channel constant"
    return None


def _constant_input(node: onnx.NodeProto, weights: _Weights) -> int | None:
    found = [i for i, name in enumerate(node.input[:2]) if weights.get(name) is not None]
    return found[0] if len(found) == 1 else None


def _per_channel(value: np.ndarray | None, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a [channels] vector if it broadcasts along the channel axis (axis 1) of a
    rank-``rank`` activation, else None (a scalar too: it is shared by every channel)."""
    if value is None or value.ndim < rank - 1 or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return value.reshape(-1)


# --- rescaling ---------------------------------------------------------------------------------


def _equalize_pair(pair: _Pair, weights: _Weights) -> float:
    """One equalisation step; returns how far this step's scales were from 1 (max |log s|)."""
    w1 = weights.get(pair.first.input[1])
    w2 = weights.get(pair.second.input[1])
    r1 = _output_ranges(w1)
    r2 = _input_ranges(w2, _group(pair.second))
    scale = np.ones_like(r1)
    alive = (r1 > 0) & (r2 > 0)
    scale[alive] = np.sqrt(r1[alive] / r2[alive])
    scale = np.clip(scale, 1.0 / SCALE_LIMIT, SCALE_LIMIT)
    scale = np.clip(scale * pair.total, 1.0 / SCALE_LIMIT, SCALE_LIMIT) / pair.total
    if np.allclose(scale, 1.0):
        return 0.0
    pair.total *= scale
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    weights.set(pair.first.input[1], w1 / scale.reshape(shape1))
    if len(pair.first.input) > 2 and pair.first.input[2]:
        weights.set(pair.first.input[2], weights.get(pair.first.input[2]) / scale)
    for node in pair.between:
        if node.op_type == "Add":
            name = node.input[_constant_input(node, weights)]
            value = weights.get(name)
            weights.set(name, value / scale.reshape(_channel_shape(value, w1.ndim)))
    weights.set(pair.second.input[1], _scale_inputs(w2, _group(pair.second), scale))
    return float(np.max(np.abs(np.log(scale))))


def _channel_shape(value: np.ndarray, rank: int) -> tuple[int, ...]:
    """How a [C] scale broadcasts onto a per-channel constant added to a rank-``rank`` tensor
    (its channel axis is 1 once the constant is aligned to the right, as ONNX broadcasts)."""
    shape = [1] * value.ndim
    shape[1 - (rank - value.ndim)] = -1
    return tuple(shape)


def _output_ranges(weight: np.ndarray) -> np.ndarray:
    return np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1).astype(np.float64)


def _input_ranges(weight: np.ndarray, group: int) -> np.ndarray:
    """Max |w| per input channel of a (grouped) Conv weight [C_out, C_in / group, k...]."""
    c_out, per_group = weight.shape[0], weight.shape[1]
    outs = c_out // group
    grouped = np.abs(weight).reshape(group, outs, per_group, -1)
    return grouped.max(axis=(1, 3)).reshape(-1).astype(np.float64)


def _scale_inputs(weight: np.ndarray, group: int, scale: np.ndarray) -> np.ndarray:
    c_out, per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(group, c_out // group, per_group, -1)
    factor = scale.reshape(group, 1, per_group, 1)
    return (grouped * factor).reshape(weight.shape).astype(weight.dtype)


def _range_ratio(ranges: np.ndarray) -> float:
    alive = ranges[ranges > 0]
    return float(alive.max() / alive.min()) if alive.size else 1.0


class _Weights:
    """The model's initializers as arrays, written back on :meth:`set`."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._graph = model.graph
        self._protos = {init.name: init for init in model.graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self._names = NameAllocator.for_model(model)
        self._readers: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self._readers[name] = self._readers.get(name, 0) + 1

    def get(self, name: str) -> np.ndarray | None:
        if name not in self._protos:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self._protos[name])
        return self._arrays[name]

    def scalar(self, name: str) -> float | None:
        value = self.get(name)
        return None if value is None or value.size != 1 else float(value.reshape(-1)[0])

    def set(self, name: str, value: np.ndarray) -> None:
        original = self._protos[name]
        value = np.asarray(value).astype(numpy_helper.to_array(original).dtype)
        self._arrays[name] = value
        original.CopyFrom(numpy_helper.from_array(value, name))

    def own(self, node: onnx.NodeProto, index: int | None) -> None:
        """Give ``node`` its own copy of its constant input ``index`` if others read it too."""
        if index is None or len(node.input) <= index or not node.input[index]:
            return
        name = node.input[index]
        if name not in self._protos or self._readers.get(name, 0) <= 1:
            return
        fresh = self._names.fresh(f"{name}_equalized")
        copy = numpy_helper.from_array(self.get(name).copy(), fresh)
        self._graph.initializer.append(copy)
        self._protos[fresh] = self._graph.initializer[-1]  # append copies: keep the graph's own
        self._readers[name] -= 1
        self._readers[fresh] = 1
        node.input[index] = fresh
