"""trtq: a deployment compiler for NVIDIA TensorRT.

The pipeline, one subpackage per stage:

* :mod:`trtq.graph` - ONNX frontend: load, normalise, inspect (later Q/DQ and FP16).
* :mod:`trtq.calib` - calibration data sources and (later) streaming statistics.
* :mod:`trtq.runtime` - running models: :func:`trtq.load` gives one interface over
  ONNX Runtime (``.onnx``) and TensorRT (``.engine``).
* :mod:`trtq.cli` - the ``trtq`` command.

Nothing here imports TensorRT, pycuda or torch, and ``import trtq`` imports none of the
subpackages: ``trtq.load`` is looked up on first use (module ``__getattr__``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trtq.runtime import load

try:
    __version__ = version("trtq")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import trtq` stays light (no numpy, ONNX or ONNX Runtime at import).
    if name == "load":
        from trtq.runtime import load

        globals()["load"] = load  # later look-ups skip this function
        return load
    raise AttributeError(f"module 'trtq' has no attribute {name!r}")
