"""TensorRT 10's calibrator: a real subclass of NVIDIA's base class, fed by trtq's streamer.

Runs NVIDIA's real 10.13 bindings (over stub native libraries, see
tests/test_trt_conformance.py) with the CPU stand-in for pycuda from
tests/test_streamer.py, so the calibrator's contract is checked on every
`make test`; scripts/gpu_check.sh repeats it with real pycuda on a GPU.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from test_trt_conformance import bindings_env, run_python

from trtq.trt.calibrator import ProfileBatches

SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, "tests")
import tensorrt as trt
from test_streamer import FakeDriver
from trtq.calib.cache import TrtCache
from trtq.trt.calibrator import make_calibrator

cache_path = sys.argv[1]
rng = np.random.default_rng(0)
batches = [{"input": rng.standard_normal((8, 1, 28, 28)).astype(np.float32)} for _ in range(3)]
driver = FakeDriver()
calibrator = make_calibrator(trt, batches, cache_path=cache_path, driver=driver)
result = {
    "is_entropy2": isinstance(calibrator, trt.IInt8EntropyCalibrator2),
    "algorithm": str(calibrator.get_algorithm()),
    "batch_size": calibrator.get_batch_size(),
    "cache_before": calibrator.read_calibration_cache(),
    "batches_intact": [],
}
for batch in batches:
    [pointer] = calibrator.get_batch(["input"])
    got = driver.read(pointer, batch["input"])
    result["batches_intact"].append(bool(np.array_equal(got, batch["input"])))
result["after_end"] = calibrator.get_batch(["input"])
written = TrtCache.from_amax({"input": 255.0, "conv_out": 6.5}).to_text().encode()
calibrator.write_calibration_cache(written)
result["cache_round_trip"] = calibrator.read_calibration_cache() == written
minmax = make_calibrator(trt, [], cache_path=None, algorithm="minmax", driver=driver)
result["minmax"] = isinstance(minmax, trt.IInt8MinMaxCalibrator)
calibrator.close()
print("RESULT " + json.dumps(result))
"""


def test_calibrator_on_tensorrt_10(tmp_path):
    cache = tmp_path / "model.cache"
    proc = run_python(SCRIPT, bindings_env("10"), str(cache))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["is_entropy2"] and result["minmax"]
    assert result["algorithm"].endswith("ENTROPY_CALIBRATION_2")
    assert result["batch_size"] == 8
    assert result["cache_before"] is None
    assert result["batches_intact"] == [True, True, True]
    assert result["after_end"] is None
    assert result["cache_round_trip"]
    assert cache.read_text().startswith("TRT-101303-EntropyCalibration2\n")


def test_tensorrt_11_refuses_implicit_calibration(tmp_path):
    code = r"""
import sys
import tensorrt as trt
from trtq.errors import UserError
from trtq.trt.calibrator import make_calibrator
try:
    make_calibrator(trt, [], cache_path=None, driver=object())
except UserError as exc:
    print("REFUSED " + exc.message)
"""
    proc = run_python(code, bindings_env("11"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "trtq quantize" in proc.stdout


# --- only batches of the calibration shape reach TensorRT ------------------------------------

PROFILE_SCRIPT = r"""
import json, logging, sys
import numpy as np
sys.path.insert(0, "tests")
import tensorrt as trt
from test_streamer import FakeDriver
from trtq.trt.calibrator import make_calibrator

logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="LOG %(levelname)s %(message)s")
rng = np.random.default_rng(0)
rows = json.loads(sys.argv[1])
shapes = json.loads(sys.argv[2])
batches = [{"input": rng.standard_normal((n, 1, 28, 28)).astype(np.float32)} for n in rows]
driver = FakeDriver()
calibrator = make_calibrator(
    trt, batches, cache_path=None, driver=driver,
    shapes={k: tuple(v) for k, v in shapes.items()} if shapes else None,
)
size = calibrator.get_batch_size()
given = []
while True:
    pointers = calibrator.get_batch(["input"])  # as TensorRT calls it: names in, pointers out
    if pointers is None:
        break
    given.append(driver.read(pointers[0], np.empty((size, 1, 28, 28), np.float32)).copy())
calibrator.close()
samples = np.concatenate([b["input"] for b in batches])
result = {
    "batch_size": size,
    "batches": len(given),
    "in_order": bool(np.array_equal(np.concatenate(given), samples[: len(given) * size])),
}
print("RESULT " + json.dumps(result))
"""


@pytest.mark.parametrize(
    ("rows", "shapes", "batches", "size", "logged"),
    [
        # The data's batch size: the short last batch (5 of 29 samples) is dropped.
        ([8, 8, 8, 5], None, 3, 8, "the last 5 samples, fewer than a batch, dropped"),
        # The profile's batch (8) from data batches of 5: regrouped, the last 4 dropped.
        ([5, 5, 5, 5], {"input": [8, 1, 28, 28]}, 2, 8, "the last 4 samples"),
        # Batches larger than the profile's are split.
        ([16, 16], {"input": [4, 1, 28, 28]}, 8, 4, "TensorRT calibrates on 8 batches"),
    ],
)
def test_tensorrt_10_gets_only_profile_shaped_batches(
    tmp_path, rows, shapes, batches, size, logged
):
    proc = run_python(PROFILE_SCRIPT, bindings_env("10"), json.dumps(rows), json.dumps(shapes))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result == {"batch_size": size, "batches": batches, "in_order": True}
    assert any(line.startswith("LOG INFO") and logged in line for line in proc.stdout.splitlines())


def test_profile_batches_drop_what_cannot_fit(caplog):
    rng = np.random.default_rng(0)

    def image(count: int, side: int = 28) -> np.ndarray:
        return rng.standard_normal((count, 1, side, side)).astype(np.float32)

    data = [{"input": image(8)}, {"input": image(8, 32)}, {"input": image(3)}, {"input": image(6)}]
    batches = ProfileBatches(data, None)
    with caplog.at_level(logging.INFO):
        got = list(batches)
    assert [b["input"].shape for b in got] == [(8, 1, 28, 28), (8, 1, 28, 28)]
    np.testing.assert_array_equal(
        got[1]["input"], np.concatenate([data[2]["input"], data[3]["input"]])[:8]
    )
    assert (batches.sent, batches.dropped_tail) == (2, 1)
    assert (batches.dropped_batches, batches.dropped_samples) == (1, 8)
    messages = [r.getMessage() for r in caplog.records]
    assert "TensorRT calibrates on 2 batches of input 8x1x28x28; the last 1 sample" in messages[0]
    assert messages[1].startswith("dropped 1 calibration batch (8 samples; the first: input ")


def test_inputs_without_a_shared_batch_dim_pass_only_as_they_are(caplog):
    """A stateful model (input [T, 576], state [1, 1, 128]): nothing to regroup by."""
    state = np.zeros((1, 1, 128), np.float32)
    data = [
        {"input": np.ones((40, 576), np.float32), "h": state},
        {"input": np.ones((40, 576), np.float32), "h": state},
        {"input": np.ones((25, 576), np.float32), "h": state},
    ]
    batches = ProfileBatches(data, None)
    with caplog.at_level(logging.INFO):
        assert len(list(batches)) == 2
    assert batches.dropped_batches == 1
    assert "(no shared batch dim to regroup by)" in caplog.text


def test_no_batch_of_the_calibration_shape_is_an_error_line(caplog):
    data = [{"input": np.ones((4, 3), np.float32)}]
    with caplog.at_level(logging.INFO):
        assert list(ProfileBatches(data, {"input": (8, 5)})) == []
    assert "no calibration batch has the calibration shape input 8x5" in caplog.text
