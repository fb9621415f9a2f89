"""Memory a TensorRT call reads and writes: per-context buffers, and the caller's device arrays.

Host inputs are staged in pinned (page-locked) buffers, because asynchronous copies
need page-locked memory and pageable copies also run at a third of the speed; every
tensor has a device buffer. Both are allocated on first use and replaced only by
larger ones (:class:`ContextSlot`), so steady traffic allocates nothing.

CUDA arrays (CuPy, PyTorch, pycuda GPUArray: anything with
``__cuda_array_interface__``) are not copied: :func:`device_pointer` checks them and
hands their address to TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from trtq.errors import DataError
from trtq.runtime.base import Shape, format_dims

if TYPE_CHECKING:
    from trtq.runtime.engine import PendingInference

#: ``__cuda_array_interface__`` stream values that need no wait: none given, or the legacy
#: default stream (0 is not allowed by the protocol; read as legacy). Work there is
#: ordered before anything on the blocking streams trtq creates.
_ORDERED_STREAMS = frozenset({None, 0, 1})


@dataclass
class ContextSlot:
    """An execution context, its stream, and its buffers: device and pinned, per tensor.

    Buffers are allocated on first use and replaced only by larger ones, so steady
    traffic allocates nothing. Replacing is safe: a slot's stream is idle between calls.
    """

    context: Any
    stream: Any
    driver: Any
    devices: dict[str, tuple[Any, int]] = field(default_factory=dict)
    pinned: dict[str, np.ndarray] = field(default_factory=dict)
    #: Input shapes last set on the context (``set_input_shape`` only when they change).
    shapes: dict[str, Shape] = field(default_factory=dict)
    pending: PendingInference | None = None

    def device(self, name: str, nbytes: int) -> Any:
        """A device allocation of at least ``nbytes`` for tensor ``name``."""
        current = self.devices.get(name)
        if current is not None and current[1] >= nbytes:
            return current[0]
        if current is not None:
            current[0].free()
        allocation = self.driver.mem_alloc(max(nbytes, 1))
        self.devices[name] = (allocation, nbytes)
        return allocation

    def host(self, name: str, nbytes: int, dtype: np.dtype, shape: Shape) -> np.ndarray:
        """A pinned array of ``shape`` and ``dtype`` for tensor ``name`` (its first bytes)."""
        buffer = self.pinned.get(name)
        if buffer is None or buffer.size < nbytes:
            buffer = self.pinned[name] = self.driver.pagelocked_empty(max(nbytes, 1), np.uint8)
        return buffer[:nbytes].view(dtype).reshape(shape)

    def free(self) -> None:
        self.stream.synchronize()
        for allocation, _ in self.devices.values():
            allocation.free()
        self.devices.clear()
        self.pinned.clear()
        self.context = None  # TensorRT frees the context's memory now, in the caller's context


def device_pointer(name: str, value: Any, stream: Any, driver: Any) -> int:
    """The address of a CUDA array, checked to be contiguous and ready for ``stream``.

    Producers that name a stream other than the legacy default one in their
    ``__cuda_array_interface__`` may still be writing the array: the device is
    synchronized then (pycuda cannot wait on another library's stream handle).
    """
    interface = getattr(value, "__cuda_array_interface__", None)
    kind = type(value).__name__
    if interface is None:
        raise DataError(
            f"input '{name}': the {kind} is a device array without __cuda_array_interface__",
            "pass a CuPy array, a PyTorch CUDA tensor, a pycuda GPUArray or a numpy array",
        )
    if interface.get("mask") is not None:
        raise DataError(f"input '{name}': masked device arrays are not supported", "drop the mask")
    shape = tuple(interface["shape"])
    itemsize = np.dtype(interface["typestr"]).itemsize
    strides = interface.get("strides")
    if strides is not None and not _c_contiguous(shape, tuple(strides), itemsize):
        raise DataError(
            f"input '{name}': the {kind} is not contiguous (shape {format_dims(shape)}, "
            f"strides {tuple(strides)}); TensorRT reads dense row-major memory",
            "pass a contiguous one: x.contiguous() (PyTorch), cupy.ascontiguousarray(x)",
        )
    producer = interface.get("stream")
    if producer not in _ORDERED_STREAMS and producer != getattr(stream, "handle", None):
        driver.Context.synchronize()
    return int(interface["data"][0])


def interface_shape(value: Any) -> Shape:
    return tuple(int(d) for d in value.__cuda_array_interface__["shape"])


def _c_contiguous(shape: Shape, strides: tuple[int, ...], itemsize: int) -> bool:
    """Row-major dense: strides of dims longer than 1 match C order (empty arrays qualify)."""
    if 0 in shape:
        return True
    expected = itemsize
    for size, stride in zip(reversed(shape), reversed(strides), strict=True):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True
