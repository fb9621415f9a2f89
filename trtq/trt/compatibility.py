"""Can this TensorRT and GPU run that engine? Answered from its sidecar, before TensorRT tries.

A serialized plan deserializes only on the TensorRT that built it (major.minor.patch;
a later one of the same major for ``--version-compatible`` engines) and on GPUs of the
compute capability it was built for (any Ampere or later GPU for
``--hardware-compatibility`` engines). The sidecar (:mod:`trtq.trt.sidecar`) records
both, so a mismatch is refused with one line naming both sides, instead of TensorRT's
multi-line serialization log. Unknown facts (no sidecar, no GPU recorded) are not held
against an engine: TensorRT still has the last word.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trtq.trt.sidecar import SidecarError, read_sidecar

log = logging.getLogger(__name__)

#: Oldest compute capability a hardware-compatible (AMPERE_PLUS) engine runs on.
_AMPERE = (8, 0)


def matching_sidecar(path: Path, plan: bytes) -> dict[str, Any] | None:
    """The engine's validated sidecar; None if it has none, or one that cannot be trusted.

    A sidecar is optional (engines from trtexec or polygraphy have none) and only
    improves messages: TensorRT itself still refuses an incompatible plan, and nothing
    in a sidecar decides what runs. So one that is malformed, or describes another
    engine, is ignored with a one-line warning rather than refusing a good engine.
    """
    try:
        return read_sidecar(path, plan)
    except SidecarError as exc:
        log.warning("%s; ignored, %s loads without it", exc.problem, path.name)
        return None


def compatibility_problem(
    sidecar: Mapping[str, Any] | None, tensorrt_version: str, gpu: Mapping[str, Any]
) -> str | None:
    """Why this TensorRT and GPU cannot run an engine with ``sidecar``; None if they can.

    Unknown facts (no sidecar, no GPU recorded) are not held against the engine.
    """
    if not sidecar:
        return None
    options = sidecar.get("build_options") or {}  # read_sidecar checked every type
    built = str(sidecar.get("tensorrt_version") or "")
    built_gpu = sidecar.get("gpu") or {}
    built_cc = built_gpu.get("compute_capability")
    version_ok = _version_fits(built, tensorrt_version, bool(options.get("version_compatible")))
    gpu_ok = _capability_fits(
        built_cc, gpu.get("compute_capability"), bool(options.get("hardware_compatibility"))
    )
    if version_ok and gpu_ok:
        return None
    built_name = f" ({built_gpu['name']})" if built_gpu.get("name") else ""
    return (
        f"built by TensorRT {_short(built) or '?'} for compute capability {built_cc or '?'}"
        f"{built_name}; this is TensorRT {_short(tensorrt_version)} on "
        f"{gpu.get('compute_capability')} ({gpu.get('name')})"
    )


def _version_key(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def _short(version: str) -> str:
    return ".".join(map(str, _version_key(version)))


def _version_fits(built: str, installed: str, version_compatible: bool) -> bool:
    """Same major.minor.patch; or, for version-compatible engines, a later same-major one."""
    have, want = _version_key(installed), _version_key(built)
    if not want or not have:
        return True
    if version_compatible:
        return have[0] == want[0] and have >= want
    return have == want


def _capability_fits(built: str | None, current: str | None, hardware_compatible: bool) -> bool:
    if not built or not current:
        return True
    have, want = _capability(current), _capability(built)
    if have is None or want is None:
        return True
    return have >= _AMPERE if hardware_compatible else have == want


def _capability(text: str) -> tuple[int, int] | None:
    major, _, minor = str(text).partition(".")
    return (int(major), int(minor or 0)) if major.isdigit() and (minor or "0").isdigit() else None
