"""``trtq inspect MODEL``: inputs, outputs, opset, op histogram, prior quantization."""

from __future__ import annotations

import argparse

from trtq.cli.common import add_command, print_json
from trtq.graph.inspect import ModelSummary, summarize
from trtq.graph.load import load_model


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "inspect",
        run,
        help="describe an ONNX model",
        description="Print a model's inputs and outputs, opset, op histogram and whether it "
        "is already quantized.",
        epilog="example:\n  trtq inspect calib_data/mnist_cnn.onnx --json",
        parents=parents,
    )
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")


def run(args: argparse.Namespace) -> int:
    summary = summarize(load_model(args.model))
    if args.json:
        print_json({"model": args.model, **summary.to_json()})
    else:
        print(format_summary(args.model, summary))
    return 0


def format_summary(name: str, summary: ModelSummary) -> str:
    width = max((len(t.name) for t in summary.inputs + summary.outputs), default=0)

    def tensors(specs) -> list[str]:
        return [f"{t.name:<{width}}  {t.dtype!s:<8} {t.shape_str()}" for t in specs] or ["-"]

    lines = [
        ("model", [name]),
        ("producer", [summary.producer or "unknown"]),
        ("opset", [", ".join(f"{d} {v}" for d, v in summary.opsets.items())]),
        ("inputs", tensors(summary.inputs)),
        ("outputs", tensors(summary.outputs)),
        ("nodes", [f"{summary.num_nodes} ({summary.num_parameters:,} weight values)"]),
        ("ops", [", ".join(f"{op} {n}" for op, n in summary.op_counts.items())]),
        ("quantized", [_quantized_line(summary)]),
    ]
    return "\n".join(
        f"{label if i == 0 else '':<10} {text}"
        for label, texts in lines
        for i, text in enumerate(texts)
    )


def _quantized_line(summary: ModelSummary) -> str:
    if not summary.already_quantized:
        return "no"
    ops = ", ".join(f"{op} {n}" for op, n in summary.quantized_ops.items())
    return f"yes ({ops}): trtq will not quantize it again"
