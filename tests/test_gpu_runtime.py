"""GPU: the TensorRT backend's buffers, copies, streams and threads on a real device.

TensorRT's native libraries are not on the lent machine, so the engine is
tests/test_runtime_engine.py's fake ``tensorrt`` module with one change: its
``execute_async_v3`` launches a real CUDA kernel (``y = 2 * x``, compiled with pycuda)
on the stream TensorRT would get, reading and writing the addresses the backend set on
the execution context. Everything else is real: pycuda device and pinned buffers,
asynchronous copies, streams, events, and CuPy/PyTorch/pycuda arrays passed in place.

Marked ``gpu``: skipped by ``make test``; ``scripts/gpu_check.sh`` runs it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from test_runtime_engine import Tensor, fake_trt, write_engine

from trtq.errors import DataError

pytestmark = pytest.mark.gpu

WIDTH = 1024
#: x is (rows, 1024) float32, rows 1..4096 (up to 16 MiB); y = 2 * x.
TENSORS = (
    Tensor("x", True, "FLOAT", (-1, WIDTH), ((1, WIDTH), (64, WIDTH), (4096, WIDTH))),
    Tensor("y", False, "FLOAT", (-1, WIDTH)),
)
KERNEL = r"""
__global__ void twice(const float *x, float *y, unsigned long long n)
{
    unsigned long long i = blockIdx.x * (unsigned long long) blockDim.x + threadIdx.x;
    if (i < n) y[i] = 2.0f * x[i];
}
"""


@pytest.fixture(scope="module")
def kernel(cuda):
    from pycuda.compiler import SourceModule

    return SourceModule(KERNEL).get_function("twice")


class RecordingDriver:
    """``pycuda.driver`` with its streams findable by handle, and allocations/copies counted.

    TensorRT gets a raw stream handle; the fake engine launches its kernel on the
    pycuda stream behind it.
    """

    def __init__(self, cuda: Any) -> None:
        self._cuda = cuda
        self.streams: dict[int, Any] = {}
        self.allocations = 0
        self.htod = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cuda, name)

    def Stream(self, *args: Any) -> Any:  # pycuda's name, hence the capital
        stream = self._cuda.Stream(*args)
        with self._lock:
            self.streams[stream.handle] = stream
        return stream

    def mem_alloc(self, nbytes: int) -> Any:
        with self._lock:
            self.allocations += 1
        return self._cuda.mem_alloc(nbytes)

    def memcpy_htod_async(self, *args: Any) -> None:
        with self._lock:
            self.htod += 1
        self._cuda.memcpy_htod_async(*args)


def output_shapes(inputs: dict) -> dict:
    return {"y": (inputs.get("x", (-1,))[0], WIDTH)}


@pytest.fixture
def gpu(tmp_path, cuda, kernel):
    """``(engine, trt, driver)``: the backend on the real device, running the kernel."""
    from trtq.runtime.engine import TensorRTEngine

    driver = RecordingDriver(cuda)

    def compute(context, stream_handle: int) -> None:
        n = context.shapes["x"][0] * WIDTH
        kernel(
            np.uintp(context.addresses["x"]),
            np.uintp(context.addresses["y"]),
            np.uint64(n),
            block=(256, 1, 1),
            grid=((n + 255) // 256, 1),
            stream=driver.streams[stream_handle],
        )

    trt = fake_trt(driver, tensors=TENSORS, shapes=output_shapes, compute=compute)
    engine = TensorRTEngine(write_engine(tmp_path), trt=trt, driver=driver)
    yield engine, trt, driver
    engine.close()


def rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, WIDTH)).astype(np.float32)


def check(outputs: dict, x: np.ndarray) -> None:
    assert list(outputs) == ["y"] and isinstance(outputs["y"], np.ndarray)
    np.testing.assert_array_equal(outputs["y"], 2 * x)  # doubling is exact in float32


def test_numpy_in_numpy_out_and_buffers_grow_only_when_larger(gpu):
    engine, trt, driver = gpu
    for count in (3, 3, 64, 17, 64, 4096, 1, 4096):
        x = rows(count, seed=count)
        check(engine(x=x), x)
    # x and y at 3 rows, again at 64 and at 4096; reused for every smaller batch.
    assert driver.allocations == 2 * 3
    assert driver.htod == 8 and len(trt.contexts) == 1


def test_cupy_arrays_are_used_in_place(gpu):
    cupy = pytest.importorskip("cupy")
    engine, trt, driver = gpu
    x = rows(100, seed=1)
    device_x = cupy.asarray(x)
    copies = driver.htod
    check(engine(x=device_x), x)
    assert trt.contexts[-1].addresses["x"] == device_x.data.ptr  # the pointer, no copy
    assert driver.htod == copies
    transposed = cupy.asarray(np.ascontiguousarray(x.T)).T  # (100, 1024), column-major
    with pytest.raises(DataError, match="is not contiguous"):
        engine(x=transposed)


def test_torch_tensors_are_used_in_place(gpu):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    engine, trt, driver = gpu
    x = rows(33, seed=2)
    device_x = torch.from_numpy(x).cuda()
    copies = driver.htod
    check(engine(x=device_x), x)
    assert trt.contexts[-1].addresses["x"] == device_x.data_ptr()
    assert driver.htod == copies
    with pytest.raises(DataError, match="is not contiguous"):
        engine(x=torch.from_numpy(np.ascontiguousarray(x.T)).cuda().t())
    with pytest.raises(DataError, match="expected dtype float32"):
        engine(x=device_x.half())


def test_pycuda_gpuarrays_are_used_in_place(gpu):
    from pycuda import gpuarray

    engine, trt, driver = gpu
    x = rows(7, seed=3)
    device_x = gpuarray.to_gpu(x)
    copies = driver.htod
    check(engine(x=device_x), x)
    assert trt.contexts[-1].addresses["x"] == int(device_x.gpudata)
    assert driver.htod == copies


def test_threads_share_the_context_pool_and_get_correct_outputs(gpu):
    engine, trt, _ = gpu
    inputs = [rows(count, seed=count) for count in (1, 5, 64, 300, 2048)]
    failures: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for call in range(20):
                x = inputs[(index + call) % len(inputs)]
                check(engine(x=x), x)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    # A bounded pool (the default: what half the free memory holds, at most 8), however
    # many threads call; each context runs one call at a time, on any thread.
    assert 1 <= len(trt.contexts) <= engine.max_contexts <= 8


def test_pooled_contexts_and_async_calls(gpu):
    engine, trt, driver = gpu
    x, z = rows(128, seed=4), rows(9, seed=5)
    with engine.context() as first, engine.context() as second:
        stream = driver.Stream()
        pending = first.infer_async({"x": x}, stream)
        check(second.infer({"x": z}), z)
        check(pending.wait(), x)
    handles = [engine.infer_async({"x": x}), engine.infer_async({"x": z})]  # two in flight
    check(handles[0].wait(), x)
    check(handles[1].wait(), z)
    assert len(trt.contexts) == 2  # the pool's two contexts served everything


def test_bench_breakdown_times_real_events(gpu):
    engine, _, _ = gpu
    breakdown = engine.bench_breakdown({"x": rows(4096)}, 20)
    assert list(breakdown) == ["h2d", "compute", "d2h"]
    assert all(value > 0 for value in breakdown.values()), breakdown
    # 16 MiB each way over PCIe or NVLink-C2C: well over 0.1 ms, well under a second.
    assert 0.05 < breakdown["h2d"] < 1000 and 0.05 < breakdown["d2h"] < 1000
