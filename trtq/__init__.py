"""trtq: a deployment compiler for NVIDIA TensorRT.

The pipeline, one subpackage per stage:

* :mod:`trtq.graph` - ONNX frontend: load, normalise, inspect (later Q/DQ and FP16).
* :mod:`trtq.calib` - calibration data sources and (later) streaming statistics.
* :mod:`trtq.runtime` - running models: :func:`trtq.load` gives one interface over
  ONNX Runtime (``.onnx``) and TensorRT (``.engine``).
* :mod:`trtq.cli` - the ``trtq`` command.
* :mod:`trtq.api` - the same as functions: ``trtq.quantize``, ``trtq.calibrate``,
  ``trtq.build``, ``trtq.compare``, ``trtq.load``.

Nothing here imports TensorRT, pycuda or torch, and ``import trtq`` imports none of the
subpackages: the API functions are looked up on first use (module ``__getattr__``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trtq.api import build, calibrate, compare, load, quantize

try:
    __version__ = version("trtq")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "build", "calibrate", "compare", "load", "quantize"]
#: The public API (trtq/api.py), imported on first use.
_API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    # Lazy so that `import trtq` stays light (no numpy, ONNX or ONNX Runtime at import).
    if name in _API:
        from trtq import api

        value = getattr(api, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'trtq' has no attribute {name!r}")
