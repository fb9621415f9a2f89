"""``trtq build``: ONNX -> TensorRT engine + sidecar, the same command on TensorRT 10 and 11.

Precision comes from the graph. A plain FP32 model with ``--int8``/``--fp16``
goes through trtq's frontend first (Q/DQ, FP16 casts), and the graph that was
built is written next to the engine, so the command works on TensorRT 11,
which has no precision flags. A model that already carries Q/DQ is built as it
is. ``--calib-mode trt`` is TensorRT 10's implicit path (builder flags plus
TensorRT's calibrator reading a calibration cache).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from trtq.calib.cache import TrtCache, trt_version_int
from trtq.calib.collect import parse_memory
from trtq.cli.common import add_command, add_data_arguments, open_data, print_json
from trtq.errors import UserError
from trtq.fileio import save_model
from trtq.graph import fp16, qdq
from trtq.graph.inspect import ModelSummary, summarize
from trtq.graph.load import load_model, model_inputs
from trtq.quantizer import CalibrationOptions, quantize
from trtq.trt import compat
from trtq.trt.builder import (
    BuildOptions,
    BuildResult,
    build_serialized,
    cache_calibrator,
    check_options,
    open_builder,
    parse_shapes,
)
from trtq.trt.sidecar import make_sidecar, sha256_of, sidecar_path, write_engine

log = logging.getLogger(__name__)

#: Makes the TensorRT 10 calibrator for ``--calib-mode trt``: ``(trt, cache_path, algorithm)``.
CalibratorFactory = Callable[[ModuleType, Path, str], Any]
#: Makes the streaming TensorRT 10 calibrator: ``(trt, batches, cache_path or None, algorithm)``.
StreamingCalibratorFactory = Callable[[ModuleType, Any, Path | None, str], Any]


def streaming_calibrator(trt: ModuleType, batches, cache_path: Path | None, algorithm: str) -> Any:
    """TensorRT's own calibrator fed by trtq's data through pycuda (needs ``trtq[gpu]``)."""
    from trtq.trt.calibrator import make_calibrator

    return make_calibrator(trt, batches, cache_path=cache_path, algorithm=algorithm)


#: TensorRT cache header algorithm -> :func:`trtq.trt.compat.calibrator_base` algorithm.
CACHE_ALGORITHMS = {"EntropyCalibration2": "entropy", "MinMaxCalibration": "minmax"}

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
        "--shapes", action="append", metavar="NAME:DIMS", help="one shape per input: x:1x3x224x224"
    )
    for kind in ("min", "opt", "max"):
        shapes.add_argument(
            f"--{kind}-shapes",
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
        choices=("graph", "trt"),
        default="graph",
        help="graph: trtq writes the precision into the graph (TensorRT 10 and 11); trt: "
        "TensorRT 10's builder flags and calibrator",
    )
    precision.add_argument("--no-progress", action="store_true", help="no calibration progress")
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--workspace",
        type=parse_memory,
        help="workspace memory limit, e.g. 4G (None: TensorRT's default)",
    )
    engine.add_argument(
        "--builder-optimization-level",
        type=int,
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


@dataclass(frozen=True)
class Recipe:
    """Where the engine's precision comes from, decided from the flags and the model."""

    #: The sidecar's precision mode: "graph", "weak-fp16" or "weak-int8".
    precision: str
    #: Run trtq's frontend with Q/DQ INT8 placement / FP16 conversion.
    int8: bool = False
    fp16: bool = False

    @property
    def rewrites(self) -> bool:
        return self.int8 or self.fp16

    @property
    def graph_precision(self) -> str:
        """What trtq put into the graph ("as-is" when the model was built untouched)."""
        return "+".join(p for p, on in (("int8", self.int8), ("fp16", self.fp16)) if on) or "as-is"


def run(
    args: argparse.Namespace,
    *,
    calibrator_factory: CalibratorFactory = cache_calibrator,
    streaming_factory: StreamingCalibratorFactory = streaming_calibrator,
) -> int:
    """Check the flags, find TensorRT and a GPU, prepare the graph, build, write.

    Nothing is written until the engine is built, and TensorRT is looked for
    before any calibration, so a machine without a usable TensorRT fails in
    a second with one line. ``calibrator_factory`` makes the TensorRT 10
    calibrator for ``--calib-mode trt`` from a cache, ``streaming_factory`` the
    one that streams ``--calib`` data to TensorRT.
    """
    _check_flags(args)
    options = build_options(args)
    trt, logger, builder = open_builder()
    features = compat.detect(trt)
    check_options(options, features)
    model = load_model(args.model)
    recipe = choose_recipe(args, summarize(model))
    if recipe.precision == "weak-int8" and args.calib:
        batches = open_data(args, args.calib, model_inputs(model))
        cache = Path(args.cache) if args.cache else None
        options.calibrator = streaming_factory(trt, batches, cache, "entropy")
    elif recipe.precision == "weak-int8":
        options.calibrator = _calibrator(trt, features, Path(args.cache), calibrator_factory)
    prepared = _prepare(args, model, recipe)
    source = prepared.source if prepared else args.model
    result = build_serialized(source, options, trt, builder=builder, logger=logger)
    sidecar = _sidecar(args, options, recipe, result, prepared)
    if prepared and prepared.model is not None:
        save_model(prepared.model, prepared.path)
    write_engine(args.output, result.plan, sidecar)
    if args.json:
        print_json(sidecar)
    else:
        print(_summary(args, sidecar, prepared))
    return 0


def build_options(args: argparse.Namespace) -> BuildOptions:
    """BuildOptions from the flags; strongly typed unless TensorRT 10's weak path is asked."""
    weak = args.calib_mode == "trt"
    options = BuildOptions(
        shapes=parse_shapes(args.shapes),
        min_shapes=parse_shapes(args.min_shapes),
        opt_shapes=parse_shapes(args.opt_shapes),
        max_shapes=parse_shapes(args.max_shapes),
        workspace=args.workspace,
        builder_optimization_level=args.builder_optimization_level,
        timing_cache=args.timing_cache,
        plugins=list(args.plugins),
        version_compatible=args.version_compatible,
        hardware_compatibility=args.hardware_compatibility,
        strongly_typed=not weak,
        weak_precision=("int8" if args.int8 else "fp16") if weak else None,
    )
    options.profile()  # shape flags that contradict each other fail here, before TensorRT
    return options


def _check_flags(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, refused before anything is loaded."""
    output = Path(args.output)
    if not (output.parent if str(output.parent) else Path(".")).is_dir():
        raise UserError(f"output folder does not exist: {output.parent}", "create it first")
    if output.resolve() == Path(args.model).resolve():
        raise UserError("the engine would overwrite the model", "choose another -o")
    # With --calib-mode trt --calib, --cache is where TensorRT writes its cache.
    cache_is_output = args.calib_mode == "trt" and args.calib
    inputs = [("--plugins", p) for p in args.plugins]
    for flag, path in ([] if cache_is_output else [("--cache", args.cache)]) + inputs:
        if path and not Path(path).is_file():
            raise UserError(f"{flag}: file not found: {path}", "check the path")
    if args.calib_mode == "trt":
        _check_trt_mode(args)
    elif (args.calib or args.cache) and not (args.int8 or args.fp16):
        raise UserError("--calib/--cache give ranges for --int8", "add --int8 (or --fp16)")
    elif args.cache and not args.int8:
        raise UserError("--cache gives INT8 ranges", "add --int8, or drop --cache")


def _check_trt_mode(args: argparse.Namespace) -> None:
    if args.int8 == args.fp16:
        raise UserError(
            "--calib-mode trt sets one TensorRT 10 builder flag: give --int8 or --fp16",
            "for INT8 with FP16, use the default --calib-mode graph",
        )
    if args.int8 and not (args.cache or args.calib):
        raise UserError(
            "--calib-mode trt --int8 needs calibration data or a TensorRT calibration cache",
            "pass --calib DATA (TensorRT calibrates; needs pycuda), or --cache FILE written by "
            "trtq calibrate MODEL --calib DATA -o stats.json --cache FILE",
        )
    if args.fp16 and (args.cache or args.calib):
        raise UserError(
            "--calib/--cache give INT8 ranges; TensorRT's FP16 flag needs none",
            "drop them with --fp16, or use --int8",
        )


def choose_recipe(args: argparse.Namespace, summary: ModelSummary) -> Recipe:
    """Where precision comes from: the model's own Q/DQ, trtq's frontend, or TensorRT 10."""
    if summary.already_quantized:
        ops = ", ".join(f"{op} x{n}" for op, n in summary.quantized_ops.items())
        if args.calib_mode == "trt":
            raise UserError(
                f"the model already carries quantization ({ops}); TensorRT takes its scales "
                "from those nodes, not from a calibrator",
                "drop --calib-mode trt",
            )
        ignored = [f for f, on in (("--int8", args.int8), ("--fp16", args.fp16)) if on]
        log.info(
            "the model already carries quantization (%s): building it as it is, strongly typed%s",
            ops,
            f" ({', '.join(ignored)} not applied)" if ignored else "",
        )
        return Recipe("graph")
    if args.calib_mode == "trt":
        return Recipe("weak-int8" if args.int8 else "weak-fp16")
    if args.int8 and not (args.calib or args.cache):
        raise UserError(
            "--int8 needs activation ranges",
            "pass --calib DATA, or --cache FILE written by trtq calibrate --cache",
        )
    return Recipe("graph", int8=args.int8, fp16=args.fp16)


def _calibrator(trt: ModuleType, features, cache_path: Path, factory: CalibratorFactory) -> Any:
    """The calibrator for ``--calib-mode trt``, after checking TensorRT would accept the cache."""
    cache = TrtCache.read(cache_path)
    algorithm = CACHE_ALGORITHMS.get(cache.algorithm)
    if algorithm is None:
        raise UserError(
            f"{cache_path} was written by a {cache.algorithm} calibrator",
            f"use a cache from one of: {', '.join(CACHE_ALGORITHMS)}",
        )
    expected = trt_version_int(features.version)
    if cache.version != expected:
        raise UserError(
            f"{cache_path} is for TensorRT version {cache.version}, this is {features.version} "
            f"({expected}); TensorRT would ignore the cache",
            f"rewrite it with: trtq calibrate ... --cache FILE --trt-version {features.version}",
        )
    return factory(trt, cache_path, algorithm)


@dataclass
class Prepared:
    """The graph trtq rewrote for the build, and where it is saved."""

    path: Path
    #: What the builder parses: serialized bytes, or the saved path for models over 2 GB.
    source: Path | bytes
    #: Still to be saved at :attr:`path` after the build (None: saved already).
    model: onnx.ModelProto | None
    report: dict


def prepared_path(output: str | Path, model: str | Path) -> Path:
    """``out/model.engine`` -> ``out/model.trtq.onnx`` (never the source model itself)."""
    path = Path(output).with_suffix(".trtq.onnx")
    if path.resolve() == Path(model).resolve():
        path = Path(f"{output}.onnx")
    return path


def _prepare(args: argparse.Namespace, model: onnx.ModelProto, recipe: Recipe) -> Prepared | None:
    """Run trtq's frontend when the recipe asks for it; None means "build the model as it is"."""
    if not recipe.rewrites:
        return None
    batches = open_data(args, args.calib, model_inputs(model)) if args.calib else None
    result = quantize(
        model,
        batches,
        placement=qdq.PlacementOptions() if recipe.int8 else None,
        mixed=fp16.MixedPrecisionOptions() if recipe.fp16 else None,
        calibration=CalibrationOptions(progress=not args.no_progress),
        cache=TrtCache.read(args.cache) if args.cache else None,
    )
    path = prepared_path(args.output, args.model)
    if result.model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
        return Prepared(path, result.model.SerializeToString(), result.model, result.report)
    # Over 2 GB, the parser needs the weights in files beside the model: save it first.
    log.info("writing %s before the build (its weights are stored beside it)", path)
    save_model(result.model, path)
    return Prepared(path, path, None, result.report)


def _sidecar(
    args: argparse.Namespace,
    options: BuildOptions,
    recipe: Recipe,
    result: BuildResult,
    prepared: Prepared | None,
) -> dict[str, Any]:
    built = prepared.source if prepared else None
    extra: dict[str, Any] = {
        "graph_precision": recipe.graph_precision,
        "built_model": str(prepared.path) if prepared else None,
        "built_model_sha256": sha256_of(built) if built is not None else None,
        "frontend": _frontend_summary(prepared.report) if prepared else None,
    }
    return make_sidecar(
        result,
        options,
        source_model=args.model,
        precision=recipe.precision,
        # TensorRT writes a --calib-mode trt cache during the build; if it wrote none, say so.
        calibration_cache=args.cache if args.cache and Path(args.cache).exists() else None,
        extra=extra,
    )


def _frontend_summary(report: dict) -> dict[str, Any]:
    """The part of the quantize report worth keeping with the engine."""
    mixed = report.get("mixed_precision")
    return {
        "precision": report.get("precision"),
        "coverage": report.get("coverage"),
        "float_nodes": len(report.get("float_nodes", [])),
        "mixed_precision_coverage": mixed["coverage"] if mixed else None,
        "verification": report.get("verification"),
    }


def _summary(args: argparse.Namespace, sidecar: dict[str, Any], prepared: Prepared | None) -> str:
    gpu = sidecar["gpu"]["name"] or "unknown GPU"
    lines = [
        f"wrote {args.output} ({sidecar['engine_bytes']:,} bytes; TensorRT "
        f"{sidecar['tensorrt_version']} on {gpu}; precision {sidecar['precision']} "
        f"({sidecar['graph_precision']}); built in {sidecar['build_seconds']:.1f} s)",
        f"wrote {sidecar_path(args.output)}",
    ]
    if prepared:
        lines.append(f"wrote {prepared.path} (the graph TensorRT built)")
        coverage = prepared.report.get("coverage")
        if prepared.report.get("precision") and coverage:
            lines.append(f"  INT8 coverage {coverage['fraction']:.1%} of multiply-accumulates")
    for tensor in sidecar["io"]:
        shape = "x".join(map(str, tensor["shape"]))
        lines.append(f"  {tensor['mode']} {tensor['name']}: {tensor['dtype']} {shape}")
    return "\n".join(lines)
