"""The engine and its sidecar: ``model.engine`` plus ``model.engine.json``.

A serialized engine only runs with the TensorRT version, and usually the GPU
generation, that built it, and it does not say how it was made. The sidecar
records that: TensorRT version, GPU, I/O tensors with their profile shapes,
where the precision came from, hashes of the source model, calibration cache
and engine, and the build options. The engine file itself stays raw plan
bytes, so ``trtexec --loadEngine`` and polygraphy load it unchanged.

Reading a sidecar (:func:`read_sidecar`) validates it against :data:`SIDECAR_SCHEMA`,
plain code rather than a schema library: the type of every field trtq reads, and the
engine's SHA-256 against the plan bytes. A sidecar is a record, never an instruction:
nothing in it decides what code runs (plugins and an engine's embedded host code are
the caller's explicit choice, see :mod:`trtq.runtime.engine_loading`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trtq import __version__
from trtq.errors import ModelError
from trtq.fileio import atomic_path
from trtq.trt.builder import BuildOptions, BuildResult

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "trtq-engine"
SIDECAR_VERSION = 1
#: How the engine got its precision: from the graph (strongly typed), or TensorRT 10's flags.
PRECISION_MODES = ("graph", "weak-fp16", "weak-int8")

GpuInfo = dict[str, str | None]


def sidecar_path(engine_path: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def make_sidecar(
    result: BuildResult,
    options: BuildOptions,
    *,
    source_model: str | Path | bytes,
    precision: str = "graph",
    calibration_cache: str | Path | None = None,
    gpu: GpuInfo | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sidecar for ``result``; ``gpu`` is queried when not given (None where unknown)."""
    if precision not in PRECISION_MODES:
        raise ValueError(f"precision must be one of {PRECISION_MODES}, not {precision!r}")
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "trtq_version": __version__,
        "tensorrt_version": result.features.version,
        "gpu": gpu if gpu is not None else gpu_info(),
        "precision": precision,
        "io": result.io,
        "source_model": None if isinstance(source_model, bytes) else str(source_model),
        "source_model_sha256": sha256_of(source_model),
        "calibration_cache": str(calibration_cache) if calibration_cache else None,
        "calibration_cache_sha256": sha256_of(calibration_cache) if calibration_cache else None,
        "engine_bytes": len(result.plan),
        "engine_sha256": hashlib.sha256(result.plan).hexdigest(),
        "build_seconds": round(result.build_seconds, 3),
        "build_options": options.to_json(),
        **(extra or {}),
    }


def write_engine(path: str | Path, plan: bytes, sidecar: dict[str, Any]) -> Path:
    """Write the raw plan to ``path`` and the sidecar to ``path + ".json"``, atomically.

    Both go to temporary files first and are renamed only when both are
    complete, the sidecar first: a reader never finds a new engine next to a
    stale sidecar (the sidecar's ``engine_sha256`` tells a mismatch apart).
    Returns the sidecar's path.
    """
    json_path = sidecar_path(path)
    text = json.dumps(sidecar, indent=2) + "\n"
    with atomic_path(path) as engine_tmp, atomic_path(json_path) as json_tmp:
        engine_tmp.write_bytes(plan)
        json_tmp.write_text(text, encoding="utf-8")
    return json_path


def read_sidecar(engine_path: str | Path, plan: bytes) -> dict[str, Any] | None:
    """The sidecar of the engine at ``engine_path`` whose bytes are ``plan``, validated.

    None if there is no sidecar. A sidecar that is not a regular file, too large, not
    JSON, not of :data:`SIDECAR_SCHEMA`, or about another engine (its ``engine_sha256``
    is not the plan's) raises :class:`SidecarError`, one line naming the field.
    """
    path = sidecar_path(engine_path)
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SidecarError(f"cannot read {path.name}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise SidecarError(f"{path.name} is not a regular file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(SIDECAR_MAX_BYTES + 1)  # bounded, even if the file grows
    except OSError as exc:
        raise SidecarError(f"cannot read {path.name}: {exc.strerror}") from exc
    if len(raw) > SIDECAR_MAX_BYTES:
        raise SidecarError(
            f"{path.name} is larger than a sidecar ever is ({SIDECAR_MAX_BYTES:,} bytes)"
        )
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise SidecarError(f"{path.name} is not readable JSON ({_first_line(exc)})") from exc
    validate_sidecar(data, path.name)
    if data["engine_sha256"] != hashlib.sha256(plan).hexdigest():
        raise SidecarError(
            f"{path.name} describes another engine (its engine_sha256 is not the hash of "
            f"{Path(engine_path).name})"
        )
    if data.get("engine_bytes") not in (None, len(plan)):
        raise SidecarError(
            f"{path.name} records engine_bytes {data['engine_bytes']:,}, not "
            f"the {len(plan):,} bytes of {Path(engine_path).name}"
        )
    return data


def sha256_of(source: str | Path | bytes) -> str:
    """Hex SHA-256 of a file (read in chunks) or of bytes."""
    if isinstance(source, bytes | bytearray | memoryview):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the schema ---------------------------------------------------------------------------

#: Larger files are refused unread: a sidecar is a few kilobytes (its I/O list grows with
#: the engine's inputs and outputs, a few hundred bytes each).
SIDECAR_MAX_BYTES = 16 << 20


class SidecarError(ModelError):
    """An engine's sidecar that cannot be trusted as a record of that engine."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem, "rebuild the engine with trtq build, or delete the sidecar")


class _Invalid(Exception):
    """A value that does not fit the schema: where, and what was expected there."""

    def __init__(self, where: str, expected: str, value: Any) -> None:
        super().__init__(f"{where or 'the file'} should be {expected}, not {_kind(value)}")


#: ``(value, where)``: raises :class:`_Invalid` if ``value`` does not fit.
Check = Callable[[Any, str], None]


def _typed(expected: str, test: Callable[[Any], bool]) -> Check:
    def check(value: Any, where: str) -> None:
        if not test(value):
            raise _Invalid(where, expected, value)

    return check


_STRING = _typed("a string", lambda v: isinstance(v, str))
_BOOL = _typed("true or false", lambda v: isinstance(v, bool))
_COUNT = _typed(
    "a whole number >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
)
_DIM = _typed(
    "a whole number >= -1 (-1: dynamic)",
    lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1,
)
_SECONDS = _typed(
    "a number of seconds >= 0",
    lambda v: (
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    ),
)
_SHA256 = _typed(
    "a SHA-256 as 64 lowercase hex digits",
    lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None,
)
_CAPABILITY = _typed(
    'a compute capability such as "9.0"',
    lambda v: isinstance(v, str) and re.fullmatch("[0-9]{1,3}[.][0-9]{1,3}", v) is not None,
)
_ANY_OBJECT = _typed("an object", lambda v: isinstance(v, dict))


def _one_of(*choices: Any) -> Check:
    # Compared with their type too: JSON's true must not pass for 1.
    return _typed(
        " or ".join(json.dumps(c) for c in choices),
        lambda v: any(type(v) is type(c) and v == c for c in choices),
    )


def _nullable(check: Check) -> Check:
    def nullable(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)

    return nullable


def _list_of(check: Check) -> Check:
    def items(value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise _Invalid(where, "a list", value)
        for index, item in enumerate(value):
            check(item, f"{where}[{index}]")

    return items


def _map_of(check: Check) -> Check:
    def entries(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(where, "an object", value)
        for key, item in value.items():
            check(item, f"{where}[{json.dumps(key)}]")

    return entries


def _object(fields: Mapping[str, Check], required: Sequence[str] = ()) -> Check:
    """An object whose listed fields fit; other fields are kept and not read by trtq."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(where, "an object", value)
        for name in required:
            if name not in value:
                raise _Invalid(_join(where, name), "present", _MISSING)
        for name, field_check in fields.items():
            if name in value:
                field_check(value[name], _join(where, name))

    return check


_SHAPE = _list_of(_DIM)
_PROFILE = _object({"min": _SHAPE, "opt": _SHAPE, "max": _SHAPE}, required=("min", "opt", "max"))
_IO_TENSOR = _object(
    {
        "name": _STRING,
        "mode": _one_of("input", "output"),
        "dtype": _STRING,
        "shape": _list_of(
            _typed(
                "a dim (a whole number or a name)",
                lambda v: (
                    isinstance(v, str)
                    or (isinstance(v, int) and not isinstance(v, bool) and v >= -1)
                ),
            )
        ),
        "profile": _PROFILE,
    },
    required=("name", "mode", "dtype", "shape"),
)
_BUILD_OPTIONS = _object(
    {
        "profile": _map_of(_PROFILE),
        "workspace": _nullable(_COUNT),
        "builder_optimization_level": _nullable(_COUNT),
        "timing_cache": _nullable(_STRING),
        "plugins": _list_of(_STRING),
        "version_compatible": _BOOL,
        "hardware_compatibility": _BOOL,
        "strongly_typed": _BOOL,
        "weak_precision": _nullable(_one_of("fp16", "int8")),
        "calibrator": _nullable(_STRING),
    }
)

#: What a sidecar holds, field by field (:func:`make_sidecar` writes every one of them).
#: Only the fields that tie it to its engine are required: format, version and hash.
SIDECAR_SCHEMA = _object(
    {
        "format": _one_of(SIDECAR_FORMAT),
        "format_version": _one_of(*range(1, SIDECAR_VERSION + 1)),
        "trtq_version": _STRING,
        "tensorrt_version": _STRING,
        "gpu": _object({"name": _nullable(_STRING), "compute_capability": _nullable(_CAPABILITY)}),
        "precision": _one_of(*PRECISION_MODES),
        "io": _list_of(_IO_TENSOR),
        "source_model": _nullable(_STRING),
        "source_model_sha256": _nullable(_SHA256),
        "calibration_cache": _nullable(_STRING),
        "calibration_cache_sha256": _nullable(_SHA256),
        "engine_bytes": _COUNT,
        "engine_sha256": _SHA256,
        "build_seconds": _SECONDS,
        "build_options": _BUILD_OPTIONS,
        "graph_precision": _nullable(_STRING),
        "built_model": _nullable(_STRING),
        "built_model_sha256": _nullable(_SHA256),
        "frontend": _nullable(_ANY_OBJECT),
    },
    required=("format", "format_version", "tensorrt_version", "engine_sha256"),
)


def validate_sidecar(data: Any, name: str = "the sidecar") -> None:
    """Raise :class:`SidecarError` naming the first field of ``data`` that breaks the schema."""
    try:
        SIDECAR_SCHEMA(data, "")
    except _Invalid as exc:
        raise SidecarError(f"{name} is not a trtq engine sidecar: {exc}") from None


def recorded_plugins(sidecar: Mapping[str, Any] | None) -> list[str]:
    """File names of the plugins the engine was built with (for messages only)."""
    plugins = ((sidecar or {}).get("build_options") or {}).get("plugins") or []
    return [Path(entry).name for entry in plugins]


def built_version_compatible(sidecar: Mapping[str, Any] | None) -> bool:
    """Whether the sidecar says the engine was built version-compatible (a record only)."""
    return ((sidecar or {}).get("build_options") or {}).get("version_compatible") is True


_MISSING = object()


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _kind(value: Any) -> str:
    """How a wrong value is described: its JSON type (never its text, which may be anything)."""
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        text = repr(value)  # one line; a 4000-digit integer is not worth printing
        return f"the number {text}" if len(text) <= 24 else "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), "something else")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# --- which GPU built the engine ----------------------------------------------------------


def gpu_info(probes: Sequence[Callable[[], GpuInfo | None]] | None = None) -> GpuInfo:
    """Name and compute capability of the first visible GPU; nulls when nothing can tell.

    Tries cuda-python, then pycuda, then ``nvidia-smi``. Never raises: the
    sidecar is a record, and a missing GPU query must not fail a finished build.
    """
    for probe in probes if probes is not None else (_cuda_python, _pycuda, _nvidia_smi):
        try:
            found = probe()
        except Exception as exc:  # a broken driver binding is just "unknown"
            log.debug("GPU query %s failed: %s", getattr(probe, "__name__", probe), exc)
            continue
        if found and found.get("name"):
            return found
    return {"name": None, "compute_capability": None}


def _cuda_python() -> GpuInfo | None:
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        from cuda import cuda as driver  # older cuda-python
    attr = driver.CUdevice_attribute
    if driver.cuInit(0)[0] != driver.CUresult.CUDA_SUCCESS:
        return None
    _, device = driver.cuDeviceGet(0)
    _, raw = driver.cuDeviceGetName(256, device)
    _, major = driver.cuDeviceGetAttribute(
        attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device
    )
    _, minor = driver.cuDeviceGetAttribute(
        attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device
    )
    name = bytes(raw).split(b"\0", 1)[0].decode(errors="replace").strip()
    return {"name": name, "compute_capability": f"{major}.{minor}"}


def _pycuda() -> GpuInfo | None:
    import pycuda.driver as cuda

    cuda.init()
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return {"name": device.name(), "compute_capability": f"{major}.{minor}"}


def _nvidia_smi() -> GpuInfo | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    command = [exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible:
        command += ["-i", visible]
    done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        return None
    name, _, capability = lines[0].rpartition(",")
    return {"name": name.strip(), "compute_capability": capability.strip() or None}
