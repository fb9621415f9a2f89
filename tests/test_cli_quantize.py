"""`trtq quantize`: the written model, its report, and reuse of stats files and caches."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import CALIB_DATA
from helpers import run

from trtq.calib.cache import TrtCache
from trtq.calib.scope import trt_tensors
from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR

MODEL = str(CALIB_DATA / "mnist_cnn.onnx")
CALIB = str(CALIB_DATA / "mnist_calib.npz")


def quantize(capsys, *argv) -> tuple[int, str, str]:
    code = main(["quantize", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q")
    out, report = folder / "m.int8.onnx", folder / "report.json"
    assert main(["quantize", MODEL, "--calib", CALIB, "-o", str(out), "--report", str(report),
                 "--no-progress", "-q"]) == 0  # fmt: skip
    return out, json.loads(report.read_text())


def test_report_accounts_for_every_compute_node(quantized):
    _, report = quantized
    coverage = report["coverage"]
    assert coverage["total_nodes"] == 6
    assert coverage["quantized_nodes"] + len(report["float_nodes"]) == 6
    assert coverage["fraction"] >= 0.9
    assert all(node["reason"] for node in report["float_nodes"])
    for tensor in report["quantized_tensors"]:
        assert tensor["scale"] == pytest.approx(tensor["amax"] / 127)
        assert tensor["quantizable"] and tensor["role"]


def test_written_model_is_valid_and_faithful(quantized, mnist_test):
    path, _ = quantized
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = mnist_test["input"].astype(np.float32)
    reference = run(onnx.load(MODEL), {"input": x})[0]
    logits = run(model, {"input": x})[0]
    accuracy = np.mean(logits.argmax(1) == mnist_test["labels"])
    assert accuracy >= np.mean(reference.argmax(1) == mnist_test["labels"]) - 0.005


def test_summary_line(capsys, tmp_path):
    code, out, _ = quantize(
        capsys, MODEL, "--calib", CALIB, "-o", tmp_path / "m.onnx", "--limit", "64"
    )
    assert code == 0
    assert "INT8: 4/6 compute nodes, coverage" in out and "float: " in out and "tiny" in out


def test_json_report_on_stdout(capsys, tmp_path):
    code, out, _ = quantize(
        capsys, MODEL, "--calib", CALIB, "-o", tmp_path / "m.onnx", "--limit", "64", "--json"
    )
    assert code == 0
    assert json.loads(out)["precision"] == "int8"


def test_stats_and_cache_are_written_then_reused(capsys, tmp_path):
    stats, cache = tmp_path / "stats.json", tmp_path / "m.cache"
    first, second, third = (tmp_path / f"{i}.onnx" for i in range(3))
    args = ["--calib", CALIB, "--limit", "64"]
    assert quantize(capsys, MODEL, *args, "-o", first, "--stats", stats, "--cache", cache)[0] == 0
    assert stats.exists() and cache.exists()
    # Labelled with the method used (entropy, the default), complete for TensorRT's implicit INT8.
    assert TrtCache.read(cache).algorithm == "EntropyCalibration2"
    assert set(trt_tensors(onnx.load(MODEL))) <= set(TrtCache.read(cache).scales)
    # No --calib: ranges come from the files alone, and give the same model.
    assert quantize(capsys, MODEL, "-o", second, "--stats", stats)[0] == 0
    assert quantize(capsys, MODEL, "-o", third, "--cache", cache)[0] == 0
    a, b, c = (onnx.load(p) for p in (first, second, third))
    scales = lambda m: {i.name: onnx.numpy_helper.to_array(i).tolist() for i in m.graph.initializer}  # noqa: E731
    assert scales(a) == scales(b)
    for name, value in scales(a).items():  # the cache stores float32 scales: equal to rounding
        assert np.allclose(value, scales(c)[name], rtol=1e-6), name


def test_without_data_or_ranges(capsys, tmp_path):
    code, _, err = quantize(capsys, MODEL, "-o", tmp_path / "m.onnx")
    assert code == EXIT_USER_ERROR and "no calibration data" in err


def test_cache_for_another_model(capsys, tmp_path):
    cache = tmp_path / "other.cache"
    TrtCache.from_amax({"some_tensor": 1.0}).write(cache)
    code, _, err = quantize(capsys, MODEL, "-o", tmp_path / "m.onnx", "--cache", cache)
    assert code == EXIT_USER_ERROR and "has no range for" in err


def test_already_quantized_model_is_refused(capsys, quantized, tmp_path):
    path, _ = quantized
    code, _, err = quantize(capsys, path, "--calib", CALIB, "-o", tmp_path / "again.onnx")
    assert code == EXIT_USER_ERROR
    assert "already quantized" in err and "build it directly" in err
    assert not (tmp_path / "again.onnx").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--precision", "fp16"], "FP16: 19 nodes in reduced precision, 0 kept FP32"),
        (["--precision", "bf16"], "BF16: 19 nodes in reduced precision, 0 kept FP32"),
        (["--precision", "int8", "--high-precision", "fp16"], "FP16: 33 nodes in reduced"),
        (
            ["--precision", "fp16", "--keep-fp32-ops", "Gemm"],
            "fp32: /head/Gemm: Gemm in --keep-fp32-ops",
        ),
    ],
)
def test_reduced_precision_modes(capsys, tmp_path, flags, expected):
    out_path = tmp_path / "m.onnx"
    code, out, _ = quantize(
        capsys, MODEL, "--calib", CALIB, "--limit", "64", "-o", out_path, *flags
    )
    assert code == 0
    assert expected in out
    assert "check (onnx" in out  # the numeric check ran, and says with what
    onnx.checker.check_model(onnx.load(out_path), full_check=True)


def test_scalar_and_state_inputs_that_are_not_batch_major(capsys, tmp_path):
    """Like silero-vad: a scalar int64 input and a state whose first dim is not the batch."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
            helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["state", "sr_f"], ["state_out"]),
        ],
        "stateful",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "N", 4]),
        ],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w")
        ],
    )
    model_path, loader = tmp_path / "stateful.onnx", tmp_path / "loader.py"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_path)
    loader.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    rng = np.random.default_rng(1)\n"
        "    for _ in range(4):\n"
        "        yield {'x': rng.standard_normal((1, 16, 8, 8)).astype(np.float32),\n"
        "               'state': np.ones((2, 1, 4), np.float32), 'sr': np.array(16000)}\n"
    )
    code, out, err = quantize(capsys, model_path, "--calib", loader, "-o", tmp_path / "q.onnx")
    assert code == 0, err
    assert "check (onnxruntime, 4 samples): y cosine" in out  # every batch of the loader
    assert "state_out cosine vs FP32 mean 1.000000" in out
