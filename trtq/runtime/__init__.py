"""Running models: :func:`load` a ``.onnx`` model or a TensorRT engine behind one interface.

::

    import trtq

    engine = trtq.load("model.onnx")                # ONNX Runtime (trtq.runtime.onnxrt)
    engine = trtq.load("model.engine", device=0)    # TensorRT (trtq.runtime.engine)
    outputs = engine(input=batch)                   # or engine.infer({"input": batch})
    engine.inputs[0]                                # IOSpec(name, dtype, shape, profile)

Both backends implement :class:`~trtq.runtime.base.Engine`, so serving code, ``trtq
run`` and ``trtq bench`` work on either; the file suffix picks the backend.

The TensorRT backend lives in :mod:`trtq.runtime.engine` as ``TensorRTEngine(path, *,
device=0, plugins=None, allow_host_code=False, max_contexts=None, ...)``, a subclass of
``Engine``. It is imported only when an engine file is loaded - the single seam between
this module and TensorRT - so everything else works on machines without TensorRT or a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from trtq.errors import ModelError, UserError
from trtq.runtime.base import Engine, IOSpec
from trtq.runtime.pool import DEFAULT_CONTEXT_TIMEOUT

__all__ = ["ENGINE_SUFFIXES", "ONNX_SUFFIXES", "Engine", "IOSpec", "load"]

log = logging.getLogger(__name__)

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")


def load(
    path: str | Path,
    device: int = 0,
    *,
    plugins: Sequence[str | Path] | None = None,
    allow_host_code: bool = False,
    max_contexts: int | None = None,
    context_timeout: float | None = DEFAULT_CONTEXT_TIMEOUT,
    providers: Sequence[str] | None = None,
) -> Engine:
    """Load a model to run: ``.onnx`` with ONNX Runtime, ``.engine``/``.plan`` with TensorRT.

    ``device`` is the GPU (TensorRT, and ONNX Runtime's GPU providers). ``providers`` are
    ONNX Runtime execution providers, e.g. ``["cuda", "cpu"]`` (default CPU); TensorRT
    engines ignore them. Problems are raised as one-line :class:`~trtq.errors.UserError`.

    TensorRT engines only (ONNX Runtime ignores these):

    * ``plugins``: TensorRT plugin libraries (``.so``) and Python plugin modules (``.py``)
      to load first. Loading runs no code the caller did not name: what an engine's
      sidecar records about plugins only appears in error messages, and files next to
      the engine are never loaded.
    * ``allow_host_code``: let a version-compatible engine run the lean runtime embedded
      in it (TensorRT's ``engine_host_code_allowed``); only for engines you trust.
    * ``max_contexts``: at most this many execution contexts, shared by all threads
      (each holds the engine's activation memory); None: as many as half the GPU's free
      memory holds, from 1 to 8. A call borrows one and returns it when it ends; callers
      beyond the pool wait, up to ``context_timeout`` seconds (None: no limit), then get
      :class:`~trtq.runtime.pool.ContextsBusyError`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ONNX_SUFFIXES + ENGINE_SUFFIXES:
        raise UserError(
            f"cannot tell how to run {path}: unknown suffix '{path.suffix}'",
            "pass a .onnx model (run by ONNX Runtime) or a .engine/.plan file (TensorRT)",
        )
    if not path.is_file():
        raise ModelError(f"model file not found: {path}", "check the path")
    if suffix in ONNX_SUFFIXES:
        from trtq.runtime.onnxrt import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, device=device, providers=providers, plugins=plugins)
    if providers:
        log.warning("ONNX Runtime providers ignored: %s is a TensorRT engine", path)
    return _tensorrt_backend()(
        path,
        device=device,
        plugins=plugins,
        allow_host_code=allow_host_code,
        max_contexts=max_contexts,
        context_timeout=context_timeout,
    )


def _tensorrt_backend() -> type[Engine]:
    try:
        from trtq.runtime.engine import TensorRTEngine
    except ModuleNotFoundError as exc:
        if exc.name != "trtq.runtime.engine":
            raise
        raise UserError(
            "TensorRT engines need the TensorRT runtime backend (trtq.runtime.engine), which "
            "this trtq does not have yet",
            "run the .onnx model with ONNX Runtime meanwhile: trtq.load('model.onnx')",
        ) from None
    return TensorRTEngine
