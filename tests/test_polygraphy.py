"""Polygraphy interop: exported data loader scripts, and polygraphy agreeing with trtq.

The subprocess tests run NVIDIA's `polygraphy` command (the `dev` extra installs it) with
its ONNX Runtime backend on scripts written by `--export-loader`.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CALIB_DATA

from trtq.calib.data import ImagePreprocess, open_batches
from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR, UserError
from trtq.graph.load import TensorSpec, load_model, model_inputs
from trtq.polygraphy import write_loader_script

MODEL = CALIB_DATA / "mnist_cnn.onnx"
CALIB = CALIB_DATA / "mnist_calib.npz"
#: The data every polygraphy test runs on: 200 calibration digits in batches of 50.
DATA_FLAGS = ("--limit", "200", "--batch-size", "50")


def import_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"loader_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_batches(first, second) -> None:
    first, second = list(first), list(second)
    assert len(first) == len(second) and first
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype
            np.testing.assert_array_equal(a[name], b[name])


def trtq(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# --- the loader script itself (no polygraphy needed) --------------------------------------


def test_loader_yields_the_batches_trtq_reads(tmp_path):
    inputs = model_inputs(load_model(MODEL))
    script = write_loader_script(tmp_path / "loader.py", CALIB, inputs, 32, limit=100)
    assert_same_batches(
        import_script(script).load_data(), open_batches(CALIB, inputs, batch_size=32, limit=100)
    )
    text = script.read_text()
    assert str(CALIB.resolve()) in text and "open_batches" in text
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


def test_loader_keeps_image_preprocessing(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        pixels = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    inputs = [TensorSpec("x", np.dtype("float32"), ("n", 3, 32, 32))]
    preprocess = ImagePreprocess(
        resize=(32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), color="BGR"
    )
    script = write_loader_script(tmp_path / "l.py", folder, inputs, 2, preprocess=preprocess)
    module = import_script(script)
    assert preprocess == module.PREPROCESS  # the settings travel as JSON, read back exactly
    assert_same_batches(
        module.load_data(),
        open_batches(folder, inputs, batch_size=2, preprocess=preprocess),
    )


def test_loader_path_must_be_python(tmp_path):
    with pytest.raises(UserError, match=r"must end in \.py"):
        write_loader_script(tmp_path / "loader.txt", CALIB, [], None)


def test_calibrate_exports_its_batches(tmp_path, capsys):
    loader = tmp_path / "calib_loader.py"
    code, err = trtq(
        capsys,
        "calibrate",
        MODEL,
        "--calib",
        CALIB,
        "-o",
        tmp_path / "s.json",
        *DATA_FLAGS,
        "--no-progress",
        "--export-loader",
        loader,
    )
    assert code == 0, err
    inputs = model_inputs(load_model(MODEL))
    assert_same_batches(
        import_script(loader).load_data(), open_batches(CALIB, inputs, batch_size=50, limit=200)
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["calibrate", "--merge", "a.json", "-o", "s.json", "--export-loader", "l.py"],
        ["quantize", str(MODEL), "-o", "q.onnx", "--stats", "s.json", "--export-loader", "l.py"],
    ],
    ids=["calibrate-merge", "quantize-without-calib"],
)
def test_export_loader_needs_data(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.json").write_text("{}")
    code, err = trtq(capsys, *argv)
    assert code == EXIT_USER_ERROR
    assert "--export-loader needs" in err and len(err.strip().splitlines()) == 1


# --- polygraphy itself ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def polygraphy() -> str:
    pytest.importorskip(
        "polygraphy", reason="polygraphy is not installed (pip install 'trtq[dev]')"
    )
    found = Path(sys.executable).with_name("polygraphy")
    command = str(found) if found.exists() else shutil.which("polygraphy")
    if command is None:
        pytest.skip("the polygraphy command is not on PATH")
    return command


def run_polygraphy(command: str, *argv, cwd: Path) -> str:
    result = subprocess.run(
        [command, *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """trtq's INT8 model of the sample and the loader `trtq quantize --export-loader` wrote."""
    folder = tmp_path_factory.mktemp("polygraphy")
    argv = ["quantize", str(MODEL), "--calib", str(CALIB), *DATA_FLAGS, "--no-progress", "-q"]
    argv += ["-o", str(folder / "int8.onnx"), "--export-loader", str(folder / "loader.py")]
    assert main(argv) == 0
    return {"folder": folder, "int8": folder / "int8.onnx", "loader": folder / "loader.py"}


@pytest.fixture(scope="module")
def polygraphy_fp32(polygraphy, exported) -> Path:
    """polygraphy's ONNX Runtime outputs of the FP32 model on the exported loader's batches."""
    out = exported["folder"] / "fp32.json"
    run_polygraphy(
        polygraphy, "run", MODEL, "--onnxrt", "--data-loader-script", exported["loader"],
        "--save-outputs", out, cwd=exported["folder"],
    )  # fmt: skip
    return out


def test_polygraphy_and_trtq_run_agree(polygraphy_fp32, exported, capsys):
    from polygraphy.comparator import RunResults

    saved = exported["folder"] / "trtq.npz"
    code, err = trtq(capsys, "run", MODEL, "--data", CALIB, *DATA_FLAGS, "--save-outputs", saved)
    assert code == 0, err
    ((_, iterations),) = RunResults.load(str(polygraphy_fp32)).items()
    assert len(iterations) == 4  # 200 samples in batches of 50
    theirs = np.concatenate([np.asarray(it["logits"]) for it in iterations])
    with np.load(saved) as ours:
        np.testing.assert_allclose(ours["logits"], theirs, rtol=1e-5, atol=1e-5)


def test_polygraphy_compares_trtq_int8_with_fp32(polygraphy, polygraphy_fp32, exported):
    output = run_polygraphy(
        polygraphy, "run", exported["int8"], "--onnxrt",
        "--data-loader-script", exported["loader"], "--load-outputs", polygraphy_fp32,
        "--atol", "0.25", "--rtol", "0.1", cwd=exported["folder"],
    )  # fmt: skip
    assert "PASSED" in output and "Pass Rate: 100.00%" in output


def test_polygraphy_inspects_the_sample(polygraphy, tmp_path):
    output = run_polygraphy(polygraphy, "inspect", "model", MODEL, cwd=tmp_path)
    assert "input [dtype=float32, shape=('batch', 1, 28, 28)]" in output
    assert "logits [dtype=float32, shape=('batch', 10)]" in output
