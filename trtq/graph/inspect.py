"""Summaries of a model for `trtq inspect`: I/O, opset, op histogram, prior quantization."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx

from trtq.graph.load import TensorSpec, model_inputs, model_outputs
from trtq.graph.normalize import default_opset
from trtq.graph.walk import all_nodes

#: Ops that mean the model already carries quantization (QAT export, onnxruntime
#: quantize_static/dynamic output). Quantizing such a model again would stack a
#: second set of scales on the first.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "ConvInteger",
        "MatMulInteger",
        "MatMulInteger16",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearSoftmax",
        "QGemm",
        "QAttention",
    }
)


@dataclass
class ModelSummary:
    """What `trtq inspect` prints; ``to_json`` is its machine-readable form."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    opsets: dict[str, int]
    ir_version: int
    producer: str
    op_counts: dict[str, int]
    num_nodes: int
    num_parameters: int
    quantized_ops: dict[str, int] = field(default_factory=dict)

    @property
    def already_quantized(self) -> bool:
        return bool(self.quantized_ops)

    def to_json(self) -> dict:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "opset": self.opset,
            "opsets": self.opsets,
            "ir_version": self.ir_version,
            "producer": self.producer,
            "num_nodes": self.num_nodes,
            "num_parameters": self.num_parameters,
            "op_counts": self.op_counts,
            "already_quantized": self.already_quantized,
            "quantized_ops": self.quantized_ops,
        }


def summarize(model: onnx.ModelProto) -> ModelSummary:
    """Describe a model without modifying it; nodes inside If/Loop/Scan bodies are counted too."""
    counts = Counter(node.op_type for node in all_nodes(model.graph))
    for function in model.functions:
        counts.update(node.op_type for node in function.node)
    quantized = {op: n for op, n in counts.items() if op in QUANTIZED_OPS}
    parameters = sum(_numel(init.dims) for init in model.graph.initializer)
    return ModelSummary(
        inputs=model_inputs(model),
        outputs=model_outputs(model),
        opset=default_opset(model),
        opsets={op.domain or "ai.onnx": int(op.version) for op in model.opset_import},
        ir_version=int(model.ir_version),
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        op_counts=dict(counts.most_common()),
        num_nodes=sum(counts.values()),
        num_parameters=parameters,
        quantized_ops=quantized,
    )


def _numel(dims) -> int:
    total = 1
    for d in dims:
        total *= int(d)
    return total
