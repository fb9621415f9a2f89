"""The TensorRT backend: :class:`~trtq.runtime.base.Engine` on a deserialized ``.engine`` file.

``trtq.load("model.engine")`` lands here. Loading is where engines fail in practice, so
it is checked step by step, each failure one line:

1. the sidecar (``model.engine.json``, written by ``trtq build``) says which TensorRT
   version and GPU built the engine; a plan only deserializes on the same TensorRT
   (major.minor.patch; a later one of the same major for ``--version-compatible``
   engines) and the same compute capability (any Ampere or later GPU for
   ``--hardware-compatibility`` engines). A mismatch is refused before TensorRT sees
   the plan, naming both sides, instead of TensorRT's multi-line serialization log;
2. plugin libraries named in the sidecar's build options, plus ``plugins=``, are
   registered first: deserializing an engine whose plugin is missing fails;
3. ``deserialize_cuda_engine`` returning None is one line too.

Running: every thread that calls the engine gets its own TensorRT execution context
and CUDA stream (an execution context is not thread-safe), with device buffers per
tensor allocated on first use and grown only when a larger shape arrives, and pinned
host buffers to stage inputs and outputs (asynchronous copies need page-locked
memory; pageable copies also run at a third of the speed). A call copies inputs in,
enqueues the engine, copies outputs out, all on the context's stream, synchronizes
once and returns numpy copies. CUDA arrays (CuPy, PyTorch, pycuda GPUArray: anything
with ``__cuda_array_interface__``) are not copied: their pointer is handed to TensorRT.

Every execution context holds the engine's activation memory, so a server with many
threads holds that many copies. :meth:`TensorRTEngine.context` hands out contexts
from a pool instead, for callers who schedule their own work, and
:meth:`TensorRTEngine.infer_async` runs on a pooled context and returns a handle.

TensorRT and pycuda are imported when an engine is loaded, never at import time.
Every TensorRT attribute used here is listed in :data:`trtq.trt.compat.USED_ATTRIBUTES`
and checked against NVIDIA's real 10.x and 11.x bindings by the test suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from trtq.errors import DataError, ModelError, UserError, require
from trtq.runtime.base import Engine, IOSpec, Shape, format_dims

log = logging.getLogger(__name__)

__all__ = ["EngineContext", "PendingInference", "TensorRTEngine", "compatibility_problem"]

#: Phases :meth:`TensorRTEngine.bench_breakdown` times, in call order.
PHASES = ("h2d", "compute", "d2h")
#: ``__cuda_array_interface__`` stream values that need no wait: none given, or the legacy
#: default stream (0 is not allowed by the protocol; read as legacy). Work there is
#: ordered before anything on the blocking streams trtq creates.
_ORDERED_STREAMS = frozenset({None, 0, 1})
#: Oldest compute capability a hardware-compatible (AMPERE_PLUS) engine runs on.
_AMPERE = (8, 0)


class TensorRTEngine(Engine):
    """A serialized TensorRT engine, run on GPU ``device`` (see the module docstring).

    ``plugins`` are plugin libraries to register besides those the sidecar names.
    ``trt`` and ``driver`` replace the ``tensorrt`` module and ``pycuda.driver`` (tests
    run the whole backend on stand-ins); by default both are imported here.
    """

    backend = "tensorrt"
    accepts_device_arrays = True

    def __init__(
        self,
        path: str | Path,
        *,
        device: int = 0,
        plugins: Sequence[str | Path] | None = None,
        trt: ModuleType | None = None,
        driver: Any = None,
    ) -> None:
        from trtq.trt import create_runtime, import_tensorrt
        from trtq.trt.builder import make_logger

        path = Path(path)
        trt = trt if trt is not None else import_tensorrt()
        plan = _read_plan(path)
        sidecar = _matching_sidecar(path, plan)
        logger = make_logger(trt)
        runtime = create_runtime(trt, logger)  # "no usable TensorRT/GPU" fails here
        gpu = _Gpu.open(driver if driver is not None else import_cuda_driver(), device)
        self.tensorrt_version = str(getattr(trt, "__version__", "?"))
        problem = compatibility_problem(sidecar, self.tensorrt_version, gpu.info())
        if problem:
            raise UserError(f"{path.name} was {problem}", "rebuild it here with trtq build")
        with gpu.current():
            engine = _deserialize(trt, logger, runtime, plan, path, sidecar, plugins)
        inputs, outputs = io_specs(trt, engine, path.name)
        super().__init__(path, inputs, outputs)
        self.device = device
        self.sidecar = sidecar
        self._logger = logger  # TensorRT keeps a pointer to it: it must outlive the runtime
        self._runtime, self._engine = runtime, engine
        self._gpu = gpu
        self._driver = gpu.driver
        self._lock = threading.Lock()
        self._local = threading.local()
        self._slots: list[_Slot] = []  # every context made, for close()
        self._pool: list[_Slot] = []  # contexts free for context() and infer_async()
        self._closed = False

    # --- the Engine interface ------------------------------------------------------------

    def _run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        with self._gpu.current():
            slot = self._thread_slot()
            return self._run_on(slot, feeds, slot.stream)

    def info(self) -> dict[str, Any]:
        """Backend, TensorRT version and GPU running the engine, its I/O, and its sidecar."""
        built = {k: v for k, v in self.sidecar.items() if k != "io"} if self.sidecar else None
        return {
            **super().info(),
            "tensorrt_version": self.tensorrt_version,
            "gpu": {"device": self.device, **self._gpu.info()},
            "io": [
                _io_entry(spec, mode)
                for mode, specs in (("input", self.inputs), ("output", self.outputs))
                for spec in specs
            ],
            "built": built,
        }

    def bench_breakdown(self, feeds: Mapping[str, Any], iterations: int) -> dict[str, float]:
        """Mean ms of host->device copies, the engine, and device->host copies per call.

        Timed with CUDA events on a pooled context's stream after one untimed call (which
        allocates the buffers). Host work between events (staging into pinned memory,
        TensorRT's enqueue) counts in the phase it delays, as a caller would see it.
        """
        checked = self._check(feeds)
        count = max(int(iterations), 1)
        totals = [0.0] * len(PHASES)
        with self._gpu.current():
            slot = self._acquire()
            try:
                self._run_on(slot, checked, slot.stream)
                marks = [self._driver.Event() for _ in range(len(PHASES) + 1)]
                for _ in range(count):
                    self._enqueue(slot, checked, slot.stream, marks)
                    marks[-1].synchronize()
                    for i in range(len(PHASES)):
                        totals[i] += marks[i].time_till(marks[i + 1])
            finally:
                self._release(slot)
        return {phase: round(total / count, 6) for phase, total in zip(PHASES, totals, strict=True)}

    def close(self) -> None:
        """Free every context, buffer and the engine. Call when no call is running."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots, self._slots, self._pool = self._slots, [], []
        self._local = threading.local()
        with self._gpu.current():  # TensorRT and pycuda free device memory in this context
            for slot in slots:
                slot.free()
            self._engine = None
            self._runtime = None

    # --- explicit contexts and asynchronous calls ----------------------------------------

    @contextlib.contextmanager
    def context(self) -> Iterator[EngineContext]:
        """A dedicated execution context from the pool, returned to it on exit.

        For callers who manage their own threads or streams: one ``EngineContext`` per
        concurrent worker, each with its own buffers and stream. Not thread-safe itself.
        """
        with self._gpu.current():
            slot = self._acquire()
        lease = EngineContext(self, slot)
        try:
            yield lease
        finally:
            lease._end()
            self._release(slot)

    def infer_async(self, inputs: Mapping[str, Any], stream: Any = None) -> PendingInference:
        """Start one batch on a pooled context; ``.wait()`` on the handle gives the outputs.

        Copies and the engine run on ``stream`` (a ``pycuda.driver.Stream``; None: the
        context's own). Device arrays passed in must stay alive and unchanged until
        ``wait()``. The context returns to the pool at ``wait()``, so always call it.
        """
        feeds = self._check(inputs)
        with self._gpu.current():
            slot = self._acquire()
            try:
                return self._start(slot, feeds, stream, release=True)
            except BaseException:
                self._release(slot)
                raise

    @property
    def engine(self) -> Any:
        """The underlying ``tensorrt.ICudaEngine``, for what this interface does not cover."""
        return self._engine

    # --- slots: one execution context with its stream and buffers ------------------------

    def _thread_slot(self) -> _Slot:
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = self._new_slot()
        return slot

    def _acquire(self) -> _Slot:
        with self._lock:
            slot = self._pool.pop() if self._pool else None
        return slot if slot is not None else self._new_slot()

    def _release(self, slot: _Slot) -> None:
        """Back to the pool once its stream is idle (a later user must not race it)."""
        with self._gpu.current():
            slot.stream.synchronize()
        with self._lock:
            if not self._closed:
                self._pool.append(slot)

    def _new_slot(self) -> _Slot:
        """A new execution context and stream (the CUDA context must be current)."""
        with self._lock:  # creating contexts concurrently is not documented as safe
            if self._closed:
                raise UserError("this engine was closed", "load the engine again")
            context = self._engine.create_execution_context()
            if context is None:
                raise UserError(
                    f"TensorRT could not create an execution context for {self.path.name} "
                    "(see the log above; most often the GPU is out of memory)",
                    "free GPU memory, or use fewer threads or engine.context() to share contexts",
                )
            slot = _Slot(context, self._driver.Stream(), self._driver)
            self._slots.append(slot)
        return slot

    # --- one call ------------------------------------------------------------------------

    def _run_on(self, slot: _Slot, feeds: Mapping[str, Any], stream: Any) -> dict[str, np.ndarray]:
        views = self._enqueue(slot, feeds, stream)
        stream.synchronize()
        return {name: view.copy() for name, view in views.items()}

    def _start(
        self, slot: _Slot, feeds: Mapping[str, Any], stream: Any, *, release: bool
    ) -> PendingInference:
        stream = _pycuda_stream(stream, slot)
        views = self._enqueue(slot, feeds, stream)
        done = self._driver.Event()
        done.record(stream)
        pending = PendingInference(self, slot, views, done, feeds, release=release)
        slot.pending = pending
        return pending

    def _enqueue(
        self, slot: _Slot, feeds: Mapping[str, Any], stream: Any, marks: Sequence[Any] = ()
    ) -> dict[str, np.ndarray]:
        """Queue copies in, the engine and copies out on ``stream``; pinned views to read.

        ``marks`` are events recorded between the phases (``bench_breakdown``). If
        anything fails, the stream is drained before the error propagates, so the
        next call never refills a pinned buffer that a copy still reads.
        """
        try:
            _record(marks, 0, stream)
            for spec in self.inputs:
                self._bind_input(slot, spec, feeds[spec.name], stream)
            _record(marks, 1, stream)
            shapes = {spec.name: self._bind_output(slot, spec) for spec in self.outputs}
            if not slot.context.execute_async_v3(stream.handle):
                raise UserError(
                    f"TensorRT failed to run {self.path.name} (see the log above)",
                    "rerun with -v for TensorRT's log",
                )
            _record(marks, 2, stream)
            views = {
                spec.name: self._fetch(slot, spec, shapes[spec.name], stream)
                for spec in self.outputs
            }
            _record(marks, 3, stream)
        except BaseException:
            stream.synchronize()
            raise
        return views

    def _bind_input(self, slot: _Slot, spec: IOSpec, value: Any, stream: Any) -> None:
        if type(value) is np.ndarray:
            address = self._send(slot, spec.name, value, stream)
        else:
            address = device_pointer(spec.name, value, stream, self._driver)
        shape = tuple(value.shape) if type(value) is np.ndarray else _interface_shape(value)
        if slot.shapes.get(spec.name) != shape:
            if not slot.context.set_input_shape(spec.name, shape):
                slot.shapes.pop(spec.name, None)
                raise DataError(
                    f"input '{spec.name}': TensorRT refused shape {format_dims(shape)} for "
                    f"{self.path.name} (see the log above)",
                    "feed shapes within the engine's profile (trtq inspect shows it)",
                )
            slot.shapes[spec.name] = shape
        slot.context.set_tensor_address(spec.name, address)

    def _send(self, slot: _Slot, name: str, array: np.ndarray, stream: Any) -> int:
        """Stage ``array`` in pinned memory and queue its copy; the device address."""
        device = slot.device(name, array.nbytes)
        if array.nbytes:
            staged = slot.host(name, array.nbytes, array.dtype, array.shape)
            np.copyto(staged, array)
            self._driver.memcpy_htod_async(device, staged, stream)
        return int(device)

    def _bind_output(self, slot: _Slot, spec: IOSpec) -> Shape:
        shape = tuple(int(d) for d in slot.context.get_tensor_shape(spec.name))
        if any(d < 0 for d in shape):
            raise UserError(
                f"output '{spec.name}' of {self.path.name} has a data-dependent shape "
                f"({format_dims(shape)}), which trtq's runtime does not support",
                "run the model with ONNX Runtime, or give the output a shape computable from "
                "the input shapes",
            )
        nbytes = math.prod(shape) * spec.dtype.itemsize
        slot.context.set_tensor_address(spec.name, int(slot.device(spec.name, nbytes)))
        return shape

    def _fetch(self, slot: _Slot, spec: IOSpec, shape: Shape, stream: Any) -> np.ndarray:
        nbytes = math.prod(shape) * spec.dtype.itemsize
        view = slot.host(spec.name, nbytes, spec.dtype, shape)
        if nbytes:
            self._driver.memcpy_dtoh_async(view, slot.device(spec.name, nbytes), stream)
        return view


class EngineContext:
    """A dedicated execution context from :meth:`TensorRTEngine.context`.

    ``infer``/``__call__`` run synchronously on its stream, ``infer_async`` returns a
    :class:`PendingInference`; one call at a time (wait for a pending one first).
    """

    def __init__(self, engine: TensorRTEngine, slot: _Slot) -> None:
        self._engine = engine
        self._slot: _Slot | None = slot

    @property
    def execution_context(self) -> Any:
        """The ``tensorrt.IExecutionContext`` behind this lease."""
        return self._active().context

    @property
    def stream(self) -> Any:
        """The context's own ``pycuda.driver.Stream``."""
        return self._active().stream

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        feeds = self._engine.check_inputs(inputs)
        slot = self._idle()
        with self._engine._gpu.current():
            return self._engine._run_on(slot, feeds, slot.stream)

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        return self.infer(inputs)

    def infer_async(self, inputs: Mapping[str, Any], stream: Any = None) -> PendingInference:
        """As :meth:`TensorRTEngine.infer_async`, on this context (which stays leased)."""
        feeds = self._engine.check_inputs(inputs)
        slot = self._idle()
        with self._engine._gpu.current():
            return self._engine._start(slot, feeds, stream, release=False)

    def _active(self) -> _Slot:
        if self._slot is None:
            raise UserError(
                "this execution context was returned to the pool (its `with` block ended)",
                "use it inside `with engine.context() as ctx:` only",
            )
        return self._slot

    def _idle(self) -> _Slot:
        slot = self._active()
        if slot.pending is not None:
            raise UserError(
                "this execution context still has a call in flight",
                "call .wait() on the handle infer_async returned first",
            )
        return slot

    def _end(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None and slot.pending is not None:
            slot.pending._finish()


class PendingInference:
    """A call in flight (:meth:`TensorRTEngine.infer_async`); ``wait()`` gives its outputs."""

    def __init__(
        self,
        engine: TensorRTEngine,
        slot: _Slot,
        views: dict[str, np.ndarray],
        done: Any,
        feeds: Mapping[str, Any],
        *,
        release: bool,
    ) -> None:
        self._engine, self._slot, self._views, self._done = engine, slot, views, done
        self._feeds: Mapping[str, Any] | None = feeds  # device inputs stay alive until done
        self._release = release
        self._outputs: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def done(self) -> bool:
        """Whether the outputs are ready (``wait()`` would not block)."""
        return self._outputs is not None or bool(self._done.query())

    def wait(self) -> dict[str, np.ndarray]:
        """Block until the call finished; ``{output_name: ndarray}`` (the same on every call)."""
        self._finish()
        assert self._outputs is not None
        return self._outputs

    def _finish(self) -> None:
        with self._lock:
            if self._outputs is not None:
                return
            with self._engine._gpu.current():
                self._done.synchronize()
            self._outputs = {name: view.copy() for name, view in self._views.items()}
            self._views, self._feeds = {}, None
            self._slot.pending = None
            if self._release:
                self._engine._release(self._slot)


# --- per-context state ---------------------------------------------------------------------


@dataclass
class _Slot:
    """An execution context, its stream, and its buffers: device and pinned, per tensor.

    Buffers are allocated on first use and replaced only by larger ones, so steady
    traffic allocates nothing. Replacing is safe: a slot's stream is idle between calls.
    """

    context: Any
    stream: Any
    driver: Any
    devices: dict[str, tuple[Any, int]] = field(default_factory=dict)
    pinned: dict[str, np.ndarray] = field(default_factory=dict)
    #: Input shapes last set on the context (``set_input_shape`` only when they change).
    shapes: dict[str, Shape] = field(default_factory=dict)
    pending: PendingInference | None = None

    def device(self, name: str, nbytes: int) -> Any:
        """A device allocation of at least ``nbytes`` for tensor ``name``."""
        current = self.devices.get(name)
        if current is not None and current[1] >= nbytes:
            return current[0]
        if current is not None:
            current[0].free()
        allocation = self.driver.mem_alloc(max(nbytes, 1))
        self.devices[name] = (allocation, nbytes)
        return allocation

    def host(self, name: str, nbytes: int, dtype: np.dtype, shape: Shape) -> np.ndarray:
        """A pinned array of ``shape`` and ``dtype`` for tensor ``name`` (its first bytes)."""
        buffer = self.pinned.get(name)
        if buffer is None or buffer.size < nbytes:
            buffer = self.pinned[name] = self.driver.pagelocked_empty(max(nbytes, 1), np.uint8)
        return buffer[:nbytes].view(dtype).reshape(shape)

    def free(self) -> None:
        self.stream.synchronize()
        for allocation, _ in self.devices.values():
            allocation.free()
        self.devices.clear()
        self.pinned.clear()
        self.context = None  # TensorRT frees the context's memory now, in the caller's context


def _record(marks: Sequence[Any], index: int, stream: Any) -> None:
    if marks:
        marks[index].record(stream)


# --- device arrays -------------------------------------------------------------------------


def device_pointer(name: str, value: Any, stream: Any, driver: Any) -> int:
    """The address of a CUDA array, checked to be contiguous and ready for ``stream``.

    Producers that name a stream other than the legacy default one in their
    ``__cuda_array_interface__`` may still be writing the array: the device is
    synchronized then (pycuda cannot wait on another library's stream handle).
    """
    interface = getattr(value, "__cuda_array_interface__", None)
    kind = type(value).__name__
    if interface is None:
        raise DataError(
            f"input '{name}': the {kind} is a device array without __cuda_array_interface__",
            "pass a CuPy array, a PyTorch CUDA tensor, a pycuda GPUArray or a numpy array",
        )
    if interface.get("mask") is not None:
        raise DataError(f"input '{name}': masked device arrays are not supported", "drop the mask")
    shape = tuple(interface["shape"])
    itemsize = np.dtype(interface["typestr"]).itemsize
    strides = interface.get("strides")
    if strides is not None and not _c_contiguous(shape, tuple(strides), itemsize):
        raise DataError(
            f"input '{name}': the {kind} is not contiguous (shape {format_dims(shape)}, "
            f"strides {tuple(strides)}); TensorRT reads dense row-major memory",
            "pass a contiguous one: x.contiguous() (PyTorch), cupy.ascontiguousarray(x)",
        )
    producer = interface.get("stream")
    if producer not in _ORDERED_STREAMS and producer != getattr(stream, "handle", None):
        driver.Context.synchronize()
    return int(interface["data"][0])


def _interface_shape(value: Any) -> Shape:
    return tuple(int(d) for d in value.__cuda_array_interface__["shape"])


def _c_contiguous(shape: Shape, strides: tuple[int, ...], itemsize: int) -> bool:
    """Row-major dense: strides of dims longer than 1 match C order (empty arrays qualify)."""
    if 0 in shape:
        return True
    expected = itemsize
    for size, stride in zip(reversed(shape), reversed(strides), strict=True):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


def _pycuda_stream(stream: Any, slot: _Slot) -> Any:
    if stream is None:
        return slot.stream
    if isinstance(getattr(stream, "handle", None), int):
        return stream
    raise UserError(
        f"infer_async takes a pycuda.driver.Stream (got {type(stream).__name__})",
        "pass a pycuda stream, or None to use the execution context's own stream",
    )


# --- loading -------------------------------------------------------------------------------


def import_cuda_driver() -> Any:
    """``pycuda.driver``, initialised; one line naming the extra when missing or broken."""
    driver = require("pycuda.driver", "gpu", "running TensorRT engines")
    try:
        driver.init()
    except Exception as exc:  # pycuda's own error types (no driver, no device)
        raise UserError(
            f"no usable TensorRT/GPU: CUDA could not start ({_one_line(exc)})",
            "check that an NVIDIA GPU is visible (nvidia-smi)",
        ) from exc
    return driver


@dataclass
class _Gpu:
    """A GPU and its primary context (the one TensorRT, CuPy and PyTorch use too)."""

    driver: Any
    ordinal: int
    name: str
    capability: tuple[int, int]
    primary: Any

    @classmethod
    def open(cls, driver: Any, ordinal: int) -> _Gpu:
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


def _read_plan(path: Path) -> bytes:
    try:
        plan = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"engine file not found: {path}", "check the path") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}", "check the file") from exc
    if not plan:
        raise ModelError(f"{path} is empty", "rebuild it with trtq build")
    return plan


def _matching_sidecar(path: Path, plan: bytes) -> dict[str, Any] | None:
    """The engine's sidecar, or None if absent, unreadable or about another engine.

    The sidecar only improves messages and finds plugins; TensorRT itself still
    refuses an incompatible plan, so a bad sidecar is a warning, not an error.
    """
    from trtq.trt.sidecar import read_sidecar, sidecar_path

    try:
        sidecar = read_sidecar(path)
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", sidecar_path(path), _one_line(exc))
        return None
    if sidecar is None:
        return None
    if not isinstance(sidecar, dict):
        log.warning("ignoring %s: not a trtq engine sidecar", sidecar_path(path))
        return None
    recorded = sidecar.get("engine_sha256")
    if recorded and recorded != hashlib.sha256(plan).hexdigest():
        log.warning(
            "ignoring %s: it describes another engine (engine_sha256 differs)", sidecar_path(path)
        )
        return None
    return sidecar


def compatibility_problem(
    sidecar: Mapping[str, Any] | None, tensorrt_version: str, gpu: Mapping[str, Any]
) -> str | None:
    """Why this TensorRT and GPU cannot run an engine with ``sidecar``; None if they can.

    Unknown facts (no sidecar, no GPU recorded) are not held against the engine.
    """
    if not sidecar:
        return None
    options = sidecar.get("build_options") or {}
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


def _deserialize(
    trt: ModuleType,
    logger: Any,
    runtime: Any,
    plan: bytes,
    path: Path,
    sidecar: Mapping[str, Any] | None,
    plugins: Sequence[str | Path] | None,
) -> Any:
    """Plugins first, then the plan (the CUDA context must be current)."""
    from trtq.trt.builder import load_plugins

    load_plugins(trt, logger, plugin_libraries(path, sidecar, plugins))
    if ((sidecar or {}).get("build_options") or {}).get("version_compatible"):
        # A version-compatible plan carries its own lean runtime: TensorRT runs that
        # host code only when told to, and only for engines built to need it.
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ModelError(
            f"TensorRT {getattr(trt, '__version__', '?')} could not deserialize {path.name} "
            "(see the log above)",
            "an engine loads only with the TensorRT version, GPU type and plugins that built "
            "it: rebuild it here with trtq build, or pass its plugins with --plugins",
        )
    return engine


def plugin_libraries(
    path: Path, sidecar: Mapping[str, Any] | None, plugins: Sequence[str | Path] | None
) -> list[Path]:
    """The sidecar's plugin libraries, then ``plugins``, each once.

    A recorded library is looked for where it was at build time, then next to the
    engine; one with the same file name among ``plugins`` stands in for it.
    """
    given = [Path(p) for p in plugins or []]
    given_names = {p.name for p in given}
    recorded = ((sidecar or {}).get("build_options") or {}).get("plugins") or []
    found: list[Path] = []
    for entry in map(Path, recorded):
        if entry.name in given_names:
            continue
        beside = path.parent / entry.name
        if not entry.is_file() and not beside.is_file():
            raise UserError(
                f"{path.name} was built with plugin library {entry}, which is not here",
                "pass its location with --plugins (plugins=[...])",
            )
        found.append(entry if entry.is_file() else beside)
    unique: dict[Path, Path] = {}
    for library in [*found, *given]:
        unique.setdefault(library.resolve(), library)
    return list(unique.values())


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


def _io_entry(spec: IOSpec, mode: str) -> dict[str, Any]:
    """One tensor as the sidecar records it (-1 for dynamic dims), for :meth:`info`."""
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
        from trtq.trt.builder import dtype_name

        raise ModelError(
            f"'{name}' of {model} is {dtype_name(dtype)}, which numpy has no type for",
            "rebuild with that input/output in float32, float16 or an integer type",
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
