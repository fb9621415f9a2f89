"""What the subcommands share: help formatting and argument helpers."""

from __future__ import annotations

import argparse
import json
import sys


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
        type=int,
        help="samples per batch (default: the model's fixed batch dim, else 8)",
    )
    group.add_argument("--limit", type=int, help="use at most this many samples")
    images = parser.add_argument_group("image folders")
    images.add_argument(
        "--resize",
        metavar="HxW",
        help="resize images to HEIGHTxWIDTH (default: model's fixed dims)",
    )
    images.add_argument(
        "--mean", help="per-channel mean after --scale, e.g. 0.485,0.456,0.406 (default: 0)"
    )
    images.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225 (default: 1)")
    images.add_argument("--scale", help="pixel multiplier applied first (default: 1/255)")
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


def add_freeze_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--freeze-input",
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
        try:
            values = [float(v) if any(c in v for c in ".eE") else int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not name or not text or not values:
            raise UserError(f"bad --freeze-input {item!r}", "write NAME=VALUE, e.g. sr=16000")
        frozen[name.strip()] = np.array(values[0] if len(values) == 1 else values)
    return frozen
