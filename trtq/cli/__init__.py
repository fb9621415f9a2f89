"""The ``trtq`` command: one module per subcommand, registered in :data:`COMMANDS`.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args) -> int``.
This module owns what they share: logging flags, and turning exceptions into
one-line messages with exit codes scripts can rely on (see :mod:`trtq.errors`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trtq import __version__
from trtq.cli import (
    bench_cmd,
    build_cmd,
    calibrate_cmd,
    compare_cmd,
    inspect_cmd,
    normalize_cmd,
    quantize_cmd,
    run_cmd,
)
from trtq.errors import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, UserError

#: In the order of the pipeline, as `trtq --help` lists them.
COMMANDS = (
    inspect_cmd,
    normalize_cmd,
    calibrate_cmd,
    quantize_cmd,
    compare_cmd,
    build_cmd,
    run_cmd,
    bench_cmd,
)

log = logging.getLogger("trtq")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trtq",
        description="Deployment compiler for NVIDIA TensorRT: quantize, calibrate, build, run.",
    )
    parser.add_argument("--version", action="version", version=f"trtq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-v debug)")
    group.add_argument(
        "-q", "--quiet", action="count", default=0, help="less detail (-q warnings, -qq errors)"
    )
    group.add_argument(
        "--debug", action="store_true", help="show the full traceback when something fails"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers, parents=[common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose - args.quiet)
    try:
        _check_output_folders(args)
        return int(args.run(args) or 0)
    except UserError as exc:
        if args.debug:
            log.exception("traceback")
        print(f"trtq: error: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("trtq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            log.exception("traceback")
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"trtq: internal error: {type(exc).__name__}: {detail} "
            "(this is a bug in trtq: rerun with --debug and report the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


#: Flags naming files a command writes (or reads and then writes): their folder must exist.
_OUTPUT_FLAGS = (
    "output",
    "report",
    "cache",
    "stats",
    "save_outputs",
    "export_loader",
    "timing_cache",
)


def _check_output_folders(args: argparse.Namespace) -> None:
    """Fail before a long calibration, not after it, when an output cannot be written."""
    for flag in _OUTPUT_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, str | Path) and value:
            folder = Path(value).parent
            if str(folder) and not folder.is_dir():
                option = "-o/--output" if flag == "output" else f"--{flag.replace('_', '-')}"
                raise UserError(f"{option}: folder {folder} does not exist", "create it first")


def _configure_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        verbosity, logging.DEBUG if verbosity > 0 else logging.ERROR
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("trtq: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
