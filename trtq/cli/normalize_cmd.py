"""``trtq normalize MODEL -o OUT``: the graph trtq quantizes, written out for inspection."""

from __future__ import annotations

import argparse
import logging

from trtq.cli.common import add_command, add_freeze_argument, parse_frozen
from trtq.fileio import save_model
from trtq.graph.inspect import summarize
from trtq.graph.load import check_model, load_model
from trtq.graph.normalize import normalize

log = logging.getLogger(__name__)


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "normalize",
        run,
        help="normalise a model the way trtq does before quantizing",
        description="Upgrade the opset to >= 13, turn Constant-node weights into initializers, "
        "drop Identity nodes, fold constant subgraphs and BatchNormalization into Conv, and "
        "run shape inference. The result computes the same function as the input.",
        epilog="example:\n  trtq normalize model.onnx -o model.normalized.onnx",
        parents=parents,
    )
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("-o", "--output", required=True, help="where to write the result")
    add_freeze_argument(parser)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    check_model(model)
    before = summarize(model)
    normalized = normalize(model, frozen=parse_frozen(args.freeze_input))
    check_model(normalized)
    save_model(normalized, args.output)
    after = summarize(normalized)
    log.info(
        "%s: opset %d -> %d, %d -> %d nodes; wrote %s",
        args.model,
        before.opset,
        after.opset,
        before.num_nodes,
        after.num_nodes,
        args.output,
    )
    return 0
