"""The TensorRT backend's bounded pool of execution contexts (trtq.runtime.pool), on the fakes.

Each execution context holds the engine's activation memory, so contexts must not grow
with the threads a server runs: every call borrows one of at most ``max_contexts`` and
returns it when it ends. The fakes of tests/test_runtime_engine.py (a ``tensorrt``
look-alike computing ``y = 2 * x + offset`` in fake device memory, and a pycuda
stand-in) drive the real backend without a GPU; ``exclusive`` fails a call if two
threads ever run one context at once.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from test_runtime_engine import (
    Driver,
    assert_outputs,
    batch,
    exclusive,
    fake_trt,
    numpy_engine,
    one_line,
    write_engine,
)

import trtq
import trtq.runtime.engine as engine_module
from trtq.errors import UserError
from trtq.runtime.engine import TensorRTEngine
from trtq.runtime.pool import MAX_DEFAULT_CONTEXTS, ContextsBusyError, Pool, default_pool_size

GIB = 1 << 30


@pytest.fixture
def driver() -> Driver:
    return Driver()


def load(tmp_path, driver, **options) -> tuple[TensorRTEngine, object]:
    """An engine on the fakes whose calls take a little time and check exclusive use."""
    trt = fake_trt(
        driver,
        compute=exclusive(numpy_engine(driver)),
        activation_bytes=options.pop("activation_bytes", GIB),
    )
    return TensorRTEngine(write_engine(tmp_path), trt=trt, driver=driver, **options), trt


def test_200_short_lived_threads_share_4_contexts(tmp_path, driver):
    engine, trt = load(tmp_path, driver, max_contexts=4)
    feeds = [batch(rows, seed=rows) for rows in range(1, 17)]
    want = [engine.infer(f) for f in feeds]  # the same engine, one thread: the reference
    errors: list[BaseException] = []
    start = threading.Barrier(50)

    def request(index: int) -> None:
        try:
            if index < 50:
                start.wait()  # the first 50 start together: the pool must fill and queue
            for call in range(1 + index % 3):
                which = (index + call) % len(feeds)
                got = engine.infer(feeds[which])
                for name in ("y", "total"):
                    np.testing.assert_array_equal(got[name], want[which][name])
            assert driver.balanced()  # every CUDA context push on this thread was popped
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert 1 <= len(trt.contexts) <= 4  # 200 threads came and went: never more than the pool
    # The threads are gone and hold nothing: every context is back, and reused.
    with engine.context(), engine.context(), engine.context(), engine.context():
        pass
    assert len(trt.contexts) == 4
    assert_outputs(engine.infer(feeds[3]), feeds[3])
    assert engine.info()["contexts"] == {"max": 4, "created": 4}
    engine.close()
    assert driver.allocations == driver.freed


def test_callers_beyond_the_pool_wait_for_a_context(tmp_path, driver):
    engine, trt = load(tmp_path, driver, max_contexts=1)
    order: list[str] = []
    waiting = threading.Event()

    def second_caller() -> None:
        waiting.set()
        assert_outputs(engine.infer(batch(2)), batch(2))
        order.append("second call done")

    with engine.context() as held:
        thread = threading.Thread(target=second_caller)
        thread.start()
        waiting.wait()
        time.sleep(0.05)  # it is waiting for the one context now
        assert order == []
        assert_outputs(held.infer(batch(3)), batch(3))
        order.append("context returned")
    thread.join()
    assert order == ["context returned", "second call done"]
    assert len(trt.contexts) == 1


def test_a_pool_that_stays_busy_times_out_in_one_line(tmp_path, driver):
    engine, _ = load(tmp_path, driver, max_contexts=1, context_timeout=0.05)
    with engine.context(), pytest.raises(ContextsBusyError) as info:
        engine.infer(batch(2))  # this thread holds the only context: it would wait forever
    one_line(info, "all 1 execution context of model.engine stayed busy for 0.05 s")
    one_line(info, "max_contexts=N", "--max-contexts N", ".wait()")
    assert_outputs(engine.infer(batch(2)), batch(2))  # returned: usable again

    pending = engine.infer_async(batch(4))  # holds its context until wait()
    with pytest.raises(ContextsBusyError):
        engine.infer_async(batch(1))
    assert_outputs(pending.wait(), batch(4))
    assert_outputs(engine.infer_async(batch(1)).wait(), batch(1))


def test_close_wakes_waiting_callers(tmp_path, driver):
    engine, _ = load(tmp_path, driver, max_contexts=1, context_timeout=None)
    failures: list[str] = []
    waiting = threading.Event()

    def caller() -> None:
        waiting.set()
        try:
            engine.infer(batch(1))
        except UserError as exc:
            failures.append(str(exc))

    with engine.context():
        thread = threading.Thread(target=caller)
        thread.start()
        waiting.wait()
        time.sleep(0.05)
        engine.close()
    thread.join(5)
    assert not thread.is_alive()
    assert failures == ["this engine was closed. load model.engine again."]
    assert driver.allocations == driver.freed and driver.balanced()


def test_a_failed_context_creation_frees_its_place(tmp_path, driver):
    engine, trt = load(tmp_path, driver, max_contexts=1)
    create = trt.ICudaEngine.create_execution_context
    trt.ICudaEngine.create_execution_context = lambda self: None  # the GPU is out of memory
    with pytest.raises(UserError) as info:
        engine.infer(batch(1))
    one_line(info, "could not create an execution context", "max_contexts=N")
    trt.ICudaEngine.create_execution_context = create
    assert_outputs(engine.infer(batch(2)), batch(2))  # the place was not lost
    assert len(trt.contexts) == 1


@pytest.mark.parametrize(
    ("activation", "free", "size"),
    [
        (GIB, 64 * GIB, MAX_DEFAULT_CONTEXTS),  # small engine, big GPU: capped
        (10 * GIB, 64 * GIB, 3),  # 32 GiB (half the free memory) holds 3 of 10 GiB
        (10 * GIB, 12 * GIB, 1),  # not even one fits half: still one
        (0, GIB, MAX_DEFAULT_CONTEXTS),  # no activation memory: only the cap limits
    ],
)
def test_the_default_size_comes_from_the_engine_and_free_memory(tmp_path, activation, free, size):
    assert default_pool_size(activation, free) == size
    driver = Driver(free=free)
    engine, _ = load(tmp_path, driver, activation_bytes=activation)
    assert engine.max_contexts == size
    assert (
        TensorRTEngine(
            tmp_path / "model.engine", max_contexts=2, trt=fake_trt(driver), driver=driver
        ).max_contexts
        == 2
    )  # an explicit size wins


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"max_contexts": 0}, "max_contexts must be a whole number >= 1, not 0"),
        ({"max_contexts": True}, "not True"),
        ({"max_contexts": 2.5}, "not 2.5"),
        ({"max_contexts": "4"}, "not '4'"),
        ({"context_timeout": -1}, "context_timeout must be a number of seconds >= 0"),
        ({"context_timeout": float("nan")}, "not nan"),
    ],
)
def test_pool_settings_are_checked_in_one_line(monkeypatch, tmp_path, driver, options, fragment):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(driver))
    monkeypatch.setattr(engine_module, "import_cuda_driver", lambda: driver)
    with pytest.raises(UserError) as info:
        trtq.load(write_engine(tmp_path), **options)
    one_line(info, fragment)


def test_pool_without_a_timeout_waits_until_released():
    made = []
    pool: Pool[int] = Pool(lambda: made.append(len(made)) or made[-1], 2, None, "thing")
    first, second = pool.acquire(), pool.acquire()
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.append(pool.acquire()))
    thread.start()
    time.sleep(0.05)
    assert got == [] and made == [0, 1]
    pool.release(second)
    thread.join(5)
    assert got == [second] and pool.created == 2
    pool.release(first)
    assert pool.acquire() == first  # the most recently returned first


def test_cli_max_contexts(monkeypatch, tmp_path, driver, capsys):
    import json

    from test_runtime_engine import TENSORS

    from trtq.cli import main

    tensors = (TENSORS[0], TENSORS[2])  # x -> y = 2 * x
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(driver, tensors=tensors))
    monkeypatch.setattr(engine_module, "import_cuda_driver", lambda: driver)
    path = write_engine(tmp_path)
    argv = ["bench", str(path), "--iterations", "40", "--warmup", "0", "--threads", "8"]
    assert main([*argv, "--max-contexts", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["contexts"]["max"] == 2 and 1 <= report["contexts"]["created"] <= 2
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing, before loading
        main([*argv, "--max-contexts", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--max-contexts" in err
