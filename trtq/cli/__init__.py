"""The ``trtq`` command: one module per subcommand, registered in :data:`COMMANDS`.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args) -> int``.
This module owns what they share: logging flags, and turning exceptions into
one-line messages with exit codes scripts can rely on (see :mod:`trtq.errors`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from trtq import __version__
from trtq.cli import (
    bench_cmd,
    build_cmd,
    calibrate_cmd,
    compare_cmd,
    doctor_cmd,
    inspect_cmd,
    normalize_cmd,
    quantize_cmd,
    report_cmd,
    run_cmd,
    sensitivity_cmd,
)
from trtq.cli.common import ArgumentParser
from trtq.errors import (
    EXIT_GATE_FAILED,
    EXIT_INTERNAL_ERROR,
    EXIT_USER_ERROR,
    GateFailedError,
    UserError,
)
from trtq.fileio import ignore_file_size_signal
from trtq.outputs import NamedPath, Role, check_command_paths

#: In the order of the pipeline, as `trtq --help` lists them.
COMMANDS = (
    inspect_cmd,
    normalize_cmd,
    calibrate_cmd,
    quantize_cmd,
    sensitivity_cmd,
    report_cmd,
    compare_cmd,
    build_cmd,
    run_cmd,
    bench_cmd,
    doctor_cmd,
)

log = logging.getLogger("trtq")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
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
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser
    )
    for command in COMMANDS:
        command.add_parser(subparsers, parents=[common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose - args.quiet)
    ignore_file_size_signal()
    try:
        _check_paths(args)
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a reader gone from the pipe is this run's error, not a warning at exit
        return code
    except UserError as exc:
        if args.debug:
            log.exception("traceback")
        print(f"trtq: error: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except GateFailedError as exc:
        print(f"trtq: gate failed: {exc}", file=sys.stderr)
        return EXIT_GATE_FAILED
    except KeyboardInterrupt:
        print("trtq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        print(
            "trtq: error: the pipe trtq was writing to was closed by its reader. "
            "Keep the reader running to the end, or write to a file.",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
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
    finally:
        _detach_closed_stdout()


#: The flags naming files, by what commands do with them; trtq/outputs.py holds the rules.
_PATH_FLAGS = {
    "model": Role.INPUT,
    "reference": Role.INPUT,
    "candidate": Role.INPUT,
    "calib": Role.INPUT,
    "data": Role.INPUT,
    "eval": Role.INPUT,
    "merge": Role.INPUT,
    "plugins": Role.INPUT,
    "report_json": Role.INPUT,
    "compare": Role.INPUT,
    "sensitivity": Role.INPUT,
    "output": Role.OUTPUT,
    "report": Role.OUTPUT,
    "html": Role.OUTPUT,
    "save_outputs": Role.OUTPUT,
    "export_loader": Role.OUTPUT,
    "cache": Role.READ_OR_WRITE,
    "stats": Role.READ_OR_WRITE,
    "timing_cache": Role.READ_OR_WRITE,
}
#: Where a command departs from the table: an engine has its sidecar named after it, and
#: `trtq calibrate` only writes its --cache, `trtq report` only reads its --stats.
_COMMAND_ROLES = {
    ("build", "output"): Role.FILE_OUTPUT,
    ("calibrate", "cache"): Role.OUTPUT,
    ("report", "stats"): Role.INPUT,
}
_POSITIONAL_NAMES = {
    "model": "the model",
    "reference": "the reference model",
    "candidate": "the candidate model",
    "report_json": "the report",
}


def _check_paths(args: argparse.Namespace) -> None:
    """Fail before a long calibration, not after it, when an output cannot or must not be
    written: each writable, none an input, no two the same file (see trtq/outputs.py)."""
    paths = []
    for flag, role in _PATH_FLAGS.items():
        value = getattr(args, flag, None)
        role = _COMMAND_ROLES.get((args.command, flag), role)
        option = _POSITIONAL_NAMES.get(flag) or (
            "-o/--output" if flag == "output" else f"--{flag.replace('_', '-')}"
        )
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str | Path) and str(path):
                paths.append(NamedPath(option, path, role))
        if role is Role.FILE_OUTPUT and value:
            from trtq.trt.sidecar import sidecar_path

            paths.append(NamedPath(f"the sidecar of {option}", sidecar_path(value), role))
    check_command_paths(paths)


def _detach_closed_stdout() -> None:
    """Point stdout at /dev/null if its reader is gone, so that Python's final flush at exit
    does not print a second complaint after trtq's one line."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _configure_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        verbosity, logging.DEBUG if verbosity > 0 else logging.ERROR
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("trtq: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
