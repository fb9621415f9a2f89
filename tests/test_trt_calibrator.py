"""TensorRT 10's calibrator: a real subclass of NVIDIA's base class, fed by trtq's streamer.

Runs NVIDIA's real 10.13 bindings (over stub native libraries, see
tests/test_trt_conformance.py) with the CPU stand-in for pycuda from
tests/test_streamer.py, so the calibrator's contract is checked on every
`make test`; scripts/gpu_check.sh repeats it with real pycuda on a GPU.
"""

from __future__ import annotations

import json

from test_trt_conformance import bindings_env, run_python

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
