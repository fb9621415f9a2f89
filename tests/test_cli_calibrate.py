"""`trtq calibrate`: stats files, TensorRT caches, shards and merges, end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import CALIB_DATA

from trtq.calib.cache import CalibrationStats, TrtCache
from trtq.calib.scope import plan_tensors, planning_graph
from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR
from trtq.graph import qdq

MODEL = str(CALIB_DATA / "mnist_cnn.onnx")
CALIB = str(CALIB_DATA / "mnist_calib.npz")


def calibrate(capsys, *argv) -> tuple[int, str]:
    code = main(["calibrate", *map(str, argv), "--no-progress"])
    return code, capsys.readouterr().err


def test_stats_and_cache(tmp_path, capsys):
    stats_path, cache_path = tmp_path / "stats.json", tmp_path / "model.cache"
    code, err = calibrate(capsys, MODEL, "--calib", CALIB, "-o", stats_path, "--cache", cache_path)
    assert code == 0, err
    stats = CalibrationStats.read(stats_path)
    assert stats.num_samples == 500
    cache = TrtCache.read(cache_path)
    # Labelled with the method that chose the ranges: entropy, TensorRT's own.
    assert cache.to_text().startswith("TRT-101303-EntropyCalibration2\n")
    # --cache observes every float activation, as TensorRT's implicit INT8 mode needs.
    assert set(cache.scales) == set(stats.ranges) and "input" in cache.scales
    grouped = {name for group in stats.scope.range_groups for name in group}
    for name, scale in cache.scales.items():
        if name not in grouped:
            assert scale == pytest.approx(stats.ranges[name].amax / 127, rel=1e-7)
        assert stats.ranges[name].method == "entropy" or stats.ranges[name].reason
    # Tensors joined by range-preserving ops (MaxPool...) share one scale, as in quantize.
    for group in stats.scope.range_groups:
        assert len({cache.scales[name] for name in group}) == 1, group


def test_default_observes_the_quantize_plan(tmp_path, capsys):
    code, _ = calibrate(capsys, MODEL, "--calib", CALIB, "-o", tmp_path / "s.json", "--limit", "64")
    assert code == 0
    report = json.loads((tmp_path / "s.json").read_text())
    placement = qdq.PlacementOptions()
    planned = plan_tensors(planning_graph(onnx.load(MODEL), placement), placement)
    assert list(report["histograms"]) == planned and report["num_samples"] == 64


@pytest.mark.parametrize("method", ["entropy", "percentile", "max", "mse"])
def test_every_method(tmp_path, capsys, method):
    out = tmp_path / "s.json"
    code, _ = calibrate(
        capsys, MODEL, "--calib", CALIB, "-o", out, "--method", method, "--limit", "64"
    )
    assert code == 0
    ranges = CalibrationStats.read(out).ranges
    assert all(r.amax > 0 for r in ranges.values())
    # entropy falls back to mse (saying why) where its search locks onto a spike.
    assert all(
        r.method == method or (method == "entropy" and r.method == "mse" and r.reason)
        for r in ranges.values()
    )


def test_shards_merge_to_the_single_process_result(tmp_path, capsys):
    single = tmp_path / "single.json"
    assert calibrate(capsys, MODEL, "--calib", CALIB, "-o", single, "--batch-size", "32")[0] == 0
    parts = []
    for k in (1, 2, 3):
        part = tmp_path / f"part{k}.json"
        code, _ = calibrate(
            capsys, MODEL, "--calib", CALIB, "-o", part, "--batch-size", "32", "--shard", f"{k}/3"
        )
        assert code == 0
        assert CalibrationStats.read(part).shard == f"{k}/3"
        parts.append(part)
    merged = tmp_path / "merged.json"
    code, _ = calibrate(capsys, "--merge", *parts, "-o", merged)
    assert code == 0
    a, b = CalibrationStats.read(single), CalibrationStats.read(merged)
    assert a.num_samples == b.num_samples == 500
    for name in a.histograms:
        np.testing.assert_array_equal(a.histograms[name].counts, b.histograms[name].counts)
    assert a.ranges == b.ranges


def test_merge_refuses_a_model_argument(tmp_path, capsys):
    code, err = calibrate(capsys, MODEL, "--merge", "a.json", "-o", tmp_path / "m.json")
    assert code == EXIT_USER_ERROR and "--merge takes only stats files" in err


def test_shard_cannot_write_a_cache(tmp_path, capsys):
    code, err = calibrate(
        capsys,
        MODEL,
        "--calib",
        CALIB,
        "--shard",
        "1/2",
        "-o",
        tmp_path / "s.json",
        "--cache",
        tmp_path / "c.cache",
    )
    assert code == EXIT_USER_ERROR and "a shard cannot write a cache" in err


def test_missing_calib_flag(tmp_path, capsys):
    code, err = calibrate(capsys, MODEL, "-o", tmp_path / "s.json")
    assert code == EXIT_USER_ERROR and "needs MODEL and --calib" in err


def test_merge_of_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    code, err = calibrate(capsys, "--merge", bad, "-o", tmp_path / "m.json")
    assert code == EXIT_USER_ERROR and "not a trtq stats file" in err
    assert not (tmp_path / "m.json").exists()
