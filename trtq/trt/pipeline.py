"""ONNX model -> TensorRT engine + sidecar: the pipeline behind ``trtq build`` and ``trtq.build``.

Precision comes from the graph. A plain FP32 model with ``int8``/``fp16`` goes
through trtq's frontend first (:func:`trtq.quantizer.quantize`: Q/DQ, FP16 casts),
and the graph that was built is written next to the engine, so the same call works
on TensorRT 11, which has no precision flags. A model that already carries Q/DQ is
built as it is. ``calib_mode="trt"`` is TensorRT 10's implicit path (builder flags
plus TensorRT's calibrator, streaming the data or serving a calibration cache).

The order is what makes failures cheap: arguments are checked first, then TensorRT
and a GPU are looked for, and only then does calibration run; nothing is written
until the engine is built, and then the engine and its sidecar atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from trtq.calib.cache import TRTQ_ONLY_ALGORITHMS, TrtCache, trt_version_int
from trtq.calib.collect import parse_memory
from trtq.calib.data import ImagePreprocess
from trtq.calib.data.in_memory import DataLike, as_batches
from trtq.calib.scope import check_trt_cache
from trtq.errors import ModelError, UserError
from trtq.fileio import save_model
from trtq.graph import fp16, qdq
from trtq.graph.inspect import ModelSummary, summarize
from trtq.graph.load import load_model, model_inputs
from trtq.proto import serialized
from trtq.quantizer import CalibrationOptions, quantize
from trtq.trt import compat
from trtq.trt.builder import (
    BuildOptions,
    BuildResult,
    build_serialized,
    check_options,
    open_builder,
)
from trtq.trt.calibrator import cache_calibrator, streaming_calibrator
from trtq.trt.compat import TrtFeatures
from trtq.trt.shapes import ShapesArgument, as_shapes
from trtq.trt.sidecar import make_sidecar, sha256_of, write_engine

log = logging.getLogger(__name__)

__all__ = ["BuildOutcome", "build"]

#: Makes the TensorRT 10 calibrator that serves a cache: ``(trt, cache_path, algorithm)``.
CalibratorFactory = Callable[[ModuleType, Path, str], Any]
#: Makes the streaming TensorRT 10 calibrator: ``(trt, batches, cache_path or None, algorithm,
#: shapes=)``, ``shapes`` being the calibration shape per input (the profile's opt shapes).
StreamingCalibratorFactory = Callable[..., Any]

#: graph: trtq writes the precision into the graph (TensorRT 10 and 11); trt: TensorRT 10's
#: builder flags and calibrator.
CALIB_MODES = ("graph", "trt")
#: TensorRT cache header algorithm -> :func:`trtq.trt.compat.calibrator_base` algorithm.
CACHE_ALGORITHMS = {"EntropyCalibration2": "entropy", "MinMaxCalibration": "minmax"}


@dataclass(frozen=True)
class BuildOutcome:
    """What :func:`build` wrote, and the sidecar that describes the engine."""

    engine: Path
    sidecar_path: Path
    #: The sidecar's content: TensorRT version, GPU, I/O, precision, hashes, options.
    sidecar: dict[str, Any]
    #: The graph TensorRT built, when trtq's frontend rewrote the model (else None).
    built_model: Path | None = None
    #: The frontend's quantize report for :attr:`built_model` (else None).
    frontend_report: dict | None = None


@dataclass(frozen=True)
class Recipe:
    """Where the engine's precision comes from, decided from the arguments and the model."""

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


@dataclass(frozen=True)
class PrecisionRequest:
    """The precision arguments of :func:`build`, as one value the checks can pass around."""

    int8: bool
    fp16: bool
    calib: DataLike | None
    cache: Path | None
    mode: str

    @property
    def cache_is_output(self) -> bool:
        """With TensorRT's calibrator streaming data, the cache is where it writes its ranges."""
        return self.mode == "trt" and self.calib is not None


@dataclass(frozen=True)
class DataOptions:
    """How a calibration data path is read (see :func:`trtq.calib.data.open_batches`)."""

    batch_size: int | None = None
    limit: int | None = None
    preprocess: ImagePreprocess | None = None


@dataclass
class Prepared:
    """The graph trtq rewrote for the build, and where it is saved."""

    path: Path
    #: What the builder parses: serialized bytes, or the saved path for models over 2 GB.
    source: Path | bytes
    #: Still to be saved at :attr:`path` after the build (None: saved already).
    model: onnx.ModelProto | None
    report: dict


def build(
    model: str | Path | onnx.ModelProto,
    output: str | Path,
    *,
    int8: bool = False,
    fp16: bool = False,
    calib: DataLike | None = None,
    cache: str | Path | None = None,
    calib_mode: str = "graph",
    shapes: ShapesArgument = None,
    min_shapes: ShapesArgument = None,
    opt_shapes: ShapesArgument = None,
    max_shapes: ShapesArgument = None,
    workspace: int | str | None = None,
    builder_optimization_level: int | None = None,
    timing_cache: str | Path | None = None,
    plugins: Sequence[str | Path] = (),
    version_compatible: bool = False,
    hardware_compatibility: bool = False,
    batch_size: int | None = None,
    limit: int | None = None,
    preprocess: ImagePreprocess | None = None,
    progress: bool = False,
    calibrator_factory: CalibratorFactory = cache_calibrator,
    streaming_factory: StreamingCalibratorFactory = streaming_calibrator,
) -> BuildOutcome:
    """Build ``model`` into a TensorRT engine at ``output``, with its sidecar beside it.

    ``model`` is an ONNX path or proto, FP32 or already carrying Q/DQ. ``int8`` and
    ``fp16`` put that precision into an FP32 graph first (ranges from ``calib`` data or
    a TensorRT ``cache``); the graph built is written as ``output`` with the suffix
    ``.trtq.onnx``. ``shapes`` (one shape per input) or ``min/opt/max_shapes`` (a range)
    take trtexec's syntax (``"input:8x3x224x224"``) or ``{"input": (8, 3, 224, 224)}``.
    ``workspace`` is bytes or a size such as ``"4G"``. ``calib_mode="trt"`` is TensorRT
    10's builder flags and calibrator (``calibrator_factory`` makes the one that serves a
    cache, ``streaming_factory`` the one that streams ``calib``). ``batch_size``,
    ``limit`` and ``preprocess`` say how a ``calib`` path is read; ``progress`` shows a
    progress bar while calibrating.

    Every problem a caller can fix is a one-line :class:`~trtq.errors.UserError`, raised
    before anything is written.
    """
    output = Path(output)
    precision = PrecisionRequest(int8, fp16, calib, Path(cache) if cache else None, calib_mode)
    _check_arguments(model, output, precision, plugins)
    data = DataOptions(batch_size, limit, preprocess)
    weak = calib_mode == "trt"
    options = BuildOptions(
        shapes=as_shapes(shapes),
        min_shapes=as_shapes(min_shapes),
        opt_shapes=as_shapes(opt_shapes),
        max_shapes=as_shapes(max_shapes),
        workspace=_workspace(workspace),
        builder_optimization_level=builder_optimization_level,
        timing_cache=timing_cache,
        plugins=list(plugins),
        version_compatible=version_compatible,
        hardware_compatibility=hardware_compatibility,
        strongly_typed=not weak,
        weak_precision=("int8" if int8 else "fp16") if weak else None,
    )
    options.profile()  # shape arguments that contradict each other fail here, before TensorRT
    trt, logger, builder = open_builder()
    features = compat.detect(trt)
    check_options(options, features)
    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    recipe = choose_recipe(precision, summarize(proto))
    if recipe.precision == "weak-int8" and precision.calib is not None:
        batches = _batches(precision.calib, proto, data)
        # TensorRT calibrates at the profile's opt shapes: only batches of that shape reach it.
        shapes = {name: r.opt for name, r in options.profile().items()} or None
        options.calibrator = streaming_factory(
            trt, batches, precision.cache, "entropy", shapes=shapes
        )
    elif recipe.precision == "weak-int8":
        assert precision.cache is not None  # _check_arguments asked for one
        options.calibrator = _cache_calibrator(
            trt, features, precision.cache, calibrator_factory, proto
        )
    prepared = _prepare(proto, model, output, recipe, precision, data, progress)
    source = prepared.source if prepared else _source(model, proto)
    result = build_serialized(source, options, trt, builder=builder, logger=logger)
    sidecar = _sidecar(model, options, recipe, precision, result, prepared)
    if prepared and prepared.model is not None:
        save_model(prepared.model, prepared.path)
    json_path = write_engine(output, result.plan, sidecar)
    return BuildOutcome(
        output,
        json_path,
        sidecar,
        prepared.path if prepared else None,
        prepared.report if prepared else None,
    )


def _workspace(value: int | str | None) -> int | None:
    if value is None:
        return None
    size = parse_memory(value) if isinstance(value, str) else value
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise UserError(f"bad workspace size {value!r}", "give bytes > 0, or a size such as 4G")
    return size


def _check_arguments(
    model: str | Path | onnx.ModelProto,
    output: Path,
    precision: PrecisionRequest,
    plugins: Sequence[str | Path],
) -> None:
    """Argument combinations that cannot work, refused before anything is loaded."""
    if not isinstance(model, str | Path | onnx.ModelProto):
        raise UserError(
            f"model must be the path of an .onnx file or an onnx.ModelProto, "
            f"not {type(model).__name__}",
            "pass the file's path",
        )
    if not (output.parent if str(output.parent) else Path(".")).is_dir():
        raise UserError(f"output folder does not exist: {output.parent}", "create it first")
    if not isinstance(model, onnx.ModelProto) and output.resolve() == Path(model).resolve():
        raise UserError("the engine would overwrite the model", "choose another -o")
    if precision.mode not in CALIB_MODES:
        raise UserError(
            f"unknown calibration mode {precision.mode!r}", f"use one of {', '.join(CALIB_MODES)}"
        )
    inputs = [("--plugins", p) for p in plugins]
    if not precision.cache_is_output:
        inputs.insert(0, ("--cache", precision.cache))
    for flag, path in inputs:
        if path and not Path(path).is_file():
            raise UserError(f"{flag}: file not found: {path}", "check the path")
    has_ranges = precision.calib is not None or precision.cache is not None
    if precision.mode == "trt":
        _check_trt_mode(precision)
    elif has_ranges and not (precision.int8 or precision.fp16):
        raise UserError("--calib/--cache give ranges for --int8", "add --int8 (or --fp16)")
    elif precision.cache and not precision.int8:
        raise UserError("--cache gives INT8 ranges", "add --int8, or drop --cache")


def _check_trt_mode(precision: PrecisionRequest) -> None:
    has_ranges = precision.calib is not None or precision.cache is not None
    if precision.int8 == precision.fp16:
        raise UserError(
            "--calib-mode trt sets one TensorRT 10 builder flag: give --int8 or --fp16",
            "for INT8 with FP16, use the default --calib-mode graph",
        )
    if precision.int8 and not has_ranges:
        raise UserError(
            "--calib-mode trt --int8 needs calibration data or a TensorRT calibration cache",
            "pass --calib DATA (TensorRT calibrates; needs pycuda), or --cache FILE written by "
            "trtq calibrate MODEL --calib DATA -o stats.json --cache FILE",
        )
    if precision.fp16 and has_ranges:
        raise UserError(
            "--calib/--cache give INT8 ranges; TensorRT's FP16 flag needs none",
            "drop them with --fp16, or use --int8",
        )


def choose_recipe(precision: PrecisionRequest, summary: ModelSummary) -> Recipe:
    """Where precision comes from: the model's own Q/DQ, trtq's frontend, or TensorRT 10."""
    if summary.already_quantized:
        ops = ", ".join(f"{op} x{n}" for op, n in summary.quantized_ops.items())
        if precision.mode == "trt":
            raise UserError(
                f"the model already carries quantization ({ops}); TensorRT takes its scales "
                "from those nodes, not from a calibrator",
                "drop --calib-mode trt",
            )
        ignored = [f for f, on in (("--int8", precision.int8), ("--fp16", precision.fp16)) if on]
        log.info(
            "the model already carries quantization (%s): building it as it is, strongly typed%s",
            ops,
            f" ({', '.join(ignored)} not applied)" if ignored else "",
        )
        return Recipe("graph")
    if precision.mode == "trt":
        return Recipe("weak-int8" if precision.int8 else "weak-fp16")
    if precision.int8 and precision.calib is None and precision.cache is None:
        raise UserError(
            "--int8 needs activation ranges",
            "pass --calib DATA, or --cache FILE written by trtq calibrate --cache",
        )
    return Recipe("graph", int8=precision.int8, fp16=precision.fp16)


def _cache_calibrator(
    trt: ModuleType,
    features: TrtFeatures,
    cache_path: Path,
    factory: CalibratorFactory,
    model: onnx.ModelProto,
) -> Any:
    """The calibrator for ``calib_mode="trt"``, after checking TensorRT would accept the cache.

    The cache must be TensorRT's own kind (not trtq's mse/percentile ranges under
    another name), for this TensorRT version, and complete for ``model``.
    """
    cache = TrtCache.read(cache_path)
    algorithm = CACHE_ALGORITHMS.get(cache.algorithm)
    trtq_method = TRTQ_ONLY_ALGORITHMS.get(cache.algorithm)
    if trtq_method is not None:
        raise UserError(
            f"{cache_path} holds trtq's {trtq_method} ranges ({cache.algorithm}): TensorRT has "
            "no such calibrator to serve them",
            "build with the default --calib-mode graph (trtq puts these ranges into the graph), "
            "or write the cache with trtq calibrate --method max (TensorRT's MinMax ranges)",
        )
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
    check_trt_cache(cache, model, str(cache_path))
    return factory(trt, cache_path, algorithm)


def _batches(
    calib: DataLike, model: onnx.ModelProto, data: DataOptions
) -> Iterable[Mapping[str, np.ndarray]]:
    """``calib`` as batches checked against the model (a path is opened here)."""
    return as_batches(
        calib,
        model_inputs(model),
        batch_size=data.batch_size,
        limit=data.limit,
        preprocess=data.preprocess,
    )


def prepared_path(output: str | Path, model: str | Path | onnx.ModelProto) -> Path:
    """``out/model.engine`` -> ``out/model.trtq.onnx`` (never the source model itself)."""
    path = Path(output).with_suffix(".trtq.onnx")
    if not isinstance(model, onnx.ModelProto) and path.resolve() == Path(model).resolve():
        path = Path(f"{output}.onnx")
    return path


def _prepare(
    proto: onnx.ModelProto,
    model: str | Path | onnx.ModelProto,
    output: Path,
    recipe: Recipe,
    precision: PrecisionRequest,
    data: DataOptions,
    progress: bool,
) -> Prepared | None:
    """Run trtq's frontend when the recipe asks for it; None means "build the model as it is"."""
    if not recipe.rewrites:
        return None
    batches = _batches(precision.calib, proto, data) if precision.calib is not None else None
    result = quantize(
        proto,
        batches,
        placement=qdq.PlacementOptions() if recipe.int8 else None,
        mixed=fp16.MixedPrecisionOptions() if recipe.fp16 else None,
        calibration=CalibrationOptions(progress=progress),
        cache=TrtCache.read(precision.cache) if precision.cache else None,
    )
    path = prepared_path(output, model)
    data = serialized(result.model)
    if data is not None:
        return Prepared(path, data, result.model, result.report)
    # Over 2 GB, the parser needs the weights in files beside the model: save it first.
    log.info("writing %s before the build (its weights are stored beside it)", path)
    save_model(result.model, path)
    return Prepared(path, path, None, result.report)


def _source(model: str | Path | onnx.ModelProto, proto: onnx.ModelProto) -> str | Path | bytes:
    """What the builder parses for a model built as it is: its file, or the proto's bytes."""
    if not isinstance(model, onnx.ModelProto):
        return model
    data = serialized(proto)
    if data is None:
        raise ModelError(
            "the model is over 2 GB, which TensorRT's parser reads only from a file",
            "save it with its weights beside it (trtq.fileio.save_model) and pass the path",
        )
    return data


def _sidecar(
    model: str | Path | onnx.ModelProto,
    options: BuildOptions,
    recipe: Recipe,
    precision: PrecisionRequest,
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
    cache = precision.cache
    return make_sidecar(
        result,
        options,
        source_model=model.SerializeToString() if isinstance(model, onnx.ModelProto) else model,
        precision=recipe.precision,
        # TensorRT writes a calib_mode="trt" cache during the build; if it wrote none, say so.
        calibration_cache=cache if cache and cache.exists() else None,
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
