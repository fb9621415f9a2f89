"""trtq: a deployment compiler for NVIDIA TensorRT.

The pipeline, one subpackage per stage:

* :mod:`trtq.graph` - ONNX frontend: load, normalise, inspect (later Q/DQ and FP16).
* :mod:`trtq.calib` - calibration data sources and (later) streaming statistics.
* :mod:`trtq.cli` - the ``trtq`` command.

Nothing here imports TensorRT, pycuda or torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trtq")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
