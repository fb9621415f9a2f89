"""``trtq quantize``: FP32 ONNX + calibration data -> Q/DQ ONNX that TensorRT builds as INT8/FP8."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from trtq.calib.cache import CalibrationStats, TrtCache
from trtq.calib.collect import parse_memory
from trtq.calib.ranges import DEFAULT_METHOD, METHODS
from trtq.cli.common import add_command, add_data_arguments, open_data, print_json
from trtq.fileio import save_model, write_text
from trtq.graph import qdq
from trtq.graph.load import load_model, model_inputs
from trtq.graph.patterns import COMPUTE_OPS
from trtq.quantize import CalibrationOptions, quantize

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
    parser.add_argument("--precision", choices=qdq.PRECISIONS, default="int8", help="Q/DQ type")
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
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--max-memory", type=parse_memory, help="see trtq calibrate --help")
    calib.add_argument("--providers", help="ONNX Runtime providers for calibration (default cpu)")
    calib.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    stats = CalibrationStats.read(args.stats) if _exists(args.stats) else None
    cache = TrtCache.read(args.cache) if _exists(args.cache) else None
    batches = None
    if args.calib:
        batches = open_data(args, args.calib, model_inputs(model))
    result = quantize(
        model,
        batches,
        placement=qdq.PlacementOptions(
            precision=args.precision,
            include_ops=_ops(args.include_ops),
            exclude_ops=_ops(args.exclude_ops),
            exclude_nodes=args.exclude_nodes,
            min_channels=args.min_channels,
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
    coverage = report["coverage"]
    precision = report["precision"].upper()
    lines = [
        f"wrote {report['output']}: {coverage['quantized_nodes']}/{coverage['total_nodes']} "
        f"compute nodes in {precision}, {precision} coverage {coverage['fraction']:.1%} of "
        f"{coverage['total_macs']:,} multiply-accumulates",
        f"quantized tensors: {len(report['quantized_tensors'])} (method {report['method']})",
    ]
    for node in report["float_nodes"]:
        lines.append(
            f"  float: {node['name']} ({node['op']}, {node['macs']:,} MACs): {node['reason']}"
        )
    return "\n".join(lines)


def _ops(text: str) -> frozenset[str]:
    return frozenset(op.strip() for op in text.split(",") if op.strip())


def _exists(path: str | None) -> bool:
    return bool(path) and Path(path).exists()
