"""TensorRT plugin ``trtq::STFT``: ONNX STFT (opset 17, real signal, onesided) on the GPU.

Importing this module registers the plugin with TensorRT's plugin registry, through
TensorRT's Python plugin API (``tensorrt.plugin``, TensorRT >= 10.6; the ahead-of-time
implementation needs >= 10.12). trtq imports it by path::

    trtq build model.plugins.onnx -o model.engine --plugins plugins/stft/stft_plugin.py

The ONNX parser maps a node to it when the node's op is ``STFT`` and its attribute
``plugin_namespace`` is ``trtq`` (``trtq.graph.plugins.stft_to_plugin`` writes such nodes).

Inputs: signal [batch, signal_length, 1] (ONNX) or [batch, signal_length] (what
torch.onnx.export writes) float32, window [frame_length] float32.
Attributes (int32 arrays of one element, see below): frame_step, frame_length, onesided (1).
Output: [batch, 1 + (signal_length - frame_length) // frame_step, frame_length // 2 + 1, 2].

Two implementations of the same kernel (``stft.cu``, built by ``make -C plugins/stft``):

* ahead of time (``aot`` attribute 1, the graph pass's default): the kernel's PTX goes into
  the engine and TensorRT launches it itself, so the engine runs anywhere TensorRT runs
  (trtexec, C++, Triton), without Python or this module;
* just in time (``aot`` 0): TensorRT calls back into Python at every run, which launches the
  kernel through ``libtrtq_stft.so``; loading such an engine needs this module imported first
  (``trtq.load(engine, plugins=[...])``; trtq does it from the engine's sidecar).

Attributes are declared as ``NDArray[int32]``, not ``int``: the ONNX parser passes an ONNX int
attribute as an INT32 field of one element, and TensorRT 10.13's plugin creator turns an
``int`` attribute into a Python int with ``int(array)``, which NumPy >= 2.3 refuses for arrays
of one dimension ("only 0-dimensional arrays can be converted to Python scalars"). Arrays
pass through both 10.x and 11.x untouched.

This module must not use ``from __future__ import annotations``: ``tensorrt.plugin`` reads
the annotations as classes.
"""

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt
import tensorrt.plugin as trtp


def _load_kernel_module():
    """stft_kernel.py beside this file (trtq imports plugin modules by path, not as a package)."""
    name = "trtq_stft_kernel"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("stft_kernel.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


kernel = _load_kernel_module()

# Spelled out rather than ``npt.NDArray[np.int32]``: from NumPy 2.5 NDArray is a type alias
# object, which tensorrt.plugin's ``issubclass`` check rejects; this generic alias is what
# NDArray used to expand to, on every NumPy version.
Int32 = np.ndarray[tuple[Any, ...], np.dtype[np.int32]]


def _value(attribute) -> int:
    """The int in a one-element attribute array (or a plain int)."""
    values = np.asarray(attribute).reshape(-1)
    if values.size != 1:
        raise ValueError(f"{kernel.PLUGIN_ID}: expected one value per attribute, got {values}")
    return int(values[0])


def _attributes(frame_step, frame_length, onesided) -> tuple[int, int]:
    step, length = _value(frame_step), _value(frame_length)
    kernel.check_attributes(step, length, _value(onesided))
    return step, length


@trtp.register(kernel.PLUGIN_ID)
def stft_descriptor(
    signal: trtp.TensorDesc,
    window: trtp.TensorDesc,
    frame_step: Int32,
    frame_length: Int32,
    onesided: Int32,
) -> trtp.TensorDesc:
    """[batch, frames, bins, 2] float32 from signal [batch, signal_length(, 1)]."""
    step, length = _attributes(frame_step, frame_length, onesided)
    if signal.ndim not in (2, 3) or window.ndim != 1:
        raise ValueError(
            f"{kernel.PLUGIN_ID} takes signal [batch, length(, 1)] and window [frame_length], "
            f"got ranks {signal.ndim} and {window.ndim}"
        )
    if signal.ndim == 3:
        channels = signal.shape_expr[2]
        if not channels.is_fake and channels.is_constant and channels.constant_value() != 1:
            raise ValueError(f"{kernel.PLUGIN_ID} transforms real signals: [batch, length, 1]")
    batch, signal_length = signal.shape_expr[0], signal.shape_expr[1]
    frames = kernel.frame_count(signal_length, length, step)
    return trtp.from_shape_expr((batch, frames, kernel.bin_count(length), 2), dtype=trt.float32)


@trtp.autotune(kernel.PLUGIN_ID)
def stft_formats(
    signal: trtp.TensorDesc,
    window: trtp.TensorDesc,
    outputs: tuple[trtp.TensorDesc],
) -> list[trtp.AutoTuneCombination]:
    """The kernel reads and writes float32 in linear (row-major) layout only."""
    return [trtp.AutoTuneCombination("FP32, FP32, FP32", "LINEAR, LINEAR, LINEAR")]


@trtp.impl(kernel.PLUGIN_ID)
def stft_jit(
    signal: trtp.Tensor,
    window: trtp.Tensor,
    frame_step: Int32,
    frame_length: Int32,
    onesided: Int32,
    outputs: tuple[trtp.Tensor],
    stream: int,
) -> None:
    """Launch the kernel through libtrtq_stft.so on TensorRT's stream."""
    step, length = _attributes(frame_step, frame_length, onesided)
    kernel.launch(
        signal.data_ptr,
        window.data_ptr,
        outputs[0].data_ptr,
        int(signal.shape[0]),
        int(signal.shape[1]),
        length,
        step,
        stream,
    )


@trtp.aot_impl(kernel.PLUGIN_ID)
def stft_aot(
    signal: trtp.TensorDesc,
    window: trtp.TensorDesc,
    frame_step: Int32,
    frame_length: Int32,
    onesided: Int32,
    outputs: tuple[trtp.TensorDesc],
    tactic: int,
) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    """The PTX of trtq_stft_kernel and how TensorRT launches it.

    TensorRT passes the input pointers, then ``extra_args``, then the output pointer:
    (signal, window, batch, signal_length, frame_length, frame_step, n_frames, out), the
    kernel's parameter order.
    """
    step, length = _attributes(frame_step, frame_length, onesided)
    batch, signal_length = signal.shape_expr[0], signal.shape_expr[1]
    frames = kernel.frame_count(signal_length, length, step)

    launch = trtp.KernelLaunchParams()
    launch.grid_x = frames
    launch.grid_y = batch
    launch.block_x = kernel.block_size(length)
    launch.shared_mem = kernel.shared_bytes(length)

    extra_args = trtp.SymIntExprs.from_tuple(
        (
            trtp.SymInt32(batch),
            trtp.SymInt32(signal_length),
            trtp.SymInt32(length),
            trtp.SymInt32(step),
            trtp.SymInt32(frames),
        )
    )
    return kernel.KERNEL_NAME, kernel.read_ptx(), launch, extra_args
