"""The engine and its sidecar: ``model.engine`` plus ``model.engine.json``.

A serialized engine only runs with the TensorRT version, and usually the GPU
generation, that built it, and it does not say how it was made. The sidecar
records that: TensorRT version, GPU, I/O tensors with their profile shapes,
where the precision came from, hashes of the source model, calibration cache
and engine, and the build options. The engine file itself stays raw plan
bytes, so ``trtexec --loadEngine`` and polygraphy load it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trtq import __version__
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


def read_sidecar(engine_path: str | Path) -> dict[str, Any] | None:
    """The sidecar of ``engine_path``, or None if there is none."""
    path = sidecar_path(engine_path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def sha256_of(source: str | Path | bytes) -> str:
    """Hex SHA-256 of a file (read in chunks) or of bytes."""
    if isinstance(source, bytes | bytearray | memoryview):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
