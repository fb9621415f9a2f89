"""Collection: histograms streamed from ONNX Runtime in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtq.calib.collect import Shard, collect, parse_memory, plan_groups
from trtq.errors import UserError
from trtq.graph.load import load_model
from trtq.graph.normalize import normalize
from trtq.graph.patterns import compute_op_inputs, float_activations
from trtq.sessions import resolve_providers


@pytest.fixture(scope="module")
def mnist(mnist_model):
    return normalize(load_model(mnist_model))


def digit_batches(mnist_test, count: int, size: int = 16) -> list[dict[str, np.ndarray]]:
    images = mnist_test["input"].astype(np.float32)
    return [{"input": images[(i * size) % 960 : (i * size) % 960 + size]} for i in range(count)]


def assert_same_histograms(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name].counts, b[name].counts, err_msg=name)
        assert (a[name].range_exp, a[name].count, a[name].max) == (
            b[name].range_exp,
            b[name].count,
            b[name].max,
        )


def test_observes_every_compute_input(mnist, mnist_test):
    tensors = compute_op_inputs(mnist)
    assert len(tensors) == 6  # five Conv inputs and the Gemm input
    result = collect(mnist, tensors, digit_batches(mnist_test, 4), progress=False)
    assert result.num_batches == 4 and result.num_samples == 64 and result.passes == 1
    for name, hist in result.histograms.items():
        assert hist.count > 0, name
        assert hist.nan_count == 0 and hist.sentinel_count == 0


def test_memory_does_not_grow_with_the_number_of_batches(mnist, mnist_test):
    tensors = float_activations(mnist)

    def peak(batches) -> int:
        tracemalloc.start()
        collect(mnist, tensors, batches, progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    few, many = digit_batches(mnist_test, 3), digit_batches(mnist_test, 60)
    peak(few)  # warm up imports and caches
    assert peak(many) < 1.2 * peak(few) + (256 << 10)


def test_memory_budget_splits_into_groups_with_identical_results(mnist, mnist_test):
    tensors = float_activations(mnist)
    batches = digit_batches(mnist_test, 3)
    whole = collect(mnist, tensors, batches, progress=False)
    budget = 16 * 32 * 28 * 28 * 4  # about one full-resolution feature map of a batch
    grouped = collect(mnist, tensors, batches, max_memory=budget, progress=False)
    assert grouped.passes > 1
    assert grouped.num_batches == 3
    # ONNX Runtime fuses differently depending on which outputs are requested, so a
    # value on a bin edge may land one bin over; nothing else may differ.
    for name, hist in whole.histograms.items():
        other = grouped.histograms[name]
        assert (hist.count, hist.range_exp) == (other.count, other.range_exp), name
        assert np.abs(hist.counts - other.counts).sum() <= 1e-4 * hist.count, name


def test_plan_groups_respects_the_budget(mnist, mnist_test):
    tensors = float_activations(mnist)
    batches = digit_batches(mnist_test, 1)
    assert plan_groups(mnist, tensors, batches[0], None) == [tensors]
    groups = plan_groups(mnist, tensors, batches[0], 200_000)
    assert [t for g in groups for t in g] == tensors
    assert len(groups) > 2


def test_shards_merge_to_the_single_run(mnist, mnist_test):
    tensors = compute_op_inputs(mnist)
    batches = digit_batches(mnist_test, 7)
    single = collect(mnist, tensors, batches, progress=False).histograms
    parts = [collect(mnist, tensors, batches, shard=Shard(k, 3), progress=False) for k in (1, 2, 3)]
    assert sum(p.num_batches for p in parts) == 7
    merged = {n: parts[0].histograms[n].merge(parts[1].histograms[n]) for n in tensors}
    merged = {n: merged[n].merge(parts[2].histograms[n]) for n in tensors}
    assert_same_histograms(single, merged)


def test_batches_of_different_widths():
    """Dynamic spatial dims (OCR lines): every batch may have its own shape."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["y"]),
        ],
        "ocr_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[w, numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), "w2")],
    )
    model = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    rng = np.random.default_rng(1)
    batches = [
        {"x": rng.standard_normal((2, 1, 32, width)).astype(np.float32)} for width in (40, 97, 300)
    ]
    result = collect(model, compute_op_inputs(model), batches, progress=False)
    assert result.histograms["x"].count == 2 * 32 * (40 + 97 + 300)
    assert result.histograms["r"].count == 2 * 4 * 30 * (38 + 95 + 298)


def test_unknown_provider_is_a_user_error():
    with pytest.raises(UserError, match="provider 'tpu' is not available"):
        resolve_providers(["tpu"])
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(None) == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512M", 512 << 20), ("4G", 4 << 30), ("1.5GiB", 3 << 29), ("1000", 1000)],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_bad_memory_and_shard_strings():
    with pytest.raises(UserError, match="bad memory size"):
        parse_memory("lots")
    with pytest.raises(UserError, match="bad shard"):
        Shard.parse("3/2")
    assert Shard.parse("2/4") == Shard(2, 4)


def test_no_batches_is_a_user_error(mnist):
    with pytest.raises(UserError, match="no calibration batches"):
        collect(mnist, compute_op_inputs(mnist), [], progress=False)
