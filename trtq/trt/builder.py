"""ONNX -> serialized TensorRT engine, one code path for TensorRT 10 and 11.

trtq puts precision in the graph (Q/DQ pairs, FP16 casts) and builds a strongly
typed network, the only kind TensorRT 11 has, so the same model builds the same
way on both versions. TensorRT 10's implicit precision (FP16/INT8 builder flags
and a calibrator) remains an option, allowed only where
:func:`trtq.trt.compat.detect` finds it.

This module only sequences TensorRT calls; every version difference is a
question to :mod:`trtq.trt.compat`. Shapes and profiles are checked in
:mod:`trtq.trt.shapes`, plugins registered by :mod:`trtq.trt.plugins`. The
``tensorrt`` module is a parameter (imported through
:func:`trtq.trt.import_tensorrt` when not given), which is what lets the tests
replay a build against a recording fake on a machine without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from trtq.errors import ModelError, UserError
from trtq.fileio import write_bytes
from trtq.trt import compat, create_builder, first_line, import_tensorrt
from trtq.trt.compat import TrtFeatures
from trtq.trt.plugins import load_plugins
from trtq.trt.shapes import Shape, ShapeRange, TensorInfo, check_profile, optimization_profile

log = logging.getLogger(__name__)


#: TensorRT 10's weak-precision modes and the builder flag each one sets.
WEAK_PRECISION_FLAGS: dict[str, str] = {"fp16": "FP16", "int8": "INT8"}
#: ``IBuilderConfig.builder_optimization_level`` accepts these (3 is TensorRT's default).
OPTIMIZATION_LEVELS = range(6)
#: TensorRT ``DataType`` member names -> the names numpy and ONNX users know.
DTYPE_NAMES: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
    "FP8": "float8e4m3fn",
    "INT4": "int4",
    "FP4": "float4e2m1",
    "E8M0": "float8e8m0",
}


@dataclass
class BuildOptions:
    """How to build. Defaults: strongly typed, precision from the graph, TensorRT's defaults.

    ``shapes`` gives one shape per input (min = opt = max); ``min_shapes``,
    ``opt_shapes`` and ``max_shapes`` give a range instead. Either way every
    input with a dynamic dimension must be covered, because an engine needs
    an optimization profile for each of them.
    """

    shapes: dict[str, Shape] = field(default_factory=dict)
    min_shapes: dict[str, Shape] = field(default_factory=dict)
    opt_shapes: dict[str, Shape] = field(default_factory=dict)
    max_shapes: dict[str, Shape] = field(default_factory=dict)
    #: Workspace memory pool limit in bytes (None: TensorRT's default, the device memory).
    workspace: int | None = None
    #: 0-5: build time against engine speed (None: TensorRT's default, 3).
    builder_optimization_level: int | None = None
    #: Tactic timings read from this file if it exists, and written back after the build.
    timing_cache: str | Path | None = None
    #: Plugin libraries (.so) loaded into TensorRT's registry before the model is parsed.
    plugins: list[str | Path] = field(default_factory=list)
    #: An engine that newer TensorRT runtimes can load (BuilderFlag.VERSION_COMPATIBLE).
    version_compatible: bool = False
    #: An engine that runs on every GPU from Ampere on (HardwareCompatibilityLevel.AMPERE_PLUS).
    hardware_compatibility: bool = False
    #: Precision exactly as the graph says. TensorRT 11 is always strongly typed.
    strongly_typed: bool = True
    #: TensorRT 10 only: "fp16" or "int8" builder flag on a weakly typed network.
    weak_precision: str | None = None
    #: TensorRT 10 only: an ``IInt8Calibrator`` subclass instance, with weak_precision "int8".
    calibrator: Any = None

    def profile(self) -> dict[str, ShapeRange]:
        """The optimization-profile shapes per input, checked for consistency."""
        return optimization_profile(self.shapes, self.min_shapes, self.opt_shapes, self.max_shapes)

    def to_json(self) -> dict[str, Any]:
        """The options as recorded in the engine's sidecar (the calibrator by class name)."""
        return {
            "profile": {name: r.to_json() for name, r in self.profile().items()},
            "workspace": self.workspace,
            "builder_optimization_level": self.builder_optimization_level,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
            "plugins": [str(p) for p in self.plugins],
            "version_compatible": self.version_compatible,
            "hardware_compatibility": self.hardware_compatibility,
            "strongly_typed": self.strongly_typed,
            "weak_precision": self.weak_precision,
            "calibrator": type(self.calibrator).__name__ if self.calibrator is not None else None,
        }


@dataclass
class BuildResult:
    """A serialized engine and what a runtime needs to know about its I/O."""

    plan: bytes
    #: One dict per I/O tensor: name, mode, dtype, shape (-1 dynamic), profile (inputs).
    io: list[dict[str, Any]]
    features: TrtFeatures
    build_seconds: float


def build_serialized(
    source: str | Path | bytes,
    options: BuildOptions | None = None,
    trt: ModuleType | None = None,
    *,
    builder: Any = None,
    logger: Any = None,
) -> BuildResult:
    """Build ``source`` (an ONNX path or serialized bytes) into a serialized engine.

    ``builder`` and ``logger`` may be created beforehand (:func:`open_builder`)
    so that a machine without a usable GPU is detected before a long
    calibration, not after. Every failure a user can fix is a one-line
    :class:`~trtq.errors.UserError`.
    """
    options = options or BuildOptions()
    trt = trt if trt is not None else import_tensorrt()
    features = compat.detect(trt)
    profile = options.profile()
    check_options(options, features)
    if not isinstance(source, bytes | bytearray | memoryview) and not Path(source).is_file():
        raise ModelError(f"model file not found: {source}", "check the path")
    logger = logger if logger is not None else make_logger(trt)
    load_plugins(trt, logger, options.plugins)
    builder = builder if builder is not None else create_builder(trt, logger)
    network = builder.create_network(compat.network_flags(trt, features, options.strongly_typed))
    parser = trt.OnnxParser(network, logger)  # owns the weights: keep it until the build is done
    parse_onnx(parser, source)
    inputs = _tensors(network, "input")
    check_profile(inputs, profile)
    config = builder.create_builder_config()
    configure(trt, config, features, options)
    _add_profile(builder, config, features, options, inputs, profile)
    timing_cache = attach_timing_cache(config, features, options.timing_cache)
    plan, seconds = _build(builder, network, config)
    if timing_cache is not None:
        save_timing_cache(config, options.timing_cache)
    io = describe_io(inputs, _tensors(network, "output"), profile)
    return BuildResult(plan, io, features, seconds)


def _build(builder: Any, network: Any, config: Any) -> tuple[bytes, float]:
    """The serialized plan and the seconds TensorRT took to build it."""
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError("TensorRT could not build the engine (see the log above)")
    plan = bytes(memoryview(serialized))
    log.debug("built a %d-byte engine in %.1f s", len(plan), seconds)
    return plan, seconds


def open_builder(trt: ModuleType | None = None) -> tuple[ModuleType, Any, Any]:
    """``(trt, logger, builder)``: fails with one line when TensorRT or a GPU is unusable."""
    trt = trt if trt is not None else import_tensorrt()
    logger = make_logger(trt)
    return trt, logger, create_builder(trt, logger)


def make_logger(trt: ModuleType) -> Any:
    """TensorRT's own logger, as chatty as trtq's: warnings normally, info with ``-v``."""
    verbose = logging.getLogger("trtq").isEnabledFor(logging.DEBUG)
    return trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)


def check_options(options: BuildOptions, features: TrtFeatures) -> None:
    """Refuse option combinations this TensorRT cannot honour, before any work is done."""
    _check_weak_precision(options, features)
    level = options.builder_optimization_level
    if level is not None and level not in OPTIMIZATION_LEVELS:
        raise UserError(
            f"builder optimization level {level} is out of range", "use 0 to 5 (default 3)"
        )
    _require(
        features.version_compatible or not options.version_compatible,
        features,
        "VERSION_COMPATIBLE engines",
    )
    _require(
        features.hardware_compatibility or not options.hardware_compatibility,
        features,
        "hardware-compatible (Ampere+) engines",
    )


def _check_weak_precision(options: BuildOptions, features: TrtFeatures) -> None:
    """TensorRT 10's implicit path: a known flag, a weakly typed network, a calibrator base."""
    weak = options.weak_precision
    if weak is not None:
        if weak not in WEAK_PRECISION_FLAGS:
            raise UserError(
                f"unknown weak precision {weak!r}", f"use one of {', '.join(WEAK_PRECISION_FLAGS)}"
            )
        if not features.weak_typing:
            raise UserError(
                f"TensorRT {features.major} has no FP16/INT8 builder flags; trtq puts precision "
                "in the graph instead",
                "run without --calib-mode trt",
            )
        if options.strongly_typed:
            raise UserError(
                "FP16/INT8 builder flags need a weakly typed network",
                "set strongly_typed=False with weak_precision",
            )
    if options.calibrator is not None:
        if weak != "int8":
            raise UserError("a calibrator needs weak_precision='int8'", "set it or drop it")
        if not features.int8_calibrators:
            raise UserError(
                f"TensorRT {features.major} has no INT8 calibrators",
                "put the ranges in the graph: run without --calib-mode trt",
            )


def _require(supported: bool, features: TrtFeatures, what: str) -> None:
    if not supported:
        raise UserError(f"TensorRT {features.version} cannot build {what}", "drop that option")


# --- parsing -----------------------------------------------------------------------------


def parse_onnx(parser: Any, source: str | Path | bytes) -> None:
    """Parse ``source`` into the parser's network; every parser error becomes one line.

    A path is parsed from the file so that external weights next to it are found.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        ok = parser.parse(bytes(source))
    else:
        ok = parser.parse_from_file(str(source))
    if ok:
        return
    errors = [parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
    if not errors:
        errors = ["no error reported (see the log above)"]
    raise ModelError(
        f"TensorRT's ONNX parser rejected the model ({len(errors)} error(s)): " + "; ".join(errors),
        "the named nodes use ops or attributes this TensorRT does not support; replace them, "
        "or load a plugin with --plugins",
    )


def parser_error_text(error: Any) -> str:
    """``node 'conv1' (Conv): <description>``, from whatever this TensorRT's ParserError offers."""
    desc = first_line(_ask(error, "desc") or error)
    name = _ask(error, "node_name")
    op = _ask(error, "node_operator")
    index = _ask(error, "node")
    if name:
        where = f"node '{name}'"
    elif isinstance(index, int) and index >= 0:
        where = f"node #{index}"
    else:
        return desc
    return f"{where} ({op}): {desc}" if op else f"{where}: {desc}"


def _ask(obj: Any, method: str) -> Any:
    """``obj.method()`` if this version has it, else None (names differ across versions)."""
    attribute = getattr(obj, method, None)
    if attribute is None:
        return None
    try:
        return attribute() if callable(attribute) else attribute
    except Exception:  # a binding that cannot answer is no reason to hide the other errors
        return None


# --- network tensors and the optimization profile ---------------------------------------


def _tensors(network: Any, mode: str) -> list[TensorInfo]:
    count = network.num_inputs if mode == "input" else network.num_outputs
    get = network.get_input if mode == "input" else network.get_output
    return [_tensor_info(get(i)) for i in range(count)]


def _tensor_info(tensor: Any) -> TensorInfo:
    return TensorInfo(tensor.name, tuple(int(d) for d in tensor.shape), dtype_name(tensor.dtype))


def dtype_name(dtype: Any) -> str:
    """``DataType.HALF`` -> ``"float16"``; unknown members keep their lower-cased name."""
    member = getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]
    return DTYPE_NAMES.get(member, member.lower())


def _add_profile(
    builder: Any,
    config: Any,
    features: TrtFeatures,
    options: BuildOptions,
    inputs: list[TensorInfo],
    profile: Mapping[str, ShapeRange],
) -> None:
    """One optimization profile for the dynamic inputs (none when every input is static)."""
    dynamic = [t for t in inputs if t.dynamic]
    if not dynamic:
        return
    trt_profile = builder.create_optimization_profile()
    for tensor in dynamic:
        shapes = profile[tensor.name]
        trt_profile.set_shape(tensor.name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(trt_profile)
    if options.calibrator is not None and features.int8_calibrators:
        # TensorRT 10 calibrates dynamic-shape networks at the shapes of this profile.
        config.set_calibration_profile(trt_profile)


def describe_io(
    inputs: list[TensorInfo], outputs: list[TensorInfo], profile: Mapping[str, ShapeRange]
) -> list[dict[str, Any]]:
    """The engine's I/O as the sidecar records it (the network's I/O is the engine's)."""
    described = []
    for mode, tensors in (("input", inputs), ("output", outputs)):
        for t in tensors:
            entry: dict[str, Any] = {
                "name": t.name,
                "mode": mode,
                "dtype": t.dtype,
                "shape": list(t.shape),
            }
            if mode == "input":
                shapes = profile.get(t.name) or ShapeRange(t.shape, t.shape, t.shape)
                entry["profile"] = shapes.to_json()
            described.append(entry)
    return described


# --- builder configuration ---------------------------------------------------------------


def configure(trt: ModuleType, config: Any, features: TrtFeatures, options: BuildOptions) -> None:
    """Memory, optimization level, compatibility and (TensorRT 10) weak precision."""
    if options.workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace))
    level = options.builder_optimization_level
    if level is not None:
        if features.builder_optimization_level:
            config.builder_optimization_level = level
        else:
            log.warning("TensorRT %s has no builder optimization level; ignored", features.version)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compatibility:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if options.weak_precision is not None:
        config.set_flag(getattr(trt.BuilderFlag, WEAK_PRECISION_FLAGS[options.weak_precision]))
    if options.calibrator is not None:
        config.int8_calibrator = options.calibrator


def attach_timing_cache(config: Any, features: TrtFeatures, path: str | Path | None) -> Any:
    """Start from the timing cache at ``path`` (a new one if the file does not exist yet).

    Returns the cache object, which must outlive the build, or None when there is none.
    """
    if path is None:
        return None
    if not features.timing_cache:
        log.warning("TensorRT %s has no timing cache; --timing-cache ignored", features.version)
        return None
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):
        raise UserError(
            f"TensorRT cannot use the timing cache {path}",
            "it was written by another TensorRT version or GPU: delete it and build again",
        )
    log.debug("timing cache: %s (%d bytes)", path, len(data))
    return cache


def save_timing_cache(config: Any, path: str | Path) -> None:
    """Write the build's timings back (atomically), so the next build starts from them."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    write_bytes(path, bytes(memoryview(cache.serialize())))
    log.debug("timing cache written to %s", path)
