"""One tensor set for `trtq calibrate` and `trtq quantize`; complete, honestly labelled caches.

calibrate observes exactly the tensors quantize's plan needs for the same placement flags and
records what it was made for; quantize --stats refuses other models and options. A TensorRT
cache covers every float tensor of the model as given (observed on it, since BatchNorm folding
removes some) and its header names the method that chose the ranges; trtq build --calib-mode
trt refuses partial caches and trtq's own mse/percentile ones.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CALIB_DATA
from onnx import TensorProto, helper, numpy_helper
from test_build import build, fake_trt

import trtq
from trtq.calib.cache import CalibrationStats, TrtCache
from trtq.calib.calibrate import trt_cache
from trtq.calib.histogram import Histogram
from trtq.calib.ranges import TensorRange
from trtq.calib.scope import CalibrationScope, plan_tensors, planning_graph, trt_tensors
from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR, DataError
from trtq.graph import qdq
from trtq.trt import sidecar

MODEL = CALIB_DATA / "mnist_cnn.onnx"
CALIB = CALIB_DATA / "mnist_calib.npz"
#: A Conv output the normalised graph no longer has (BatchNormalization is folded into it).
PRE_BN = "/features/features.0/features.0.0/Conv_output_0"


def cli(capsys, command: str, *argv) -> tuple[int, str]:
    code = main([command, *map(str, argv), "--no-progress"])
    return code, capsys.readouterr().err


def scales(path) -> dict[str, list]:
    model = onnx.load(path)
    return {i.name: numpy_helper.to_array(i).tolist() for i in model.graph.initializer}


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("contract") / "stats.json"
    assert main(["calibrate", str(MODEL), "--calib", str(CALIB), "-o", str(path), "-q",
                 "--no-progress"]) == 0  # fmt: skip
    return str(path)


def test_readme_flow_calibrate_then_quantize_with_stats(stats_file, tmp_path, capsys):
    """The README's two commands; the model equals one quantized straight from the data."""
    from_stats, from_data = tmp_path / "from_stats.onnx", tmp_path / "from_data.onnx"
    code, err = cli(capsys, "quantize", MODEL, "--stats", stats_file, "-o", from_stats)
    assert code == 0, err
    assert "no range for" not in err
    code, err = cli(capsys, "quantize", MODEL, "--calib", CALIB, "-o", from_data)
    assert code == 0, err
    assert scales(from_stats) == scales(from_data)


def test_stats_hold_the_plan_and_say_what_they_were_made_for(stats_file):
    with open(stats_file) as file:
        data = json.load(file)
    placement = qdq.PlacementOptions()
    planned = plan_tensors(planning_graph(onnx.load(MODEL), placement), placement)
    assert list(data["histograms"]) == planned
    made_for = data["made_for"]
    assert made_for["placement"] == {
        "precision": "int8",
        "include_ops": ["Conv", "ConvTranspose", "Gemm", "MatMul"],
        "exclude_ops": [],
        "exclude_nodes": None,
        "min_channels": 16,
    }
    assert made_for["method"] == "entropy" and made_for["frozen_inputs"] == {}
    assert data["model_sha256"] == trtq.calibrate(MODEL, CALIB, limit=8).model_sha256


@pytest.mark.parametrize(
    ("flags", "difference"),
    [
        (
            ["--min-channels", "8"],
            "calibrated for --min-channels 16, this run has --min-channels 8",
        ),
        (["--exclude-nodes", "features.2"], "--exclude-nodes (none), this run has --exclude-nodes"),
        (["--include-ops", "Conv"], "--include-ops Conv,ConvTranspose,Gemm,MatMul, this run"),
        (["--precision", "fp8"], "--precision int8, this run has --precision fp8"),
    ],
)
def test_quantize_refuses_stats_made_for_other_placement(
    stats_file, tmp_path, capsys, flags, difference
):
    out = tmp_path / "q.onnx"
    code, err = cli(capsys, "quantize", MODEL, "--stats", stats_file, "-o", out, *flags)
    assert code == EXIT_USER_ERROR
    assert difference in err and "calibrate again with" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_quantize_refuses_stats_of_another_model(stats_file, tmp_path, capsys):
    normalized = tmp_path / "normalized.onnx"
    assert main(["normalize", str(MODEL), "-o", str(normalized), "-q"]) == 0
    code, err = cli(
        capsys, "quantize", normalized, "--stats", stats_file, "-o", tmp_path / "q.onnx"
    )
    assert code == EXIT_USER_ERROR and "calibrated on another model" in err


def test_calibrate_takes_the_placement_flags_of_quantize(tmp_path, capsys):
    stats, out = tmp_path / "s.json", tmp_path / "q.onnx"
    code, err = cli(capsys, "calibrate", MODEL, "--calib", CALIB, "--limit", "64",
                    "--min-channels", "1", "-o", stats)  # fmt: skip
    assert code == 0, err
    code, err = cli(capsys, "quantize", MODEL, "--stats", stats, "--min-channels", "1", "-o", out)
    assert code == 0, err
    # With one channel allowed, the first Conv (1 input channel) is planned and quantized.
    first_conv_input = "/Div_1_output_0"
    assert first_conv_input in CalibrationStats.read(stats).histograms
    assert f"{first_conv_input}_scale" in {i.name for i in onnx.load(out).graph.initializer}


@pytest.mark.parametrize(
    ("method", "label"),
    [
        ("entropy", "EntropyCalibration2"),
        ("max", "MinMaxCalibration"),
        ("mse", "TrtqMseCalibration"),
        ("percentile", "TrtqPercentileCalibration"),
    ],
)
def test_cache_is_complete_and_labelled_with_the_method(tmp_path, capsys, method, label):
    stats, cache = tmp_path / "s.json", tmp_path / "m.cache"
    code, err = cli(capsys, "calibrate", MODEL, "--calib", CALIB, "--limit", "64", "-o", stats,
                    "--cache", cache, "--method", method)  # fmt: skip
    assert code == 0, err
    written = TrtCache.read(cache)
    wanted = trt_tensors(onnx.load(MODEL))
    assert PRE_BN in wanted and set(wanted) <= set(written.scales)
    # The label names the method that chose every range; entropy's spike guard (mse's range
    # where the KL search locks onto a spike: one tensor on this sample) is still entropy.
    ranges = CalibrationStats.read(stats).ranges
    used = {ranges[name].method for name in written.scales}
    assert written.algorithm == label
    if method == "entropy":
        assert used == {"entropy", "mse"}
        assert all(ranges[n].reason for n in written.scales if ranges[n].method == "mse")
    else:
        assert used == {method}


def test_a_cache_of_several_methods_is_labelled_mixed():
    hist = Histogram.empty()
    hist.update(np.linspace(0.0, 4.0, 1000))
    ranges = {
        "a": TensorRange("a", 3.0, "entropy"),
        "b": TensorRange("b", 4.0, "mse", reason="entropy's KL minimum clips 30%"),
    }
    scope = CalibrationScope(None, "entropy", 99.99, trt_tensors=("a", "b"))
    stats = CalibrationStats({"a": hist, "b": hist}, 8, 1, "sha", ranges, scope=scope)
    # entropy's spike guard handing one tensor to mse: still an entropy calibration.
    assert trt_cache(stats, trt_version="10.13.3").algorithm == "EntropyCalibration2"
    # ranges of another method the guard did not choose: mixed.
    stats.ranges["b"] = TensorRange("b", 4.0, "max")
    assert trt_cache(stats, trt_version="10.13.3").algorithm == "TrtqMixedCalibration"


def test_cache_tensors_missing_from_the_normalised_graph_are_observed_on_the_model(
    tmp_path, capsys
):
    """The pre-BatchNorm Conv output exists only in the model as given: its max is real."""
    cache = tmp_path / "m.cache"
    code, err = cli(capsys, "calibrate", MODEL, "--calib", CALIB, "--limit", "64", "-o",
                    tmp_path / "s.json", "--cache", cache, "--method", "max")  # fmt: skip
    assert code == 0, err
    model = onnx.load(MODEL)
    model.graph.output.append(helper.make_tensor_value_info(PRE_BN, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with np.load(CALIB, allow_pickle=False) as data:
        batch = data["input"][:64].astype(np.float32)
    (pre_bn,) = session.run([PRE_BN], {"input": batch})
    expected = np.float32(np.abs(pre_bn).max() / 127)
    assert TrtCache.read(cache).scales[PRE_BN] == pytest.approx(float(expected), rel=1e-6)


def test_quantize_writes_a_complete_labelled_cache_that_rebuilds_the_same_model(tmp_path, capsys):
    cache, first, second = tmp_path / "m.cache", tmp_path / "a.onnx", tmp_path / "b.onnx"
    code, err = cli(capsys, "quantize", MODEL, "--calib", CALIB, "--limit", "64", "--method",
                    "max", "--cache", cache, "-o", first)  # fmt: skip
    assert code == 0, err
    written = TrtCache.read(cache)
    assert written.algorithm == "MinMaxCalibration"
    assert set(trt_tensors(onnx.load(MODEL))) <= set(written.scales)
    code, err = cli(capsys, "quantize", MODEL, "--cache", cache, "-o", second)
    assert code == 0, err
    for name, value in scales(first).items():  # the cache stores float32 scales
        assert np.allclose(value, scales(second)[name], rtol=1e-6), name


def test_quantize_cannot_write_a_cache_from_stats_that_lack_the_model_tensors(
    stats_file, tmp_path, capsys
):
    cache, out = tmp_path / "m.cache", tmp_path / "q.onnx"
    code, err = cli(capsys, "quantize", MODEL, "--stats", stats_file, "--cache", cache, "-o", out)
    assert code == EXIT_USER_ERROR and "would be partial" in err
    assert not cache.exists() and not out.exists()


def masked_model(path) -> None:
    """Conv -> Add(-1e9 mask fill) -> Conv: the middle tensor has no honest INT8 scale."""
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 32, 4, 4), np.float32)
    mask[..., 0] = -1e9
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(mask, "mask"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["y", "mask"], ["masked"]),
        helper.make_node("Conv", ["masked", "w2"], ["out"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 32, 4, 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_no_cache_when_a_tensor_has_no_honest_scale(tmp_path, capsys):
    model, data = tmp_path / "masked.onnx", tmp_path / "x.npy"
    masked_model(model)
    np.save(data, np.random.default_rng(1).standard_normal((16, 32, 4, 4)).astype(np.float32))
    stats, cache = tmp_path / "s.json", tmp_path / "m.cache"
    code, err = cli(capsys, "calibrate", model, "--calib", data, "-o", stats, "--cache", cache)
    assert code == EXIT_USER_ERROR
    assert "no complete TensorRT cache: tensor 'masked'" in err and "graph mode" in err
    assert not stats.exists() and not cache.exists()
    # Without --cache, the stats are written and quantize leaves that Conv in float.
    code, err = cli(capsys, "calibrate", model, "--calib", data, "-o", stats)
    assert code == 0 and "masked: not quantizable" in err


def test_cache_with_frozen_inputs_is_refused(tmp_path, capsys):
    code, err = cli(capsys, "calibrate", MODEL, "--calib", CALIB, "-o", tmp_path / "s.json",
                    "--cache", tmp_path / "m.cache", "--freeze-input", "input=1")  # fmt: skip
    assert code == EXIT_USER_ERROR and "freezing inputs changes that model" in err


def test_sharded_calibration_merges_into_the_same_cache(tmp_path, capsys):
    single = tmp_path / "single.cache"
    args = ["--calib", CALIB, "--batch-size", "32", "--limit", "256", "--method", "entropy"]
    code, err = cli(capsys, "calibrate", MODEL, *args, "-o", tmp_path / "s.json", "--cache", single)
    assert code == 0, err
    parts = [tmp_path / f"part{k}.json" for k in (1, 2)]
    for k, part in enumerate(parts, start=1):
        code, err = cli(capsys, "calibrate", MODEL, *args, "--tensors", "all", "--shard",
                        f"{k}/2", "-o", part)  # fmt: skip
        assert code == 0, err
    merged = tmp_path / "merged.cache"
    code, err = cli(capsys, "calibrate", "--merge", *parts, "-o", tmp_path / "m.json", "--cache",
                    merged)  # fmt: skip
    assert code == 0, err
    assert merged.read_text() == single.read_text()  # method entropy, from the shards' record


def test_python_api_calibrate_then_quantize(tmp_path):
    with np.load(CALIB, allow_pickle=False) as data:
        batches = [{"input": data["input"][i : i + 32]} for i in range(0, 128, 32)]
    stats = trtq.calibrate(MODEL, batches, method="percentile", min_channels=1)
    assert isinstance(stats, CalibrationStats) and stats.scope.method == "percentile"
    assert list(tmp_path.iterdir()) == []  # no output asked, none written
    result = trtq.quantize(MODEL, batches, stats=stats, method="percentile", min_channels=1)
    assert result.report["precision"] == "int8"
    with pytest.raises(DataError, match="calibrated for --min-channels 1, this run has"):
        trtq.quantize(MODEL, stats=stats, method="percentile")


# --- trtq build --calib-mode trt: what TensorRT 10 would read ---------------------------------


@pytest.fixture
def trt10(monkeypatch):
    """tests/test_build.py's fake TensorRT 10 module as `tensorrt`, on a fixed GPU."""
    trt = fake_trt(10)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    monkeypatch.setattr(sidecar, "gpu_info", lambda probes=None: dict(gpu))
    return trt


def test_build_serves_a_complete_max_cache(trt10, tmp_path, capsys):
    cache = tmp_path / "m.cache"
    code, err = cli(capsys, "calibrate", MODEL, "--calib", CALIB, "--limit", "64", "-o",
                    tmp_path / "s.json", "--cache", cache, "--method", "max")  # fmt: skip
    assert code == 0, err
    code, _, err = build(capsys, MODEL, "-o", tmp_path / "m.engine", "--int8", "--calib-mode",
                         "trt", "--cache", cache, "--shapes", "input:8x1x28x28")  # fmt: skip
    assert code == 0, err


def test_build_refuses_a_partial_cache(trt10, tmp_path, capsys):
    """The cache trtq quantize used to write: the planned tensors only."""
    placement = qdq.PlacementOptions()
    planned = plan_tensors(planning_graph(onnx.load(MODEL), placement), placement)
    cache, engine = tmp_path / "m.cache", tmp_path / "m.engine"
    TrtCache.from_amax(dict.fromkeys(planned, 4.0)).write(cache)
    code, _, err = build(capsys, MODEL, "-o", engine, "--int8", "--calib-mode", "trt",
                         "--cache", cache, "--shapes", "input:8x1x28x28")  # fmt: skip
    assert code == EXIT_USER_ERROR
    assert "has no scale for 20 of the 25 float tensors" in err and "'input'" in err
    assert "trtq calibrate MODEL --calib DATA -o stats.json --cache FILE" in err
    assert not engine.exists()


@pytest.mark.parametrize("method", ["mse", "percentile", "mixed"])
def test_build_refuses_trtq_only_methods(trt10, tmp_path, capsys, method):
    cache, engine = tmp_path / "m.cache", tmp_path / "m.engine"
    amax = dict.fromkeys(trt_tensors(onnx.load(MODEL)), 4.0)
    TrtCache.from_amax(amax, method=method).write(cache)
    code, _, err = build(capsys, MODEL, "-o", engine, "--int8", "--calib-mode", "trt",
                         "--cache", cache, "--shapes", "input:8x1x28x28")  # fmt: skip
    assert code == EXIT_USER_ERROR
    assert f"holds trtq's {method} ranges" in err and "no such calibrator" in err
    assert not engine.exists()
