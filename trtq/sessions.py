"""ONNX Runtime sessions, made one way for every stage (calibration, checks, compare, runtime).

Three choices matter and are made here, not at each call site:

* ``fake_quant``: graph optimisations at the *basic* level, so Q/DQ nodes are
  executed as written (quantize, then dequantize, in float) — the faithful
  simulation of TensorRT's INT8 arithmetic. The higher levels fuse them into
  ONNX Runtime's own int8 kernels, whose rounding differs.
* models over protobuf's 2 GB limit cannot be serialized in memory; they are
  handed to ONNX Runtime as a file with external data.
* ONNX Runtime's exceptions are turned into one-line trtq errors naming the model
  (:class:`Session`), for loading and for every run, wherever a session is used.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from trtq.errors import DataError, ModelError, UserError
from trtq.proto import serialized


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


def session_options(
    *,
    fake_quant: bool = True,
    memory_arena: bool = True,
    threads: int | None = None,
    float8: bool = False,
) -> ort.SessionOptions:
    """Options for one session; ``float8``: the model holds FP8 Q/DQ (see :func:`has_float8`)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:  # several sessions running side by side share the cores
        options.intra_op_num_threads = threads
    if fake_quant:
        # ONNX Runtime 1.32's basic level folds FP8 weight DequantizeLinears with FP16 scales
        # into wrong constants on the CPU (MNIST: cosine 0.43 instead of 0.9994): FP8 models
        # run unoptimised, exactly as written.
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if float8
            else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        )
    # The arena keeps the largest batch's buffers for good; calibration wants memory back.
    options.enable_cpu_mem_arena = memory_arena
    return options


def open_session(
    model: onnx.ModelProto | str | Path,
    providers: Sequence[str] | None = None,
    *,
    fake_quant: bool = True,
    memory_arena: bool = True,
    name: str | None = None,
    threads: int | None = None,
) -> Session:
    """A session on a model in memory or on disk (see the module docstring for the options).

    ``name`` is how errors refer to the model (default: its path, or its graph's name);
    ``threads`` caps ONNX Runtime's intra-op threads (default: one per core).
    """
    float8 = fake_quant and has_float8(model)
    options = session_options(
        fake_quant=fake_quant, memory_arena=memory_arena, threads=threads, float8=float8
    )
    chosen = resolve_providers(providers)
    if not isinstance(model, onnx.ModelProto):
        return Session(str(model), options, chosen, name=name or str(model))
    name = name or model_name(model)
    data = serialized(model)
    if data is not None:
        return Session(data, options, chosen, name=name, model=model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.onnx")
        onnx.save(model, path, save_as_external_data=True, location="model.data")
        return Session(str(path), options, chosen, name=name, model=model)


def reference_session(
    model: onnx.ModelProto, providers: Sequence[str] | None = None, *, name: str | None = None
) -> Session:
    """A session on an FP32 reference model, run only to be compared against.

    There is nothing to simulate in it, so it gets every graph optimisation: the same
    function up to float rounding (about 1e-7 relative), two to three times faster than
    the basic level on convolutional models, where the check after writing runs it on
    every checked sample.
    """
    return open_session(model, providers, fake_quant=False, name=name)


_FLOAT8 = frozenset(
    {
        onnx.TensorProto.FLOAT8E4M3FN,
        onnx.TensorProto.FLOAT8E4M3FNUZ,
        onnx.TensorProto.FLOAT8E5M2,
        onnx.TensorProto.FLOAT8E5M2FNUZ,
    }
)


def has_float8(model: onnx.ModelProto | str | Path) -> bool:
    """Whether a model stores FP8 tensors (FP8 Q/DQ zero points and weights are initializers).

    A path is read without its external data (the weights themselves are not needed).
    """
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception:  # unreadable: the session itself reports it, naming the model
            return False
    return any(init.data_type in _FLOAT8 for init in model.graph.initializer)


def model_name(model: onnx.ModelProto) -> str:
    """How messages name a model held in memory."""
    return f"the model (graph '{model.graph.name}')" if model.graph.name else "the model"


class Session(ort.InferenceSession):
    """An ONNX Runtime session whose failures are one-line trtq errors naming the model.

    ONNX Runtime raises its own exception types (``Fail``, ``InvalidGraph``,
    ``NotImplemented``...) with messages that name neither the file nor the node. Here,
    what is the model's fault (an op ONNX Runtime does not implement, an invalid graph,
    unreadable weights) becomes a :class:`~trtq.errors.ModelError`, inputs ONNX Runtime
    refuses a :class:`~trtq.errors.DataError`, a failing node a :class:`UserError`; each
    names the model and gives ONNX Runtime's first line. Failures that are neither the
    model's nor the data's (out of memory, an internal error) pass through unchanged.
    """

    def __init__(
        self,
        source: str | bytes,
        options: ort.SessionOptions,
        providers: Sequence[str | tuple[str, dict[str, Any]]],
        *,
        name: str,
        model: onnx.ModelProto | None = None,
    ) -> None:
        self.model_name = name
        try:
            super().__init__(source, options, providers=providers)
        except Exception as exc:  # ONNX Runtime's pybind exception types share no base
            error = load_error(name, exc, model if model is not None else _read_graph(source))
            if error is None:
                raise
            raise error from exc

    def run(self, output_names, input_feed, run_options=None):
        try:
            return super().run(output_names, input_feed, run_options)
        except UserError:
            raise
        except Exception as exc:
            error = run_error(self.model_name, exc)
            if error is None:
                raise
            raise error from exc


#: What ONNX Runtime raises for a model it cannot load: the model's fault.
_MODEL_FAULTS = frozenset(
    {
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "InvalidProtobuf",
        "ModelRequiresCompilation",
        "NoModel",
        "NoSuchFile",
        "NotFound",
        "NotImplemented",
    }
)


def load_error(name: str, exc: Exception, model: onnx.ModelProto | None) -> UserError | None:
    """The trtq error for ONNX Runtime failing to load ``name`` (None: not the user's fault)."""
    from trtq.graph.load import explain_op_error

    kind, detail = type(exc).__name__, describe(exc)
    if kind == "EPFail":
        return _provider_error(name, detail)
    if kind not in _MODEL_FAULTS:
        return None
    unknown_op = explain_op_error(model, detail)
    if unknown_op:
        return ModelError(
            f"ONNX Runtime cannot load {name}: {unknown_op}",
            "trtq runs the model in ONNX Runtime (calibration, checks), so export it with "
            "ops ONNX Runtime implements",
        )
    return ModelError(
        f"ONNX Runtime cannot load {name}: {detail}",
        "check the model with `trtq inspect`; an invalid graph needs a fixed export",
    )


def run_error(name: str, exc: Exception) -> UserError | None:
    """The trtq error for ONNX Runtime failing to run ``name`` (None: not the user's fault)."""
    kind, detail = type(exc).__name__, describe(exc)
    if kind == "InvalidArgument":
        return DataError(
            f"ONNX Runtime refused the inputs of {name}: {detail}",
            "check the arrays against `trtq inspect` of the model",
        )
    if kind == "NotImplemented":
        return ModelError(
            f"ONNX Runtime cannot run {name}: {detail}",
            "export the model with ops and types ONNX Runtime implements",
        )
    if kind == "EPFail":
        return _provider_error(name, detail)
    if kind in ("Fail", "RuntimeException"):
        return UserError(
            f"ONNX Runtime failed running {name} ({kind}): {detail}",
            "check that the data fits the model (`trtq inspect MODEL --data DATA`); "
            "rerun with --debug for the traceback",
        )
    return None


def _provider_error(name: str, detail: str) -> UserError:
    return UserError(
        f"an ONNX Runtime execution provider failed on {name}: {detail}",
        "try --providers cpu to rule the provider out",
    )


#: ``[ONNXRuntimeError] : 1 : FAIL : `` and ``Load model from X failed:``: said elsewhere.
_NOISE = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : |^Load model from .*? failed:\s*")


def describe(exc: BaseException) -> str:
    """The first line of ONNX Runtime's message, without its status-code prefix."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    while (stripped := _NOISE.sub("", first, count=1)) != first:
        first = stripped
    return " ".join(first.split()) or type(exc).__name__


def _read_graph(source: str | bytes) -> onnx.ModelProto | None:
    """The model, without its weights, for naming nodes in an error (None if unreadable)."""
    try:
        if isinstance(source, bytes):
            return onnx.load_model_from_string(source)
        return onnx.load(source, load_external_data=False)
    except Exception:  # the error being explained is the one that matters
        return None
