"""ONNX Runtime sessions, made one way for every stage (calibration, checks, compare, runtime).

Two choices matter and are made here, not at each call site:

* ``fake_quant``: graph optimisations at the *basic* level, so Q/DQ nodes are
  executed as written (quantize, then dequantize, in float) — the faithful
  simulation of TensorRT's INT8 arithmetic. The higher levels fuse them into
  ONNX Runtime's own int8 kernels, whose rounding differs.
* models over protobuf's 2 GB limit cannot be serialized in memory; they are
  handed to ONNX Runtime as a file with external data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from trtq.errors import UserError


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """Check requested ONNX Runtime providers (short names like 'cuda' allowed); default CPU."""
    available = ort.get_available_providers()
    if not requested:
        return ["CPUExecutionProvider"]
    chosen = []
    for name in requested:
        full = name if name.endswith("ExecutionProvider") else f"{name.upper()}ExecutionProvider"
        match = next((p for p in available if p.lower() == full.lower()), None)
        if match is None:
            raise UserError(
                f"ONNX Runtime provider {name!r} is not available here",
                f"choose from: {', '.join(available)}",
            )
        chosen.append(match)
    return chosen


def session_options(*, fake_quant: bool = True, memory_arena: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if fake_quant:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # The arena keeps the largest batch's buffers for good; calibration wants memory back.
    options.enable_cpu_mem_arena = memory_arena
    return options


def open_session(
    model: onnx.ModelProto | str | Path,
    providers: Sequence[str] | None = None,
    *,
    fake_quant: bool = True,
    memory_arena: bool = True,
) -> ort.InferenceSession:
    """A session on a model in memory or on disk (see the module docstring for the options)."""
    options = session_options(fake_quant=fake_quant, memory_arena=memory_arena)
    chosen = resolve_providers(providers)
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=chosen)
    if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
        return ort.InferenceSession(model.SerializeToString(), options, providers=chosen)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.onnx")
        onnx.save(model, path, save_as_external_data=True, location="model.data")
        return ort.InferenceSession(str(path), options, providers=chosen)
