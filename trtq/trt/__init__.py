"""The TensorRT layer: everything that touches the ``tensorrt`` module lives here.

Nothing in this package imports TensorRT at module level: the engine builder,
the calibrator and the runtime ask :func:`import_tensorrt` for the module when
they need it, so ``import trtq`` (and every command that only rewrites ONNX)
works on a machine without TensorRT. Version differences between TensorRT 10
and 11 are detected from the module itself in :mod:`trtq.trt.compat`.

Two ways TensorRT can be unusable are told apart, each as one line:

* the Python package or its native libraries are missing:
  :func:`import_tensorrt` raises :class:`~trtq.errors.MissingDependencyError`;
* the libraries load but cannot create a builder or runtime (no GPU, no
  driver, a CUDA mismatch): :func:`create_builder` and :func:`create_runtime`
  raise :class:`~trtq.errors.UserError` instead of pybind11's opaque
  ``TypeError: factory function returned nullptr``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from trtq.errors import MissingDependencyError, UserError

__all__ = ["create_builder", "create_runtime", "import_tensorrt"]

#: How to get TensorRT, appended to every "TensorRT is missing" message.
INSTALL_HINT = (
    "install it with: pip install 'trtq[trt]' (NVIDIA's tensorrt wheels; "
    "add --extra-index-url https://pypi.nvidia.com if your index lacks them), "
    "or run trtq inside the nvcr.io/nvidia/tensorrt container image"
)

#: Why a factory that returned nothing most likely did, appended to that message.
NO_GPU_HINT = (
    "check that an NVIDIA GPU is visible (nvidia-smi) and that the driver supports "
    "the CUDA version of your TensorRT wheels, or run trtq inside the "
    "nvcr.io/nvidia/tensorrt container image with --gpus all"
)


def one_line(exc: object) -> str:
    """An exception's text on one line (loader errors span several), or its type's name."""
    return " ".join(str(exc).split()) or type(exc).__name__


def first_line(obj: object) -> str:
    """The first line of what TensorRT said (its messages can run to many lines)."""
    text = str(obj).strip()
    return text.splitlines()[0] if text else type(obj).__name__


def import_tensorrt() -> ModuleType:
    """Import and return the ``tensorrt`` module, or explain in one line how to get it.

    Imported lazily (here, not at module level) so that everything in trtq
    that does not build or run engines works without TensorRT. Two failures
    are reported: the package is not installed (``ImportError`` for
    ``tensorrt`` itself), or it is installed but its native libraries
    (``libnvinfer.so.N`` and friends) cannot be loaded, which surfaces as an
    ``ImportError`` or ``OSError`` from the extension module.
    """
    try:
        return importlib.import_module("tensorrt")
    except ModuleNotFoundError as exc:
        if exc.name not in (None, "tensorrt"):  # a dependency of the package is missing
            raise MissingDependencyError(
                f"TensorRT's Python package is installed but could not be imported: "
                f"{one_line(exc)}",
                INSTALL_HINT,
            ) from exc
        raise MissingDependencyError(
            "building and running engines needs TensorRT's Python package 'tensorrt', "
            "which is not installed",
            INSTALL_HINT,
        ) from exc
    except (ImportError, OSError) as exc:
        raise MissingDependencyError(
            f"TensorRT's Python package is installed but its libraries could not be loaded "
            f"({one_line(exc)})",
            INSTALL_HINT,
        ) from exc


def _create(trt: ModuleType, factory: str, logger: Any) -> Any:
    try:
        return getattr(trt, factory)(logger)
    except TypeError as exc:
        # pybind11 raises TypeError when the C++ factory (createInferBuilder /
        # createInferRuntime) returns nullptr: TensorRT loaded, but found no usable
        # GPU or CUDA driver. Any other TypeError (a wrong argument) is a bug in trtq.
        if "nullptr" not in str(exc):
            raise
        version = getattr(trt, "__version__", "?")
        raise UserError(
            f"no usable TensorRT/GPU: TensorRT {version} could not create a {factory}",
            NO_GPU_HINT,
        ) from exc


def create_builder(trt: ModuleType, logger: Any) -> Any:
    """``trt.Builder(logger)``, with "no usable TensorRT/GPU" as a one-line :class:`UserError`.

    The CLI turns the error into exit code 2 and its one line on stderr.
    """
    return _create(trt, "Builder", logger)


def create_runtime(trt: ModuleType, logger: Any) -> Any:
    """``trt.Runtime(logger)``, with "no usable TensorRT/GPU" as a one-line :class:`UserError`."""
    return _create(trt, "Runtime", logger)
