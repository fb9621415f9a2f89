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
