"""``trtq sensitivity MODEL --calib DATA``: which nodes INT8 hurts, measured at the outputs."""

from __future__ import annotations

import argparse
import json

from trtq import api
from trtq.calib.ranges import DEFAULT_METHOD, METHODS
from trtq.cli import flagtypes
from trtq.cli.common import (
    add_calibration_run_arguments,
    add_command,
    add_data_arguments,
    add_evaluation_arguments,
    add_freeze_argument,
    add_placement_arguments,
    add_ray_argument,
    image_preprocess,
    parse_frozen,
    placement_arguments,
    print_json,
)
from trtq.fileio import write_text
from trtq.graph import qdq
from trtq.tune.sensitivity import format_table

EPILOG = """\
examples:
  trtq sensitivity calib_data/mnist_cnn.onnx --calib calib_data/mnist_calib.npz
  trtq sensitivity model.onnx --calib calib.npz --eval test.npz --workers 2 --json

Ranges are calibrated once (on --calib, less the held-out batches unless --eval is given).
Then, per quantized node, two models are built and run on the evaluation samples: with
only that node quantized ("alone": the harm it does by itself), and with every node but
that one ("all but": what moving it to high precision gains; where the two disagree, the
node interacts with the others). Cosine and relative L2 against FP32, per output in
--json, the worst output in the table. 2N + 1 models for N nodes, shared by --workers."""


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "sensitivity",
        run,
        help="per node, the output error INT8 causes there (alone, and with the others)",
        description="Measure what quantizing each node costs at the model's outputs, against "
        "FP32, on data that did not set the ranges: with only that node quantized, and with "
        "every node but that one. A table sorted by harm, next to each node's MACs.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument("model", help="FP32 ONNX model")
    parser.add_argument("--calib", required=True, help="calibration data (as for quantize)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="range algorithm")
    parser.add_argument(
        "--percentile",
        type=flagtypes.percentile,
        default=99.99,
        help="percentile for --method percentile",
    )
    parser.add_argument("--precision", choices=qdq.PRECISIONS, default="int8", help="Q/DQ type")
    parser.add_argument(
        "--high-precision",
        choices=api.HIGH_PRECISIONS,
        default="fp32",
        help="the type of everything not quantized",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--report", help="write the figures (JSON) here")
    add_evaluation_arguments(parser.add_argument_group("evaluation"))
    add_placement_arguments(parser)
    calib = parser.add_argument_group("calibration")
    add_calibration_run_arguments(calib)
    add_ray_argument(parser)
    add_freeze_argument(parser)
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    found = api.sensitivity(
        args.model,
        args.calib,
        eval_data=args.eval,
        eval_samples=args.eval_samples,
        workers=args.workers,
        precision=args.precision,
        high_precision=args.high_precision,
        method=args.method,
        percentile=args.percentile,
        **placement_arguments(args),
        freeze_inputs=parse_frozen(args.freeze_input),
        batch_size=args.batch_size,
        limit=args.limit,
        preprocess=image_preprocess(args),
        max_memory=args.max_memory,
        providers=args.providers.split(",") if args.providers else None,
        progress=not args.no_progress,
        ray=args.ray,
    )
    payload = {"model": args.model, **found.to_json()}
    if args.report:
        write_text(args.report, json.dumps(payload, indent=2) + "\n")
    if args.json:
        print_json(payload)
    else:
        print(format_table(found))
    return 0
