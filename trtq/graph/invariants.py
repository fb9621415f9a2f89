"""TensorRT's invariants for explicitly quantized (Q/DQ) ONNX models, checked on any model.

TensorRT accepts most Q/DQ graphs without complaint and decides by *pattern* what runs in
INT8/FP8: a DequantizeLinear feeding a Conv, ConvTranspose, Gemm or MatMul directly is fused
into the kernel; anything else (a Cast or Reshape in between, a scale that is zero in FP16, an
asymmetric zero point) either fails the build or, worse, builds a layer that silently runs in
float or computes different numbers. :func:`check` lists every such defect of a model from any
tool (onnxruntime ``quantize_static``, NVIDIA ModelOpt, trtq) as :class:`Finding` objects;
:func:`verify_written` turns a finding in trtq's *own* output into an internal error, because
trtq vouches for every model it writes (ARCHITECTURE.md §Invariants).

Severities: ``error`` - TensorRT rejects the model, or computes values the ONNX graph does not
mean; ``warning`` - it builds and computes the same values, but the quantization (speed) is
lost or layers cannot be told apart.

The rules, each a function below (rule id: what TensorRT needs):

* ``duplicate-tensor-name``: every tensor is defined once; a subgraph never redefines a name of
  an enclosing graph (ONNX's single-assignment rule; TensorRT's parser maps names to tensors);
* ``duplicate-node-name``: node names are unique, subgraphs included: TensorRT names layers
  after nodes, and reports, ``--exclude-nodes`` and per-layer precision address them by name;
* ``dq-not-direct``: a compute (or residual Add) input that is meant to be quantized reads its
  DequantizeLinear directly; a Cast, Identity or Reshape-like op in between breaks the fusion
  and the layer runs in float behind a reformat;
* ``qdq-not-constant``: scales and zero points are build-time constants;
* ``scale-invalid``: scales are positive, finite and normal numbers of their stored dtype (a
  subnormal FP16 scale keeps only a few significant bits, and flush-to-zero kernels read 0);
* ``zero-point-nonzero``: TensorRT quantization is symmetric: every zero point is 0;
* ``quantized-type``: the quantized type is int8 or FP8 E4M3 (int4/FP4 for constant weights):
  uint8 (asymmetric) and int32 (quantized bias) Q/DQ are not TensorRT's;
* ``per-channel-axis``: a per-channel weight scale runs along the consumer's output channels
  (axis 0 for Conv and Gemm transB=1 weights, 1 for ConvTranspose and Gemm transB=0, the last
  for MatMul's [K, N]) and has one value per channel;
* ``per-channel-activation``: activations are quantized per tensor (one scale);
* ``qdq-pair``: a QuantizeLinear feeds only DequantizeLinear nodes, and a DequantizeLinear reads
  a constant (weights) or a QuantizeLinear (activations) directly;
* ``qdq-mismatch``: a Q -> DQ pair uses one scale, zero point and axis (otherwise the pair
  rescales the tensor and is no longer a quantization TensorRT can fuse away);
* ``qdq-on-shape-tensor``: no Q/DQ on shape tensors (Reshape's shape, Slice's starts/ends,
  Expand's shape, Resize's scales/sizes ...): TensorRT computes those at build time in int64;
* ``qdq-non-float``: QuantizeLinear quantizes float tensors only;
* ``qdq-opset``: per-channel scales need opset 13, FP16/BF16 scales and FP8 need opset 19,
  int4 and block sizes need opset 21 (ONNX's Q/DQ schemas, which TensorRT's parser follows).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtq.graph.coverage import quantized_compute_nodes
from trtq.graph.patterns import COMPUTE_OPS
from trtq.graph.walk import all_graphs, all_nodes

ERROR, WARNING = "error", "warning"
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Ops TensorRT fuses a DequantizeLinear into: the compute ops, and the residual Add it fuses
#: into the Conv before it (its Q/DQ sits on the shortcut input).
FUSING_OPS = COMPUTE_OPS | {"Add"}
#: Ops that move a tensor without computing on it: between a DequantizeLinear and its compute
#: consumer they hide the pattern TensorRT fuses.
HIDING_OPS = frozenset({"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
#: Inputs TensorRT evaluates as shape tensors (int64, at build time): never quantized.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Slice": (1, 2, 3, 4),
    "Expand": (1,),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Tile": (1,),
    "Pad": (1,),
    "ConstantOfShape": (0,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "TopK": (1,),
    "OneHot": (1,),
}
#: Types TensorRT quantizes to; int4/FP4 only as stored weights (weight-only quantization).
QUANTIZED_TYPES = frozenset({TensorProto.INT8, TensorProto.FLOAT8E4M3FN})
WEIGHT_ONLY_TYPES = frozenset({TensorProto.INT4, TensorProto.FLOAT4E2M1})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
#: Smallest normal number of each scale dtype: below it a scale loses significant bits.
_SMALLEST_NORMAL = {
    TensorProto.FLOAT: float(np.finfo(np.float32).tiny),
    TensorProto.FLOAT16: float(np.finfo(np.float16).tiny),
    TensorProto.BFLOAT16: float(ml_dtypes.finfo(ml_dtypes.bfloat16).tiny),
}


@dataclass(frozen=True)
class Finding:
    """One broken invariant: which rule, where, and a one-line message that names the fix."""

    rule: str
    severity: str
    node: str | None
    tensor: str | None
    message: str

    def to_json(self) -> dict:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "node": self.node,
            "tensor": self.tensor,
            "message": self.message,
        }

    def __str__(self) -> str:
        return f"{self.severity} {self.rule} {self.node or '-'}: {self.message}"


class InvariantViolation(RuntimeError):
    """trtq wrote a model that breaks a TensorRT invariant: a bug in trtq, not a user error."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        first = findings[0]
        more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
        super().__init__(
            f"trtq's own output breaks rule {first.rule} at node {first.node or '-'}: "
            f"{first.message}{more}"
        )


def check(model: onnx.ModelProto) -> list[Finding]:
    """Every broken TensorRT invariant of ``model``, in rule order, each reported once."""
    view = _ModelView(model)
    findings: list[Finding] = []
    seen: set[tuple[str, str | None, str | None]] = set()
    for rule in _RULES:
        for finding in rule(view):
            key = (finding.rule, finding.node, finding.tensor)
            if key not in seen:
                seen.add(key)
                findings.append(finding)
    return findings


def verify_written(
    model: onnx.ModelProto, planned_quantized: Collection[str] | None = None
) -> None:
    """Raise :class:`InvariantViolation` if trtq's own output breaks any invariant.

    With ``planned_quantized`` (the nodes the Q/DQ plan quantized), the final graph must show
    exactly those compute nodes quantized: a planned node whose operands do not read a
    DequantizeLinear would be reported as INT8 while TensorRT runs it in float.
    """
    findings = check(model)
    if planned_quantized is not None:
        shown = quantized_compute_nodes(model)
        for name in sorted(set(planned_quantized) - shown):
            findings.append(
                Finding(
                    "planned-not-quantized",
                    ERROR,
                    name,
                    None,
                    "planned as quantized, but its activation and weight do not both read a "
                    "DequantizeLinear in the written graph",
                )
            )
        for name in sorted(shown - set(planned_quantized)):
            findings.append(
                Finding(
                    "unplanned-quantized",
                    ERROR,
                    name,
                    None,
                    "planned to stay in float, but reads DequantizeLinear outputs",
                )
            )
    if findings:
        raise InvariantViolation(findings)


# --- the model as the rules see it --------------------------------------------------------------


class _ModelView:
    """Name -> producer / consumers / constant / element type, across the model and its subgraphs.

    Names are resolved model-wide: with unique names (the first rule) that is exact, and a
    subgraph reading an outer-scope tensor finds its producer too.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(all_nodes(model.graph))
        self.opset = next(
            (int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0
        )
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producer.setdefault(name, node)
            for index, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, index))
        self.constants: dict[str, TensorProto] = {}
        for graph in all_graphs(model.graph):
            for init in graph.initializer:
                self.constants.setdefault(init.name, init)
        for node in self.nodes:
            value = _constant_node_value(node)
            if value is not None:
                self.constants.setdefault(node.output[0], value)
            elif node.op_type == "Identity" and node.input and node.input[0] in self.constants:
                self.constants.setdefault(node.output[0], self.constants[node.input[0]])
        self.types = _element_types(model)
        self.types.update({name: t.data_type for name, t in self.constants.items()})

    def qdq_nodes(self) -> Iterator[onnx.NodeProto]:
        return (n for n in self.nodes if n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx"))

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def op(self, name: str) -> str | None:
        producer = self.producer.get(name)
        return producer.op_type if producer is not None else None

    def quantized_type(self, node: onnx.NodeProto) -> int | None:
        """The low-precision type of a Q's output or a DQ's input (None when unknown)."""
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "QuantizeLinear":
            if zero_point is not None:
                return self.types.get(zero_point)
            declared = _attribute(node, "output_dtype", 0)
            return declared or TensorProto.UINT8  # ONNX's default without a zero point
        found = self.types.get(node.input[0])
        if found is None and zero_point is not None:
            found = self.types.get(zero_point)
        return found

    def weight_source(self, dq: onnx.NodeProto) -> str | None:
        """The constant a weight DQ dequantizes: its input, or the input of its constant Q."""
        if dq.input[0] in self.constants:
            return dq.input[0]
        producer = self.producer.get(dq.input[0])
        if producer is not None and producer.op_type == "QuantizeLinear":
            return producer.input[0] if producer.input[0] in self.constants else None
        return None

    def upstream(self, name: str) -> tuple[list[onnx.NodeProto], str]:
        """Walk up from ``name`` through :data:`HIDING_OPS`: (the hiding nodes, where it stops)."""
        hidden: list[onnx.NodeProto] = []
        while (producer := self.producer.get(name)) is not None and producer.op_type in HIDING_OPS:
            if len(hidden) > len(self.nodes) or not producer.input:  # a cycle: a broken model
                break
            hidden.append(producer)
            name = producer.input[0]
        return hidden, name


def _constant_node_value(node: onnx.NodeProto) -> TensorProto | None:
    if node.op_type != "Constant" or not node.attribute or not node.output:
        return None
    attr = node.attribute[0]
    if attr.type == onnx.AttributeProto.TENSOR:
        return attr.t
    value = helper.get_attribute_value(attr)
    if attr.name in ("value_float", "value_floats"):
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32))
    if attr.name in ("value_int", "value_ints"):
        return numpy_helper.from_array(np.asarray(value, dtype=np.int64))
    return None  # sparse or string constants: never a scale, zero point or weight


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types declared in the model, completed by ONNX type inference where it works."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):
        inferred = model  # e.g. over 2 GB: the declared types are all there is
    types: dict[str, int] = {}
    for graph in all_graphs(inferred.graph):
        for value in (*graph.input, *graph.value_info, *graph.output):
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                types[value.name] = value.type.tensor_type.elem_type
    return types


def _attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def _type_name(elem_type: int | None) -> str:
    return "unknown" if elem_type is None else TensorProto.DataType.Name(elem_type).lower()


# --- names ---------------------------------------------------------------------------------------


def _duplicate_tensor_names(view: _ModelView) -> Iterator[Finding]:
    yield from _names_in(view.model.graph, frozenset())


def _names_in(graph: onnx.GraphProto, outer: frozenset[str]) -> Iterator[Finding]:
    inputs = {value.name for value in graph.input}
    definitions: list[tuple[str, onnx.NodeProto | None]] = [(v.name, None) for v in graph.input]
    definitions += [(init.name, None) for init in graph.initializer if init.name not in inputs]
    definitions += [(name, node) for node in graph.node for name in node.output if name]
    defined: set[str] = set()
    for name, node in definitions:
        if name in defined or name in outer:
            where = "in an enclosing graph" if name in outer else "twice in one graph"
            yield Finding(
                "duplicate-tensor-name",
                ERROR,
                _label(node) if node is not None else None,
                name,
                f"tensor {name} is defined {where}: readers get the wrong tensor; rename one "
                "(names must be unique, subgraphs included)",
            )
        defined.add(name)
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _names_in(sub, outer | defined)


def _duplicate_node_names(view: _ModelView) -> Iterator[Finding]:
    counts = Counter(node.name for node in view.nodes if node.name)
    for name, count in counts.items():
        if count > 1:
            yield Finding(
                "duplicate-node-name",
                WARNING,
                name,
                None,
                f"{count} nodes are named {name}: TensorRT layers, reports and per-layer "
                "settings cannot tell them apart; give each node a unique name",
            )


# --- the fused pattern ---------------------------------------------------------------------------


def _dq_not_direct(view: _ModelView) -> Iterator[Finding]:
    for node in view.nodes:
        if node.op_type not in FUSING_OPS:
            continue
        for index, name in enumerate(node.input[:2]):
            if not name:
                continue
            hidden, source = view.upstream(name)
            if hidden and view.op(source) in QDQ_OPS:
                between = ", ".join(f"{n.op_type} {_label(n)}" for n in reversed(hidden))
                yield Finding(
                    "dq-not-direct",
                    WARNING,
                    _label(node),
                    name,
                    f"{node.op_type} input {index} reads {view.op(source)} "
                    f"{_label(view.producer[source])} through {between}: TensorRT fuses only "
                    f"DequantizeLinear -> {node.op_type}, so the layer runs in float; feed the "
                    "DQ output directly (retype the DQ instead of casting after it)",
                )


def _qdq_pairs(view: _ModelView) -> Iterator[Finding]:
    for node in view.qdq_nodes():
        if node.op_type == "QuantizeLinear":
            readers = view.consumers.get(node.output[0], [])
            others = [c for c, _ in readers if c.op_type != "DequantizeLinear"]
            if others:
                yield Finding(
                    "qdq-pair",
                    ERROR,
                    _label(node),
                    node.output[0],
                    f"QuantizeLinear output is read by {others[0].op_type} {_label(others[0])}: "
                    "TensorRT needs Q immediately followed by DequantizeLinear; move the "
                    "DequantizeLinear right after the Q",
                )
            continue
        source = node.input[0]
        producer = view.producer.get(source)
        if source in view.constants or producer is None or producer.op_type == "QuantizeLinear":
            continue
        yield Finding(
            "qdq-pair",
            ERROR,
            _label(node),
            source,
            f"DequantizeLinear reads {producer.op_type} {_label(producer)}: TensorRT fuses "
            "constant -> DQ (weights) and Q -> DQ (activations) only; read the constant or the "
            "QuantizeLinear directly",
        )


def _qdq_mismatch(view: _ModelView) -> Iterator[Finding]:
    for dq in view.qdq_nodes():
        q = view.producer.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        differences = []
        q_scale, dq_scale = view.array(q.input[1]), view.array(dq.input[1])
        if q_scale is not None and dq_scale is not None and not _same(q_scale, dq_scale):
            differences.append(f"scale {_brief(q_scale)} vs {_brief(dq_scale)}")
        q_zero, dq_zero = _zero_point(view, q), _zero_point(view, dq)
        if q_zero is not None and dq_zero is not None and not _same(q_zero, dq_zero):
            differences.append(f"zero point {_brief(q_zero)} vs {_brief(dq_zero)}")
        if (
            q_scale is not None
            and q_scale.size > 1
            and _attribute(q, "axis", 1) != _attribute(dq, "axis", 1)
        ):
            differences.append(f"axis {_attribute(q, 'axis', 1)} vs {_attribute(dq, 'axis', 1)}")
        if differences:
            yield Finding(
                "qdq-mismatch",
                ERROR,
                _label(dq),
                dq.input[0],
                f"QuantizeLinear {_label(q)} and this DequantizeLinear differ "
                f"({'; '.join(differences)}): the pair rescales the tensor instead of "
                "quantizing it; give both the same scale and zero-point tensors",
            )


def _zero_point(view: _ModelView, node: onnx.NodeProto) -> np.ndarray | None:
    if len(node.input) > 2 and node.input[2]:
        return view.array(node.input[2])
    return np.zeros(())


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values (a missing zero point is a 0-d zero; [s] and s are the same scale)."""
    return a.size == b.size and bool(
        np.array_equal(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())
    )


def _brief(values: np.ndarray) -> str:
    flat = values.astype(np.float64).ravel()
    return f"{flat[0]:.6g}" if flat.size == 1 else f"[{flat[0]:.6g}, ... x{flat.size}]"


# --- scales and zero points ----------------------------------------------------------------------


def _parameters(view: _ModelView, index: int) -> Iterator[tuple[onnx.NodeProto, str]]:
    """(first Q/DQ node reading it, name) of every scale (1) or zero point (2), once each:
    pairs share these tensors, and one defect is one finding."""
    seen: set[str] = set()
    for node in view.qdq_nodes():
        name = node.input[index] if len(node.input) > index else ""
        if name and name not in seen:
            seen.add(name)
            yield node, name


def _constant_parameters(view: _ModelView) -> Iterator[Finding]:
    for index, what in ((1, "scale"), (2, "zero point")):
        for node, name in _parameters(view, index):
            if name not in view.constants:
                yield Finding(
                    "qdq-not-constant",
                    ERROR,
                    _label(node),
                    name,
                    f"{node.op_type} {what} {name} is computed at run time: TensorRT needs "
                    f"build-time constant {what}s; store it as an initializer",
                )


def _scales(view: _ModelView) -> Iterator[Finding]:
    for node, name in _parameters(view, 1):
        tensor = view.constants.get(name)
        if tensor is None or tensor.data_type not in _SMALLEST_NORMAL:
            continue
        values = numpy_helper.to_array(tensor).astype(np.float64).ravel()
        problem = _scale_problem(values, tensor.data_type)
        if problem:
            yield Finding(
                "scale-invalid",
                ERROR,
                _label(node),
                name,
                f"scale {name} of {node.op_type} {problem}; TensorRT needs positive, finite, "
                "normal scales: floor the scale at the dtype's smallest normal number, or store "
                "it in float32",
            )


def _scale_problem(values: np.ndarray, data_type: int) -> str | None:
    dtype = _type_name(data_type)
    where = lambda i: f" (channel {i})" if values.size > 1 else ""  # noqa: E731
    for test, what in (
        (~np.isfinite(values), "is not finite"),
        (values < 0, "is negative"),
        (values == 0, f"is 0 in {dtype}"),
    ):
        if np.any(test):
            index = int(np.argmax(test))
            return f"{what}{where(index)}: {values[index]:.6g}"
    tiny = _SMALLEST_NORMAL[data_type]
    below = values < tiny
    if np.any(below):
        index = int(np.argmax(below))
        return (
            f"is subnormal in {dtype}{where(index)}: {values[index]:.6g} < {tiny:.6g} keeps "
            "few significant bits and flush-to-zero kernels read it as 0"
        )
    return None


def _zero_points(view: _ModelView) -> Iterator[Finding]:
    for node, name in _parameters(view, 2):
        values = view.array(name)
        if values is None:
            continue
        nonzero = values.astype(np.float64).ravel() != 0
        if np.any(nonzero):
            index = int(np.argmax(nonzero))
            yield Finding(
                "zero-point-nonzero",
                ERROR,
                _label(node),
                name,
                f"zero point {name} of {node.op_type} is {values.ravel()[index]} "
                f"({int(nonzero.sum())} of {nonzero.size} non-zero): TensorRT quantizes "
                "symmetrically; requantize with zero points 0 (symmetric activations and weights)",
            )


def _quantized_types(view: _ModelView) -> Iterator[Finding]:
    for node in view.qdq_nodes():
        if node.op_type == "DequantizeLinear" and view.op(node.input[0]) == "QuantizeLinear":
            continue  # its Q reports the pair
        found = view.quantized_type(node)
        if found is None or found in QUANTIZED_TYPES:
            continue
        source = node.input[0]
        if found in WEIGHT_ONLY_TYPES and source in view.constants:
            continue
        if found == TensorProto.UINT8:
            fix = "requantize to signed int8 with zero point 0 (symmetric)"
        elif found == TensorProto.INT32:
            fix = "keep biases in float (onnxruntime: extra_options QuantizeBias=False)"
        else:
            fix = "quantize to int8 or FP8 E4M3"
        yield Finding(
            "quantized-type",
            ERROR,
            _label(node),
            node.output[0] if node.op_type == "QuantizeLinear" else source,
            f"{node.op_type} uses {_type_name(found)}: TensorRT's Q/DQ take int8 or FP8 E4M3 "
            f"(int4/FP4 only for constant weights); {fix}",
        )


# --- axes ---------------------------------------------------------------------------------------


def _per_channel_axes(view: _ModelView) -> Iterator[Finding]:
    for dq in view.qdq_nodes():
        if dq.op_type != "DequantizeLinear":
            continue
        scale = view.constants.get(dq.input[1])
        weight = view.weight_source(dq)
        if scale is None or weight is None or len(scale.dims) != 1:
            continue  # per-tensor (0-d scale), block-quantized (scale of the weight's rank)
        dims = tuple(view.constants[weight].dims)
        rank = len(dims)
        axis = int(_attribute(dq, "axis", 1))
        axis = axis + rank if axis < 0 else axis
        for consumer, index in view.consumers.get(dq.output[0], []):
            if index != 1 or consumer.op_type not in COMPUTE_OPS:
                continue
            expected = _channel_axis(consumer, rank)
            if expected is None:
                problem = f"a {rank}-d weight has no output-channel axis; use one scale"
            elif axis != expected:
                problem = (
                    f"axis {axis}, but {consumer.op_type} {_label(consumer)} has its output "
                    f"channels on axis {expected} of weight {list(dims)}; use axis={expected}"
                )
            elif scale.dims[0] != dims[axis]:
                problem = (
                    f"{scale.dims[0]} scales for {dims[axis]} channels on axis {axis} of weight "
                    f"{list(dims)}; give one scale per channel"
                )
            else:
                continue
            yield Finding(
                "per-channel-axis", ERROR, _label(dq), dq.input[1], f"per-channel scale: {problem}"
            )


def _channel_axis(consumer: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of ``consumer``'s weight (input 1), None when it has none."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if _attribute(consumer, "transB", 0) else 1
    return rank - 1 if rank >= 2 else None  # MatMul: [..., K, N]


def _per_channel_activations(view: _ModelView) -> Iterator[Finding]:
    for q in view.qdq_nodes():
        scale = view.constants.get(q.input[1])
        if q.op_type != "QuantizeLinear" or scale is None or q.input[0] in view.constants:
            continue
        if int(np.prod(scale.dims, dtype=np.int64)) > 1:
            yield Finding(
                "per-channel-activation",
                ERROR,
                _label(q),
                q.input[0],
                f"activation {q.input[0]} has {int(np.prod(scale.dims))} scales: TensorRT "
                "quantizes activations per tensor; use one scale",
            )


# --- where Q/DQ cannot go -----------------------------------------------------------------------


def _shape_tensors(view: _ModelView) -> Iterator[Finding]:
    for node in view.nodes:
        for index in SHAPE_INPUTS.get(node.op_type, ()):
            if index >= len(node.input) or not node.input[index]:
                continue
            _, source = view.upstream(node.input[index])
            producer = view.producer.get(source)
            if producer is not None and producer.op_type in QDQ_OPS:
                yield Finding(
                    "qdq-on-shape-tensor",
                    ERROR,
                    _label(producer),
                    source,
                    f"{producer.op_type} feeds input {index} of {node.op_type} {_label(node)}, "
                    "a shape tensor TensorRT computes in int64 at build time; remove the Q/DQ",
                )


def _non_float_inputs(view: _ModelView) -> Iterator[Finding]:
    for q in view.qdq_nodes():
        found = view.types.get(q.input[0])
        if q.op_type == "QuantizeLinear" and found is not None and found not in FLOAT_TYPES:
            yield Finding(
                "qdq-non-float",
                ERROR,
                _label(q),
                q.input[0],
                f"QuantizeLinear quantizes {q.input[0]}, a {_type_name(found)} tensor: TensorRT "
                "quantizes float tensors only; remove the Q/DQ pair",
            )


def _opset(view: _ModelView) -> Iterator[Finding]:
    for node in view.qdq_nodes():
        scale = view.constants.get(node.input[1])
        needs = []
        if "axis" in {a.name for a in node.attribute} or (scale is not None and scale.dims):
            needs.append((13, "per-channel scales"))
        if scale is not None and scale.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            needs.append((19, f"{_type_name(scale.data_type)} scales"))
        found = view.quantized_type(node)
        if found in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):
            needs.append((19, "FP8"))
        if found in (TensorProto.INT4, TensorProto.UINT4) or _attribute(node, "block_size", 0):
            needs.append((21, "int4 and block quantization"))
        for opset, what in needs:
            if view.opset < opset:
                yield Finding(
                    "qdq-opset",
                    ERROR,
                    _label(node),
                    node.input[1],
                    f"{node.op_type} with {what} needs opset >= {opset}, the model declares "
                    f"{view.opset}; convert it to opset {opset} (onnx.version_converter)",
                )
                break


_RULES = (
    _duplicate_tensor_names,
    _duplicate_node_names,
    _dq_not_direct,
    _constant_parameters,
    _scales,
    _zero_points,
    _quantized_types,
    _per_channel_axes,
    _per_channel_activations,
    _qdq_pairs,
    _qdq_mismatch,
    _shape_tensors,
    _non_float_inputs,
    _opset,
)
