"""trtq: a deployment compiler for NVIDIA TensorRT.

The pipeline, one subpackage per stage:

* :mod:`trtq.graph` - ONNX frontend: load, normalise, inspect (later Q/DQ and FP16).
* :mod:`trtq.calib` - calibration data sources and (later) streaming statistics.
* :mod:`trtq.runtime` - running models: :func:`trtq.load` gives one interface over
  ONNX Runtime (``.onnx``) and TensorRT (``.engine``).
* :mod:`trtq.cli` - the ``trtq`` command.
* :mod:`trtq.tune` - per-node precision against the outputs: sensitivity, fallback.
* :mod:`trtq.api` - the same as functions: ``trtq.quantize``, ``trtq.calibrate``,
  ``trtq.build``, ``trtq.compare``, ``trtq.load``, ``trtq.sensitivity``.

Nothing here imports TensorRT, pycuda or torch, and ``import trtq`` imports none of the
subpackages: the API functions are looked up on first use (module ``__getattr__``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trtq.api import build, calibrate, compare, load, quantize, sensitivity

try:
    __version__ = version("trtq")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "build", "calibrate", "compare", "load", "quantize", "sensitivity"]
#: Where each public name lives, imported on first use: trtq/api.py, except ``load``, whose
#: package imports ONNX Runtime only when a model is loaded (serving code stays light).
_API = {name: "trtq.api" for name in __all__ if name != "__version__"} | {"load": "trtq.runtime"}


def __getattr__(name: str) -> Any:
    # Lazy so that `import trtq` stays light (no numpy, ONNX or ONNX Runtime at import).
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'trtq' has no attribute {name!r}")
