"""The NVIDIA driver and its GPUs, asked from ``libcuda`` itself through ctypes.

``trtq doctor`` reports what the driver sees before anything else is tried: pycuda may
be missing or broken, ``nvidia-smi`` absent from a container, and TensorRT only says
"no usable GPU". libcuda is the driver: if it loads, it answers its version and the
devices it can use (after ``CUDA_VISIBLE_DEVICES``), and its error codes say why not.
Six driver API functions are used, each documented in NVIDIA's CUDA Driver API:
``cuInit``, ``cuDriverGetVersion``, ``cuDeviceGetCount``, ``cuDeviceGet``,
``cuDeviceGetName`` and ``cuDeviceGetAttribute``. Nothing here raises.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

#: The driver library's name on Linux (the unversioned ``libcuda.so`` is a toolkit stub).
LIBRARY = "libcuda.so.1"
#: ``CUdevice_attribute`` values of the compute capability.
_CC_MAJOR, _CC_MINOR = 75, 76
#: ``CUresult`` codes worth a word of their own (the rest are reported by number).
_ERRORS = {
    3: "CUDA_ERROR_NOT_INITIALIZED",
    35: "CUDA_ERROR_INSUFFICIENT_DRIVER",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    999: "CUDA_ERROR_UNKNOWN",
}


@dataclass(frozen=True)
class DeviceInfo:
    ordinal: int
    name: str
    compute_capability: str


@dataclass(frozen=True)
class DriverInfo:
    """What libcuda said: its CUDA version and devices, or why it could not be asked."""

    #: The newest CUDA version the driver supports, e.g. "12.4"; None when not loaded.
    cuda_version: str | None = None
    devices: list[DeviceInfo] = field(default_factory=list)
    #: Why the driver or its devices are not usable (None: all went well).
    problem: str | None = None


def probe_driver(library: Any = None) -> DriverInfo:
    """Ask the driver (``library``: a loaded libcuda; default: load :data:`LIBRARY`)."""
    if library is None:
        try:
            library = ctypes.CDLL(LIBRARY)
        except OSError:
            return DriverInfo(problem=f"no NVIDIA driver ({LIBRARY} does not load)")
    version = ctypes.c_int(0)
    code = library.cuDriverGetVersion(ctypes.byref(version))
    cuda = f"{version.value // 1000}.{version.value % 1000 // 10}" if code == 0 else None
    code = library.cuInit(0)
    if code != 0:
        return DriverInfo(cuda, problem=f"cuInit failed: {_error(code)}")
    count = ctypes.c_int(0)
    code = library.cuDeviceGetCount(ctypes.byref(count))
    if code != 0:
        return DriverInfo(cuda, problem=f"cuDeviceGetCount failed: {_error(code)}")
    devices = []
    for ordinal in range(count.value):
        device = _device(library, ordinal)
        if isinstance(device, str):
            return DriverInfo(cuda, devices, problem=device)
        devices.append(device)
    return DriverInfo(cuda, devices, None if devices else "the driver sees no GPU")


def _device(library: Any, ordinal: int) -> DeviceInfo | str:
    """Device ``ordinal``'s name and compute capability, or what went wrong."""
    handle = ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    calls = (
        ("cuDeviceGet", lambda: library.cuDeviceGet(ctypes.byref(handle), ordinal)),
        ("cuDeviceGetName", lambda: library.cuDeviceGetName(name, len(name), handle)),
        (
            "cuDeviceGetAttribute",
            lambda: library.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, handle),
        ),
        (
            "cuDeviceGetAttribute",
            lambda: library.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, handle),
        ),
    )
    for function, call in calls:
        code = call()
        if code != 0:
            return f"{function} for device {ordinal} failed: {_error(code)}"
    text = name.value.decode(errors="replace").strip()
    return DeviceInfo(ordinal, text, f"{major.value}.{minor.value}")


def _error(code: int) -> str:
    return f"{_ERRORS.get(code, 'CUresult')} ({code})"
