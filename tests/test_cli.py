"""The `trtq` command: help, version, inspect, normalize, and exit codes on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent
from onnx import TensorProto, helper

from trtq import __version__
from trtq.cli import build_parser, main
from trtq.errors import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR
from trtq.graph.load import load_model

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def trtq(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("trtq: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"trtq {__version__}"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: trtq {command}" in out
    assert "--debug" in out and "--verbose" in out
    assert "example" in out


def test_console_script_runs_as_module(mnist_model):
    result = subprocess.run(
        [sys.executable, "-m", "trtq", "inspect", str(mnist_model), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout)["inputs"][0]["name"] == "input"


def test_inspect_text(mnist_model, capsys):
    code, out, _ = trtq(capsys, "inspect", mnist_model)
    assert code == 0
    assert "input   float32  batchx1x28x28" in out
    assert "ai.onnx 17" in out
    assert "quantized  no" in out


def test_inspect_json(mnist_model, capsys):
    code, out, _ = trtq(capsys, "inspect", mnist_model, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["inputs"] == [
        {"name": "input", "dtype": "float32", "shape": ["batch", 1, 28, 28]}
    ]
    assert report["opset"] == 17
    assert report["already_quantized"] is False
    assert report["op_counts"]["Conv"] == 5


def test_normalize_writes_an_equivalent_model(mnist_model, mnist_batch, tmp_path, capsys):
    out_path = tmp_path / "norm.onnx"
    code, _, err = trtq(capsys, "normalize", mnist_model, "-o", out_path)
    assert code == 0, err
    assert "wrote" in err
    normalized = load_model(out_path)
    assert "BatchNormalization" not in {n.op_type for n in normalized.graph.node}
    assert_equivalent(load_model(mnist_model), normalized, mnist_batch)
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


def test_quiet_silences_info(mnist_model, tmp_path, capsys):
    code, _, err = trtq(capsys, "normalize", "-q", mnist_model, "-o", tmp_path / "n.onnx")
    assert code == 0 and err == ""


def test_missing_model_file(capsys, tmp_path):
    code, out, err = trtq(capsys, "inspect", tmp_path / "missing.onnx")
    assert code == EXIT_USER_ERROR and out == ""
    assert_one_line_error(err, "model file not found", "missing.onnx")


def test_not_onnx(capsys, tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("not a model")
    code, _, err = trtq(capsys, "inspect", bogus)
    assert code == EXIT_USER_ERROR
    assert_one_line_error(err, "is not an ONNX model", "pass a .onnx file")


def test_output_folder_missing(capsys, mnist_model, tmp_path):
    code, _, err = trtq(capsys, "normalize", mnist_model, "-o", tmp_path / "no" / "x.onnx")
    assert code == EXIT_USER_ERROR
    assert_one_line_error(err, "-o/--output: folder", "does not exist", "create it first")


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = trtq(capsys, "inspect", "--debug", tmp_path / "missing.onnx")
    assert code == EXIT_USER_ERROR
    assert "Traceback" in err and "model file not found" in err


def test_internal_error_exits_1(capsys, mnist_model, monkeypatch):
    def broken(model):
        raise RuntimeError("boom")

    monkeypatch.setattr("trtq.cli.inspect_cmd.summarize", broken)
    code, _, err = trtq(capsys, "inspect", mnist_model)
    assert code == EXIT_INTERNAL_ERROR
    assert "internal error: RuntimeError: boom" in err and "Traceback" not in err


def test_unknown_flag_exits_2(capsys, mnist_model):
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(mnist_model), "--no-such-flag"])
    assert info.value.code == EXIT_USER_ERROR
    assert "unrecognized arguments" in capsys.readouterr().err


def test_inspect_checks_data(mnist_model, capsys):
    code, out, _ = trtq(
        capsys, "inspect", mnist_model, "--data", "calib_data/mnist_calib.npz", "--batch-size", "50"
    )
    assert code == 0
    assert "500 samples in 10 batches" in out and ": ok" in out
    assert "input: float32 50x1x28x28, values 0 .. 255" in out


def test_inspect_data_json(mnist_model, capsys):
    code, out, _ = trtq(
        capsys, "inspect", mnist_model, "--data", "calib_data/mnist_test.npz", "--json"
    )
    assert code == 0
    data = json.loads(out)["data"]
    assert data["samples"] == 1000 and data["inputs"]["input"]["max"] == 255.0


def two_input_model(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Add", ["image", "bias"], ["y"])],
        "two_inputs",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["N", 3, 8, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
    )
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_wrong_input_name(capsys, tmp_path):
    model = two_input_model(tmp_path)
    data = tmp_path / "d.npz"
    np.savez(
        data, image=np.zeros((2, 3, 8, 8), np.float32), bais=np.zeros((2, 3, 8, 8), np.float32)
    )
    code, _, err = trtq(capsys, "inspect", model, "--data", data)
    assert code == EXIT_USER_ERROR
    assert_one_line_error(err, "'bias'", "bais")


def test_shape_mismatch(capsys, mnist_model, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, input=np.zeros((4, 1, 32, 32), np.uint8))
    code, _, err = trtq(capsys, "inspect", mnist_model, "--data", data)
    assert code == EXIT_USER_ERROR
    assert_one_line_error(err, "input 'input'", "1x28x28", "32x32")


def test_empty_data_folder(capsys, mnist_model, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    code, _, err = trtq(capsys, "inspect", mnist_model, "--data", folder)
    assert code == EXIT_USER_ERROR
    assert_one_line_error(err, "calib")


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_data(capsys, mnist_model, tmp_path, bad):
    images = np.ones((4, 1, 28, 28), np.float32)
    images[2, 0, 5, 5] = bad
    data = tmp_path / "d.npy"
    np.save(data, images)
    code, _, err = trtq(capsys, "inspect", mnist_model, "--data", data)
    assert code == EXIT_USER_ERROR
    assert_one_line_error(err, "input 'input'", "NaN" if np.isnan(bad) else "Inf")


def test_missing_data(capsys, mnist_model, tmp_path):
    code, _, err = trtq(capsys, "inspect", mnist_model, "--data", tmp_path / "nope")
    assert code == EXIT_USER_ERROR
    assert_one_line_error(err, "data not found")


def test_outputs_get_the_usual_file_mode(mnist_model, tmp_path, capsys):
    """Atomic writes go through mkstemp (0600); the result must be readable like any file."""
    out = tmp_path / "n.onnx"
    code, _, _ = trtq(capsys, "normalize", "-q", mnist_model, "-o", out)
    assert code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
