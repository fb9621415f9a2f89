"""Control flow: frozen setting inputs, If inlining, and silero-vad, a real model built on Ifs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO
from helpers import assert_equivalent, run
from onnx import TensorProto, helper, numpy_helper

from trtq.cli import main
from trtq.cli.common import parse_frozen
from trtq.errors import EXIT_USER_ERROR, ModelError, UserError
from trtq.graph.load import load_model
from trtq.graph.normalize import freeze_inputs, normalize

SILERO = REPO / ".models" / "silero_vad"


def value(name, shape=None):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def nested_if_model() -> onnx.ModelProto:
    """y = If(rate == 16000, then: Relu(x @ W16 [+ inner If on flag]), else: x @ W8)."""
    rng = np.random.default_rng(0)

    def inner(tag: str, k: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Mul", ["h", f"{tag}_k"], [f"{tag}_out"])],
            tag,
            [],
            [value(f"{tag}_out")],
            initializer=[numpy_helper.from_array(np.array(k, np.float32), f"{tag}_k")],
        )

    then = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w16"], ["h"]),
            helper.make_node(
                "If", ["flag"], ["g"], then_branch=inner("a", 2.0), else_branch=inner("b", -1.0)
            ),
            helper.make_node("Relu", ["g"], ["then_out"]),
        ],
        "then",
        [],
        [value("then_out")],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w16")
        ],
    )
    other = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w8"], ["else_out"])],
        "else",
        [],
        [value("else_out")],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w8")
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Equal", ["rate", "r16"], ["is16"]),
            helper.make_node("If", ["is16"], ["y"], then_branch=then, else_branch=other),
        ],
        "settings",
        [
            value("x", ["N", 32]),
            helper.make_tensor_value_info("rate", TensorProto.INT64, []),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [value("y", ["N", 32])],
        initializer=[numpy_helper.from_array(np.array(16000, np.int64), "r16")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_frozen_inputs_inline_every_if_they_decide():
    model = nested_if_model()
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    for rate, flag in ((16000, True), (16000, False), (8000, True)):
        frozen = {"rate": np.array(rate), "flag": np.array(flag)}
        normalized = normalize(model, frozen=frozen)
        assert "If" not in {n.op_type for n in normalized.graph.node}
        assert [v.name for v in normalized.graph.input] == ["x"]
        expected = run(model, {"x": x, "rate": np.array(rate), "flag": np.array(flag)})[0]
        np.testing.assert_allclose(run(normalized, {"x": x})[0], expected, rtol=1e-6, atol=1e-6)


def test_without_freezing_the_ifs_stay(mnist_batch):
    normalized = normalize(nested_if_model())
    assert "If" in {n.op_type for n in normalized.graph.node}


def test_freeze_errors():
    with pytest.raises(ModelError, match="has no input 'sample_rate'"):
        freeze_inputs(nested_if_model(), {"sample_rate": np.array(1)})
    with pytest.raises(UserError, match="is not NAME=VALUE"):
        parse_frozen(["rate"])
    assert parse_frozen(["rate=16000", "scale=0.5,2"])["scale"].tolist() == [0.5, 2.0]


def silero(name: str) -> Path:
    path = SILERO / name
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing: `make test` runs scripts/fetch_test_models.sh")
        pytest.skip(f"{path} missing (run scripts/fetch_test_models.sh)")
    return path


def write_audio_loader(folder: Path) -> Path:
    """Chirps with noise, 512-sample frames at 16 kHz, the model's state zeroed."""
    loader = folder / "audio.py"
    loader.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    rng = np.random.default_rng(0)\n"
        "    t = np.arange(512) / 16000\n"
        "    for i in range(8):\n"
        "        tone = 0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t)\n"
        "        x = tone + 0.05 * rng.standard_normal(512)\n"
        "        yield {'input': x.astype(np.float32)[None], 'sr': np.array(16000),\n"
        "               'state': np.zeros((2, 1, 128), np.float32)}\n"
    )
    return loader


def test_silero_vad_quantizes_once_its_sample_rate_is_frozen(tmp_path, capsys):
    model = silero("silero_vad.onnx")
    loader = write_audio_loader(tmp_path)
    out = tmp_path / "vad.int8.onnx"
    code = main(["quantize", str(model), "--calib", str(loader), "-o", str(out), "--no-progress",
                 "--freeze-input", "sr=16000", "--json", "-q"])  # fmt: skip
    report = __import__("json").loads(capsys.readouterr().out)
    assert code == 0
    assert report["coverage"]["fraction"] > 0.5
    reasons = {node["op"]: node["reason"] for node in report["float_nodes"]}
    assert "recurrent" in reasons["LSTM"]
    assert report["verification"]["outputs"]["output"]["cosine_mean"] > 0.999
    # The sample-rate If is gone; Ifs on run-time shapes remain, the LSTM is top-level now.
    assert "inside the body" not in reasons["LSTM"]
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_silero_vad_without_freezing_reports_its_ifs(tmp_path, capsys):
    model = silero("silero_vad.onnx")
    code = main(["quantize", str(model), "--calib", str(write_audio_loader(tmp_path)), "-o",
                 str(tmp_path / "v.onnx"), "--no-progress", "--json", "-q"])  # fmt: skip
    report = __import__("json").loads(capsys.readouterr().out)
    assert code == 0
    assert report["coverage"]["fraction"] == 0.0
    assert all("inside the body of If" in n["reason"] for n in report["float_nodes"])


@pytest.mark.parametrize("name", ["silero_vad_half.onnx", "silero_vad_16k_op15.onnx"])
def test_silero_variants_normalize_equivalently(name):
    model = load_model(silero(name))
    feeds = {
        "input": (0.1 * np.random.default_rng(2).standard_normal((1, 512))).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
    }
    if "sr" in {v.name for v in model.graph.input}:
        feeds["sr"] = np.array(16000)
    assert_equivalent(model, normalize(model), feeds)


def test_bad_freeze_on_the_command_line(tmp_path, capsys):
    onnx.save(nested_if_model(), tmp_path / "m.onnx")
    code = main(["normalize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "n.onnx"),
                 "--freeze-input", "speed=3"])  # fmt: skip
    assert code == EXIT_USER_ERROR
    assert "has no input 'speed'" in capsys.readouterr().err
