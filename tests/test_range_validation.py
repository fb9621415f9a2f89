"""Every range that enters trtq is validated at one place (trtq/calib/validate.py).

Hostile TensorRT caches, stats files, shard merges and Python objects: each is refused with
exit 2 and one line naming the tensor, and no output is written (issue 13, class 1).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from conftest import CALIB_DATA

import trtq
from trtq.calib.cache import CalibrationStats, TrtCache
from trtq.calib.histogram import Histogram
from trtq.calib.validate import check_histogram
from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR, DataError

MODEL = CALIB_DATA / "mnist_cnn.onnx"
CALIB = CALIB_DATA / "mnist_calib.npz"
#: A tensor the default quantize plan puts a Q/DQ pair on.
TENSOR = "/features/features.1/MaxPool_output_0"


def run(capsys, *argv) -> tuple[int, str]:
    code = main([*map(str, argv), "--no-progress"])
    return code, capsys.readouterr().err


def refused(capsys, tmp_path, flag: str, path, *expected: str) -> None:
    """quantize with ``flag path`` exits 2 with one line holding ``expected``; writes nothing."""
    out = tmp_path / "q.onnx"
    code, err = run(capsys, "quantize", MODEL, flag, path, "-o", out)
    assert code == EXIT_USER_ERROR, err
    assert len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err
    assert not out.exists()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A valid stats file and a valid complete cache of the sample (64 samples)."""
    folder = tmp_path_factory.mktemp("valid")
    stats, cache = folder / "stats.json", folder / "m.cache"
    assert main(["calibrate", str(MODEL), "--calib", str(CALIB), "--limit", "64", "-o",
                 str(stats), "--cache", str(cache), "--no-progress", "-q"]) == 0  # fmt: skip
    return stats, cache


# --- TensorRT caches ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "problem"),
    [
        ("00000000", "scale 0.0: zero"),
        ("0", "scale 0.0: zero"),  # TensorRT's own spelling of a zero scale
        ("7fc00000", "scale nan: not finite"),
        ("7f800000", "scale inf: not finite"),
        ("bf800000", "scale -1.0: negative"),
        ("00000001", "denormal as a float32 scale"),
        ("7f7fffff", "at or beyond 1e+09 (a mask fill, not data)"),
        ("4b000000", "a range of 1.07e+09"),  # scale 2**23: amax just past the sentinel rule
    ],
)
def test_hostile_cache_scale(calibrated, tmp_path, capsys, bits, problem):
    _, valid = calibrated
    lines = valid.read_text().splitlines()
    lines = [f"{TENSOR}: {bits}" if line.startswith(f"{TENSOR}: ") else line for line in lines]
    hostile = tmp_path / "hostile.cache"
    hostile.write_text("\n".join(lines) + "\n")
    refused(capsys, tmp_path, "--cache", hostile, f"tensor {TENSOR!r}", problem)


def test_duplicate_cache_line(calibrated, tmp_path, capsys):
    _, valid = calibrated
    text = valid.read_text()
    hostile = tmp_path / "hostile.cache"
    hostile.write_text(text + f"{TENSOR}: 3c010204\n")
    refused(capsys, tmp_path, "--cache", hostile, f"repeats tensor {TENSOR!r}", "first on line")


def test_valid_cache_and_stats_are_accepted_without_data_but_unchecked(
    calibrated, tmp_path, capsys
):
    stats, cache = calibrated
    for flag, path in (("--stats", stats), ("--cache", cache)):
        code, err = run(capsys, "quantize", MODEL, flag, path, "-o", tmp_path / "q.onnx")
        assert code == 0, err
        assert "not compared with FP32" in err  # no data: no numeric check, and it says so


# --- stats files -------------------------------------------------------------------------------


def _edit(hist: dict, name: str) -> None:
    """Corrupt one field of a histogram's JSON the way ``name`` says."""
    if name == "negative count":
        hist["nonzero_counts"][0] = -5
    elif name == "NaN max":
        hist["max"] = math.nan
    elif name == "infinite min":
        hist["min"] = -math.inf
    elif name == "fractional count":
        hist["nonzero_counts"][0] = 1.5
    elif name == "huge count":
        hist["nonzero_counts"][0] = 2**60
    elif name == "count disagrees with bins":
        hist["count"] += 1
    elif name == "bins not a power of two":
        hist["bins"] = 1000
    elif name == "bin index out of range":
        hist["nonzero_bins"][-1] = hist["bins"]
    elif name == "max edited":
        hist["max"] = math.ldexp(0.99, hist["range_exp"])
    elif name == "range_exp absurd":
        hist["range_exp"] = 400
    elif name == "negative NaN count":
        hist["nan_count"] = -1
    elif name == "max past the sentinel limit":
        hist["max"] = 3.4e38


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("negative count", "a bin count -5: outside 0..2**53"),
        ("NaN max", "has max nan: not finite"),
        ("infinite min", "has min -inf: not finite"),
        ("fractional count", "a bin count 1.5: not an integer"),
        ("huge count", f"a bin count {2**60}: outside 0..2**53"),
        ("count disagrees with bins", "values but its bins hold"),
        ("bins not a power of two", "1000 bins: not a power of two"),
        ("bin index out of range", "bin indices not increasing within 0..2047"),
        ("max edited", "but its highest non-empty bin is"),
        ("range_exp absurd", "range_exp 400, outside"),
        ("negative NaN count", "nan_count -1: outside"),
        ("max past the sentinel limit", "not a finite value below 1e+09"),
    ],
)
def test_hostile_stats_histogram(calibrated, tmp_path, capsys, name, problem):
    valid, _ = calibrated
    data = json.loads(valid.read_text())
    _edit(data["histograms"][TENSOR], name)
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(data))
    refused(capsys, tmp_path, "--stats", hostile, f"tensor {TENSOR!r}", problem)


@pytest.mark.parametrize(
    ("amax", "problem"),
    [(math.nan, "amax nan: not finite"), (-2.0, "amax -2.0: negative"), (0.0, "amax 0.0: zero")],
)
def test_hostile_stats_range(calibrated, tmp_path, capsys, amax, problem):
    valid, _ = calibrated
    data = json.loads(valid.read_text())
    data["ranges"][TENSOR]["amax"] = amax
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(data))
    refused(capsys, tmp_path, "--stats", hostile, f"tensor {TENSOR!r}", problem)


def test_stats_with_mixed_bins(calibrated, tmp_path, capsys):
    valid, _ = calibrated
    data = json.loads(valid.read_text())
    small = Histogram.empty(1024)
    small.update(np.linspace(0, 3, 1000))
    data["histograms"][TENSOR] = small.to_json()
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(data))
    refused(capsys, tmp_path, "--stats", hostile, "mixes histograms of [1024, 2048] bins")


def test_stats_with_bad_sample_counts_and_duplicate_keys(calibrated, tmp_path, capsys):
    valid, _ = calibrated
    data = json.loads(valid.read_text())
    data["num_samples"] = -1
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(data))
    refused(capsys, tmp_path, "--stats", hostile, "sample or batch count of -1")
    text = valid.read_text()
    entry = f'  "{TENSOR}": {{'
    start = text.index(entry, text.index('"histograms"'))
    end = text.index("\n  }", start) + len("\n  }")
    duplicated = text[:start] + text[start:end] + ",\n" + text[start:]
    hostile.write_text(duplicated)
    refused(capsys, tmp_path, "--stats", hostile, f"lists {TENSOR!r} twice")


# --- merges ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards 1/2 and 2/2 of the sample, one 2048-bin and one 1024-bin shard 2/2."""
    folder = tmp_path_factory.mktemp("shards")
    made = {}
    for key, flags in {
        "1/2": ["--shard", "1/2"],
        "2/2": ["--shard", "2/2"],
        "2/2 bins": ["--shard", "2/2", "--bins", "1024"],
        "1/3": ["--shard", "1/3"],
    }.items():
        path = folder / f"{key.replace('/', 'of').replace(' ', '_')}.json"
        assert main(["calibrate", str(MODEL), "--calib", str(CALIB), "--limit", "128",
                     "--batch-size", "32", "-o", str(path), "--no-progress", "-q",
                     *flags]) == 0  # fmt: skip
        made[key] = path
    return made


def merge(capsys, tmp_path, *parts) -> tuple[int, str]:
    out = tmp_path / "merged.json"
    code, err = run(capsys, "calibrate", "--merge", *parts, "-o", out)
    assert code == 0 or not out.exists()
    return code, err


def test_merge_of_the_same_shard_twice(shards, tmp_path, capsys):
    code, err = merge(capsys, tmp_path, shards["1/2"], shards["2/2"], shards["1/2"])
    assert code == EXIT_USER_ERROR and "are both shard 1/2: its samples would count twice" in err
    copy = tmp_path / "copy.json"
    shutil.copy(shards["2/2"], copy)  # renamed, same content
    code, err = merge(capsys, tmp_path, shards["1/2"], shards["2/2"], copy)
    assert code == EXIT_USER_ERROR and "both shard 2/2" in err


def test_merge_of_identical_whole_calibrations(calibrated, tmp_path, capsys):
    valid, _ = calibrated
    copy = tmp_path / "copy.json"
    shutil.copy(valid, copy)
    code, err = merge(capsys, tmp_path, valid, copy)
    assert code == EXIT_USER_ERROR and "holds the same statistics as" in err


def test_merge_of_different_bins_is_a_user_error(shards, tmp_path, capsys):
    code, err = merge(capsys, tmp_path, shards["1/2"], shards["2/2 bins"])
    assert code == EXIT_USER_ERROR
    assert "has histograms of 1024 bins" in err and "the same --bins" in err
    assert len(err.strip().splitlines()) == 1


def test_merge_of_different_splits_and_incomplete_ones(shards, tmp_path, capsys):
    code, err = merge(capsys, tmp_path, shards["1/2"], shards["1/3"])
    assert code == EXIT_USER_ERROR and "mix different splits" in err
    code, err = merge(capsys, tmp_path, shards["1/3"])
    assert code == 0 and "merging 1 of 3 shards (missing 2/3, 3/3)" in err


def test_merge_validates_each_file(shards, tmp_path, capsys):
    data = json.loads(shards["2/2"].read_text())
    data["histograms"][TENSOR]["nonzero_counts"][0] = -1
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(data))
    code, err = merge(capsys, tmp_path, shards["1/2"], hostile)
    assert code == EXIT_USER_ERROR and f"tensor {TENSOR!r}" in err and "-1" in err


# --- the Python API ----------------------------------------------------------------------------


def test_python_api_ranges_are_validated(calibrated):
    valid, _ = calibrated
    with pytest.raises(DataError, match=r"the calibration cache: tensor 't' has scale nan"):
        trtq.quantize(MODEL, cache=TrtCache({"t": math.nan}))
    stats = CalibrationStats.read(valid)
    stats.histograms[TENSOR].counts[0] = -3
    with pytest.raises(DataError, match="negative bin count"):
        trtq.quantize(MODEL, stats=stats)
    with pytest.raises(DataError, match="tensor 'x' has amax inf"):
        TrtCache.from_amax({"x": math.inf})


def test_histograms_trtq_makes_pass_the_gate():
    """The checks hold for what Histogram.update and merge produce (no false refusals)."""
    rng = np.random.default_rng(0)
    merged = Histogram.empty()
    for scale in (1e-30, 1e-3, 1.0, 7.5, 3e8):
        part = Histogram.empty()
        part.update((rng.standard_normal(1000) * scale).astype(np.float32))
        part.update(np.zeros(10))
        check_histogram("test", "t", part)
        merged = merged.merge(part)
        check_histogram("test", "t", merged)
    masked = Histogram.empty()
    masked.update(np.array([np.nan, -1e9, 0.5]))
    check_histogram("test", "t", masked)


def test_stats_claiming_gigabytes_of_histograms_are_refused_before_allocating(
    calibrated, tmp_path, capsys
):
    valid, _ = calibrated
    data = json.loads(valid.read_text())
    empty = Histogram.empty(1 << 16).to_json()
    data["histograms"] = {f"t{i}": empty for i in range(2100)}  # a 400 KB file
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(data))
    refused(capsys, tmp_path, "--stats", hostile, "2100 histograms of 65536 bins (1.0 GiB)")
