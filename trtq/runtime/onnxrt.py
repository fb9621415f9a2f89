"""The ONNX Runtime backend: :class:`~trtq.runtime.base.Engine` on an ``InferenceSession``.

It runs the same ``.onnx`` files trtq writes, with the same interface as a TensorRT
engine, so serving code and ``trtq run``/``trtq bench`` can be tried on any machine
and switched to TensorRT by changing the file name.

One session serves every call: ONNX Runtime documents ``InferenceSession.run`` as safe
to call from several threads at once, and the input checks keep no state. Output names
are computed once, so a call costs the checks, ``run`` and one dict.

Models with QuantizeLinear/DequantizeLinear run with basic graph optimizations, as in
``trtq compare``: ONNX Runtime then computes in float between Q/DQ pairs (fake
quantization, TensorRT's arithmetic) instead of fusing them into its own integer kernels.
Other models get ONNX Runtime's full optimizations.

Inputs are host arrays (numpy, or anything ``numpy.asarray`` or DLPack reads on the CPU).
CUDA device arrays need the TensorRT backend; ONNX Runtime's own CUDA provider takes
host arrays here too (it copies them), which is what ``providers=["cuda"]`` gives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from trtq.errors import ModelError, UserError
from trtq.runtime.base import Engine, IOSpec

log = logging.getLogger(__name__)

#: ONNX Runtime's type strings -> numpy dtypes.
ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in {
        "float": "float32",
        "float16": "float16",
        "double": "float64",
        "int8": "int8",
        "int16": "int16",
        "int32": "int32",
        "int64": "int64",
        "uint8": "uint8",
        "uint16": "uint16",
        "uint32": "uint32",
        "uint64": "uint64",
        "bool": "bool",
        "string": "object",
    }.items()
}

#: Providers that run on a GPU and take a ``device_id`` option.
_DEVICE_PROVIDERS = frozenset(
    {
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        "ROCMExecutionProvider",
        "MIGraphXExecutionProvider",
    }
)


class OnnxRuntimeEngine(Engine):
    """An ONNX model run by ONNX Runtime (CPU unless ``providers`` says otherwise).

    ``providers`` takes ONNX Runtime names or short ones (``["cuda", "cpu"]``), checked by
    :func:`trtq.sessions.resolve_providers`; ``device`` is the GPU for GPU providers.
    ``plugins`` (TensorRT plugin libraries) mean nothing to ONNX Runtime and are ignored.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        device: int = 0,
        providers: Sequence[str] | None = None,
        plugins: Sequence[str | Path] | None = None,
    ) -> None:
        from trtq.graph.inspect import QUANTIZED_OPS
        from trtq.graph.load import load_model
        from trtq.sessions import Session, resolve_providers, session_options

        path = Path(path)
        if plugins:
            log.debug("ONNX Runtime ignores TensorRT plugins: %s", ", ".join(map(str, plugins)))
        model = load_model(path, load_external_data=False)  # one-line errors for bad files
        weights = {init.name for init in model.graph.initializer}
        quantized = any(node.op_type in QUANTIZED_OPS for node in model.graph.node)
        del model
        options = session_options(fake_quant=quantized)
        chosen = resolve_providers(providers)
        self.providers = chosen
        with_options = [
            (name, {"device_id": str(device)}) if name in _DEVICE_PROVIDERS else name
            for name in chosen
        ]
        # One-line errors naming the model, for loading and for every call.
        self._session = Session(str(path), options, with_options, name=path.name)
        # Initializers listed as graph inputs (old exporters) have defaults: not required.
        inputs = [_spec(arg) for arg in self._session.get_inputs() if arg.name not in weights]
        outputs = [_spec(arg) for arg in self._session.get_outputs()]
        super().__init__(path, inputs, outputs)
        self.quantized = quantized
        self._session_run = self._session.run

    def _run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        names = self.output_names
        return dict(zip(names, self._session_run(names, feeds), strict=True))

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "providers": list(self._session.get_providers()),
            "graph_optimization": "basic" if self.quantized else "all",
        }

    def close(self) -> None:
        # ONNX Runtime frees a session when its last reference goes.
        self._session_run = _closed
        self._session = None  # type: ignore[assignment]

    @property
    def session(self) -> ort.InferenceSession:
        """The underlying session, for what this interface does not cover (IO binding...)."""
        return self._session


def _spec(arg: Any) -> IOSpec:
    dtype = ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise ModelError(
            f"'{arg.name}' is a {arg.type}; trtq runs models whose inputs and outputs are tensors",
            "export the model with tensor inputs and outputs",
        )
    dims = list(arg.shape) if arg.shape is not None else []
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)
    names = tuple(d if isinstance(d, str) and d else None for d in dims)
    return IOSpec(arg.name, dtype, shape, None, names if any(names) else None)


def _closed(*args: object) -> None:
    raise UserError("this engine was closed", "load the model again")
