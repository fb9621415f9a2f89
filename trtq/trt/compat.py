"""What differs between TensorRT 10 and 11, detected from the ``tensorrt`` module itself.

Features are found by looking for the attributes trtq would use (``hasattr``
on NVIDIA's real classes and enums), not by parsing the version string: minor
releases add and deprecate API, and a check on the attribute is exactly the
question "can this call work here". The version is recorded for messages.

The facts (see ARCHITECTURE.md §TensorRT 10 and 11), as detected from the real bindings:

* TensorRT 10.x builds weakly typed networks by default (BuilderFlag FP16/INT8
  plus an ``IInt8*Calibrator``); strong typing is opt-in through the
  ``STRONGLY_TYPED`` network creation flag.
* TensorRT 11.x removed weak typing altogether: no precision builder flags, no
  calibrators, no ``ITensor.set_dynamic_range``, no ``EXPLICIT_BATCH``. Every
  network is strongly typed; ``STRONGLY_TYPED`` still exists but is deprecated
  and ignored.
* The numeric values of ``NetworkDefinitionCreationFlag`` members differ
  between the two (``STRONGLY_TYPED`` is bit 1 in 10.x, bit 0 in 11.x because
  ``EXPLICIT_BATCH`` is gone), so flag bits are always computed from the
  module's own enum (:func:`network_flags`), never hard-coded.

:data:`USED_ATTRIBUTES` and :data:`FEATURE_ATTRIBUTES` name every TensorRT
attribute trtq's TensorRT layer touches; ``tests/test_trt_conformance.py``
resolves each one on NVIDIA's real bindings for both versions. Add a name here
whenever trtq starts using a new one.

Nothing here imports tensorrt: every function takes the module as an argument.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from trtq.errors import UserError

__all__ = [
    "FEATURE_ATTRIBUTES",
    "USED_ATTRIBUTES",
    "TrtFeatures",
    "calibrator_base",
    "detect",
    "has_attribute",
    "missing_attributes",
    "network_flags",
    "required_attributes",
    "resolve",
]

#: TensorRT attributes trtq uses on every supported version (10.x and 11.x), as dotted
#: paths from the ``tensorrt`` module. Keep in sync with the code in ``trtq/trt`` and
#: ``trtq/runtime``.
USED_ATTRIBUTES: tuple[str, ...] = (
    # logging
    "Logger",
    "ILogger",
    "ILogger.Severity",
    "Logger.ERROR",
    "Logger.WARNING",
    "Logger.INFO",
    "Logger.VERBOSE",
    # building: builder, network, parser, config, profiles
    "Builder",
    "Builder.create_network",
    "Builder.create_builder_config",
    "Builder.create_optimization_profile",
    "Builder.build_serialized_network",
    "NetworkDefinitionCreationFlag",
    "INetworkDefinition.num_inputs",
    "INetworkDefinition.num_outputs",
    "INetworkDefinition.get_input",
    "INetworkDefinition.get_output",
    "ITensor.name",
    "ITensor.shape",
    "ITensor.dtype",
    "OnnxParser",
    "OnnxParser.parse",
    "OnnxParser.parse_from_file",
    "OnnxParser.num_errors",
    "OnnxParser.get_error",
    "ParserError.desc",
    "ParserError.node_name",
    "ParserError.node",
    "ParserError.node_operator",
    "BuilderFlag",
    "IBuilderConfig.set_flag",
    "IBuilderConfig.get_flag",
    "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.add_optimization_profile",
    "IBuilderConfig.profiling_verbosity",
    "ProfilingVerbosity.DETAILED",
    "MemoryPoolType.WORKSPACE",
    "IOptimizationProfile.set_shape",
    "IHostMemory.nbytes",
    # deserialising and running engines
    "Runtime",
    "Runtime.deserialize_cuda_engine",
    "ICudaEngine.num_io_tensors",
    "ICudaEngine.num_optimization_profiles",
    "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_shape",
    "ICudaEngine.get_tensor_dtype",
    "ICudaEngine.get_tensor_profile_shape",
    "ICudaEngine.create_execution_context",
    "ICudaEngine.serialize",
    "IExecutionContext.set_optimization_profile_async",
    "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape",
    "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3",
    "TensorIOMode.INPUT",
    "TensorIOMode.OUTPUT",
    "DataType.FLOAT",
    "DataType.HALF",
    "DataType.BF16",
    "DataType.INT8",
    "DataType.FP8",
    "DataType.INT32",
    "DataType.INT64",
    "DataType.BOOL",
    "DataType.UINT8",
    "nptype",
    # plugins
    "get_plugin_registry",
    "IPluginRegistry.load_library",
    "init_libnvinfer_plugins",
    # the runtime (trtq/runtime/engine.py): host-memory shape tensors are refused at load
    "ICudaEngine.get_tensor_location",
    "TensorLocation.HOST",
)

#: Attributes used only where a feature says so: ``(feature, present)`` -> names. With
#: ``present`` False, the names are the fallback used where the feature is missing.
FEATURE_ATTRIBUTES: dict[tuple[str, bool], tuple[str, ...]] = {
    ("weak_typing", True): (
        "BuilderFlag.FP16",
        "BuilderFlag.INT8",
        "BuilderFlag.OBEY_PRECISION_CONSTRAINTS",
    ),
    ("int8_calibrators", True): (
        "IInt8Calibrator",
        "IInt8EntropyCalibrator2",
        "IInt8MinMaxCalibrator",
        "IInt8EntropyCalibrator2.get_algorithm",
        # the methods trtq's calibrators override (trtq/trt/calibrator.py, builder.py)
        "IInt8EntropyCalibrator2.get_batch_size",
        "IInt8EntropyCalibrator2.get_batch",
        "IInt8EntropyCalibrator2.read_calibration_cache",
        "IInt8EntropyCalibrator2.write_calibration_cache",
        "IInt8MinMaxCalibrator.get_batch",
        "IInt8MinMaxCalibrator.read_calibration_cache",
        "CalibrationAlgoType.ENTROPY_CALIBRATION_2",
        "CalibrationAlgoType.MINMAX_CALIBRATION",
        "IBuilderConfig.int8_calibrator",
        "IBuilderConfig.set_calibration_profile",
    ),
    ("strongly_typed_flag", True): ("NetworkDefinitionCreationFlag.STRONGLY_TYPED",),
    ("explicit_batch_flag", True): ("NetworkDefinitionCreationFlag.EXPLICIT_BATCH",),
    ("device_memory_size_v2", True): ("ICudaEngine.device_memory_size_v2",),
    ("device_memory_size_v2", False): ("ICudaEngine.device_memory_size",),
    ("version_compatible", True): (
        "BuilderFlag.VERSION_COMPATIBLE",
        "BuilderFlag.EXCLUDE_LEAN_RUNTIME",
        "Runtime.engine_host_code_allowed",
    ),
    ("hardware_compatibility", True): (
        "HardwareCompatibilityLevel.NONE",
        "HardwareCompatibilityLevel.AMPERE_PLUS",
        "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY",
        "IBuilderConfig.hardware_compatibility_level",
    ),
    ("builder_optimization_level", True): ("IBuilderConfig.builder_optimization_level",),
    ("timing_cache", True): (
        "IBuilderConfig.create_timing_cache",
        "IBuilderConfig.set_timing_cache",
        "IBuilderConfig.get_timing_cache",
        "ITimingCache.serialize",
    ),
    ("set_dynamic_range", True): ("ITensor.set_dynamic_range",),
}


def resolve(trt: ModuleType, dotted: str) -> Any:
    """The object at ``dotted`` (``"IBuilderConfig.set_flag"``) on the ``tensorrt`` module.

    Raises AttributeError naming the first missing part.
    """
    obj: Any = trt
    walked: list[str] = []
    for part in dotted.split("."):
        walked.append(part)
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"TensorRT {getattr(trt, '__version__', '?')} has no {'.'.join(walked)}"
            ) from None
    return obj


def has_attribute(trt: ModuleType, dotted: str) -> bool:
    """Whether ``dotted`` resolves on the ``tensorrt`` module (see :func:`resolve`)."""
    try:
        resolve(trt, dotted)
    except AttributeError:
        return False
    return True


@dataclass(frozen=True)
class TrtFeatures:
    """What the imported TensorRT offers, each field found by a check on the module."""

    #: ``tensorrt.__version__``, e.g. ``"10.13.3.9"``.
    version: str
    #: Major version parsed from :attr:`version` (for messages and the cache header).
    major: int
    #: ``BuilderFlag.FP16`` and ``BuilderFlag.INT8`` exist: the builder may choose precisions
    #: itself (10.x). Without them (11.x) every network is strongly typed and precision
    #: must be in the graph (Q/DQ, casts).
    weak_typing: bool
    #: ``IInt8EntropyCalibrator2`` and ``IBuilderConfig.int8_calibrator`` exist: TensorRT's
    #: implicit INT8 calibration is available (10.x only).
    int8_calibrators: bool
    #: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists (10.x opt-in; 11.x ignores it).
    strongly_typed_flag: bool
    #: ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` exists (ignored since 10.0, gone in 11).
    explicit_batch_flag: bool
    #: ``ICudaEngine.device_memory_size_v2`` exists (``device_memory_size`` is gone in 11).
    device_memory_size_v2: bool
    #: ``BuilderFlag.VERSION_COMPATIBLE``: engines that a newer TensorRT runtime can load.
    version_compatible: bool
    #: ``HardwareCompatibilityLevel.AMPERE_PLUS``: engines that run on other GPU generations.
    hardware_compatibility: bool
    #: ``IBuilderConfig.builder_optimization_level`` (build time against engine speed).
    builder_optimization_level: bool
    #: ``IBuilderConfig.create_timing_cache``: reuse tactic timings across builds.
    timing_cache: bool
    #: ``ITensor.set_dynamic_range``: per-tensor INT8 ranges without Q/DQ (10.x only).
    set_dynamic_range: bool

    @property
    def always_strongly_typed(self) -> bool:
        """Every network is strongly typed, whatever the creation flags say (11.x)."""
        return not self.weak_typing

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def detect(trt: ModuleType) -> TrtFeatures:
    """Detect what the given ``tensorrt`` module supports (no GPU, builder or engine needed)."""
    version = str(getattr(trt, "__version__", "0"))

    def has(*names: str) -> bool:
        return all(has_attribute(trt, name) for name in names)

    return TrtFeatures(
        version=version,
        major=_major(version),
        weak_typing=has("BuilderFlag.FP16", "BuilderFlag.INT8"),
        int8_calibrators=has("IInt8EntropyCalibrator2", "IBuilderConfig.int8_calibrator"),
        strongly_typed_flag=has("NetworkDefinitionCreationFlag.STRONGLY_TYPED"),
        explicit_batch_flag=has("NetworkDefinitionCreationFlag.EXPLICIT_BATCH"),
        device_memory_size_v2=has("ICudaEngine.device_memory_size_v2"),
        version_compatible=has("BuilderFlag.VERSION_COMPATIBLE"),
        hardware_compatibility=has(
            "HardwareCompatibilityLevel.AMPERE_PLUS", "IBuilderConfig.hardware_compatibility_level"
        ),
        builder_optimization_level=has("IBuilderConfig.builder_optimization_level"),
        timing_cache=has("IBuilderConfig.create_timing_cache"),
        set_dynamic_range=has("ITensor.set_dynamic_range"),
    )


def required_attributes(features: TrtFeatures) -> tuple[str, ...]:
    """Every attribute trtq may touch on a TensorRT with these ``features``."""
    names = list(USED_ATTRIBUTES)
    for (feature, present), extra in FEATURE_ATTRIBUTES.items():
        if getattr(features, feature) == present:
            names.extend(extra)
    return tuple(names)


def missing_attributes(trt: ModuleType, features: TrtFeatures | None = None) -> list[str]:
    """The attributes of :func:`required_attributes` that ``trt`` lacks (empty when conformant)."""
    features = features if features is not None else detect(trt)
    return [name for name in required_attributes(features) if not has_attribute(trt, name)]


def network_flags(trt: ModuleType, features: TrtFeatures, strongly_typed: bool) -> int:
    """The ``flags`` bitmask for ``builder.create_network(flags)``.

    * ``strongly_typed`` on 10.x sets ``STRONGLY_TYPED`` (precision follows the graph's
      Q/DQ and casts exactly; recommended for Q/DQ models from 10.12 on).
    * On 11.x every network is strongly typed: the flag still exists but is deprecated
      and ignored, so it is left out (nothing to ask for; weak typing cannot be asked for).
    * ``EXPLICIT_BATCH`` is set only on a TensorRT that still has implicit batch (before
      10.0); 10.x ignores it with a deprecation warning and 11.x removed it.

    Bits are computed from the module's own enum: the members' values differ between
    10.x and 11.x.
    """
    creation = trt.NetworkDefinitionCreationFlag
    flags = 0
    if features.explicit_batch_flag and 0 < features.major < 10:
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if strongly_typed and not features.always_strongly_typed:
        if not features.strongly_typed_flag:
            raise UserError(
                f"TensorRT {features.version} cannot build strongly typed networks",
                "upgrade to TensorRT 10.12 or newer (pip install 'trtq[trt]')",
            )
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


CalibrationAlgorithm = Literal["entropy", "minmax"]

_CALIBRATOR_BASES: dict[str, str] = {
    "entropy": "IInt8EntropyCalibrator2",
    "minmax": "IInt8MinMaxCalibrator",
}


def calibrator_base(trt: ModuleType, algorithm: CalibrationAlgorithm) -> type:
    """The real TensorRT base class for an implicit INT8 calibrator (TensorRT 10 only).

    A calibrator must subclass NVIDIA's own class so the builder's C++ side can call
    back into Python. ``entropy`` is ``IInt8EntropyCalibrator2`` (KL divergence, the
    one TensorRT recommends for CNNs), ``minmax`` is ``IInt8MinMaxCalibrator``.
    TensorRT 11 removed both: there precision must be in the graph, which is what
    ``trtq quantize`` writes.
    """
    if algorithm not in _CALIBRATOR_BASES:
        raise UserError(
            f"unknown calibration algorithm {algorithm!r}",
            f"use one of: {', '.join(_CALIBRATOR_BASES)}",
        )
    name = _CALIBRATOR_BASES[algorithm]
    if not has_attribute(trt, name):
        version = getattr(trt, "__version__", "?")
        raise UserError(
            f"TensorRT {version} has no {name}",
            "TensorRT 11 removed implicit INT8 calibration; use trtq quantize (explicit Q/DQ)",
        )
    return resolve(trt, name)
