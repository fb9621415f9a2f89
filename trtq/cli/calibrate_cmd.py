"""``trtq calibrate``: activation ranges from data, as a stats JSON and a TensorRT cache."""

from __future__ import annotations

import argparse
import logging

from trtq.calib.cache import DEFAULT_TRT_VERSION, CalibrationStats, TrtCache, merge_stats
from trtq.calib.calibrate import calibrate, choose_ranges
from trtq.calib.collect import Shard, parse_memory
from trtq.calib.histogram import DEFAULT_BINS
from trtq.calib.ranges import DEFAULT_METHOD, METHODS
from trtq.cli.common import (
    add_command,
    add_data_arguments,
    add_export_loader_argument,
    add_freeze_argument,
    export_loader,
    open_data,
    parse_frozen,
)
from trtq.errors import UserError
from trtq.graph.load import check_model, load_model, model_inputs
from trtq.graph.normalize import normalize
from trtq.graph.patterns import compute_op_inputs, float_activations

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  trtq calibrate calib_data/mnist_cnn.onnx --calib calib_data/mnist_calib.npz -o stats.json
  trtq calibrate model.onnx --calib images/ --resize 224x224 --mean 0.485,0.456,0.406 \\
      --std 0.229,0.224,0.225 -o stats.json --cache model.cache
  # sharded: run each shard anywhere, then merge
  trtq calibrate model.onnx --calib data/ --shard 1/2 -o part1.json
  trtq calibrate model.onnx --calib data/ --shard 2/2 -o part2.json
  trtq calibrate --merge part1.json part2.json -o stats.json --cache model.cache"""


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "calibrate",
        run,
        help="compute activation ranges from calibration data",
        description="Run the FP32 model with ONNX Runtime on calibration data, stream the "
        "activations TensorRT will quantize into histograms (memory does not grow with the "
        "data), and pick a range per tensor.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument("model", nargs="?", help="FP32 ONNX model (not needed with --merge)")
    parser.add_argument("--calib", help="calibration data (see the README's data formats)")
    parser.add_argument("-o", "--output", required=True, help="stats JSON to write")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="range algorithm")
    parser.add_argument(
        "--percentile", type=float, default=99.99, help="percentile for --method percentile"
    )
    parser.add_argument("--cache", help="also write a TensorRT calibration cache here")
    parser.add_argument(
        "--trt-version",
        default=DEFAULT_TRT_VERSION,
        help="TensorRT version written in the cache header (TensorRT ignores other versions)",
    )
    parser.add_argument(
        "--tensors",
        choices=("quantizable", "all"),
        help="tensors to observe: inputs of Conv/Gemm/MatMul, or every float activation "
        "(default: all with --cache, for TensorRT's implicit INT8 mode; else quantizable)",
    )
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS, help="histogram bins")
    parser.add_argument(
        "--max-memory",
        type=parse_memory,
        help="bound on one batch's observed activations (e.g. 2G); over it, tensors are "
        "observed in groups, one pass over the data per group",
    )
    parser.add_argument(
        "--providers", help="ONNX Runtime providers, comma-separated (e.g. cuda,cpu); default cpu"
    )
    parser.add_argument("--shard", type=Shard.parse, help="calibrate only shard K of N: K/N")
    parser.add_argument("--merge", nargs="+", metavar="STATS", help="merge shard stats files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_freeze_argument(parser)
    add_data_arguments(parser)
    add_export_loader_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.merge:
        if args.model or args.calib or args.shard:
            raise UserError("--merge takes only stats files", "drop MODEL, --calib and --shard")
        if args.export_loader:  # polygraphy interop: a merge reads no data to export
            raise UserError("--export-loader needs --calib DATA", "pass it when calibrating")
        stats = merge_stats([CalibrationStats.read(p) for p in args.merge], args.merge)
        stats.ranges = choose_ranges(stats, args.method, args.percentile)
    else:
        if not args.model or not args.calib:
            raise UserError("calibrate needs MODEL and --calib DATA", "or --merge STATS...")
        if args.cache and args.shard:
            raise UserError("a shard cannot write a cache", "merge the shards, then write it")
        model = load_model(args.model)
        check_model(model)
        model = normalize(model, frozen=parse_frozen(args.freeze_input))
        batches = open_data(args, args.calib, model_inputs(model))
        export_loader(args, args.calib, model_inputs(model), "calibrated on")
        tensors_kind = args.tensors or ("all" if args.cache else "quantizable")
        tensors = float_activations(model) if tensors_kind == "all" else compute_op_inputs(model)
        stats = calibrate(
            model,
            batches,
            tensors=tensors,
            method=args.method,
            percentile=args.percentile,
            bins=args.bins,
            max_memory=args.max_memory,
            providers=args.providers.split(",") if args.providers else None,
            shard=args.shard,
            progress=not args.no_progress,
        )
    stats.write(args.output)
    for r in stats.ranges.values():
        if not r.quantizable:
            log.warning("%s: not quantizable: %s", r.name, r.reason)
    if args.cache:
        amax = {r.name: r.amax for r in stats.ranges.values() if r.quantizable}
        TrtCache.from_amax(amax, method=args.method, trt_version=args.trt_version).write(args.cache)
        log.info("wrote TensorRT calibration cache %s (%d tensors)", args.cache, len(amax))
    log.info(
        "wrote %s: %d tensors, %d samples%s",
        args.output,
        len(stats.histograms),
        stats.num_samples,
        f", shard {stats.shard}" if stats.shard else f", method {args.method}",
    )
    return 0
