"""The TensorRT backend: :class:`~trtq.runtime.base.Engine` on a deserialized ``.engine`` file.

``trtq.load("model.engine")`` lands here. Loading (the plan, its sidecar, plugins, the
GPU) is :mod:`trtq.runtime.engine_loading`; this module runs the engine.

Running: every call borrows a TensorRT execution context with its CUDA stream (an
execution context is not thread-safe) from a bounded pool (:mod:`trtq.runtime.pool`):
at most ``max_contexts`` exist, made on demand, and a call returns its context when it
ends, so threads that come and go hold nothing; callers beyond the pool wait for a
context. Every execution context holds the engine's activation memory, which is why
the pool is bounded (by default by the GPU's free memory, see :func:`pool_size`).
Each context keeps its buffers (:mod:`trtq.runtime.buffers`): device buffers per
tensor allocated on first use and grown only when a larger shape arrives, and pinned
host buffers to stage inputs and outputs. A call copies inputs in, enqueues the engine,
copies outputs out, all on the context's stream, synchronizes once and returns numpy
copies. CUDA arrays (CuPy, PyTorch, pycuda GPUArray) are not copied: their pointer is
handed to TensorRT.

:meth:`TensorRTEngine.context` lends a context from the same pool for a whole block,
for callers who schedule their own work, and :meth:`TensorRTEngine.infer_async` runs
on a pooled context and returns a handle.

TensorRT and pycuda are imported when an engine is loaded, never at import time.
Every TensorRT attribute used here is listed in :data:`trtq.trt.compat.USED_ATTRIBUTES`
and checked against NVIDIA's real 10.x and 11.x bindings by the test suite.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from trtq.errors import DataError, UserError
from trtq.runtime.base import Engine, IOSpec, Shape, format_dims
from trtq.runtime.buffers import ContextSlot, device_pointer, interface_shape
from trtq.runtime.engine_loading import (
    Gpu,
    deserialize,
    import_cuda_driver,
    io_entry,
    io_specs,
    read_plan,
)
from trtq.runtime.pool import (
    DEFAULT_CONTEXT_TIMEOUT,
    Pool,
    check_pool_settings,
    default_pool_size,
)
from trtq.trt import create_runtime, import_tensorrt
from trtq.trt.builder import make_logger
from trtq.trt.compatibility import compatibility_problem, matching_sidecar

log = logging.getLogger(__name__)

__all__ = ["EngineContext", "PendingInference", "TensorRTEngine", "pool_size"]

#: Phases :meth:`TensorRTEngine.bench_breakdown` times, in call order.
PHASES = ("h2d", "compute", "d2h")


class TensorRTEngine(Engine):
    """A serialized TensorRT engine, run on GPU ``device`` (see the module docstring).

    ``plugins`` are the plugin libraries (``.so``) and Python plugin modules (``.py``) to
    register before deserializing; ``allow_host_code`` lets a version-compatible engine
    run the lean runtime embedded in it. Only these arguments decide what code runs,
    never the sidecar. ``max_contexts`` bounds the execution contexts (None: see
    :func:`pool_size`); a call that finds them all busy waits up to ``context_timeout``
    seconds (None: no limit). ``trt`` and ``driver`` replace the ``tensorrt`` module and
    ``pycuda.driver`` (tests run the whole backend on stand-ins); by default both are
    imported here.
    """

    backend = "tensorrt"
    accepts_device_arrays = True

    def __init__(
        self,
        path: str | Path,
        *,
        device: int = 0,
        plugins: Sequence[str | Path] | None = None,
        allow_host_code: bool = False,
        max_contexts: int | None = None,
        context_timeout: float | None = DEFAULT_CONTEXT_TIMEOUT,
        trt: ModuleType | None = None,
        driver: Any = None,
    ) -> None:
        path = Path(path)
        if not isinstance(allow_host_code, bool):  # "no" must not read as yes
            raise UserError(
                f"allow_host_code must be True or False, not {allow_host_code!r}",
                "pass allow_host_code=True only for engines you trust",
            )
        check_pool_settings(max_contexts, context_timeout)
        trt = trt if trt is not None else import_tensorrt()
        plan = read_plan(path)
        sidecar = matching_sidecar(path, plan)
        logger = make_logger(trt)
        runtime = create_runtime(trt, logger)  # "no usable TensorRT/GPU" fails here
        gpu = Gpu.open(driver if driver is not None else import_cuda_driver(), device)
        self.tensorrt_version = str(getattr(trt, "__version__", "?"))
        problem = compatibility_problem(sidecar, self.tensorrt_version, gpu.info())
        if problem:
            raise UserError(f"{path.name} was {problem}", "rebuild it here with trtq build")
        with gpu.current():
            engine = deserialize(
                trt, logger, runtime, plan, path, sidecar, plugins, allow_host_code=allow_host_code
            )
            size = max_contexts or pool_size(engine, gpu.driver)
        inputs, outputs = io_specs(trt, engine, path.name)
        super().__init__(path, inputs, outputs)
        self.device = device
        self.sidecar = sidecar
        self._logger = logger  # TensorRT keeps a pointer to it: it must outlive the runtime
        self._runtime, self._engine = runtime, engine
        self._gpu = gpu
        self._driver = gpu.driver
        self._create_lock = threading.Lock()  # creating contexts concurrently: not documented
        self._pool: Pool[ContextSlot] = Pool(self._new_slot, size, context_timeout, path.name)

    # --- the Engine interface ------------------------------------------------------------

    @property
    def max_contexts(self) -> int:
        """The most execution contexts this engine makes (each holds its activation memory)."""
        return self._pool.size

    def _run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        with self._gpu.current():
            slot = self._pool.acquire()
            try:
                return self._run_on(slot, feeds, slot.stream)
            finally:  # the stream is idle: _run_on synchronized it, or drained it on error
                self._pool.release(slot)

    def info(self) -> dict[str, Any]:
        """Backend, TensorRT version and GPU running the engine, its I/O, and its sidecar."""
        built = {k: v for k, v in self.sidecar.items() if k != "io"} if self.sidecar else None
        return {
            **super().info(),
            "tensorrt_version": self.tensorrt_version,
            "gpu": {"device": self.device, **self._gpu.info()},
            "io": [
                io_entry(spec, mode)
                for mode, specs in (("input", self.inputs), ("output", self.outputs))
                for spec in specs
            ],
            "built": built,
            "contexts": {"max": self._pool.size, "created": self._pool.created},
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
            slot = self._pool.acquire()
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
        slots = self._pool.close()  # callers still waiting for a context get an error
        if self._engine is None:
            return
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
        It counts against ``max_contexts`` for the whole block, and waits for a free
        context like any call.
        """
        with self._gpu.current():
            slot = self._pool.acquire()
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
            slot = self._pool.acquire()
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

    def _release(self, slot: ContextSlot) -> None:
        """Back to the pool once its stream is idle (a later user must not race it)."""
        with self._gpu.current():
            slot.stream.synchronize()
        self._pool.release(slot)

    def _new_slot(self) -> ContextSlot:
        """A new execution context and stream (the CUDA context must be current)."""
        with self._create_lock:
            context = self._engine.create_execution_context()
            if context is None:
                raise UserError(
                    f"TensorRT could not create an execution context for {self.path.name} "
                    "(see the log above; most often the GPU is out of memory)",
                    "free GPU memory, or allow fewer contexts: trtq.load(..., max_contexts=N), "
                    "--max-contexts N",
                )
            return ContextSlot(context, self._driver.Stream(), self._driver)

    # --- one call ------------------------------------------------------------------------

    def _run_on(
        self, slot: ContextSlot, feeds: Mapping[str, Any], stream: Any
    ) -> dict[str, np.ndarray]:
        views = self._enqueue(slot, feeds, stream)
        stream.synchronize()
        return {name: view.copy() for name, view in views.items()}

    def _start(
        self, slot: ContextSlot, feeds: Mapping[str, Any], stream: Any, *, release: bool
    ) -> PendingInference:
        stream = _pycuda_stream(stream, slot)
        views = self._enqueue(slot, feeds, stream)
        done = self._driver.Event()
        done.record(stream)
        pending = PendingInference(self, slot, views, done, feeds, release=release)
        slot.pending = pending
        return pending

    def _enqueue(
        self, slot: ContextSlot, feeds: Mapping[str, Any], stream: Any, marks: Sequence[Any] = ()
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

    def _bind_input(self, slot: ContextSlot, spec: IOSpec, value: Any, stream: Any) -> None:
        if type(value) is np.ndarray:
            address = self._send(slot, spec.name, value, stream)
        else:
            address = device_pointer(spec.name, value, stream, self._driver)
        shape = tuple(value.shape) if type(value) is np.ndarray else interface_shape(value)
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

    def _send(self, slot: ContextSlot, name: str, array: np.ndarray, stream: Any) -> int:
        """Stage ``array`` in pinned memory and queue its copy; the device address."""
        device = slot.device(name, array.nbytes)
        if array.nbytes:
            staged = slot.host(name, array.nbytes, array.dtype, array.shape)
            np.copyto(staged, array)
            self._driver.memcpy_htod_async(device, staged, stream)
        return int(device)

    def _bind_output(self, slot: ContextSlot, spec: IOSpec) -> Shape:
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

    def _fetch(self, slot: ContextSlot, spec: IOSpec, shape: Shape, stream: Any) -> np.ndarray:
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

    def __init__(self, engine: TensorRTEngine, slot: ContextSlot) -> None:
        self._engine = engine
        self._slot: ContextSlot | None = slot

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

    def _active(self) -> ContextSlot:
        if self._slot is None:
            raise UserError(
                "this execution context was returned to the pool (its `with` block ended)",
                "use it inside `with engine.context() as ctx:` only",
            )
        return self._slot

    def _idle(self) -> ContextSlot:
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
        slot: ContextSlot,
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


def pool_size(engine: Any, driver: Any) -> int:
    """The default ``max_contexts``: how many contexts half the GPU's free memory holds.

    Each context holds the engine's activation memory (``device_memory_size_v2``); the
    free memory is read when the engine loads (the CUDA context must be current). At
    least 1, at most :data:`~trtq.runtime.pool.MAX_DEFAULT_CONTEXTS`.
    """
    free, _total = driver.mem_get_info()
    return default_pool_size(int(engine.device_memory_size_v2), int(free))


def _record(marks: Sequence[Any], index: int, stream: Any) -> None:
    if marks:
        marks[index].record(stream)


def _pycuda_stream(stream: Any, slot: ContextSlot) -> Any:
    if stream is None:
        return slot.stream
    if isinstance(getattr(stream, "handle", None), int):
        return stream
    raise UserError(
        f"infer_async takes a pycuda.driver.Stream (got {type(stream).__name__})",
        "pass a pycuda stream, or None to use the execution context's own stream",
    )
