"""Helpers for numerical checks with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    # Graph optimisations off: compare the models as written, not what ORT fuses them into.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def assert_equivalent(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    rtol: float = 1e-4,
) -> None:
    """Max abs difference of every output <= rtol x the reference output's scale (max |x|)."""
    expected, actual = run(reference, feeds), run(candidate, feeds)
    assert len(expected) == len(actual)
    for ref, got in zip(expected, actual, strict=True):
        assert ref.shape == got.shape
        scale = max(float(np.max(np.abs(ref))), 1e-12)
        err = float(np.max(np.abs(ref.astype(np.float64) - got)))
        assert err <= rtol * scale, f"max abs diff {err:.3g} > {rtol} x output scale {scale:.3g}"


def planted_outlier_model(seed: int = 0) -> onnx.ModelProto:
    """Three 16-channel Convs, the last of which per-tensor INT8 destroys (and only it).

    ``conv_b`` writes its channel 0 at 1000x the scale of the others, and ``conv_c``
    ignores that channel (zero weights). The one range of ``conv_c``'s input is set by
    the outlier channel, so every channel ``conv_c`` does read rounds to zero: its INT8
    output is nothing like FP32. ``conv_a`` and ``conv_b`` read ordinary activations.
    Input ``x`` [N, 16, 8, 8], output ``y``.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w_a = rng.normal(0, 0.3, (16, 16, 3, 3)).astype(np.float32)
    w_b = rng.normal(0, 0.3, (16, 16, 1, 1)).astype(np.float32)
    w_b[0] *= 1000.0
    w_c = rng.normal(0, 0.3, (16, 16, 3, 3)).astype(np.float32)
    w_c[:, 0] = 0.0
    nodes = [
        helper.make_node("Conv", ["x", "w_a"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node("Conv", ["a_relu", "w_b"], ["b"], name="conv_b"),
        helper.make_node("Conv", ["b", "w_c"], ["y"], name="conv_c", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "planted_outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [
            numpy_helper.from_array(w, name)
            for name, w in (("w_a", w_a), ("w_b", w_b), ("w_c", w_c))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def planted_batches(samples: int = 256, batch: int = 16, seed: int = 1) -> list[dict]:
    """Inputs for :func:`planted_outlier_model`: standard normal, in batches."""
    x = np.random.default_rng(seed).normal(size=(samples, 16, 8, 8)).astype(np.float32)
    return [{"x": x[i : i + batch]} for i in range(0, samples, batch)]


def float_value(name: str, *shape: int | str) -> onnx.ValueInfoProto:
    """A float32 graph input or output of ``shape`` (ints, or names for free dims)."""
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape))


def checked_model(
    nodes, inputs, outputs, initializers: dict[str, np.ndarray], name: str = "test"
) -> onnx.ModelProto:
    """An opset-17 model of ``nodes``, fully checked by onnx (a test's graph is valid)."""
    graph = onnx.helper.make_graph(
        nodes,
        name,
        inputs,
        outputs,
        initializer=[onnx.numpy_helper.from_array(a, n) for n, a in initializers.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
