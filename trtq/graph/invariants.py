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

from collections.abc import Collection

import onnx

from trtq.graph.coverage import quantized_compute_nodes
from trtq.graph.invariant_rules import ERROR, RULES, WARNING, Finding
from trtq.graph.qdq_view import ModelView

__all__ = ["ERROR", "WARNING", "Finding", "InvariantViolation", "check", "verify_written"]


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
    view = ModelView(model)
    findings: list[Finding] = []
    seen: set[tuple[str, str | None, str | None]] = set()
    for rule in RULES:
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
