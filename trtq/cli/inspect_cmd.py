"""``trtq inspect MODEL``: inputs, outputs, opset, op histogram, prior quantization."""

from __future__ import annotations

import argparse

import numpy as np

from trtq.cli.common import add_command, add_data_arguments, open_data, print_json
from trtq.graph.inspect import ModelSummary, summarize
from trtq.graph.load import load_model


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "inspect",
        run,
        help="describe an ONNX model",
        description="Print a model's inputs and outputs, opset, op histogram and whether it "
        "is already quantized. With --data, read the data as calibration would and check "
        "it against the model's inputs (names, shapes, dtypes, NaN/Inf).",
        epilog="examples:\n  trtq inspect calib_data/mnist_cnn.onnx --json\n"
        "  trtq inspect calib_data/mnist_cnn.onnx --data calib_data/mnist_calib.npz",
        parents=parents,
    )
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    parser.add_argument("--data", help="calibration data to check against the model")
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    summary = summarize(load_model(args.model))
    data = check_data(args, summary) if args.data else None
    if args.json:
        print_json({"model": args.model, **summary.to_json(), **({"data": data} if data else {})})
        return 0
    print(format_summary(args.model, summary))
    if data:
        print(f"{'data':<10} {data['description']}: ok")
        for name, stats in data["inputs"].items():
            low, high = stats["min"], stats["max"]
            print(f"{'':<10} {name}: {stats['dtype']} {stats['shape']}, values {low:g} .. {high:g}")
    return 0


def check_data(args: argparse.Namespace, summary: ModelSummary) -> dict:
    """Read every batch (each is validated as it is read) and summarise the values per input."""
    source = open_data(args, args.data, summary.inputs)
    seen: dict[str, dict] = {}
    batches = samples = 0
    for batch in source:
        batches += 1
        samples += len(next(iter(batch.values())))
        for name, array in batch.items():
            entry = seen.setdefault(
                name, {"dtype": str(array.dtype), "shape": "x".join(map(str, array.shape))}
            )
            low, high = (float(np.min(array)), float(np.max(array))) if array.size else (0, 0)
            entry["min"] = min(entry.get("min", low), low)
            entry["max"] = max(entry.get("max", high), high)
    return {
        "description": source.description,
        "batches": batches,
        "samples": samples,
        "inputs": seen,
    }


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
