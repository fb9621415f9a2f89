"""``trtq calibrate``: activation ranges from data, as a stats JSON and a TensorRT cache.

A thin shell over :func:`trtq.calibrate` (and :func:`trtq.calib.calibrate.merge_files`
for ``--merge``): the flags are those of ``trtq quantize`` where they mean the same.
"""

from __future__ import annotations

import argparse
import logging

from trtq import api
from trtq.calib.cache import DEFAULT_TRT_VERSION, CalibrationStats
from trtq.calib.calibrate import data_inputs, merge_files, trt_cache
from trtq.calib.histogram import DEFAULT_BINS
from trtq.calib.ranges import DEFAULT_METHOD, METHODS
from trtq.calib.scope import TENSOR_SETS
from trtq.cli import flagtypes
from trtq.cli.common import (
    add_calibration_run_arguments,
    add_command,
    add_data_arguments,
    add_export_loader_argument,
    add_freeze_argument,
    add_placement_arguments,
    add_ray_argument,
    export_loader,
    image_preprocess,
    parse_frozen,
    placement_arguments,
)
from trtq.errors import UserError
from trtq.graph import qdq
from trtq.graph.load import load_model

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  trtq calibrate calib_data/mnist_cnn.onnx --calib calib_data/mnist_calib.npz -o stats.json
  trtq quantize calib_data/mnist_cnn.onnx --stats stats.json -o mnist.int8.onnx
  trtq calibrate model.onnx --calib images/ --resize 224x224 --mean 0.485,0.456,0.406 \\
      --std 0.229,0.224,0.225 -o stats.json --cache model.cache
  # sharded: run each shard anywhere, then merge (--tensors all: the merge can write a cache)
  trtq calibrate model.onnx --calib data/ --shard 1/2 --tensors all -o part1.json
  trtq calibrate model.onnx --calib data/ --shard 2/2 --tensors all -o part2.json
  trtq calibrate --merge part1.json part2.json -o stats.json --cache model.cache

The stats record the model and the placement flags they were made for; trtq quantize --stats
refuses them for another model or other placement flags. The cache holds a scale for every
float tensor of the model as given (what TensorRT's implicit INT8 asks for), and its header
names the method: EntropyCalibration2 (entropy), MinMaxCalibration (max), or trtq's own
TrtqMseCalibration, TrtqPercentileCalibration or TrtqMixedCalibration (ranges of several
methods: entropy falls back to mse on spiky tensors), which trtq build --calib-mode trt
refuses (TensorRT has no such calibrator); trtq's graph mode reads them all."""


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "calibrate",
        run,
        help="compute activation ranges from calibration data",
        description="Run the FP32 model with ONNX Runtime on calibration data, stream the "
        "activations trtq quantize will quantize (with the same placement flags) into "
        "histograms (memory does not grow with the data), and pick a range per tensor.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument("model", nargs="?", help="FP32 ONNX model (not needed with --merge)")
    parser.add_argument("--calib", help="calibration data (see the README's data formats)")
    parser.add_argument("-o", "--output", required=True, help="stats JSON to write")
    parser.add_argument(
        "--method",
        choices=METHODS,
        help=f"range algorithm; None: {DEFAULT_METHOD}, or with --merge the shards' method",
    )
    parser.add_argument(
        "--percentile",
        type=flagtypes.percentile,
        help="percentile for --method percentile; None: 99.99, or with --merge the shards'",
    )
    parser.add_argument(
        "--precision",
        choices=qdq.PRECISIONS,
        default="int8",
        help="the precision trtq quantize --precision will use (it decides the placement)",
    )
    parser.add_argument(
        "--cache",
        help="also write a complete TensorRT calibration cache here (for trtq build "
        "--calib-mode trt)",
    )
    parser.add_argument(
        "--trt-version",
        type=flagtypes.trt_version,
        default=DEFAULT_TRT_VERSION,
        help="TensorRT version written in the cache header (TensorRT ignores other versions)",
    )
    parser.add_argument(
        "--tensors",
        choices=TENSOR_SETS,
        help="quantizable: the tensors trtq quantize asks for; all: also every float tensor "
        "(of the normalised graph and of the model as given, as TensorRT's implicit INT8 and "
        "FP16 decisions need); default: all with --cache, else quantizable",
    )
    parser.add_argument(
        "--bins", type=flagtypes.histogram_bins, default=DEFAULT_BINS, help="histogram bins"
    )
    add_calibration_run_arguments(parser)
    parser.add_argument("--shard", type=flagtypes.shard, help="calibrate only shard K of N: K/N")
    parser.add_argument("--merge", nargs="+", metavar="STATS", help="merge shard stats files")
    add_ray_argument(parser)
    add_placement_arguments(parser)
    add_freeze_argument(parser)
    add_data_arguments(parser)
    add_export_loader_argument(parser)


def run(args: argparse.Namespace) -> int:
    stats = _merge(args) if args.merge else _calibrate(args)
    log.info(
        "wrote %s: %d tensors, %d samples%s",
        args.output,
        len(stats.histograms),
        stats.num_samples,
        f", shard {stats.shard}"
        if stats.shard or stats.scope is None
        else f", method {stats.scope.method}",
    )
    return 0


def _calibrate(args: argparse.Namespace) -> CalibrationStats:
    if not args.model or not args.calib:
        raise UserError("calibrate needs MODEL and --calib DATA", "or --merge STATS...")
    frozen = parse_frozen(args.freeze_input)
    if args.export_loader:
        inputs = data_inputs(load_model(args.model, load_external_data=False), frozen)
        export_loader(args, args.calib, inputs, "calibrated on")
    return api.calibrate(
        args.model,
        args.calib,
        output=args.output,
        cache=args.cache,
        method=args.method or DEFAULT_METHOD,
        percentile=99.99 if args.percentile is None else args.percentile,
        precision=args.precision,
        **placement_arguments(args),
        tensors=args.tensors,
        freeze_inputs=frozen,
        shard=args.shard,
        bins=args.bins,
        batch_size=args.batch_size,
        limit=args.limit,
        preprocess=image_preprocess(args),
        max_memory=args.max_memory,
        providers=args.providers.split(",") if args.providers else None,
        trt_version=args.trt_version,
        progress=not args.no_progress,
        ray=args.ray,
    )


def _merge(args: argparse.Namespace) -> CalibrationStats:
    if args.model or args.calib or args.shard or args.ray:
        raise UserError("--merge takes only stats files", "drop MODEL, --calib, --shard and --ray")
    if args.export_loader:  # polygraphy interop: a merge reads no data to export
        raise UserError("--export-loader needs --calib DATA", "pass it when calibrating")
    stats = merge_files(args.merge, method=args.method, percentile=args.percentile)
    cache = trt_cache(stats, trt_version=args.trt_version) if args.cache else None
    stats.write(args.output)
    if cache is not None:
        cache.write(args.cache)
    return stats
