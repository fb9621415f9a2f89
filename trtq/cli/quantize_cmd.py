"""``trtq quantize``: FP32 ONNX + calibration data -> Q/DQ ONNX that TensorRT builds as INT8/FP8."""

from __future__ import annotations

import argparse
import json
import logging

from trtq import api
from trtq.calib.range_search import QUANTIZE_METHODS
from trtq.calib.ranges import DEFAULT_METHOD
from trtq.cli import flagtypes
from trtq.cli.common import (
    add_calibration_run_arguments,
    add_command,
    add_data_arguments,
    add_evaluation_arguments,
    add_export_loader_argument,
    add_freeze_argument,
    add_placement_arguments,
    add_ray_argument,
    export_loader,
    image_preprocess,
    parse_frozen,
    placement_arguments,
    print_json,
)
from trtq.errors import GateFailedError
from trtq.fileio import write_text
from trtq.graph import fp16
from trtq.graph.load import load_model, model_inputs
from trtq.graph.smooth import DEFAULT_ALPHA as SMOOTH_ALPHA
from trtq.quantizer import (
    DEFAULT_BIAS_CORRECTION,
    DEFAULT_EQUALIZE,
    DEFAULT_SMOOTH_QUANT,
    QuantizeResult,
)
from trtq.report import html
from trtq.report.verify import (
    CHECK_MACS,
    DEFAULT_SAMPLES,
    FLOOR_MAX_REL_L2,
    FLOOR_MIN_COSINE,
    MIN_CHECK_SAMPLES,
)
from trtq.tune.fallback import Search, format_steps

log = logging.getLogger(__name__)

EPILOG = f"""\
examples:
  trtq quantize calib_data/mnist_cnn.onnx --calib calib_data/mnist_calib.npz -o mnist.int8.onnx
  trtq quantize model.onnx --calib images/ --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \\
      -o model.trtq.onnx --report report.json --cache model.cache
  trtq quantize model.onnx --stats stats.json -o model.trtq.onnx   # ranges from trtq calibrate

--cache and --stats are read when the file exists (no calibration runs) and written otherwise.

The written model is compared with the FP32 model on the first --verify-samples samples
of the --calib data (cosine, relative L2, max abs error per output). Below the default
floor (mean cosine {FLOOR_MIN_COSINE}, relative L2 {FLOOR_MAX_REL_L2}) a warning is printed.
--min-cosine / --max-rel-l2 make it a gate: exit 3 when broken (the model and report
are still written, to inspect them; the report records the figures and the data).

--target-cosine / --target-rel-l2 / --target-drop set a target instead: nodes move to
--high-precision, most harmful per MAC first, until it holds on --eval-samples samples
(of --eval, else held out of --calib), then move back to INT8 where not needed. Every
step is reported; N + 2 + 2k models are evaluated for N nodes and k moved (at most
3N + 2). Exit 3 if even every node in high precision misses the target."""


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "quantize",
        run,
        help="insert Q/DQ nodes for TensorRT explicit quantization",
        description="Normalise the model, calibrate the tensors TensorRT will quantize, and "
        "insert QuantizeLinear/DequantizeLinear pairs where TensorRT fuses them (inputs of "
        "Conv/Gemm/MatMul, per-channel weights, residual skips). The result is checked with "
        "onnx.checker and ONNX Runtime before it is written.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument("model", help="FP32 ONNX model")
    parser.add_argument("-o", "--output", required=True, help="quantized ONNX model to write")
    parser.add_argument("--calib", help="calibration data (see the README's data formats)")
    parser.add_argument(
        "--method",
        choices=QUANTIZE_METHODS,
        default=DEFAULT_METHOD,
        help="range algorithm; auto: per tensor, the method's range that gives the outputs the "
        "smallest error vs FP32 on a few calibration samples",
    )
    parser.add_argument(
        "--percentile",
        type=flagtypes.percentile,
        default=99.99,
        help="percentile for --method percentile",
    )
    parser.add_argument(
        "--precision",
        choices=api.PRECISIONS,
        default="int8",
        help="int8/fp8: Q/DQ on compute ops; fp16/bf16: the whole graph in reduced precision",
    )
    parser.add_argument(
        "--high-precision",
        choices=api.HIGH_PRECISIONS,
        default="fp32",
        help="with --precision int8/fp8: the type of everything not quantized",
    )
    parser.add_argument("--cache", help="TensorRT calibration cache: read if present, else written")
    parser.add_argument("--stats", help="trtq stats JSON: read if present, else written")
    parser.add_argument("--report", help="write the quantization report (JSON) here")
    parser.add_argument(
        "--html",
        help="write the report as an HTML page here (histograms, coverage, float nodes, "
        "fidelity; self-contained, opens offline)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    add_placement_arguments(parser)
    mixed = parser.add_argument_group("fp16/bf16")
    mixed.add_argument(
        "--keep-io-types",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the model's float inputs and outputs FP32",
    )
    mixed.add_argument(
        "--max-abs",
        type=flagtypes.number(0.0, low_open=True),
        help="nodes whose observed activations exceed this stay FP32 (default 512 for fp16, "
        "none for bf16)",
    )
    mixed.add_argument(
        "--max-reduction",
        type=flagtypes.count,
        default=fp16.DEFAULT_MAX_REDUCTION,
        help="reductions over more elements stay FP32",
    )
    mixed.add_argument(
        "--keep-fp32-nodes",
        type=flagtypes.regex,
        help="regular expression: matching nodes stay FP32",
    )
    mixed.add_argument(
        "--keep-fp32-ops",
        type=flagtypes.op_types(),
        default="",
        help="ops that stay FP32, comma-separated",
    )
    calib = parser.add_argument_group("calibration")
    add_calibration_run_arguments(calib)
    calib.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_BIAS_CORRECTION,
        help="fold each quantized layer's mean output shift, measured on 64 calibration "
        "samples, into its bias; kept only if it brings the output closer to FP32 there",
    )
    calib.add_argument(
        "--equalize",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_EQUALIZE,
        help="cross-layer equalization of Conv -> (ReLU/pooling) -> Conv chains before "
        "calibration (the FP32 function is unchanged; not with --stats/--cache)",
    )
    calib.add_argument(
        "--smooth-quant",
        nargs="?",
        const=True,
        default=DEFAULT_SMOOTH_QUANT,
        type=flagtypes.number(0.0, 1.0, low_open=True),
        metavar="ALPHA",
        help="SmoothQuant: move MatMul/Gemm input outlier channels into the weights, folded "
        f"into the LayerNorm before them (ALPHA, default {SMOOTH_ALPHA:g}: how much moves). "
        "Default: on for transformers (LayerNorm -> MatMul), for inputs with outlier channels "
        "(not with --stats/--cache); the FP32 function is unchanged",
    )
    calib.add_argument(
        "--no-smooth-quant",
        dest="smooth_quant",
        action="store_const",
        const=False,
        help="no SmoothQuant, not even where outlier channels are found",
    )
    add_ray_argument(calib)
    check = parser.add_argument_group("fidelity check (vs FP32, after writing)")
    check.add_argument(
        "--min-cosine",
        type=flagtypes.cosine,
        metavar="X",
        help="fail (exit 3) if any output's mean cosine similarity to FP32 is below X",
    )
    check.add_argument(
        "--max-rel-l2",
        type=flagtypes.relative_error,
        metavar="E",
        help="fail (exit 3) if any output's relative L2 error to FP32 is above E",
    )
    check.add_argument(
        "--verify-samples",
        type=flagtypes.count,
        default=None,
        metavar="N",
        help=f"samples of the --calib data the check runs on (unset: {DEFAULT_SAMPLES}, "
        f"fewer for heavy models: at most {CHECK_MACS:,} multiply-accumulates, at least "
        f"{MIN_CHECK_SAMPLES} samples; with a --target-*: every evaluation sample instead)",
    )
    target = parser.add_argument_group(
        "fidelity target (nodes move to --high-precision until it holds)"
    )
    target.add_argument(
        "--target-cosine",
        type=flagtypes.cosine,
        metavar="C",
        help="every output's mean cosine similarity to FP32 at least C",
    )
    target.add_argument(
        "--target-rel-l2",
        type=flagtypes.relative_error,
        metavar="E",
        help="every output's relative L2 error to FP32 at most E",
    )
    target.add_argument(
        "--target-drop",
        type=flagtypes.accuracy_points,
        metavar="PTS",
        help="top-1 accuracy on labels (of --eval) at most PTS points below FP32",
    )
    target.add_argument(
        "--labels",
        metavar="PATH[:KEY]",
        help="labels for --target-drop, as in trtq compare (default: the 'labels' array of "
        "an .npz --eval file)",
    )
    target.add_argument(
        "--label-output", metavar="NAME", help="output scored against the labels (default: first)"
    )
    add_evaluation_arguments(target)
    add_freeze_argument(parser)
    add_data_arguments(parser)
    add_export_loader_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.export_loader:
        inputs = model_inputs(load_model(args.model, load_external_data=False))
        export_loader(args, args.calib, inputs, "calibrated on")
    try:
        result = api.quantize(
            args.model,
            args.calib,
            output=args.output,
            precision=args.precision,
            high_precision=args.high_precision,
            method=args.method,
            percentile=args.percentile,
            stats=args.stats,
            cache=args.cache,
            **placement_arguments(args),
            keep_io_types=args.keep_io_types,
            max_abs=args.max_abs,
            max_reduction=args.max_reduction,
            keep_fp32_nodes=args.keep_fp32_nodes,
            keep_fp32_ops=args.keep_fp32_ops,
            freeze_inputs=parse_frozen(args.freeze_input),
            batch_size=args.batch_size if args.calib else None,
            limit=args.limit if args.calib else None,
            preprocess=image_preprocess(args) if args.calib else None,
            max_memory=args.max_memory,
            providers=args.providers.split(",") if args.providers else None,
            progress=not args.no_progress,
            min_cosine=args.min_cosine,
            max_rel_l2=args.max_rel_l2,
            verify_samples=args.verify_samples,
            target_cosine=args.target_cosine,
            target_rel_l2=args.target_rel_l2,
            target_drop=args.target_drop,
            eval_data=args.eval,
            eval_samples=args.eval_samples,
            labels=args.labels,
            label_output=args.label_output,
            workers=args.workers,
            ray=args.ray,
            bias_correction=args.bias_correction,
            equalize=args.equalize,
            smooth_quant=args.smooth_quant,
        )
    except GateFailedError as exc:
        if isinstance(exc.result, Search):  # the target is out of reach: nothing was written
            found = exc.result.to_json()
            if args.json:
                print_json({"fallback": found})
            else:
                print("\n".join(format_steps(found)))
        else:  # the report records the failed gate; the CLI then exits 3
            _show(args, exc.result)
        raise
    _show(args, result)
    return 0


def _show(args: argparse.Namespace, result: QuantizeResult) -> None:
    if args.report:
        write_text(args.report, json.dumps(result.report, indent=2) + "\n")
    if args.html:
        html.write(args.html, result.report, result.stats, stats_note=_no_stats(result))
        log.info("wrote the HTML report %s", args.html)
    if args.json:
        print_json(result.report)
    else:
        print(format_report(result.report))


def _no_stats(result: QuantizeResult) -> str | None:
    """Why the page has no histograms of the quantized tensors, when it has none."""
    if result.stats is not None or not result.report["quantized_tensors"]:
        return None
    return "the ranges came from a TensorRT cache (--cache), which holds no histograms"


def format_report(report: dict) -> str:
    """The human summary: coverage first, then every node left in higher precision and why."""
    lines = [f"wrote {report['output']}"]
    if report["precision"]:
        coverage, precision = report["coverage"], report["precision"].upper()
        lines.append(
            f"{precision}: {coverage['quantized_nodes']}/{coverage['total_nodes']} compute nodes, "
            f"coverage {coverage['fraction']:.1%} of {coverage['total_macs']:,} multiply-"
            f"accumulates per sample; {len(report['quantized_tensors'])} activations quantized "
            f"(method {report['method']})"
        )
        for node in report["float_nodes"]:
            lines.append(
                f"  float: {node['name']} ({node['op']}, {node['macs']:,} MACs): {node['reason']}"
            )
        for site in report.get("smooth_quant", {}).get("smoothed", []):
            lines.append(
                f"  smoothed: {site['tensor']} -> {', '.join(site['consumers'])}: s "
                f"{site['scale_min']:.3g}..{site['scale_max']:.3g}, channel max/median "
                f"{site['outlier_ratio_before']:.1f} -> {site['outlier_ratio_after']:.1f}"
            )
    mixed = report.get("mixed_precision")
    if mixed:
        coverage = mixed["coverage"]
        lines.append(
            f"{mixed['precision'].upper()}: {mixed['reduced_precision_nodes']} nodes in reduced "
            f"precision, {len(mixed['fp32_nodes'])} kept FP32; reduced-precision coverage "
            f"{coverage['fraction']:.1%} of multiply-accumulates"
        )
        for node in mixed["fp32_nodes"]:
            lines.append(f"  fp32: {node['name']}: {node['reason']}")
    if report.get("fallback"):
        lines += format_steps(report["fallback"])
    lines += _check_lines(report["verification"])
    return "\n".join(lines)


def _check_lines(check: dict) -> list[str]:
    """The check after writing: its data, figures per output, and the gates."""
    data = check["data"]
    if not check["outputs"]:
        lines = [f"check: {check['status']}"]
    else:
        used = f"first {data['samples']} samples ({data['batches']} batches)"
        lines = [f"check data: {used} of {data['source']}"]
    for name, figures in check["outputs"].items():
        cosine, cosine_min = _figure(figures["cosine_mean"]), _figure(figures["cosine_min"])
        lines.append(
            f"check ({check['backend']}, {data['samples']} samples): {name} cosine vs FP32 "
            f"mean {cosine}, min {cosine_min}, rel L2 {_figure(figures['rel_l2'], '.3g')}, "
            f"max abs {_figure(figures['max_abs'], '.3g')}"
        )
    for gate in check["gates"]:
        lines.append(f"gate {'passed' if gate['passed'] else 'FAILED'}: {gate['detail']}")
    return lines


def _figure(value: float | None, spec: str = ".6f") -> str:
    return "nan" if value is None else format(value, spec)
