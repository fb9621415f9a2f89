"""``trtq inspect MODEL``: inputs, outputs, opset, op histogram, prior quantization.

``--check`` lists instead where the model breaks a TensorRT invariant (for a Q/DQ model from any
tool); ``--strict`` makes any finding a failed gate (exit 3).
"""

from __future__ import annotations

import argparse

import numpy as np

from trtq.cli.common import add_command, add_data_arguments, open_data, print_json
from trtq.errors import EXIT_GATE_FAILED, EXIT_OK, UserError
from trtq.graph import invariants
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
        "it against the model's inputs (names, shapes, dtypes, NaN/Inf). With --check, list "
        "where a quantized model (from trtq, onnxruntime, ModelOpt...) breaks what TensorRT "
        "needs to fuse its Q/DQ nodes.",
        epilog="examples:\n  trtq inspect calib_data/mnist_cnn.onnx --json\n"
        "  trtq inspect calib_data/mnist_cnn.onnx --data calib_data/mnist_calib.npz\n"
        "  trtq inspect model.int8.onnx --check --strict",
        parents=parents,
    )
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    parser.add_argument("--data", help="calibration data to check against the model")
    parser.add_argument(
        "--check",
        action="store_true",
        help="list the model's TensorRT invariant findings (one per line; --json: a list)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="with --check: exit 3 if there is any finding"
    )
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.check or args.strict:
        return run_check(args)
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


def run_check(args: argparse.Namespace) -> int:
    """Report every finding; a failed gate only with --strict (a foreign model is not ours)."""
    if not args.check:
        raise UserError("--strict applies to --check", "add --check")
    if args.data:
        raise UserError("--check and --data are separate checks", "run trtq inspect once for each")
    findings = invariants.check(load_model(args.model))
    if args.json:
        print_json([finding.to_json() for finding in findings])
    else:
        for finding in findings:
            print(finding)
        errors = sum(f.severity == invariants.ERROR for f in findings)
        print(
            f"{args.model}: {len(findings)} finding(s), {errors} error(s)"
            if findings
            else f"{args.model}: no findings"
        )
    return EXIT_GATE_FAILED if findings and args.strict else EXIT_OK


def check_data(args: argparse.Namespace, summary: ModelSummary) -> dict:
    """Read every batch (each is validated as it is read) and summarise the values per input."""
    from trtq.calib.data.feeds import samples_in

    source = open_data(args, args.data, summary.inputs)
    seen: dict[str, dict] = {}
    batches = samples = 0
    for batch in source:
        batches += 1
        samples += samples_in(batch, summary.inputs)
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
