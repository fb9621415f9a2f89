"""``trtq build``: ONNX -> TensorRT engine + sidecar, the same command on TensorRT 10 and 11.

A thin shell over :func:`trtq.build` (:mod:`trtq.trt.pipeline`): flags in, one call,
the summary or the sidecar out.
"""

from __future__ import annotations

import argparse
from typing import Any

from trtq.cli import flagtypes
from trtq.cli.common import add_command, add_data_arguments, image_preprocess, print_json
from trtq.trt.pipeline import CALIB_MODES, BuildOutcome, build

EPILOG = """\
examples:
  trtq build model.onnx -o model.engine                       # precision as in the graph
  trtq build model.onnx -o model.engine --int8 --calib calib_data/mnist_calib.npz
  trtq build model.onnx -o model.engine --int8 --fp16 --cache model.cache
  trtq build model.onnx -o model.engine --shapes input:8x3x224x224
  trtq build model.onnx -o model.engine --min-shapes x:1x3x224x224 \\
      --opt-shapes x:8x3x224x224 --max-shapes x:32x3x224x224
  # TensorRT 10 only: builder flags and TensorRT's calibrator over an existing cache
  trtq build model.onnx -o model.engine --int8 --calib-mode trt --cache model.cache

Writes the engine (raw TensorRT plan: trtexec --loadEngine and polygraphy read it) and
ENGINE.json beside it (TensorRT version, GPU, I/O, precision, hashes, options). When
--int8/--fp16 rewrote the model, the graph that was built goes beside them too:
-o out/m.engine writes out/m.trtq.onnx. Nothing is written if the build fails."""


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "build",
        run,
        help="build a TensorRT engine from ONNX",
        description="Build a serialized TensorRT engine. The network is strongly typed: "
        "precision is what the graph says, so the same command builds the same engine on "
        "TensorRT 10 and 11. --int8/--fp16 put that precision into an FP32 graph first.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument("model", help="ONNX model (FP32, or already carrying Q/DQ)")
    parser.add_argument("-o", "--output", required=True, help="engine file to write")
    parser.add_argument("--json", action="store_true", help="print the sidecar as JSON on stdout")
    shapes = parser.add_argument_group("shapes (trtexec syntax; repeat a flag or use commas)")
    shapes.add_argument(
        "--shapes",
        type=flagtypes.shapes,
        action="append",
        metavar="NAME:DIMS",
        help="one shape per input: x:1x3x224x224",
    )
    for kind in ("min", "opt", "max"):
        shapes.add_argument(
            f"--{kind}-shapes",
            type=flagtypes.shapes,
            action="append",
            metavar="NAME:DIMS",
            help=f"{kind} shape of a dynamic input's range",
        )
    precision = parser.add_argument_group("precision (default: what the graph carries)")
    precision.add_argument("--int8", action="store_true", help="INT8 Q/DQ for an FP32 model")
    precision.add_argument("--fp16", action="store_true", help="FP16 for the rest (or everything)")
    precision.add_argument("--calib", help="calibration data for --int8 (see the README)")
    precision.add_argument(
        "--cache",
        help="TensorRT calibration cache (trtq calibrate --cache): ranges for --int8 instead of "
        "--calib; with --calib-mode trt --calib, TensorRT's calibrator writes it",
    )
    precision.add_argument(
        "--calib-mode",
        choices=CALIB_MODES,
        default="graph",
        help="graph: trtq writes the precision into the graph (TensorRT 10 and 11); trt: "
        "TensorRT 10's builder flags and calibrator",
    )
    precision.add_argument("--no-progress", action="store_true", help="no calibration progress")
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--workspace",
        type=flagtypes.memory_size,
        help="workspace memory limit, e.g. 4G (None: TensorRT's default)",
    )
    engine.add_argument(
        "--builder-optimization-level",
        type=flagtypes.integer(0, 5),
        metavar="N",
        help="0-5: build time against engine speed (None: TensorRT's default, 3)",
    )
    engine.add_argument(
        "--timing-cache",
        metavar="FILE",
        help="reuse tactic timings: read if present, written after",
    )
    engine.add_argument(
        "--plugins",
        nargs="+",
        action="extend",
        default=[],
        metavar="LIB",
        help="plugins to load before parsing: libraries (.so) or Python plugin modules (.py)",
    )
    engine.add_argument(
        "--version-compatible",
        action="store_true",
        help="an engine newer TensorRT runtimes can load",
    )
    engine.add_argument(
        "--hardware-compatibility",
        action="store_true",
        help="an engine for every GPU from Ampere on (not only this one)",
    )
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Build with the flags' settings and print what was written (or the sidecar as JSON)."""
    outcome = build(
        args.model,
        args.output,
        int8=args.int8,
        fp16=args.fp16,
        calib=args.calib,
        cache=args.cache,
        calib_mode=args.calib_mode,
        shapes=args.shapes,
        min_shapes=args.min_shapes,
        opt_shapes=args.opt_shapes,
        max_shapes=args.max_shapes,
        workspace=args.workspace,
        builder_optimization_level=args.builder_optimization_level,
        timing_cache=args.timing_cache,
        plugins=args.plugins,
        version_compatible=args.version_compatible,
        hardware_compatibility=args.hardware_compatibility,
        batch_size=args.batch_size,
        limit=args.limit,
        preprocess=image_preprocess(args),
        progress=not args.no_progress,
    )
    if args.json:
        print_json(outcome.sidecar)
    else:
        print(summary(outcome))
    return 0


def summary(outcome: BuildOutcome) -> str:
    """What was written: the engine (size, TensorRT, GPU, precision), sidecar, graph, I/O."""
    sidecar: dict[str, Any] = outcome.sidecar
    gpu = sidecar["gpu"]["name"] or "unknown GPU"
    lines = [
        f"wrote {outcome.engine} ({sidecar['engine_bytes']:,} bytes; TensorRT "
        f"{sidecar['tensorrt_version']} on {gpu}; precision {sidecar['precision']} "
        f"({sidecar['graph_precision']}); built in {sidecar['build_seconds']:.1f} s)",
        f"wrote {outcome.sidecar_path}",
    ]
    if outcome.built_model is not None:
        lines.append(f"wrote {outcome.built_model} (the graph TensorRT built)")
        report = outcome.frontend_report or {}
        coverage = report.get("coverage")
        if report.get("precision") and coverage:
            lines.append(f"  INT8 coverage {coverage['fraction']:.1%} of multiply-accumulates")
    for tensor in sidecar["io"]:
        shape = "x".join(map(str, tensor["shape"]))
        lines.append(f"  {tensor['mode']} {tensor['name']}: {tensor['dtype']} {shape}")
    return "\n".join(lines)
