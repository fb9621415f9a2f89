"""`trtq doctor`: the environment report for real, the engine checks on stand-ins.

* Here (no TensorRT, no GPU) and over NVIDIA's real bindings on stub libraries (TensorRT
  imports, no GPU): the report says what is present and what is missing, skips the engine
  checks with the reason, and exits 0 (2 with ``--require-gpu``).
* The engine path on tests/test_build.py's recording ``tensorrt`` fake: the three builds
  really go through :func:`trtq.build` (trtq's frontend writes the FP16 and INT8 graphs),
  and each "engine" runs the graph TensorRT was handed, in ONNX Runtime, so the figures
  and floors are measured on real outputs. A loader that corrupts one precision's outputs,
  and a TensorRT that cannot build, make checks fail (exit 3).
* libcuda's answers (driver version, devices, error codes) on a ctypes stand-in.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import CALIB_DATA, REPO
from test_build import fake_trt
from test_trt_conformance import bindings_env

import trtq.runtime
from trtq import doctor
from trtq.cli import main
from trtq.cuda.driver import DeviceInfo, DriverInfo, probe_driver
from trtq.errors import EXIT_GATE_FAILED, EXIT_USER_ERROR
from trtq.trt import sidecar

REAL_LOAD = trtq.runtime.load
H100 = DriverInfo("12.8", [DeviceInfo(0, "NVIDIA H100 80GB HBM3", "9.0")])


def doctor_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["doctor", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# --- where no engine can be built ------------------------------------------------------------


def test_without_tensorrt_reports_what_is_missing_and_skips(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails as if absent
    code, out, err = doctor_cli(capsys)
    assert code == 0, err
    lines = out.splitlines()
    for name in ("Python", "trtq", "numpy", "onnx", "onnxruntime", "pycuda", "NVIDIA driver"):
        assert any(line.split()[1:2] == [name] or f"  {name} " in line for line in lines), name
    assert "--  TensorRT       not installed (pip install 'trtq[trt]'" in out
    assert f"ok  MNIST sample   {CALIB_DATA}" in out
    assert "stft/stft_plugin.py" in out
    assert lines[-1] == (
        "engine checks skipped: TensorRT is not installed (pip install 'trtq[trt]', or "
        "NVIDIA's TensorRT container)"
    )


def test_json_and_require_gpu(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code, out, _ = doctor_cli(capsys, "--json")
    report = json.loads(out)
    assert code == 0 and report["passed"] is True and report["engine_checks"] == []
    assert report["skipped"].startswith("TensorRT is not installed")
    assert report["sample"] == str(CALIB_DATA)
    found = {item["name"]: item for item in report["environment"]}
    assert found["TensorRT"]["ok"] is False and found["onnx"]["ok"] is True
    assert found["onnx"]["value"] == onnx.__version__
    code, out, err = doctor_cli(capsys, "--require-gpu")
    assert code == EXIT_USER_ERROR and "environment" in out
    assert err.startswith("trtq: error: engine checks skipped: TensorRT is not installed")
    assert len(err.splitlines()) == 1 and "drop --require-gpu" in err


@pytest.mark.parametrize("major", ["10", "11"])
def test_real_bindings_without_gpu(major):
    """NVIDIA's bindings import (stub libraries), but no builder can be made: no GPU."""
    proc = subprocess.run(
        [sys.executable, "-m", "trtq", "doctor", "--json"],
        env=bindings_env(major), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    found = {item["name"]: item for item in report["environment"]}
    expected = {"10": "10.13.3.9", "11": "11.4.0.106"}[major]
    assert found["TensorRT"] == {"name": "TensorRT", "value": expected, "ok": True}
    assert report["skipped"] == (
        f"no usable TensorRT/GPU: TensorRT {expected} could not create a Builder"
    )


def test_sample_dir_given_must_hold_the_sample(tmp_path, capsys):
    code, _, err = doctor_cli(capsys, "--sample-dir", tmp_path)
    assert code == EXIT_USER_ERROR and len(err.splitlines()) == 1
    assert f"--sample-dir {tmp_path} lacks the MNIST sample's mnist_cnn.onnx" in err
    for name in doctor.SAMPLE_FILES:
        shutil.copy(CALIB_DATA / name, tmp_path / name)
    assert doctor.find_sample(tmp_path) == (tmp_path, [tmp_path])


def test_default_sample_places(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    installed = Path(sys.prefix) / doctor.SAMPLE_INSTALLED
    assert doctor.checkout_root() == REPO  # the editable install of this checkout
    places = [CALIB_DATA, installed, tmp_path / "calib_data"]
    assert doctor.find_sample() == (CALIB_DATA, places)
    monkeypatch.setattr(doctor, "checkout_root", lambda: None)  # an installed trtq
    assert doctor.find_sample() == (None, places[1:])
    (tmp_path / "calib_data").mkdir()
    for name in doctor.SAMPLE_FILES:
        shutil.copy(CALIB_DATA / name, tmp_path / "calib_data" / name)
    assert doctor.find_sample() == (tmp_path / "calib_data", places[1:])


# --- the engine checks, on the recording TensorRT fake ------------------------------------------


@pytest.fixture
def gpu_machine(monkeypatch):
    """TensorRT 11 (the recording fake), pycuda, a driver with an H100: nothing is missing."""
    trt = fake_trt(11)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    package = types.ModuleType("pycuda")
    package.VERSION_TEXT = "2024.1.2"
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", types.ModuleType("pycuda.driver"))
    monkeypatch.setattr(doctor, "probe_driver", lambda: H100)
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    monkeypatch.setattr(sidecar, "gpu_info", lambda probes=None: dict(gpu))
    return trt


@pytest.fixture
def small_sample(tmp_path) -> Path:
    """The MNIST sample with 128 calibration and 200 test digits: the figures in a third of
    the time (the stand-in engines run in ONNX Runtime, on the CPU)."""
    folder = tmp_path / "sample"
    folder.mkdir()
    shutil.copy(CALIB_DATA / "mnist_cnn.onnx", folder)
    for name, count in (("mnist_calib.npz", 128), ("mnist_test.npz", 200)):
        with np.load(CALIB_DATA / name, allow_pickle=False) as data:
            np.savez(folder / name, **{key: data[key][:count] for key in data.files})
    return folder


def built_graph(engine: Path) -> Path:
    """The ONNX graph TensorRT was handed for ``engine``, as its sidecar records it."""
    record = json.loads(Path(f"{engine}.json").read_text())
    return Path(record["built_model"] or record["source_model"])


def graph_loader(path):
    """trtq.load, where an "engine" runs the graph it was built from in ONNX Runtime."""
    path = Path(path)
    return REAL_LOAD(path if path.suffix == ".onnx" else built_graph(path))


class Negated:
    """An engine whose outputs come out with the wrong sign."""

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.engine.close()

    def infer(self, batch):
        return {name: -value for name, value in self.engine.infer(batch).items()}


def test_engine_checks_build_run_and_pass(gpu_machine, small_sample, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trtq.runtime, "load", graph_loader)
    code, out, err = doctor_cli(capsys, "--sample-dir", small_sample, "--keep", tmp_path / "kept",
                                "-q")  # fmt: skip
    assert code == 0, out + err
    calls = gpu_machine.calls
    assert len(calls.find("build_serialized_network")) == 3
    # Strongly typed, one profile (batch 1 to 100) per engine; precision is in the graphs.
    assert calls.find("create_network") == [("create_network", 0)] * 3
    assert calls.find("set_shape")[0] == ("set_shape", "input", (1, 1, 28, 28), (100, 1, 28, 28),
                                          (100, 1, 28, 28))  # fmt: skip
    kept = tmp_path / "kept"
    assert built_graph(kept / "mnist.fp32.engine") == small_sample / "mnist_cnn.onnx"
    ops = {p: {n.op_type for n in onnx.load(built_graph(kept / f"mnist.{p}.engine")).graph.node}
           for p in ("fp16", "int8")}  # fmt: skip
    assert "Cast" in ops["fp16"] and "QuantizeLinear" not in ops["fp16"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops["int8"]
    lines = out.splitlines()
    assert "ok  TensorRT       11.4.0.106" in out and "ok  pycuda         2024.1.2" in out
    assert "ok  GPU 0          NVIDIA H100 80GB HBM3 (compute capability 9.0)" in out
    rows = {line.split()[0]: line for line in lines if line.startswith(("  fp", "  int"))}
    assert set(rows) == {"fp32", "fp16", "int8"}
    assert all(row.rstrip().endswith("pass") for row in rows.values())
    (reference,) = re.findall(r"^  against ONNX Runtime FP32 on 200 held-out digits \(accuracy "
                              r"(\d+\.\d\d%)\)$", out, re.M)  # fmt: skip
    assert f"1.000000  1.000000  100.00%  {reference}" in rows["fp32"]
    assert lines[-1] == "all 3 engine checks passed"


def test_engine_checks_fail_below_the_floor(gpu_machine, small_sample):
    def loader(path):
        engine = graph_loader(path)
        return Negated(engine) if "int8" in Path(path).name else engine

    diagnosis = doctor.diagnose(small_sample, load=loader)
    assert diagnosis.skipped is None and not diagnosis.passed
    fp32, fp16, int8 = diagnosis.checks
    assert fp32.passed and fp16.passed and not int8.passed
    assert fp32.agreement.cosine_mean == pytest.approx(1.0)
    assert fp16.agreement.cosine_mean > 0.9999
    problems = int8.problems()
    assert re.fullmatch(r"cosine -0\.99\d+ < 0\.995", problems[0]), problems
    assert "top-1 agreement" in problems[1] and "accuracy drop" in problems[2]
    report = diagnosis.to_json()
    assert report["passed"] is False and report["engine_checks"][2]["passed"] is False
    json.dumps(report, allow_nan=False)


def test_build_failures_are_failed_checks(gpu_machine, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(11, plan=None))  # builds return None
    monkeypatch.setattr(trtq.runtime, "load", graph_loader)
    monkeypatch.setattr(doctor, "FLOORS", {"fp32": doctor.FLOORS["fp32"]})  # one is enough
    code, out, _ = doctor_cli(capsys, "-q")
    assert code == EXIT_GATE_FAILED
    assert "  fp32: TensorRT could not build the engine (see the log above)." in out
    assert out.splitlines()[-1] == "1 of 1 engine checks FAILED"


# --- libcuda --------------------------------------------------------------------------------


class FakeLibcuda:
    """The driver API functions probe_driver calls, answering like libcuda does."""

    def __init__(self, devices, init=0, version=12080):
        self.devices, self.init, self.version = devices, init, version

    def cuDriverGetVersion(self, out):
        out._obj.value = self.version
        return 0

    def cuInit(self, flags):
        return self.init

    def cuDeviceGetCount(self, out):
        out._obj.value = len(self.devices)
        return 0

    def cuDeviceGet(self, out, ordinal):
        out._obj.value = ordinal
        return 0

    def cuDeviceGetName(self, buffer, size, handle):
        buffer.value = self.devices[handle.value][0].encode()
        return 0

    def cuDeviceGetAttribute(self, out, attribute, handle):
        major, minor = self.devices[handle.value][1]
        out._obj.value = {75: major, 76: minor}[attribute]
        return 0


def test_driver_probe_reads_version_and_devices():
    info = probe_driver(FakeLibcuda([("NVIDIA H200", (9, 0)), ("NVIDIA L4", (8, 9))]))
    assert info == DriverInfo(
        "12.8", [DeviceInfo(0, "NVIDIA H200", "9.0"), DeviceInfo(1, "NVIDIA L4", "8.9")]
    )
    info = probe_driver(FakeLibcuda([], init=100))
    assert info == DriverInfo("12.8", [], "cuInit failed: CUDA_ERROR_NO_DEVICE (100)")
    assert probe_driver(FakeLibcuda([])).problem == "the driver sees no GPU"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        assert probe_driver() == DriverInfo(problem="no NVIDIA driver (libcuda.so.1 does not load)")
