"""BatchStreamer's slot and thread logic, on the CPU, with a stand-in for pycuda.driver.

The real device path runs in tests/test_gpu_streaming.py on a GPU machine; this
stand-in keeps "device" memory in numpy buffers addressed by integers, so the
ordering, reuse and error handling are checked on every `make test`.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from trtq.cuda.memory import BatchStreamer
from trtq.errors import DataError


class FakeDriver:
    """The slice of pycuda.driver that BatchStreamer uses; device memory is numpy."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}
        self.allocations = 0
        self.freed = 0
        self._addresses = itertools.count(1 << 20, 1 << 20)
        driver = self

        class Allocation:
            def __init__(self, nbytes: int) -> None:
                self.address = next(driver._addresses)
                driver.memory[self.address] = np.zeros(nbytes, np.uint8)
                driver.allocations += 1

            def __int__(self) -> int:
                return self.address

            def free(self) -> None:
                del driver.memory[self.address]
                driver.freed += 1

        class Context:
            @staticmethod
            def get_current():
                return Context()

            def push(self) -> None:
                pass

            def pop(self) -> None:
                pass

            @staticmethod
            def synchronize() -> None:
                pass

        class Event:
            def record(self, stream) -> None:
                pass

            def synchronize(self) -> None:
                pass

        class Stream:
            def synchronize(self) -> None:
                pass

        self.Allocation, self.Context, self.Event, self.Stream = Allocation, Context, Event, Stream

    def mem_alloc(self, nbytes: int):
        return self.Allocation(nbytes)

    def pagelocked_empty(self, count: int, dtype) -> np.ndarray:
        return np.empty(count, dtype)

    def memcpy_htod_async(self, device, host: np.ndarray, stream) -> None:
        raw = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
        self.memory[int(device)][: raw.size] = raw

    def read(self, address: int, like: np.ndarray) -> np.ndarray:
        raw = self.memory[address][: like.nbytes]
        return raw.view(like.dtype).reshape(like.shape)


def batches(sizes):
    rng = np.random.default_rng(0)
    return [
        {"a": rng.standard_normal((n, 4)).astype(np.float32), "b": np.arange(n, dtype=np.int64)}
        for n in sizes
    ]


def test_batches_arrive_in_order_and_intact():
    driver, data = FakeDriver(), batches([2, 5, 3, 5, 1])
    streamer = BatchStreamer(data, driver)
    assert streamer.current_shapes() == {"a": (2, 4), "b": (2,)}
    for batch in data:
        b_ptr, a_ptr = streamer.next_pointers(["b", "a"])
        np.testing.assert_array_equal(driver.read(a_ptr, batch["a"]), batch["a"])
        np.testing.assert_array_equal(driver.read(b_ptr, batch["b"]), batch["b"])
    assert streamer.next_pointers(["a", "b"]) is None
    assert streamer.next_pointers(["a", "b"]) is None  # the end stays the end
    streamer.close()
    assert driver.allocations == driver.freed  # nothing leaks


def test_buffers_are_reused_and_grown_only_when_needed():
    driver = FakeDriver()
    streamer = BatchStreamer(batches([4, 4, 4, 4, 4, 4]), driver)
    while streamer.next_pointers(["a", "b"]) is not None:
        pass
    assert driver.allocations == 2 * 2  # two slots, two inputs, allocated once
    streamer.close()
    driver = FakeDriver()
    streamer = BatchStreamer(batches([1, 1, 8, 8]), driver)
    while streamer.next_pointers(["a", "b"]) is not None:
        pass
    assert driver.allocations == 2 * 2 * 2  # each slot grew once
    streamer.close()


def test_large_batches_are_staged_in_parallel_chunks_intact():
    driver = FakeDriver()
    big = {"a": np.random.default_rng(1).standard_normal((3, 1 << 21)).astype(np.float32)}  # 24 MiB
    streamer = BatchStreamer([big], driver)
    [pointer] = streamer.next_pointers(["a"])
    np.testing.assert_array_equal(driver.read(pointer, big["a"]), big["a"])
    streamer.close()


def test_a_slot_is_not_refilled_while_tensorrt_reads_it():
    """With two slots, batch k's memory holds until batch k + 1 is asked for."""
    driver, data = FakeDriver(), batches([3, 3, 3, 3])
    streamer = BatchStreamer(data, driver)
    first = streamer.next_pointers(["a"])[0]
    streamer.current_shapes()  # the worker has staged the next batch by now
    np.testing.assert_array_equal(driver.read(first, data[0]["a"]), data[0]["a"])
    second = streamer.next_pointers(["a"])[0]
    assert second != first
    streamer.close()


def test_errors_in_the_data_reach_the_caller():
    def broken():
        yield batches([2])[0]
        raise DataError("input 'a' contains NaN in part-2.npy", "clean the calibration data")

    streamer = BatchStreamer(broken(), FakeDriver())
    assert streamer.next_pointers(["a"]) is not None
    with pytest.raises(DataError, match="contains NaN"):
        streamer.next_pointers(["a"])
    assert streamer.next_pointers(["a"]) is None
    streamer.close()


def test_missing_input_and_early_close():
    streamer = BatchStreamer(batches([2] * 50), FakeDriver())
    with pytest.raises(DataError, match="TensorRT asks for input 'mask'"):
        streamer.next_pointers(["a", "mask"])
    streamer.close()  # TensorRT stopped early: the worker must not hang
    assert not streamer._worker.is_alive()
