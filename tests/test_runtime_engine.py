"""The TensorRT backend (trtq.runtime.engine) end to end on the CPU, on stand-ins.

* ``fake_trt``: a ``tensorrt`` look-alike whose engine computes ``y = 2 * x + offset``
  and ``total = y.sum(1)`` by reading and writing the fake device memory at the
  addresses the backend set on the context, so numerics are checked end to end. It
  records every call and offers only attributes listed in trtq.trt.compat.
* ``Driver``: tests/test_streamer.py's ``FakeDriver`` plus devices, copies back,
  stream handles, timing events, and counters of allocations and copies.

The same backend runs on a real GPU in tests/test_gpu_runtime.py; NVIDIA's real
bindings (over stub libraries, no GPU) are checked at the end of this file.
"""

from __future__ import annotations

import enum
import itertools
import json
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_streamer import FakeDriver
from test_trt_conformance import bindings_env, run_python

import trtq
import trtq.runtime.engine as engine_module
from trtq.errors import EXIT_USER_ERROR, DataError, MissingDependencyError, ModelError, UserError
from trtq.runtime.base import IOSpec
from trtq.runtime.engine import TensorRTEngine
from trtq.trt import compat
from trtq.trt.compatibility import compatibility_problem
from trtq.trt.sidecar import sha256_of

PLAN = b"\x00serialized plan\xff" * 4
TRT10 = "10.13.3.9"
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


# --- stand-ins ---------------------------------------------------------------------------


class Driver(FakeDriver):
    """FakeDriver plus what the runtime uses; counts allocations and copies."""

    def __init__(
        self, *, devices: int = 1, capability: tuple[int, int] = (9, 0), free: int = 64 << 30
    ) -> None:
        super().__init__()
        self.free = free  # bytes mem_get_info reports free
        self._addresses = itertools.count(1 << 32, 1 << 32)  # room for any test tensor
        self.lock = threading.Lock()
        self.htod: list[tuple[int, int]] = []  # (device address, stream handle)
        self.dtoh: list[tuple[int, int]] = []
        self.pinned = 0
        self.device_syncs = 0
        self.depth = threading.local()  # CUDA context pushes per thread: must end at 0
        driver, handles = self, itertools.count(0x5000)

        class Device:
            @staticmethod
            def count() -> int:
                return devices

            def __init__(self, ordinal: int) -> None:
                self.ordinal = ordinal

            def compute_capability(self) -> tuple[int, int]:
                return capability

            def name(self) -> str:
                return H100["name"]

            def retain_primary_context(self):
                return Context()

        class Context:
            def push(self) -> None:
                driver.depth.value = getattr(driver.depth, "value", 0) + 1

            @staticmethod
            def pop() -> None:
                assert driver.depth.value > 0, "pop without push"
                driver.depth.value -= 1

            @staticmethod
            def synchronize() -> None:
                driver.device_syncs += 1

        class Stream:
            def __init__(self) -> None:
                self.handle = next(handles)

            def synchronize(self) -> None:
                pass

        class Event:
            times = itertools.count()

            def record(self, stream) -> None:
                self.at = next(Event.times)  # a fake clock: 1 ms per recorded event

            def synchronize(self) -> None:
                pass

            def query(self) -> bool:
                return True

            def time_till(self, end) -> float:
                return float(end.at - self.at)

        self.Device, self.Context, self.Stream, self.Event = Device, Context, Stream, Event

    def mem_alloc(self, nbytes: int):
        with self.lock:
            return super().mem_alloc(nbytes)

    def mem_get_info(self) -> tuple[int, int]:
        assert self.depth.value > 0, "mem_get_info needs a current CUDA context"
        return self.free, 80 << 30

    def pagelocked_empty(self, count: int, dtype) -> np.ndarray:
        self.pinned += 1
        return super().pagelocked_empty(count, dtype)

    def memcpy_htod_async(self, device, host, stream) -> None:
        self.htod.append((int(device), stream.handle))
        super().memcpy_htod_async(device, host, stream)

    def memcpy_dtoh_async(self, host: np.ndarray, device, stream) -> None:
        self.dtoh.append((int(device), stream.handle))
        host.reshape(-1).view(np.uint8)[:] = self.view(int(device), host.nbytes)

    def view(self, address: int, nbytes: int) -> np.ndarray:
        """``nbytes`` of fake device memory at ``address`` (inside any allocation)."""
        with self.lock:
            base = max(a for a in self.memory if a <= address)
        raw = self.memory[base]
        offset = address - base
        assert offset + nbytes <= raw.size, "read past the end of an allocation"
        return raw[offset : offset + nbytes]

    def upload(self, array: np.ndarray):
        """A device allocation holding ``array`` (what CuPy or PyTorch would own)."""
        allocation = self.mem_alloc(array.nbytes)
        self.view(int(allocation), array.nbytes)[:] = array.reshape(-1).view(np.uint8)
        return allocation

    def balanced(self) -> bool:
        return getattr(self.depth, "value", 0) == 0


class DeviceArray:
    """A CUDA array as CuPy or PyTorch expose it: ``__cuda_array_interface__`` only."""

    def __init__(self, address: int, shape, dtype=np.float32, strides=None, stream=None):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": np.dtype(dtype).str,
            "data": (address, False),
            "strides": strides,
            "version": 3,
            **({"stream": stream} if stream is not None else {}),
        }


@dataclass(frozen=True)
class Tensor:
    name: str
    input: bool
    dtype: str  # a DataType member name
    shape: tuple[int, ...]
    profile: tuple[tuple[int, ...], ...] | None = None
    host: bool = False


#: x is dynamic in its batch dim (profile 1..16), offset is static; two outputs.
TENSORS = (
    Tensor("x", True, "FLOAT", (-1, 4), ((1, 4), (4, 4), (16, 4))),
    Tensor("offset", True, "FLOAT", (4,)),
    Tensor("y", False, "FLOAT", (-1, 4)),
    Tensor("total", False, "FLOAT", (-1,)),
)
_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT32": np.int32,
    "INT64": np.int64,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


def output_shapes(inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    rows = inputs.get("x", (-1,))[0]
    return {"y": (rows, 4), "total": (rows,)}


def numpy_engine(driver: Driver) -> Callable[[Any, int], None]:
    """What the fake engine computes, from and into fake device memory."""

    def compute(context, stream_handle: int) -> None:
        x = context.read("x", driver)
        y = 2 * x + (context.read("offset", driver) if "offset" in context.addresses else 0)
        context.write("y", y, driver)
        if "total" in context.addresses:
            context.write("total", y.sum(axis=1), driver)

    return compute


def fake_trt(
    driver: Any,
    *,
    version: str = TRT10,
    tensors: tuple[Tensor, ...] = TENSORS,
    shapes: Callable[[dict], dict] = output_shapes,
    compute: Callable[[Any, int], None] | None = None,
    deserializes: bool = True,
    executes: bool = True,
    accepts: Callable[[str, tuple], bool] = lambda name, shape: True,
    activation_bytes: int = 1 << 30,
) -> types.ModuleType:
    """A ``tensorrt`` look-alike; ``trt.calls`` records ``(name, *args)`` in order."""
    calls: list[tuple] = []
    compute = compute if compute is not None else numpy_engine(driver)
    by_name = {t.name: t for t in tensors}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls
    trt.contexts = []
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])
    trt.TensorLocation = enum.Enum("TensorLocation", ["DEVICE", "HOST"])
    trt.DataType = enum.Enum("DataType", [*_NUMPY, "BF16"])

    def nptype(dtype):
        if dtype.name not in _NUMPY:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return _NUMPY[dtype.name]

    class Logger:
        ERROR, WARNING, INFO, VERBOSE = 1, 2, 3, 4

        def __init__(self, severity):
            self.severity = severity

    class IExecutionContext:
        def __init__(self) -> None:
            self.thread = threading.get_ident()
            self.addresses: dict[str, int] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.log: list[tuple] = []
            self.runners: set[int] = set()  # threads that ran this context

        def set_input_shape(self, name, shape):
            self.log.append(("set_input_shape", name, tuple(shape)))
            low, _, high = by_name[name].profile or (by_name[name].shape,) * 3
            fits = len(shape) == len(low) and all(
                lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True)
            )
            fits = fits and accepts(name, tuple(shape))
            if fits:
                self.shapes[name] = tuple(shape)
            return fits

        def get_tensor_shape(self, name):
            tensor = by_name[name]
            if tensor.input:
                return self.shapes.get(name, tensor.shape)
            return shapes({n: s for n, s in self.shapes.items()})[name]

        def set_tensor_address(self, name, address):
            self.log.append(("set_tensor_address", name, address))
            self.addresses[name] = address

        def execute_async_v3(self, stream_handle):
            self.log.append(("execute_async_v3", stream_handle))
            self.runners.add(threading.get_ident())
            if executes:
                compute(self, stream_handle)
            return executes

        # helpers of the fake (not TensorRT API)
        def read(self, name, drv):
            dtype, shape = np.dtype(_NUMPY[by_name[name].dtype]), self.get_tensor_shape(name)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            return drv.view(self.addresses[name], nbytes).view(dtype).reshape(shape).copy()

        def write(self, name, value, drv):
            dtype = np.dtype(_NUMPY[by_name[name].dtype])
            raw = np.ascontiguousarray(value, dtype).reshape(-1).view(np.uint8)
            drv.view(self.addresses[name], raw.size)[:] = raw

    class ICudaEngine:
        num_io_tensors = len(tensors)
        device_memory_size_v2 = activation_bytes  # what each execution context holds

        def get_tensor_name(self, index):
            return tensors[index].name

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if by_name[name].input else trt.TensorIOMode.OUTPUT

        def get_tensor_location(self, name):
            return trt.TensorLocation.HOST if by_name[name].host else trt.TensorLocation.DEVICE

        def get_tensor_shape(self, name):
            return by_name[name].shape

        def get_tensor_dtype(self, name):
            return trt.DataType[by_name[name].dtype]

        def get_tensor_profile_shape(self, name, profile_index):
            calls.append(("get_tensor_profile_shape", name, profile_index))
            return [list(s) for s in by_name[name].profile]

        def create_execution_context(self):
            context = IExecutionContext()
            calls.append(("create_execution_context", context.thread))
            trt.contexts.append(context)
            return context

    class Runtime:
        def __init__(self, logger):
            calls.append(("Runtime",))

        def __setattr__(self, name, value):
            calls.append(("runtime." + name, value))
            object.__setattr__(self, name, value)

        def deserialize_cuda_engine(self, plan):
            calls.append(("deserialize_cuda_engine", bytes(plan)))
            return ICudaEngine() if deserializes else None

    Runtime.engine_host_code_allowed = False

    class IPluginRegistry:
        def load_library(self, path):
            calls.append(("load_library", path))
            return object()

    def get_plugin_registry():
        return IPluginRegistry()

    def init_libnvinfer_plugins(logger, namespace):
        calls.append(("init_libnvinfer_plugins",))
        return True

    for obj in (
        Logger,
        IExecutionContext,
        ICudaEngine,
        Runtime,
        IPluginRegistry,
        nptype,
        get_plugin_registry,
        init_libnvinfer_plugins,
    ):
        setattr(trt, obj.__name__, obj)
    return trt


def exclusive(compute: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
    """``compute`` that fails if two threads run the same execution context at once."""

    def run(context, stream_handle: int) -> None:
        assert not getattr(context, "busy", False), "an execution context ran on two threads"
        context.busy = True
        try:
            time.sleep(0.0005)  # give other threads the chance to collide
            compute(context, stream_handle)
        finally:
            context.busy = False

    return run


def names(trt) -> list[str]:
    return [call[0] for call in trt.calls]


def write_engine(folder: Path, sidecar: dict | None = None, plan: bytes = PLAN) -> Path:
    path = folder / "model.engine"
    path.write_bytes(plan)
    if sidecar is not None:
        (folder / "model.engine.json").write_text(json.dumps(sidecar))
    return path


def sidecar_for(plan: bytes = PLAN, **fields) -> dict:
    return {
        "format": "trtq-engine",
        "format_version": 1,
        "tensorrt_version": TRT10,
        "gpu": dict(H100),
        "engine_sha256": sha256_of(plan),
        "build_options": {"plugins": []},
        "io": [],
        **fields,
    }


def one_line(info: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def driver() -> Driver:
    return Driver()


@pytest.fixture
def trt(driver) -> types.ModuleType:
    return fake_trt(driver)


@pytest.fixture
def engine(tmp_path, trt, driver):
    with TensorRTEngine(write_engine(tmp_path), trt=trt, driver=driver) as loaded:
        yield loaded
    assert driver.balanced()


def batch(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((rows, 4)).astype(np.float32),
        "offset": np.arange(4, dtype=np.float32),
    }


def expected(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    y = 2 * feeds["x"] + feeds["offset"]
    return {"y": y, "total": y.sum(axis=1)}


def assert_outputs(got: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> None:
    want = expected(feeds)
    assert list(got) == ["y", "total"]
    for name, value in want.items():
        assert got[name].dtype == np.float32 and got[name].shape == value.shape
        np.testing.assert_allclose(got[name], value, rtol=1e-6)


# --- specs and numerics -------------------------------------------------------------------


def test_specs_come_from_the_engine(engine, trt):
    assert engine.backend == "tensorrt" and engine.accepts_device_arrays
    x, offset = engine.inputs
    assert x == IOSpec("x", np.dtype("float32"), (-1, 4), ((1, 4), (4, 4), (16, 4)))
    assert offset == IOSpec("offset", np.dtype("float32"), (4,), ((4,), (4,), (4,)))
    assert [(s.name, s.shape) for s in engine.outputs] == [("y", (-1, 4)), ("total", (-1,))]
    # Only the dynamic input's profile is asked for (static ones have none to ask about).
    assert [c for c in trt.calls if c[0] == "get_tensor_profile_shape"] == [
        ("get_tensor_profile_shape", "x", 0)
    ]
    info = engine.info()
    assert info["backend"] == "tensorrt" and info["tensorrt_version"] == TRT10
    assert info["gpu"] == {"device": 0, **H100} and info["built"] is None
    assert info["io"][0] == {
        "mode": "input",
        "name": "x",
        "dtype": "float32",
        "shape": [-1, 4],
        "profile": {"min": [1, 4], "opt": [4, 4], "max": [16, 4]},
    }
    assert [entry["mode"] for entry in info["io"]] == ["input", "input", "output", "output"]


def test_numpy_in_numpy_out(engine, trt, driver):
    feeds = batch(3)
    assert_outputs(engine(**feeds), feeds)
    assert_outputs(engine.infer(batch(5, seed=1)), batch(5, seed=1))
    (context,) = trt.contexts
    first_call = context.log[: [e[0] for e in context.log].index("execute_async_v3") + 1]
    kinds = [entry[0] for entry in first_call]
    # Shapes in, addresses for every I/O tensor, then the engine, on the context's stream.
    assert kinds == [
        "set_input_shape",
        "set_tensor_address",
        "set_input_shape",
        "set_tensor_address",
        "set_tensor_address",
        "set_tensor_address",
        "execute_async_v3",
    ]
    assert {e[1] for e in first_call if e[0] == "set_tensor_address"} == {
        "x",
        "offset",
        "y",
        "total",
    }
    streams = {handle for _, handle in driver.htod + driver.dtoh}
    assert streams == {context.log[-1][1]}  # copies and the engine share one stream
    assert len(driver.htod) == 2 * 2 and len(driver.dtoh) == 2 * 2


def test_buffers_grow_only_for_larger_shapes(engine, trt, driver):
    before = driver.allocations
    for rows in (2, 2, 8, 3, 8, 1, 16, 16):
        feeds = batch(rows, seed=rows)
        assert_outputs(engine(**feeds), feeds)
    # x, offset, y, total at 2 rows; x, y, total again at 8 and at 16; nothing otherwise.
    assert driver.allocations - before == 4 + 3 + 3
    assert driver.pinned == 4 + 3 + 3
    (context,) = trt.contexts
    x_shapes = [e[2] for e in context.log if e[:2] == ("set_input_shape", "x")]
    assert x_shapes == [(2, 4), (8, 4), (3, 4), (8, 4), (1, 4), (16, 4)]  # only when changed
    assert [e for e in context.log if e[:2] == ("set_input_shape", "offset")] == [
        ("set_input_shape", "offset", (4,))
    ]


def test_profile_violations_are_one_line_and_reach_no_context(engine, trt):
    with pytest.raises(DataError) as info:
        engine(**{**batch(2), "x": np.zeros((17, 4), np.float32)})
    one_line(info, "shape 17x4 is outside the engine's profile (min 1x4, max 16x4)")
    with pytest.raises(DataError) as info:
        engine(**{**batch(2), "x": np.zeros((2, 5), np.float32)})
    one_line(info, "input 'x'", "2x5")
    assert trt.contexts == []  # refused before any TensorRT call
    assert_outputs(engine(**batch(16)), batch(16))  # the bounds themselves are fine


def test_tensorrt_refusing_a_shape_or_failing_is_one_line(tmp_path, driver):
    trt = fake_trt(driver, accepts=lambda name, shape: shape != (5, 4))
    engine = TensorRTEngine(write_engine(tmp_path), trt=trt, driver=driver)
    with pytest.raises(DataError) as info:  # within the profile, yet TensorRT says no
        engine(**batch(5))
    one_line(info, "input 'x': TensorRT refused shape 5x4 for model.engine")
    assert_outputs(engine(**batch(3)), batch(3))
    failing = fake_trt(driver, executes=False)
    with pytest.raises(UserError) as info:
        TensorRTEngine(write_engine(tmp_path), trt=failing, driver=driver)(**batch(2))
    one_line(info, "TensorRT failed to run model.engine")
    assert driver.balanced()


def test_data_dependent_output_shapes_are_refused_in_one_line(tmp_path, driver):
    trt = fake_trt(driver, shapes=lambda inputs: {"y": (-1, 4), "total": (-1,)})
    engine = TensorRTEngine(write_engine(tmp_path), trt=trt, driver=driver)
    with pytest.raises(UserError) as info:
        engine(**batch(2))
    one_line(info, "output 'y' of model.engine has a data-dependent shape (-1x4)")


# --- device arrays ------------------------------------------------------------------------


def test_device_arrays_are_used_in_place(engine, trt, driver):
    feeds = batch(6)
    allocation = driver.upload(feeds["x"])
    x = DeviceArray(int(allocation), (6, 4))
    copies = len(driver.htod)
    assert_outputs(engine(x=x, offset=feeds["offset"]), feeds)
    assert len(driver.htod) - copies == 1  # offset only: x was not copied
    (context,) = trt.contexts
    assert context.addresses["x"] == int(allocation)
    # An array inside a larger allocation (a slice of a CuPy pool block): its own address.
    rows = driver.upload(np.concatenate([np.zeros((2, 4), np.float32), feeds["x"]]))
    inner = DeviceArray(int(rows) + 2 * 4 * 4, (6, 4))
    assert_outputs(engine(x=inner, offset=feeds["offset"]), feeds)
    assert context.addresses["x"] == int(rows) + 32
    assert driver.device_syncs == 0  # no producer stream named: nothing to wait for


def test_device_array_checks_are_one_line(engine, driver):
    offset = batch(1)["offset"]
    address = int(driver.upload(np.zeros((4, 6), np.float32)))
    transposed = DeviceArray(address, (6, 4), strides=(4, 24))  # x.T of a 4x6 array
    with pytest.raises(DataError) as info:
        engine(x=transposed, offset=offset)
    one_line(info, "input 'x': the DeviceArray is not contiguous", "x.contiguous()")
    dense = DeviceArray(address, (6, 4), strides=(16, 4))  # explicit C strides are fine
    engine(x=dense, offset=offset)
    with pytest.raises(DataError) as info:
        engine(x=DeviceArray(address, (6, 4), np.float16), offset=offset)
    one_line(info, "expected dtype float32, got a float16 device array")
    with pytest.raises(DataError) as info:
        engine(x=DeviceArray(address, (20, 4)), offset=offset)
    one_line(info, "outside the engine's profile")

    class DLPackOnly:
        shape = (2, 4)

        def __dlpack_device__(self):
            return (2, 0)  # kDLCUDA

    with pytest.raises(DataError) as info:
        engine(x=DLPackOnly(), offset=offset)
    one_line(info, "without __cuda_array_interface__")


def test_device_arrays_from_other_streams_are_waited_for(engine, driver):
    feeds = batch(2)
    address = int(driver.upload(feeds["x"]))
    engine(x=DeviceArray(address, (2, 4), stream=1), offset=feeds["offset"])
    assert driver.device_syncs == 0  # the legacy default stream orders itself
    got = engine(x=DeviceArray(address, (2, 4), stream=0xBEEF), offset=feeds["offset"])
    assert driver.device_syncs == 1
    assert_outputs(got, feeds)


# --- threads, pooled contexts, asynchronous calls -----------------------------------------


def test_threads_share_a_bounded_pool_and_match_single_threaded(tmp_path, driver):
    trt = fake_trt(driver, compute=exclusive(numpy_engine(driver)))
    engine = TensorRTEngine(write_engine(tmp_path), max_contexts=3, trt=trt, driver=driver)
    batches = [batch(rows, seed=rows) for rows in (1, 3, 7, 16, 2)]
    single = [engine.infer(b) for b in batches]
    results: dict[int, list] = {}
    barrier = threading.Barrier(8)

    def worker(index: int) -> None:
        barrier.wait()
        got = []
        for call in range(50):
            which = (index + call) % len(batches)
            got.append((which, engine.infer(batches[which])))
        results[index] = got
        assert driver.balanced()  # every push on this thread was popped

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(8))
    for got in results.values():
        for which, outputs in got:
            for name in ("y", "total"):
                np.testing.assert_array_equal(outputs[name], single[which][name])
    assert 1 <= len(trt.contexts) <= 3  # 8 threads, a pool of 3 (exclusive() checks the use)
    assert engine.info()["contexts"] == {"max": 3, "created": len(trt.contexts)}
    engine.close()


def test_context_pool(engine, trt):
    with engine.context() as first:
        feeds = batch(4)
        assert_outputs(first.infer(feeds), feeds)
        assert_outputs(first(**batch(2)), batch(2))
        with engine.context() as second:
            assert second.execution_context is not first.execution_context
            assert second.stream.handle != first.stream.handle
    assert len(trt.contexts) == 2
    with engine.context() as again:  # returned contexts are reused, not recreated
        assert again.execution_context in trt.contexts
        assert_outputs(again.infer(batch(3)), batch(3))
    assert len(trt.contexts) == 2
    with pytest.raises(UserError) as info:
        first.infer(batch(1))
    one_line(info, "returned to the pool")
    assert_outputs(engine.infer(batch(3)), batch(3))  # plain calls borrow from the same pool
    assert len(trt.contexts) == 2


def test_infer_async(engine, trt, driver):
    feeds = batch(5)
    pending = engine.infer_async(feeds)
    got = pending.wait()
    assert_outputs(got, feeds)
    assert pending.wait() is got and pending.done()
    stream = driver.Stream()
    before = len(driver.htod)
    pending = engine.infer_async(batch(2), stream)
    assert_outputs(pending.wait(), batch(2))
    assert {handle for _, handle in driver.htod[before:]} == {stream.handle}
    assert len(trt.contexts) == 1  # the pooled context came back at wait() and was reused
    with pytest.raises(UserError) as info:
        engine.infer_async(feeds, 0x1234)
    one_line(info, "infer_async takes a pycuda.driver.Stream (got int)")
    with engine.context() as context:
        first = context.infer_async(feeds)
        with pytest.raises(UserError) as info:
            context.infer(feeds)
        one_line(info, "still has a call in flight")
        assert_outputs(first.wait(), feeds)
        assert_outputs(context.infer(feeds), feeds)
        context.infer_async(feeds)  # left pending: the end of the block waits for it
    assert len(trt.contexts) == 1


def test_bench_breakdown(engine, driver):
    breakdown = engine.bench_breakdown(batch(4), 10)
    # The fake clock advances 1 ms per recorded event: one per phase boundary.
    assert breakdown == {"h2d": 1.0, "compute": 1.0, "d2h": 1.0}
    assert len(driver.htod) == 2 * 11  # one untimed call, then ten timed ones


# --- loading: sidecar, plugins, deserialization ---------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        (
            {"tensorrt_version": "10.12.0.36"},
            "built by TensorRT 10.12.0 for compute capability 9.0",
        ),
        ({"tensorrt_version": "11.4.0.106"}, "built by TensorRT 11.4.0"),
        ({"tensorrt_version": "10.13.1.2"}, "built by TensorRT 10.13.1"),
        (
            {"gpu": {"name": "NVIDIA L4", "compute_capability": "8.9"}},
            "built by TensorRT 10.13.3 for compute capability 8.9 (NVIDIA L4); this is TensorRT "
            "10.13.3 on 9.0 (NVIDIA H100 80GB HBM3)",
        ),
    ],
)
def test_sidecar_mismatch_is_refused_before_deserializing(tmp_path, trt, driver, fields, fragment):
    path = write_engine(tmp_path, sidecar_for(**fields))
    with pytest.raises(UserError) as info:
        TensorRTEngine(path, trt=trt, driver=driver)
    message = one_line(info, "model.engine was " + fragment, "rebuild it here with trtq build")
    assert message.startswith("model.engine was built by TensorRT")
    assert "deserialize_cuda_engine" not in names(trt)
    assert driver.balanced()


def test_compatibility_rules():
    def problem(built, cc, installed="10.13.3.9", current="9.0", **options):
        sidecar = {
            "tensorrt_version": built,
            "gpu": {"compute_capability": cc},
            "build_options": options,
        }
        return compatibility_problem(sidecar, installed, {"compute_capability": current})

    assert problem("10.13.3.1", "9.0") is None  # the build number does not matter
    assert problem("10.13.2.6", "9.0") is not None
    assert problem("10.8.0.43", "9.0", version_compatible=True) is None  # later 10.x runs it
    assert problem("10.14.1.0", "9.0", version_compatible=True) is not None  # not an older one
    assert problem("10.8.0.43", "9.0", "11.4.0.106", version_compatible=True) is not None
    assert problem("10.13.3.9", "8.6", hardware_compatibility=True) is None  # Ampere+ engine
    assert problem("10.13.3.9", "8.6", current="7.5", hardware_compatibility=True) is not None
    assert problem("10.13.3.9", "8.6") is not None
    assert problem("10.13.3.9", None) is None  # unknown GPU: not held against the engine
    assert problem(None, "9.0") is None
    assert compatibility_problem(None, "10.13.3.9", H100) is None


def test_compatible_sidecar_loads_and_is_reported(tmp_path, trt, driver):
    sidecar = sidecar_for(precision="graph")
    engine = TensorRTEngine(write_engine(tmp_path, sidecar), trt=trt, driver=driver)
    built = engine.info()["built"]
    assert built["precision"] == "graph" and built["tensorrt_version"] == TRT10
    assert "io" not in built  # the engine's own I/O is reported instead
    assert "runtime.engine_host_code_allowed" not in names(trt)


def test_host_code_runs_only_when_the_caller_allows_it(tmp_path, trt, driver):
    sidecar = sidecar_for(
        tensorrt_version="10.8.0.43", build_options={"plugins": [], "version_compatible": True}
    )
    path = write_engine(tmp_path, sidecar)
    TensorRTEngine(path, trt=trt, driver=driver)  # the sidecar alone allows nothing
    assert "runtime.engine_host_code_allowed" not in names(trt)
    TensorRTEngine(path, allow_host_code=True, trt=trt, driver=driver)
    assert ("runtime.engine_host_code_allowed", True) in trt.calls
    deserialized = [i for i, name in enumerate(names(trt)) if name == "deserialize_cuda_engine"]
    assert deserialized[0] < names(trt).index("runtime.engine_host_code_allowed") < deserialized[1]


def test_a_sidecar_of_another_engine_is_ignored(tmp_path, trt, driver, caplog):
    stale = sidecar_for(plan=b"an older plan", tensorrt_version="9.3.0.1")
    engine = TensorRTEngine(write_engine(tmp_path, stale), trt=trt, driver=driver)
    assert engine.sidecar is None and "describes another engine" in caplog.text
    (tmp_path / "model.engine.json").write_text("{not json")
    assert TensorRTEngine(tmp_path / "model.engine", trt=trt, driver=driver).sidecar is None


def test_plugins_load_before_deserializing(tmp_path, trt, driver):
    recorded, given = tmp_path / "libnms.so", tmp_path / "extra" / "libroi.so"
    given.parent.mkdir()
    for library in (recorded, given):
        library.write_bytes(b"\x7fELF")
    sidecar = sidecar_for(build_options={"plugins": [str(recorded)]})
    TensorRTEngine(
        write_engine(tmp_path, sidecar), plugins=[given, recorded], trt=trt, driver=driver
    )
    loads = [c for c in trt.calls if c[0] == "load_library"]
    # Once each, in the order given: the recorded library is the one passed in.
    assert loads == [("load_library", str(given)), ("load_library", str(recorded))]
    last_load = max(i for i, c in enumerate(trt.calls) if c[0] == "load_library")
    assert last_load < names(trt).index("deserialize_cuda_engine")
    assert names(trt).index("init_libnvinfer_plugins") < last_load


def test_recorded_plugins_are_named_in_messages_never_loaded(tmp_path, driver):
    sidecar = sidecar_for(build_options={"plugins": [str(tmp_path / "gone" / "libnms.so")]})
    path = write_engine(tmp_path, sidecar)
    (tmp_path / "libnms.so").write_bytes(b"\x7fELF")  # next to the engine: still not loaded
    trt = fake_trt(driver, deserializes=False)
    with pytest.raises(ModelError) as info:
        TensorRTEngine(path, trt=trt, driver=driver)
    one_line(info, "could not deserialize", "built with plugin 'libnms.so'", "plugins=[...]")
    assert "load_library" not in names(trt)


def test_deserialize_returning_none_is_one_line(tmp_path, driver):
    trt = fake_trt(driver, deserializes=False)
    with pytest.raises(ModelError) as info:
        TensorRTEngine(write_engine(tmp_path), trt=trt, driver=driver)
    one_line(info, f"TensorRT {TRT10} could not deserialize model.engine", "trtq build")
    assert driver.balanced()


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        (
            (Tensor("x", True, "FLOAT", (2,)), Tensor("y", False, "BF16", (2,))),
            "'y' of model.engine is bfloat16, which numpy has no type for",
        ),
        (
            (Tensor("n", True, "INT64", (1,), host=True), Tensor("y", False, "FLOAT", (2,))),
            "'n' of model.engine is a shape tensor kept in host memory",
        ),
    ],
)
def test_tensors_the_runtime_cannot_serve_are_refused_at_load(tmp_path, driver, tensors, fragment):
    with pytest.raises(ModelError) as info:
        TensorRTEngine(write_engine(tmp_path), trt=fake_trt(driver, tensors=tensors), driver=driver)
    one_line(info, fragment)


def test_file_and_device_errors(tmp_path, trt, driver):
    with pytest.raises(ModelError) as info:
        TensorRTEngine(tmp_path / "missing.engine", trt=trt, driver=driver)
    one_line(info, "engine file not found")
    with pytest.raises(ModelError) as info:
        TensorRTEngine(write_engine(tmp_path, plan=b""), trt=trt, driver=driver)
    one_line(info, "is empty")
    with pytest.raises(UserError) as info:
        TensorRTEngine(write_engine(tmp_path), device=1, trt=trt, driver=driver)
    one_line(info, "no CUDA device 1 (this machine has 1)", "--device")


def test_close_frees_everything(tmp_path, trt, driver):
    engine = TensorRTEngine(write_engine(tmp_path), trt=trt, driver=driver)
    engine(**batch(3))
    with engine.context() as context:
        context.infer(batch(8))
    pending = engine.infer_async(batch(2))
    pending.wait()
    engine.close()
    engine.close()  # twice is fine
    assert driver.allocations == driver.freed and driver.allocations > 0
    with pytest.raises(UserError) as info:
        engine(**batch(3))
    one_line(info, "this engine was closed")
    assert driver.balanced()


def test_fake_offers_only_attributes_compat_lists(driver):
    """The backend can only touch what the fake has; the fake has only what compat lists.

    (Enum members are the exception: the fake needs some the backend never names; the
    two it does name are checked by hand.)
    """
    listed = set(compat.USED_ATTRIBUTES) | {
        name for extra in compat.FEATURE_ATTRIBUTES.values() for name in extra
    }

    def covered(name: str) -> bool:
        return name in listed or any(other.startswith(name + ".") for other in listed)

    offered = []
    for attribute, value in vars(fake_trt(driver)).items():
        if attribute.startswith("_") or attribute in ("calls", "contexts"):
            continue
        offered.append(attribute)
        if isinstance(value, type) and not issubclass(value, enum.Enum):
            offered += [f"{attribute}.{m}" for m in vars(value) if not m.startswith("_")]
    helpers = {"IExecutionContext.read", "IExecutionContext.write"}  # the fake's own
    assert [name for name in offered if not covered(name) and name not in helpers] == []
    assert {"TensorIOMode.INPUT", "TensorLocation.HOST"} <= listed


# --- trtq.load, the CLI, and machines without TensorRT --------------------------------------


@pytest.fixture
def loadable(monkeypatch, tmp_path, driver):
    """``trtq.load``/the CLI find the fake tensorrt module (one input, x) and fake driver."""
    tensors = (TENSORS[0], TENSORS[2])  # x -> y = 2 * x
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(driver, tensors=tensors))
    monkeypatch.setattr(engine_module, "import_cuda_driver", lambda: driver)
    return write_engine(tmp_path)


def test_trtq_load_picks_this_backend(loadable):
    with trtq.load(loadable) as engine:
        assert isinstance(engine, TensorRTEngine) and engine.device == 0
        x = batch(2)["x"]
        np.testing.assert_array_equal(engine(x=x)["y"], 2 * x)


def test_cli_run_and_bench_on_the_fakes(loadable, tmp_path, capsys):
    from trtq.cli import main  # imports ONNX Runtime: kept out of tests/test_gpu_runtime.py

    np.save(tmp_path / "x.npy", np.ones((20, 4), np.float32))
    code = main(["run", str(loadable), "--data", str(tmp_path / "x.npy"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["backend"] == "tensorrt" and report["batches"] == 3  # 8 + 8 + 4 rows
    assert report["outputs"]["y"] == {
        "dtype": "float32",
        "shape": [20, 4],
        "min": 2.0,
        "max": 2.0,
        "mean": 2.0,
    }
    code = main(["bench", str(loadable), "--iterations", "5", "--warmup", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["backend"] == "tensorrt" and report["tensorrt_version"] == TRT10
    assert report["inputs"]["x"] == "4x4 float32"  # the profile's opt shape
    assert set(report["breakdown_ms"]) == {"h2d", "compute", "d2h"}


def test_without_tensorrt_load_and_cli_say_what_to_install(monkeypatch, tmp_path, capsys):
    from trtq.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ModuleNotFoundError
    path = write_engine(tmp_path)
    with pytest.raises(MissingDependencyError) as info:
        trtq.load(path)
    one_line(info, "pip install 'trtq[trt]'")
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    code = main(["run", str(path), "--data", str(tmp_path / "x.npy")])
    out, err = capsys.readouterr()
    assert code == EXIT_USER_ERROR and out == ""
    assert len(err.splitlines()) == 1 and "pip install 'trtq[trt]'" in err


def test_without_pycuda_the_message_names_the_extra(monkeypatch, tmp_path, driver):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(driver))
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(MissingDependencyError) as info:
        trtq.load(write_engine(tmp_path))
    one_line(info, "running TensorRT engines needs", "pip install 'trtq[gpu]'")


# --- NVIDIA's real bindings over stub libraries: no GPU, one line ------------------------------

LOAD_PROBE = textwrap.dedent(
    """
    import sys
    import trtq
    from trtq.errors import UserError
    try:
        trtq.load(sys.argv[1])
    except UserError as exc:
        print("ERROR " + type(exc).__name__ + " " + str(exc))
    """
)


@pytest.mark.parametrize("major", ["10", "11"])
def test_real_bindings_without_a_gpu_fail_in_one_line(major, tmp_path):
    env = bindings_env(major)
    path = write_engine(tmp_path, sidecar_for())
    proc = run_python(LOAD_PROBE, env, str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("ERROR ")]
    assert line.startswith("ERROR UserError no usable TensorRT/GPU: TensorRT 1"), line
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    cli = "import sys; from trtq.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = run_python(cli, env, "run", str(path), "--data", str(tmp_path / "x.npy"))
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("trtq: error: no usable TensorRT/GPU")
