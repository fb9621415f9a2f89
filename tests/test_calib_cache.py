"""TensorRT calibration cache text format and trtq's stats files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from trtq.calib.cache import CalibrationStats, TrtCache, merge_stats, trt_version_int
from trtq.calib.histogram import Histogram
from trtq.errors import DataError


def test_amax_one_gives_the_published_bit_pattern():
    cache = TrtCache.from_amax({"x": 1.0})
    assert cache.to_text().splitlines()[1] == f"x: {struct.pack('>f', 1 / 127).hex()}"
    assert struct.pack(">f", 1 / 127).hex() == "3c010204"


@pytest.mark.parametrize(
    ("version", "number"), [("8.6.1", 8601), ("10.13.3", 101303), ("11.4.0.106", 110400)]
)
def test_version_integer(version, number):
    assert trt_version_int(version) == number


def test_header_and_algorithm():
    assert TrtCache.from_amax({"a": 2.0}).to_text().startswith("TRT-101303-EntropyCalibration2\n")
    text = TrtCache.from_amax({"a": 2.0}, method="max", trt_version="8.6.1").to_text()
    assert text.startswith("TRT-8601-MinMaxCalibration\n")


def test_round_trip_reproduces_scales_exactly(tmp_path):
    rng = np.random.default_rng(0)
    amax = {f"tensor_{i}": float(a) for i, a in enumerate(rng.uniform(1e-4, 1e4, 50))}
    amax["name: with colon"] = 3.0
    cache = TrtCache.from_amax(amax)
    path = tmp_path / "model.cache"
    cache.write(path)
    back = TrtCache.read(path)
    assert back.scales == {k: float(np.float32(v / 127.0)) for k, v in amax.items()}
    assert back.algorithm == "EntropyCalibration2" and back.version == 101303
    assert back.to_text() == path.read_text()  # byte-for-byte stable


def test_reads_a_cache_written_by_tensorrt_8():
    text = "TRT-8601-EntropyCalibration2\nimages: 3b66eddc\n168: 3dc6cf6e\n169: 3c010a14\n"
    cache = TrtCache.parse(text)
    assert cache.version == 8601
    assert cache.scales["169"] == pytest.approx(1 / 127, rel=1e-3)  # 3c010a14, a common value
    assert cache.to_text() == text


def test_foreign_and_corrupt_caches(tmp_path):
    with pytest.raises(DataError, match=r"ONNX Runtime's calibration\.cache"):
        TrtCache.parse("conv1_out 0.0 12.5\n", "ort.cache")
    with pytest.raises(DataError, match="not a TensorRT calibration cache"):
        TrtCache.parse("", "empty.cache")
    with pytest.raises(DataError, match="line 3 is corrupt"):
        TrtCache.parse("TRT-8601-EntropyCalibration2\na: 3c010a14\nb: zz\n", "bad.cache")
    binary = tmp_path / "bin.cache"
    binary.write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80]))
    with pytest.raises(DataError, match="not a text calibration cache"):
        TrtCache.read(binary)
    with pytest.raises(DataError, match="not found"):
        TrtCache.read(tmp_path / "missing.cache")


def test_invalid_scale_is_refused():
    with pytest.raises(DataError, match=r"tensor 'x' has amax 0\.0: zero"):
        TrtCache.from_amax({"x": 0.0})


def stats(values: np.ndarray, sha: str = "abc") -> CalibrationStats:
    h = Histogram.empty()
    h.update(values)
    return CalibrationStats({"t": h}, num_samples=len(values), num_batches=1, model_sha256=sha)


def test_stats_round_trip_and_merge(tmp_path):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(1000), rng.standard_normal(1000) * 7
    path = tmp_path / "a.json"
    stats(a).write(path)
    back = CalibrationStats.read(path)
    np.testing.assert_array_equal(back.histograms["t"].counts, stats(a).histograms["t"].counts)
    merged = merge_stats([back, stats(b)], ["a.json", "b.json"])
    whole = stats(np.concatenate([a, b]))
    np.testing.assert_array_equal(merged.histograms["t"].counts, whole.histograms["t"].counts)
    assert merged.num_samples == 2000


def test_merge_refuses_other_models(tmp_path):
    with pytest.raises(DataError, match="another model"):
        merge_stats([stats(np.ones(3)), stats(np.ones(3), sha="other")], ["a", "b"])


def test_bad_stats_files(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="not JSON"):
        CalibrationStats.read(path)
    path.write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not a trtq stats file"):
        CalibrationStats.read(path)
    path.write_text('{"format": "trtq-calibration-stats", "version": 1, "histograms": {}}')
    with pytest.raises(DataError, match="stats format 1; this trtq reads 2"):
        CalibrationStats.read(path)
    path.write_text('{"format": "trtq-calibration-stats", "version": 2, "histograms": {}}')
    with pytest.raises(DataError, match="corrupt"):
        CalibrationStats.read(path)
