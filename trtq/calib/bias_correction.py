"""Bias correction: fold the mean shift that quantization adds to each layer's output into
its bias.

Rounding a layer's weights to INT8 changes more than their noise: the error of a channel's
weights, times the mean of its input, is a constant offset on that output channel (Nagel et
al. 2019, §4.2). Depthwise convolutions, with 9 or 25 weights per channel, suffer most: the
offset is not averaged away, and it travels through every layer after. Clipping an
activation to its range does the same. The offset is measured on calibration data and
subtracted from the bias, so the quantized layer is right on average.

**What is measured.** For each quantized Conv/ConvTranspose/Gemm/MatMul, the error *this
layer's* quantization adds: its output in the fake-quantized model minus the output of a
shadow copy of it with FP32 weights reading the same input before its Q/DQ pair. Both come
from one ONNX Runtime pass over the fake-quantized model (Q/DQ executed as written), the
shadow copies added as extra nodes; the mean difference is accumulated per output channel.

**Why local and one pass, not the model's total error.** The total error at a layer (fake-
quantized output minus the FP32 model's) also holds every upstream layer's offset as it
arrives; correcting each layer by its total error counts an upstream offset twice (once
upstream, once again below it), and correcting layer by layer, re-measuring after each,
costs one pass over the data per layer. NNCF's fast bias correction is local too, but feeds
each layer the per-channel *mean* of its FP32 input; feeding the real inputs, as here, also
measures what the mean hides: an activation's clipping and rounding, which are not linear.

**Kept only where it helps.** Local corrections do not see what the nonlinearities after a
layer make of the remaining noise, so on some models they move the output away from FP32.
The model's outputs against FP32 on the same samples are compared without and with the
corrections (two more passes); the corrections are kept only when the relative L2 error
drops, and the report says which it was.

**Where the correction goes.** A Conv/ConvTranspose bias (input 2) or Gemm ``C`` (a
per-output vector): corrected in place, or created when missing (a fresh name from
:class:`~trtq.graph.edit.GraphEditor`). A MatMul has no bias input: its correction goes
into the constant of the Add that follows it, when that is its only reader; otherwise it is
skipped with the reason. A bias another node also reads is copied first.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from trtq.calib.collect import Batch, batch_size
from trtq.graph.edit import GraphEditor
from trtq.graph.qdq import QuantPlan
from trtq.sessions import open_session

CORRECTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class BiasShift:
    """The correction folded into one node's bias."""

    node: str
    op: str
    bias: str  # the tensor corrected (a bias, Gemm C, or the constant of the Add after a MatMul)
    created: bool  # the node had no bias: one was added
    shift_norm: float  # L2 norm of the per-channel mean shift subtracted
    shift_max: float  # largest |shift| of one channel
    output_rms: float  # RMS of the node's FP32-weight output, to judge the shift against

    def to_json(self) -> dict:
        return {
            "node": self.node,
            "op": self.op,
            "bias": self.bias,
            "created": self.created,
            "shift_norm": self.shift_norm,
            "shift_max": self.shift_max,
            "output_rms": self.output_rms,
        }


@dataclass
class BiasCorrection:
    """What :func:`correct_biases` did: a shift per corrected node, and why others were not."""

    shifts: list[BiasShift] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    #: Relative L2 error of the model's outputs against FP32 on those samples, without and
    #: with the corrections; they are kept only when they lower it.
    rel_l2_before: float | None = None
    rel_l2_after: float | None = None
    kept: bool = False

    def to_json(self) -> dict:
        return {
            "kept": self.kept,
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
            "rel_l2_before": self.rel_l2_before,
            "rel_l2_after": self.rel_l2_after,
            "corrected": [s.to_json() for s in self.shifts],
            "skipped": list(self.skipped),
        }


@dataclass
class _Target:
    node: onnx.NodeProto
    output: str
    shadow: str
    axis: int  # the output's channel axis (negative: from the end)
    sums: np.ndarray | None = None
    squares: float = 0.0
    count: int = 0
    values: int = 0


def correct_biases(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    plan: QuantPlan,
    batches: Iterable[Batch],
    *,
    providers: Sequence[str] | None = None,
) -> tuple[onnx.ModelProto, BiasCorrection]:
    """``quantized`` (fake-quantized FP32 Q/DQ graph of ``reference``) with corrected biases.

    ``plan`` says which nodes run quantized; ``batches`` (a few dozen samples suffice) are
    calibration data. ``quantized`` is not modified.
    """
    started = time.perf_counter()
    record = BiasCorrection()
    nodes = {n.name: n for n in quantized.graph.node}
    reference_nodes = {n.name: n for n in reference.graph.node}
    wanted = []
    for decision in plan.decisions:
        node = nodes.get(decision.name)
        if not decision.quantized or node is None or node.op_type not in CORRECTED_OPS:
            continue
        reason = _why_not(node, quantized)
        if reason is not None:
            record.skipped.append({"node": node.name, "reason": reason})
        else:
            wanted.append(node.name)
    if not wanted:
        record.seconds = time.perf_counter() - started
        return quantized, record
    batches = list(batches)
    outputs = [v.name for v in quantized.graph.output]
    expected = _run(open_session(reference, providers, memory_arena=False), outputs, batches)
    probe, targets = _probe_model(reference_nodes, reference, quantized, wanted)
    session = open_session(probe, providers, fake_quant=True, memory_arena=False)
    fetch = list(dict.fromkeys([*(n for t in targets for n in (t.output, t.shadow)), *outputs]))
    before = []
    for values in _iterate(session, fetch, batches):
        found = dict(zip(fetch, values, strict=True))
        for target in targets:
            _accumulate(target, found[target.output], found[target.shadow])
        before.append([found[name] for name in outputs])
    record.samples = sum(batch_size(batch, reference) for batch in batches)
    result = onnx.ModelProto()
    result.CopyFrom(quantized)
    editor = GraphEditor(result)
    result_nodes = {n.name: n for n in result.graph.node}
    for target in targets:
        if target.sums is None or not target.count:
            continue
        shift = target.sums / target.count
        node = result_nodes[target.node.name]
        bias, created = _fold(editor, node, shift)
        record.shifts.append(
            BiasShift(
                node.name,
                node.op_type,
                bias,
                created,
                float(np.linalg.norm(shift)),
                float(np.max(np.abs(shift))),
                float(np.sqrt(target.squares / max(target.values, 1))),
            )
        )
    result = editor.finish()
    after = _run(open_session(result, providers, memory_arena=False), outputs, batches)
    record.rel_l2_before = _relative_l2(before, expected)
    record.rel_l2_after = _relative_l2(after, expected)
    record.kept = record.rel_l2_after < record.rel_l2_before
    record.seconds = time.perf_counter() - started
    return (result if record.kept else quantized), record


def _iterate(session, names: list[str], batches: list[Batch]):
    feeds = [i.name for i in session.get_inputs()]
    for batch in batches:
        yield session.run(names, {name: batch[name] for name in feeds})


def _run(session, names: list[str], batches: list[Batch]) -> list[list[np.ndarray]]:
    return list(_iterate(session, names, batches))


def _relative_l2(got: list[list[np.ndarray]], expected: list[list[np.ndarray]]) -> float:
    """Relative L2 error of every output over every batch, together."""
    error = total = 0.0
    for got_batch, expected_batch in zip(got, expected, strict=True):
        for value, reference in zip(got_batch, expected_batch, strict=True):
            reference = np.asarray(reference, dtype=np.float64)
            error += float(np.square(np.asarray(value, dtype=np.float64) - reference).sum())
            total += float(np.square(reference).sum())
    return float(np.sqrt(error / total)) if total else float(np.sqrt(error))


# --- what can be corrected --------------------------------------------------------------------


def _why_not(node: onnx.NodeProto, model: onnx.ModelProto) -> str | None:
    """None when ``node``'s bias can take a per-channel correction, else why not."""
    initializers = {i.name: i for i in model.graph.initializer}
    if node.op_type in ("Conv", "ConvTranspose"):
        if len(node.input) > 2 and node.input[2] and node.input[2] not in initializers:
            return "its bias is not a constant"
        return None
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        if "beta" in attrs and attrs["beta"].f == 0.0:
            return "Gemm with beta 0 ignores its C input"
        if len(node.input) > 2 and node.input[2]:
            c = initializers.get(node.input[2])
            if c is None:
                return "its C input is not a constant"
            if len(c.dims) > 1 and any(d != 1 for d in c.dims[:-1]):
                return "its C input is not one value per output"
        return None
    add = _bias_add(node, model)
    if add is None:
        return "a MatMul without a constant Add after it has no bias to fold into"
    return None


def _bias_add(node: onnx.NodeProto, model: onnx.ModelProto) -> tuple[onnx.NodeProto, int] | None:
    """The Add that is the only reader of a MatMul's output and adds a per-column constant."""
    if node.output[0] in {v.name for v in model.graph.output}:
        return None
    readers = [n for n in model.graph.node if node.output[0] in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    add = readers[0]
    initializers = {i.name: i for i in model.graph.initializer}
    index = 1 if add.input[0] == node.output[0] else 0
    constant = initializers.get(add.input[index])
    if constant is None or not constant.dims or any(d != 1 for d in constant.dims[:-1]):
        return None
    return add, index


# --- measuring --------------------------------------------------------------------------------


def _probe_model(
    reference_nodes: dict[str, onnx.NodeProto],
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    wanted: list[str],
) -> tuple[onnx.ModelProto, list[_Target]]:
    """``quantized`` plus, for each wanted node, a shadow copy that reads its FP32 operands.

    The shadow reads what the node read in ``reference`` (the activation before its Q/DQ
    pair, the FP32 weight, the bias); inputs the quantized graph no longer holds (the FP32
    weights) are added as initializers under fresh names. Graph outputs become each node's
    output and its shadow's, so what lies after the last of them is pruned.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(quantized)
    editor = GraphEditor(probe)
    present = {i.name for i in probe.graph.input} | {i.name for i in probe.graph.initializer}
    present |= {o for n in probe.graph.node for o in n.output}
    reference_values = {i.name: i for i in reference.graph.initializer}
    copied: dict[str, str] = {}
    nodes = {n.name: n for n in probe.graph.node}
    targets = []
    for name in wanted:
        node, original = nodes[name], reference_nodes[name]
        inputs = []
        for tensor in original.input:
            if tensor and tensor not in present:
                if tensor not in copied:
                    values = numpy_helper.to_array(reference_values[tensor])
                    copied[tensor] = editor.add_initializer(f"{tensor}_fp32", values)
                tensor = copied[tensor]
            inputs.append(tensor)
        shadow = editor.names.fresh(f"{node.output[0]}_fp32")
        made = editor.add_node(
            node.op_type, inputs, [shadow], name=f"{node.name}_fp32", domain=node.domain or None
        )
        made.attribute.extend(node.attribute)
        axis = 1 if node.op_type in ("Conv", "ConvTranspose") else -1
        targets.append(_Target(node, node.output[0], shadow, axis))
    outputs = list(probe.graph.output)
    del probe.graph.output[:]
    for target in targets:
        for tensor in (target.output, target.shadow):
            if tensor in {v.name for v in outputs}:
                continue
            value = onnx.ValueInfoProto(name=tensor)
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            probe.graph.output.append(value)
    probe.graph.output.extend(outputs)
    return editor.finish(), targets


def _accumulate(target: _Target, output: np.ndarray, shadow: np.ndarray) -> None:
    """Add one batch's per-channel sums of (quantized - FP32-weight) output to ``target``."""
    axis = target.axis % output.ndim
    channels = output.shape[axis]
    difference = np.moveaxis(output - shadow, axis, 0).reshape(channels, -1)
    sums = difference.sum(axis=1, dtype=np.float64)
    target.sums = sums if target.sums is None else target.sums + sums
    target.count += difference.shape[1]
    flat = shadow.reshape(-1)
    target.squares += float(np.dot(flat, flat))
    target.values += flat.size


# --- folding ----------------------------------------------------------------------------------


def _fold(editor: GraphEditor, node: onnx.NodeProto, shift: np.ndarray) -> tuple[str, bool]:
    """Subtract ``shift`` from ``node``'s bias (made if missing); the bias name, and whether it
    was made."""
    if node.op_type == "MatMul":
        readers = [n for n in editor.graph.node if node.output[0] in n.input]
        add = readers[0]
        index = 1 if add.input[0] == node.output[0] else 0
        return _subtract(editor, add, index, shift), False
    scale = 1.0
    if node.op_type == "Gemm":
        scale = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
    if len(node.input) > 2 and node.input[2]:
        return _subtract(editor, node, 2, shift / scale), False
    name = editor.add_initializer(f"{node.name}_bias", (-shift / scale).astype(np.float32))
    while len(node.input) < 2:
        node.input.append("")
    node.input.append(name)
    return name, True


def _subtract(editor: GraphEditor, node: onnx.NodeProto, index: int, shift: np.ndarray) -> str:
    """``node.input[index] -= shift`` (broadcast on its last axis), on a copy if it is shared."""
    name = node.input[index]
    values = editor.initializer(name)
    corrected = (values - shift).astype(values.dtype)
    readers = sum(name in n.input for n in editor.graph.node)
    if readers > 1:
        fresh = editor.add_initializer(f"{name}_corrected", corrected)
        editor.replace_input(node, name, fresh)
        return fresh
    for init in editor.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(corrected, name))
    return name


#: Calibration samples the shift is measured on: the mean of a per-channel error settles fast.
DEFAULT_SAMPLES = 64


class BiasCorrector:
    """Bias correction as a step of :func:`trtq.quantizer.lower`: its data, and what it did."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        batches: Sequence[Batch],
        providers: Sequence[str] | None = None,
    ) -> None:
        self.reference = reference
        self.batches = batches
        self.providers = providers
        self.record: BiasCorrection | None = None

    def __call__(self, quantized: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
        corrected, self.record = correct_biases(
            self.reference, quantized, plan, self.batches, providers=self.providers
        )
        return corrected
