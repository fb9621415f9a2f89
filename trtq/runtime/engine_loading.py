"""Loading a TensorRT engine: everything that happens before its first call.

Loading is where engines fail in practice, so it is checked step by step, each
failure one line:

1. the plan is read, and its sidecar (``model.engine.json``, written by ``trtq build``),
   validated against its schema, says which TensorRT version and GPU built it; a
   mismatch is refused before TensorRT sees the plan (:mod:`trtq.trt.compatibility`);
2. the plugins the caller names (``plugins=``, ``--plugins``) are registered first:
   deserializing an engine whose plugin is missing fails;
3. the engine's embedded host code (the lean runtime inside a version-compatible plan)
   may run only if the caller says so (``allow_host_code=True``, ``--allow-host-code``);
4. ``deserialize_cuda_engine`` returning None is one line too, naming what the sidecar
   records and the caller did not give (plugins, host code);
5. the engine's I/O is described as :class:`~trtq.runtime.base.IOSpec`, refusing what
   trtq's runtime cannot serve (host shape tensors, dtypes numpy has no type for).

Loading runs no code the caller did not name. The sidecar is data: it never decides
which plugins load or whether host code runs, and files that happen to sit next to
the engine are never loaded.

The GPU is opened through ``pycuda.driver`` (:class:`Gpu`), whose primary context is
the one TensorRT, CuPy and PyTorch use too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from trtq.errors import ModelError, UserError, require
from trtq.runtime.base import IOSpec, Shape
from trtq.trt import one_line
from trtq.trt.builder import dtype_name
from trtq.trt.plugins import load_plugins, unique_plugins
from trtq.trt.sidecar import built_version_compatible, recorded_plugins


def import_cuda_driver() -> Any:
    """``pycuda.driver``, initialised; one line naming the extra when missing or broken."""
    driver = require("pycuda.driver", "gpu", "running TensorRT engines")
    try:
        driver.init()
    except Exception as exc:  # pycuda's own error types (no driver, no device)
        raise UserError(
            f"no usable TensorRT/GPU: CUDA could not start ({one_line(exc)})",
            "check that an NVIDIA GPU is visible (nvidia-smi)",
        ) from exc
    return driver


@dataclass
class Gpu:
    """A GPU and its primary context (the one TensorRT, CuPy and PyTorch use too)."""

    driver: Any
    ordinal: int
    name: str
    capability: tuple[int, int]
    primary: Any

    @classmethod
    def open(cls, driver: Any, ordinal: int) -> Gpu:
        count = driver.Device.count()
        if not 0 <= ordinal < count:
            raise UserError(
                f"no CUDA device {ordinal} (this machine has {count})",
                f"pick one of 0..{count - 1} with --device" if count else "run on a GPU machine",
            )
        device = driver.Device(ordinal)
        major, minor = device.compute_capability()
        return cls(driver, ordinal, device.name(), (major, minor), device.retain_primary_context())

    def info(self) -> dict[str, str]:
        return {"name": self.name, "compute_capability": "{}.{}".format(*self.capability)}

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """This GPU's context current on the calling thread for the block (any thread)."""
        self.primary.push()
        try:
            yield
        finally:
            self.driver.Context.pop()


def read_plan(path: Path) -> bytes:
    """The serialized engine's bytes; a missing, unreadable or empty file is one line."""
    try:
        plan = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"engine file not found: {path}", "check the path") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}", "check the file") from exc
    if not plan:
        raise ModelError(f"{path} is empty", "rebuild it with trtq build")
    return plan


def deserialize(
    trt: ModuleType,
    logger: Any,
    runtime: Any,
    plan: bytes,
    path: Path,
    sidecar: Mapping[str, Any] | None,
    plugins: Sequence[str | Path] | None,
    *,
    allow_host_code: bool = False,
) -> Any:
    """The caller's plugins, then the plan (the CUDA context must be current)."""
    given = unique_plugins(plugins)
    load_plugins(trt, logger, given)
    if allow_host_code:
        # A version-compatible plan carries its own lean runtime, host code that TensorRT
        # runs only when told to: the caller's choice, never the sidecar's.
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ModelError(
            f"TensorRT {getattr(trt, '__version__', '?')} could not deserialize {path.name} "
            f"(see the log above){_what_was_missing(sidecar, given, allow_host_code)}",
            "an engine loads only with the TensorRT version, GPU type and plugins that built "
            "it: rebuild it here with trtq build, or pass its plugins with --plugins "
            "(plugins=[...])",
        )
    return engine


def _what_was_missing(
    sidecar: Mapping[str, Any] | None, given: Sequence[Path], allow_host_code: bool
) -> str:
    """What the sidecar records that the caller did not pass: a hint, never an action."""
    hints = []
    names = {path.name for path in given}
    missing = [name for name in recorded_plugins(sidecar) if name not in names]
    if missing:
        hints.append(
            f"it was built with plugin{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(ascii, missing))}, not passed here: pass "
            f"plugins=[...] (--plugins) if you trust {'them' if len(missing) > 1 else 'it'}"
        )
    if built_version_compatible(sidecar) and not allow_host_code:
        hints.append(
            "it was built version-compatible, and its embedded runtime runs only with "
            "allow_host_code=True (--allow-host-code): pass it if you trust the engine's origin"
        )
    return "".join(f"; {hint}" for hint in hints)


def io_specs(trt: ModuleType, engine: Any, model: str) -> tuple[list[IOSpec], list[IOSpec]]:
    """Inputs and outputs as the engine reports them (profile 0 for dynamic inputs)."""
    inputs, outputs = [], []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        if engine.get_tensor_location(name) == trt.TensorLocation.HOST:
            raise ModelError(
                f"'{name}' of {model} is a shape tensor kept in host memory, which trtq's "
                "runtime does not support",
                "export the model so that shapes are computed inside the graph",
            )
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        dtype = _numpy_dtype(trt, engine.get_tensor_dtype(name), name, model)
        profile = None
        if is_input:
            profile = _profile(engine, name) if any(d < 0 for d in shape) else (shape,) * 3
        (inputs if is_input else outputs).append(IOSpec(name, dtype, shape, profile))
    return inputs, outputs


def io_entry(spec: IOSpec, mode: str) -> dict[str, Any]:
    """One tensor as the sidecar records it (-1 for dynamic dims), for ``engine.info()``."""
    entry: dict[str, Any] = {
        "name": spec.name,
        "mode": mode,
        "dtype": str(spec.dtype),
        "shape": list(spec.shape),
    }
    if spec.profile is not None:
        entry["profile"] = dict(zip(("min", "opt", "max"), map(list, spec.profile), strict=True))
    return entry


def _profile(engine: Any, name: str) -> tuple[Shape, Shape, Shape]:
    low, opt, high = engine.get_tensor_profile_shape(name, 0)
    return tuple(map(int, low)), tuple(map(int, opt)), tuple(map(int, high))


def _numpy_dtype(trt: ModuleType, dtype: Any, name: str, model: str) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise ModelError(
            f"'{name}' of {model} is {dtype_name(dtype)}, which numpy has no type for",
            "rebuild with that input/output in float32, float16 or an integer type",
        ) from None
