"""GPU: batches stream to the device intact, and TensorRT 10's calibrator hands them out.

Marked ``gpu``: skipped by ``make test``; ``scripts/gpu_check.sh`` runs these on
a machine with a CUDA GPU and pycuda (and TensorRT 10's real bindings over stub
libraries for the calibrator test).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def driver(cuda):
    """pycuda.driver, current context on device 0 (the shared ``cuda`` fixture)."""
    return cuda


def read_back(cuda, pointer: int, like: np.ndarray) -> np.ndarray:
    out = np.empty_like(like)
    cuda.memcpy_dtoh(out, pointer)
    return out


def batches_of_growing_size(count: int = 7):
    rng = np.random.default_rng(0)
    # Sizes grow and shrink: slots must be reallocated when too small and reused otherwise.
    sizes = [2, 2, 5, 3, 8, 8, 1][:count]
    return [
        {
            "image": rng.standard_normal((n, 3, 16, 16)).astype(np.float32),
            "ids": rng.integers(0, 1000, (n, 7)).astype(np.int32),
        }
        for n in sizes
    ]


def test_every_batch_arrives_intact_in_the_requested_order(driver):
    from trtq.cuda.memory import BatchStreamer

    batches = batches_of_growing_size()
    streamer = BatchStreamer(batches, driver)
    for batch in batches:
        ids_ptr, image_ptr = streamer.next_pointers(["ids", "image"])
        # The previous slot is being refilled while this one is read: both stay separate.
        np.testing.assert_array_equal(read_back(driver, image_ptr, batch["image"]), batch["image"])
        np.testing.assert_array_equal(read_back(driver, ids_ptr, batch["ids"]), batch["ids"])
    assert streamer.next_pointers(["ids", "image"]) is None
    assert streamer.batches_sent == len(batches)
    streamer.close()


def test_a_missing_input_is_a_clear_error(driver):
    from trtq.cuda.memory import BatchStreamer
    from trtq.errors import DataError

    streamer = BatchStreamer(batches_of_growing_size(2), driver)
    with pytest.raises(DataError, match="TensorRT asks for input 'mask'"):
        streamer.next_pointers(["image", "mask"])
    streamer.close()


def test_tensorrt10_calibrator_streams_batches_and_round_trips_the_cache(driver, tmp_path):
    trt = pytest.importorskip("tensorrt")
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        pytest.skip(f"TensorRT {trt.__version__} has no implicit INT8 calibrators")
    from trtq.calib.cache import TrtCache
    from trtq.trt.calibrator import make_calibrator

    batches = [b for b in batches_of_growing_size() if len(b["image"]) == 8]
    cache = tmp_path / "model.cache"
    calibrator = make_calibrator(trt, batches, cache_path=cache, driver=driver)
    assert isinstance(calibrator, trt.IInt8EntropyCalibrator2)
    assert calibrator.get_algorithm() == trt.CalibrationAlgoType.ENTROPY_CALIBRATION_2
    assert calibrator.get_batch_size() == 8
    assert calibrator.read_calibration_cache() is None  # nothing cached yet: calibrate
    for batch in batches:
        [pointer] = calibrator.get_batch(["image"])
        np.testing.assert_array_equal(read_back(driver, pointer, batch["image"]), batch["image"])
    assert calibrator.get_batch(["image"]) is None
    written = TrtCache.from_amax({"image": 4.0, "conv_out": 12.5}).to_text().encode()
    calibrator.write_calibration_cache(written)
    assert calibrator.read_calibration_cache() == written
    assert TrtCache.read(cache).scales["conv_out"] == pytest.approx(12.5 / 127)
    calibrator.close()
