"""``trtq compare REFERENCE CANDIDATE --data DATA``: how far a candidate strays; CI gates."""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from trtq.cli.common import add_command, add_data_arguments, open_data, print_json
from trtq.errors import EXIT_GATE_FAILED, UserError
from trtq.graph.load import TensorSpec, load_model, model_inputs
from trtq.report.compare import (
    DEFAULT_LABELS_KEY,
    compare_models,
    evaluate_gates,
    format_report,
    labels_in_data,
    load_labels,
)

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  trtq compare calib_data/mnist_cnn.onnx model.trtq.onnx --data calib_data/mnist_test.npz
  trtq compare model.onnx model.trtq.onnx --data test.npz --labels test_labels.npy \\
      --min-cosine 0.999 --max-drop 0.5 --json

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
        "--min-cosine and --max-drop turn the report into a CI gate.",
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
        type=float,
        metavar="X",
        help="fail (exit 3) if any output's mean cosine similarity is below X",
    )
    parser.add_argument(
        "--max-drop",
        type=float,
        metavar="PTS",
        help="fail (exit 3) if accuracy drops by more than PTS percentage points (needs labels)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    parser.add_argument(
        "--providers", help="ONNX Runtime providers, comma-separated (e.g. cuda,cpu); default cpu"
    )
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    reference = load_model(args.reference, load_external_data=False)
    # Read now so that a missing or non-ONNX candidate is reported before any work.
    load_model(args.candidate, load_external_data=False)
    inputs = model_inputs(reference)
    batches = open_data(args, args.data, inputs)
    labels, labels_from = _labels(args, inputs)
    if args.max_drop is not None and labels is None:
        raise UserError(
            "--max-drop needs labels",
            f"pass --labels PATH[:KEY], or data in an .npz with a '{DEFAULT_LABELS_KEY}' array",
        )
    report = compare_models(
        args.reference,
        args.candidate,
        batches,
        labels,
        label_output=args.label_output,
        providers=args.providers.split(",") if args.providers else None,
    )
    gates = evaluate_gates(report, min_cosine=args.min_cosine, max_drop=args.max_drop)
    context = {
        "reference": args.reference,
        "candidate": args.candidate,
        "data": batches.description,
        **({"labels": labels_from} if labels_from else {}),
    }
    if args.json:
        passed = all(gate.passed for gate in gates)
        gates_json = [gate.to_json() for gate in gates]
        print_json({**context, **report.to_json(), "gates": gates_json, "passed": passed})
    else:
        print(format_report(report, gates, context))
    failed = [gate.detail for gate in gates if not gate.passed]
    if failed:
        print(f"trtq: gate failed: {'; '.join(failed)}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0


def _labels(args: argparse.Namespace, inputs: list[TensorSpec]) -> tuple[np.ndarray | None, str]:
    """The labels to score against (first --limit of them), and where they came from."""
    if args.labels:
        path, key = _split_labels_arg(args.labels)
        labels, source = load_labels(path, key), args.labels
    elif DEFAULT_LABELS_KEY in {spec.name for spec in inputs}:
        return None, ""  # the data's 'labels' array is a model input, not the answers
    else:
        labels = labels_in_data(args.data)
        if labels is None:
            return None, ""
        source = f"{args.data}:{DEFAULT_LABELS_KEY}"
        log.info("using the labels in %s (pass --labels to use others)", source)
    return (labels[: args.limit] if args.limit else labels), source


def _split_labels_arg(text: str) -> tuple[str, str]:
    """``PATH[:KEY]`` -> (path, key); only an .npz path takes a key, so other colons stay."""
    path, sep, key = text.rpartition(":")
    if sep and path.lower().endswith(".npz") and key:
        return path, key
    return text, DEFAULT_LABELS_KEY
