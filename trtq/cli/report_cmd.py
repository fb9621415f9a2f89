"""``trtq report REPORT.json -o report.html``: the HTML page for a quantize report written
earlier (``trtq quantize --html`` writes it in the same run)."""

from __future__ import annotations

import argparse
import logging

from trtq.cli.common import add_command
from trtq.report import html

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  trtq report out/mnist_cnn.int8.json -o out/mnist_cnn.int8.html
  trtq report report.json --stats stats.json --compare compare.json -o report.html
  trtq report report.json --sensitivity sensitivity.json -o report.html

The page holds everything it shows (no network, no fonts or scripts fetched): the summary
(coverage by MACs and by op type, gates), each quantized tensor's |x| histogram with the
thresholds of max, percentile, mse and entropy and the chosen one, the nodes left in float
by reason, FP16/BF16 islands, the harm per node (--sensitivity, or the ranking of a
quantize --target-* search) and the search's steps, and FP32 against the quantized model
per output.

The histograms come from the stats file: --stats, else the one the report names (quantize
--stats FILE records it). --compare takes the output of `trtq compare ... --json`."""


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "report",
        run,
        help="write the HTML page of a quantize report",
        description="Render a trtq quantize report (JSON) as one self-contained HTML page that "
        "opens offline: calibration histograms with every method's threshold, coverage, float "
        "nodes and their reasons, and FP32 against the quantized model.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument(
        "report_json", metavar="REPORT", help="report written by trtq quantize --report"
    )
    parser.add_argument("-o", "--output", required=True, help="HTML page to write")
    parser.add_argument(
        "--stats", help="stats file with the histograms (default: the one the report names)"
    )
    parser.add_argument(
        "--compare", help="output of trtq compare --json: FP32 against the quantized model"
    )
    parser.add_argument(
        "--sensitivity", help="output of trtq sensitivity --report: the harm of each node"
    )


def run(args: argparse.Namespace) -> int:
    report = html.read_report(args.report_json)
    stats, missing = html.stats_for(report, args.report_json, args.stats)
    if missing:
        log.warning("no histograms in the page: %s", missing)
    comparisons = [html.read_comparison(args.compare)] if args.compare else []
    sensitivity = html.read_sensitivity(args.sensitivity) if args.sensitivity else None
    html.write(args.output, report, stats, comparisons, sensitivity=sensitivity, stats_note=missing)
    print(f"wrote {args.output}")
    return 0
