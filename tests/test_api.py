"""The public Python API: trtq.quantize and trtq.compare on paths, protos and batches."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import CALIB_DATA

import trtq
from trtq.calib.cache import CalibrationStats
from trtq.errors import DataError, GateFailedError, UserError

MODEL = CALIB_DATA / "mnist_cnn.onnx"
CALIB = CALIB_DATA / "mnist_calib.npz"
TEST = CALIB_DATA / "mnist_test.npz"
#: Ranges clipped at the median |x|: a deliberately unfaithful INT8 model (cosine 0.60).
CLIPPED = {"method": "percentile", "percentile": 50.0}


def scales(model: onnx.ModelProto) -> dict[str, list]:
    return {i.name: onnx.numpy_helper.to_array(i).tolist() for i in model.graph.initializer}


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    with np.load(CALIB, allow_pickle=False) as data:
        return data["input"][:64].astype(np.float32)


def test_the_api_is_exported_lazily():
    from trtq import api

    assert trtq.quantize is api.quantize and trtq.compare is api.compare


def test_quantize_a_path_into_a_file(tmp_path):
    output = tmp_path / "m.int8.onnx"
    result = trtq.quantize(MODEL, CALIB, output=output, limit=64)
    assert output.exists() and scales(onnx.load(output)) == scales(result.model)
    assert result.report["model"] == str(MODEL) and result.report["output"] == str(output)
    assert result.report["precision"] == "int8" and result.passed
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in result.model.graph.node}
    assert result.verification.outputs["logits"].cosine_mean > 0.999


def test_a_proto_and_batches_in_memory_give_the_same_model(digits):
    from_path = trtq.quantize(MODEL, CALIB, limit=64, batch_size=16)
    model = onnx.load(MODEL)
    before = model.SerializeToString()
    batches = [{"input": digits[i : i + 16]} for i in range(0, 64, 16)]
    from_list = trtq.quantize(model, batches)
    from_iterator = trtq.quantize(model, iter(batches))
    assert model.SerializeToString() == before  # the caller's model is left alone
    assert scales(from_list.model) == scales(from_path.model) == scales(from_iterator.model)
    assert from_list.report["model"] is None and from_list.report["output"] is None
    data = from_list.report["verification"]["data"]
    assert data == {"source": "batches given in Python", "samples": 64, "batches": 4}


def test_stats_path_is_written_then_reused(tmp_path):
    stats = tmp_path / "stats.json"
    first = trtq.quantize(MODEL, CALIB, stats=stats, limit=64)
    assert stats.exists()
    again = trtq.quantize(MODEL, stats=stats)  # no data: ranges from the file
    assert scales(again.model) == scales(first.model)
    assert again.report["verification"]["status"] == "not verified: no data"
    reused = trtq.quantize(MODEL, stats=CalibrationStats.read(stats))
    assert scales(reused.model) == scales(first.model)


def test_fp16_conversion(digits):
    result = trtq.quantize(MODEL, [{"input": digits}], precision="fp16")
    assert result.report["mixed_precision"]["precision"] == "fp16"
    assert result.verification.outputs["logits"].rel_l2 < 1e-2


def test_a_broken_gate_raises_with_the_result_and_still_writes(tmp_path):
    output = tmp_path / "clipped.onnx"
    with pytest.raises(GateFailedError, match=r"min-cosine: output 'logits'.*written to") as info:
        trtq.quantize(MODEL, CALIB, output=output, **CLIPPED, min_cosine=0.99)
    assert output.exists()
    result = info.value.result
    assert not result.passed and result.report["verification"]["passed"] is False


@pytest.mark.parametrize(
    ("model", "calib", "options", "message"),
    [
        (MODEL, CALIB, {"precision": "int4"}, "unknown precision 'int4'"),
        (MODEL, CALIB, {"method": "kl"}, "unknown method 'kl'"),
        (MODEL, CALIB, {"precision": "fp16", "high_precision": "bf16"}, "high_precision"),
        (MODEL, CALIB, {"min_cosine": 2.0}, "min_cosine must be in"),
        (MODEL, CALIB, {"max_rel_l2": -1.0}, "max_rel_l2 must be"),
        (MODEL, CALIB, {"verify_samples": 0}, "verify_samples must be"),
        (MODEL, CALIB, {"stats": 42}, "stats must be a path or a CalibrationStats"),
        (MODEL, CALIB, {"percentile": 0}, "percentile must be"),
        (42, CALIB, {}, "model must be the path of an .onnx file"),
        (MODEL, {"input": np.zeros((1, 1, 28, 28))}, {}, "a list of batches"),
        (MODEL, np.zeros((8, 1, 28, 28), np.float32), {}, "iterable of"),
        (MODEL, [{"input": np.zeros((8, 1, 28, 28))}], {"limit": 4}, "limit apply to"),
        (MODEL, [{"image": np.zeros((8, 1, 28, 28))}], {}, "no array for input"),
        (MODEL, [np.zeros((8, 1, 28, 28))], {}, "not a mapping"),
        (MODEL, None, {"min_cosine": 0.9}, "needs data"),
        (MODEL, None, {}, "no calibration data"),
        (CALIB_DATA / "missing.onnx", CALIB, {}, "not found"),
    ],
)
def test_bad_quantize_arguments_are_user_errors(model, calib, options, message):
    with pytest.raises(UserError, match=message) as info:
        trtq.quantize(model, calib, **options)
    assert "\n" not in str(info.value)


def test_bad_batches_are_data_errors():
    with pytest.raises(DataError, match="batch 1"):
        trtq.quantize(MODEL, [{"input": np.zeros((8, 1, 28, 28))}, {"input": np.zeros((8, 28))}])


def test_compare_paths_and_protos(tmp_path):
    candidate = trtq.quantize(MODEL, CALIB, limit=64).model
    comparison = trtq.compare(MODEL, candidate, TEST, limit=128, min_cosine=0.999, max_drop=1)
    assert comparison.passed and comparison.candidate == "<onnx.ModelProto>"
    assert comparison.labels == f"{TEST}:labels"  # found in the data file
    assert comparison.report.samples == 128 and comparison.report.accuracy.samples == 128
    assert comparison.report.outputs["logits"].cosine_mean > 0.999
    payload = json.loads(json.dumps(comparison.to_json()))
    assert payload["passed"] is True and [g["name"] for g in payload["gates"]] == [
        "min-cosine",
        "max-drop",
    ]
    same = trtq.compare(onnx.load(MODEL), MODEL, TEST, limit=16, labels=np.arange(16) % 10)
    assert same.report.outputs["logits"].rel_l2 == 0.0 and same.labels == "the labels given"


def test_compare_raises_on_a_broken_gate(digits):
    candidate = trtq.quantize(MODEL, CALIB, **CLIPPED).model  # cosine 0.60 vs FP32
    with pytest.raises(GateFailedError, match="max-rel-l2: output 'logits'") as info:
        trtq.compare(MODEL, candidate, [{"input": digits}], max_rel_l2=0.1)
    assert info.value.result.report.samples == 64 and not info.value.result.passed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_drop": 1.0, "data": [{"input": np.zeros((4, 1, 28, 28), np.float32)}]}, "labels"),
        ({"min_cosine": -2.0}, "min_cosine must be in"),
        ({"max_drop": -1.0}, "max_drop must be"),
        ({"reference": b"not a model"}, "reference must be the path"),
        ({"data": CALIB_DATA / "missing.npz"}, "data not found"),
    ],
)
def test_bad_compare_arguments_are_user_errors(options, message):
    options = dict(options)
    models = {"reference": options.pop("reference", MODEL), "candidate": MODEL}
    data = options.pop("data", TEST)
    with pytest.raises(UserError, match=message):
        trtq.compare(models["reference"], models["candidate"], data, **options)
