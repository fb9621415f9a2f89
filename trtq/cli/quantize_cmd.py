"""``trtq quantize``: FP32 ONNX + calibration data -> Q/DQ ONNX that TensorRT builds as INT8/FP8."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from trtq.calib.cache import CalibrationStats, TrtCache
from trtq.calib.collect import parse_memory
from trtq.calib.ranges import DEFAULT_METHOD, METHODS
from trtq.cli.common import (
    add_command,
    add_data_arguments,
    add_export_loader_argument,
    add_freeze_argument,
    export_loader,
    open_data,
    parse_frozen,
    print_json,
)
from trtq.fileio import save_model, write_text
from trtq.graph import fp16, qdq
from trtq.graph.load import load_model, model_inputs
from trtq.graph.patterns import COMPUTE_OPS
from trtq.quantizer import CalibrationOptions, quantize

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  trtq quantize calib_data/mnist_cnn.onnx --calib calib_data/mnist_calib.npz -o mnist.int8.onnx
  trtq quantize model.onnx --calib images/ --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \\
      -o model.trtq.onnx --report report.json --cache model.cache
  trtq quantize model.onnx --stats stats.json -o model.trtq.onnx   # ranges from trtq calibrate

--cache and --stats are read when the file exists (no calibration runs) and written otherwise."""


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "quantize",
        run,
        help="insert Q/DQ nodes for TensorRT explicit quantization",
        description="Normalise the model, calibrate the tensors TensorRT will quantize, and "
        "insert QuantizeLinear/DequantizeLinear pairs where TensorRT fuses them (inputs of "
        "Conv/Gemm/MatMul, per-channel weights, residual skips). The result is checked with "
        "onnx.checker and ONNX Runtime before it is written.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument("model", help="FP32 ONNX model")
    parser.add_argument("-o", "--output", required=True, help="quantized ONNX model to write")
    parser.add_argument("--calib", help="calibration data (see the README's data formats)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="range algorithm")
    parser.add_argument(
        "--percentile", type=float, default=99.99, help="percentile for --method percentile"
    )
    parser.add_argument(
        "--precision",
        choices=(*qdq.PRECISIONS, *fp16.LOW_TYPES),
        default="int8",
        help="int8/fp8: Q/DQ on compute ops; fp16/bf16: the whole graph in reduced precision",
    )
    parser.add_argument(
        "--high-precision",
        choices=("fp32", *fp16.LOW_TYPES),
        default="fp32",
        help="with --precision int8/fp8: the type of everything not quantized",
    )
    parser.add_argument("--cache", help="TensorRT calibration cache: read if present, else written")
    parser.add_argument("--stats", help="trtq stats JSON: read if present, else written")
    parser.add_argument("--report", help="write the quantization report (JSON) here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    group = parser.add_argument_group("placement")
    group.add_argument(
        "--include-ops",
        default=",".join(sorted(COMPUTE_OPS)),
        help="compute ops to quantize, comma-separated",
    )
    group.add_argument("--exclude-ops", default="", help="ops to keep in float, comma-separated")
    group.add_argument("--exclude-nodes", help="regular expression: matching nodes stay float")
    group.add_argument(
        "--min-channels",
        type=int,
        default=qdq.DEFAULT_MIN_CHANNELS,
        help="ops with fewer channels stay float (INT8 does not pay there)",
    )
    mixed = parser.add_argument_group("fp16/bf16")
    mixed.add_argument(
        "--keep-io-types",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the model's float inputs and outputs FP32",
    )
    mixed.add_argument(
        "--max-abs",
        type=float,
        help="nodes whose observed activations exceed this stay FP32 (default 512 for fp16, "
        "none for bf16)",
    )
    mixed.add_argument(
        "--max-reduction",
        type=int,
        default=fp16.DEFAULT_MAX_REDUCTION,
        help="reductions over more elements stay FP32",
    )
    mixed.add_argument("--keep-fp32-nodes", help="regular expression: matching nodes stay FP32")
    mixed.add_argument("--keep-fp32-ops", default="", help="ops that stay FP32, comma-separated")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--max-memory", type=parse_memory, help="see trtq calibrate --help")
    calib.add_argument("--providers", help="ONNX Runtime providers for calibration (default cpu)")
    calib.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_freeze_argument(parser)
    add_data_arguments(parser)
    add_export_loader_argument(parser)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    stats = CalibrationStats.read(args.stats) if _exists(args.stats) else None
    cache = TrtCache.read(args.cache) if _exists(args.cache) else None
    batches = None
    if args.calib:
        batches = open_data(args, args.calib, model_inputs(model))
    export_loader(args, args.calib, model_inputs(model), "calibrated on")
    quantizing = args.precision in qdq.PRECISIONS
    low = args.high_precision if quantizing else args.precision
    result = quantize(
        model,
        batches,
        placement=qdq.PlacementOptions(
            precision=args.precision,
            include_ops=_ops(args.include_ops),
            exclude_ops=_ops(args.exclude_ops),
            exclude_nodes=args.exclude_nodes,
            min_channels=args.min_channels,
        )
        if quantizing
        else None,
        mixed=None
        if low == "fp32"
        else fp16.MixedPrecisionOptions(
            precision=low,
            keep_io_types=args.keep_io_types,
            max_abs=args.max_abs,
            max_reduction=args.max_reduction,
            keep_fp32_nodes=args.keep_fp32_nodes,
            keep_fp32_ops=_ops(args.keep_fp32_ops),
        ),
        calibration=CalibrationOptions(
            method=args.method,
            percentile=args.percentile,
            max_memory=args.max_memory,
            providers=args.providers.split(",") if args.providers else None,
            progress=not args.no_progress,
        ),
        stats=stats,
        cache=cache,
        frozen=parse_frozen(args.freeze_input),
    )
    save_model(result.model, args.output)
    report = {"model": args.model, "output": args.output, **result.report}
    if args.stats and stats is None and result.stats is not None:
        result.stats.write(args.stats)
    if args.cache and cache is None:
        amax = {name: r.amax for name, r in result.ranges.items() if r.quantizable}
        TrtCache.from_amax(amax, method=args.method).write(args.cache)
    if args.report:
        write_text(args.report, json.dumps(report, indent=2) + "\n")
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    """The human summary: coverage first, then every node left in higher precision and why."""
    lines = [f"wrote {report['output']}"]
    if report["precision"]:
        coverage, precision = report["coverage"], report["precision"].upper()
        lines.append(
            f"{precision}: {coverage['quantized_nodes']}/{coverage['total_nodes']} compute nodes, "
            f"coverage {coverage['fraction']:.1%} of {coverage['total_macs']:,} multiply-"
            f"accumulates per sample; {len(report['quantized_tensors'])} activations quantized "
            f"(method {report['method']})"
        )
        for node in report["float_nodes"]:
            lines.append(
                f"  float: {node['name']} ({node['op']}, {node['macs']:,} MACs): {node['reason']}"
            )
    mixed = report.get("mixed_precision")
    if mixed:
        coverage = mixed["coverage"]
        lines.append(
            f"{mixed['precision'].upper()}: {mixed['reduced_precision_nodes']} nodes in reduced "
            f"precision, {len(mixed['fp32_nodes'])} kept FP32; reduced-precision coverage "
            f"{coverage['fraction']:.1%} of multiply-accumulates"
        )
        for node in mixed["fp32_nodes"]:
            lines.append(f"  fp32: {node['name']}: {node['reason']}")
    check = report["verification"]
    for name, figures in check["outputs"].items():
        lines.append(
            f"check ({check['backend']}, {check['samples']} samples): {name} cosine vs FP32 "
            f"mean {figures['cosine_mean']:.6f}, min {figures['cosine_min']:.6f}"
        )
    if not check["outputs"]:
        lines.append(f"check: {check['backend']}")
    return "\n".join(lines)


def _ops(text: str) -> frozenset[str]:
    return frozenset(op.strip() for op in text.split(",") if op.strip())


def _exists(path: str | None) -> bool:
    return bool(path) and Path(path).exists()
