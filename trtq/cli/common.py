"""What the subcommands share: one-line parse errors, help formatting, argument helpers."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import NoReturn

from trtq.cli import flagtypes
from trtq.errors import EXIT_USER_ERROR


class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line as one line and exit status 2, without the usage block.

    ``trtq calibrate: error: argument --shard: bad shard '3/2': K must be from 1 to N.
    write e.g. --shard 2/4.`` (one line): the flag types of :mod:`trtq.cli.flagtypes` end
    their messages with the fix; argparse's own messages (unknown flag, invalid choice,
    missing argument) get a pointer to ``--help`` instead. Subcommand parsers are of this
    class too (``add_subparsers(parser_class=...)``).
    """

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        if not line.endswith("."):
            line += f"; see `{self.prog} --help`"
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {line}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default and keeps the line breaks of descriptions and epilogs."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def add_command(subparsers, name: str, run, *, help: str, description: str, parents, epilog=None):
    """Register a subcommand whose handler is ``run(args) -> int``."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        parents=parents,
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(run=run)
    return parser


def print_json(payload: dict) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that shape calibration or evaluation data: batch size, limit, image preprocessing."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--batch-size",
        type=flagtypes.count,
        help="samples per batch (default: the model's fixed batch dim, else 8)",
    )
    group.add_argument("--limit", type=flagtypes.count, help="use at most this many samples")
    images = parser.add_argument_group("image folders")
    images.add_argument(
        "--resize",
        type=flagtypes.image_option("--resize"),
        metavar="HxW",
        help="resize images to HEIGHTxWIDTH (default: model's fixed dims)",
    )
    images.add_argument(
        "--mean",
        type=flagtypes.image_option("--mean"),
        help="per-channel mean after --scale, e.g. 0.485,0.456,0.406 (default: 0)",
    )
    images.add_argument(
        "--std",
        type=flagtypes.image_option("--std"),
        help="per-channel std, e.g. 0.229,0.224,0.225 (default: 1)",
    )
    images.add_argument(
        "--scale",
        type=flagtypes.image_option("--scale"),
        help="pixel multiplier applied first (default: 1/255)",
    )
    images.add_argument(
        "--layout", choices=("NCHW", "NHWC"), help="default: from the model input shape"
    )
    images.add_argument(
        "--color", choices=("RGB", "BGR", "GRAY"), help="default: GRAY for 1 channel, else RGB"
    )


def image_preprocess(args: argparse.Namespace):
    """The ImagePreprocess the image flags of :func:`add_data_arguments` describe (or None)."""
    from trtq.calib.data import ImagePreprocess

    return ImagePreprocess.parse(
        resize=args.resize,
        mean=args.mean,
        std=args.std,
        scale=args.scale,
        layout=args.layout,
        color=args.color,
    )


def open_data(args: argparse.Namespace, source: str, inputs):
    """Open ``source`` as batches for ``inputs`` with the flags of :func:`add_data_arguments`."""
    from trtq.calib.data import open_batches

    return open_batches(
        source,
        inputs,
        batch_size=args.batch_size,
        limit=args.limit,
        preprocess=image_preprocess(args),
    )


def add_export_loader_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--export-loader",
        metavar="LOADER.py",
        help="also write a polygraphy data loader script yielding the same batches "
        "(polygraphy run ... --data-loader-script LOADER.py)",
    )


def export_loader(args: argparse.Namespace, source: str | None, inputs, purpose: str) -> None:
    """``--export-loader``: a polygraphy loader for the data the other flags describe."""
    if not args.export_loader:
        return
    if not source:
        from trtq.errors import UserError

        raise UserError("--export-loader needs data to export", "pass --calib DATA")
    from trtq.polygraphy import write_loader_script

    write_loader_script(
        args.export_loader,
        source,
        inputs,
        args.batch_size,
        limit=args.limit,
        preprocess=image_preprocess(args),
        purpose=purpose,
    )


def add_calibration_run_arguments(group) -> None:
    """How calibration runs (not what it computes): memory bound, providers, progress bar."""
    group.add_argument(
        "--max-memory",
        type=flagtypes.memory_size,
        help="bound on one batch's observed activations (e.g. 2G); over it, tensors are "
        "observed in groups, one pass over the data per group",
    )
    group.add_argument(
        "--providers",
        type=flagtypes.providers,
        help="ONNX Runtime providers, comma-separated (e.g. cuda,cpu); default cpu",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_ray_argument(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``: calibrate on a Ray cluster (trtq calibrate, trtq quantize)."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const=True,
        type=flagtypes.ray_address,
        metavar="ADDRESS",
        help="calibrate (and evaluate nodes, for sensitivity and --target-*) on a Ray cluster, "
        "with the same results as here: ADDRESS as Ray takes it (auto, ray://HOST:10001, "
        "HOST:6379), or none to start a local instance; workers read --calib from the same "
        "path (pip install 'trtq[ray]'; README: 'Running on a Ray cluster')",
    )


def add_freeze_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--freeze-input",
        type=flagtypes.frozen_input,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="replace an input by a constant (e.g. sr=16000): control flow that only chose "
        "among settings is then inlined, and its compute can be quantized; repeatable",
    )


def parse_frozen(items: list[str]) -> dict:
    """``["sr=16000", "mask=1,1,0"]`` -> ``{"sr": array(16000), "mask": array([1, 1, 0])}``."""
    import numpy as np

    from trtq.errors import UserError

    frozen = {}
    for item in items:
        name, _, text = item.partition("=")
        name = name.strip()
        try:
            values = [float(v) if any(c in v for c in ".eE") else int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not name or not values or not all(math.isfinite(v) for v in values):
            raise UserError(
                f"{item!r} is not NAME=VALUE with finite numbers",
                "write e.g. --freeze-input sr=16000 or --freeze-input mask=1,1,0",
            )
        if name in frozen:
            raise UserError(
                f"input '{name}' is frozen twice", "give each name to --freeze-input once"
            )
        frozen[name] = np.array(values[0] if len(values) == 1 else values)
    return frozen


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """The Q/DQ placement flags, one definition for ``trtq quantize`` and ``trtq calibrate``.

    A stats file is made for one placement: calibrate takes the same flags as quantize so
    that it observes the tensors quantize will ask for (and records them).
    """
    from trtq.graph.patterns import COMPUTE_OPS
    from trtq.graph.qdq import DEFAULT_MIN_CHANNELS

    group = parser.add_argument_group("placement (the same in trtq calibrate and trtq quantize)")
    group.add_argument(
        "--include-ops",
        type=flagtypes.op_types(COMPUTE_OPS),
        default=",".join(sorted(COMPUTE_OPS)),
        help="compute ops to quantize, comma-separated",
    )
    group.add_argument(
        "--exclude-ops",
        type=flagtypes.op_types(),
        default="",
        help="ops to keep in float, comma-separated",
    )
    group.add_argument(
        "--exclude-nodes",
        type=flagtypes.regex,
        help="regular expression: matching nodes stay float",
    )
    group.add_argument(
        "--min-channels",
        type=flagtypes.integer(0),
        default=DEFAULT_MIN_CHANNELS,
        help="ops with fewer channels stay float (INT8 does not pay there)",
    )


def placement_arguments(args: argparse.Namespace) -> dict:
    """The placement flags as keywords of ``trtq.quantize`` and ``trtq.calibrate``."""
    return {
        "include_ops": args.include_ops,
        "exclude_ops": args.exclude_ops,
        "exclude_nodes": args.exclude_nodes,
        "min_channels": args.min_channels,
    }


def add_evaluation_arguments(group: argparse._ArgumentGroup) -> None:
    """The data nodes are judged on, one definition for ``trtq sensitivity`` and
    ``trtq quantize --target-*``, and the processes that share the evaluations."""
    from trtq.tune.holdout import DEFAULT_EVAL_SAMPLES

    group.add_argument(
        "--eval",
        metavar="DATA",
        help="evaluation data (default: batches held out of --calib, spread over it; they "
        "never set a range)",
    )
    group.add_argument(
        "--eval-samples",
        type=flagtypes.count,
        default=DEFAULT_EVAL_SAMPLES,
        metavar="N",
        help="samples each candidate model is measured on",
    )
    group.add_argument(
        "--workers",
        type=flagtypes.count,
        default=1,
        metavar="N",
        help="worker processes evaluating candidate models side by side",
    )
