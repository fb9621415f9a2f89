"""``trtq compare REFERENCE CANDIDATE --data DATA``: how far a candidate strays; CI gates."""

from __future__ import annotations

import argparse

from trtq import api
from trtq.cli import flagtypes
from trtq.cli.common import add_command, add_data_arguments, image_preprocess, print_json
from trtq.errors import GateFailedError
from trtq.report.compare import DEFAULT_LABELS_KEY, format_report

EPILOG = """\
examples:
  trtq compare calib_data/mnist_cnn.onnx model.trtq.onnx --data calib_data/mnist_test.npz
  trtq compare model.onnx model.trtq.onnx --data test.npz --labels test_labels.npy \\
      --min-cosine 0.999 --max-rel-l2 0.1 --max-drop 0.5 --json

Metrics per output (outputs are matched by name): mean and min per-sample cosine
similarity, relative L2 error ||cand - ref|| / ||ref||, max and mean abs error, and
top-1 agreement (argmax over the last axis; n/a for outputs of rank 1 or one class).
Both models run in ONNX Runtime with basic graph optimizations only, so Q/DQ nodes
are executed as fake quantization, as TensorRT's INT8 arithmetic computes them.
Exit status: 0 all gates passed, 2 bad input, 3 a gate failed."""


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "compare",
        run,
        help="measure a candidate model against a reference on data",
        description="Run two ONNX models (e.g. the FP32 original and its quantized copy) on "
        "the same data, batch by batch, and report how closely the candidate's outputs "
        "follow the reference's, and the accuracy of both when labels are known. "
        "--min-cosine, --max-rel-l2 and --max-drop turn the report into a CI gate.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument("reference", help="reference ONNX model (e.g. FP32)")
    parser.add_argument("candidate", help="candidate ONNX model (e.g. quantized)")
    parser.add_argument("--data", required=True, help="evaluation data (as for calibrate)")
    parser.add_argument(
        "--labels",
        metavar="PATH[:KEY]",
        help="integer labels, one per sample in data order: a .npy file or an .npz array "
        f"(KEY default '{DEFAULT_LABELS_KEY}'); default: the '{DEFAULT_LABELS_KEY}' array "
        "of an .npz DATA file, if it has one",
    )
    parser.add_argument(
        "--label-output", metavar="NAME", help="output scored against the labels (default: first)"
    )
    parser.add_argument(
        "--min-cosine",
        type=flagtypes.cosine,
        metavar="X",
        help="fail (exit 3) if any output's mean cosine similarity is below X",
    )
    parser.add_argument(
        "--max-rel-l2",
        type=flagtypes.relative_error,
        metavar="E",
        help="fail (exit 3) if any output's relative L2 error ||cand - ref|| / ||ref|| is above "
        "E (catches scale errors, to which cosine is blind)",
    )
    parser.add_argument(
        "--max-drop",
        type=flagtypes.accuracy_points,
        metavar="PTS",
        help="fail (exit 3) if accuracy drops by more than PTS percentage points (needs labels)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    parser.add_argument(
        "--providers",
        type=flagtypes.providers,
        help="ONNX Runtime providers, comma-separated (e.g. cuda,cpu); default cpu",
    )
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        comparison = api.compare(
            args.reference,
            args.candidate,
            args.data,
            labels=args.labels,
            label_output=args.label_output,
            batch_size=args.batch_size,
            limit=args.limit,
            preprocess=image_preprocess(args),
            providers=args.providers.split(",") if args.providers else None,
            min_cosine=args.min_cosine,
            max_rel_l2=args.max_rel_l2,
            max_drop=args.max_drop,
        )
    except GateFailedError as exc:
        _show(args, exc.result)  # the figures first; the CLI then exits 3 with the gate's line
        raise
    _show(args, comparison)
    return 0


def _show(args: argparse.Namespace, comparison: api.Comparison) -> None:
    if args.json:
        print_json(comparison.to_json())
        return
    context = {
        "reference": comparison.reference,
        "candidate": comparison.candidate,
        "data": comparison.data,
        **({"labels": comparison.labels} if comparison.labels else {}),
    }
    print(format_report(comparison.report, comparison.gates, context))
