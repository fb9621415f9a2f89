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
