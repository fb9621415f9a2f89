"""The STFT kernel of ``stft.cu`` as Python sees it: geometry, artifacts, and a ctypes launcher.

No TensorRT here: ``stft_plugin.py`` (the TensorRT plugin) and the tests share this module,
so the launch geometry that the plugin's ahead-of-time implementation hands to TensorRT is
the one the GPU tests check against the C launcher ``trtq_stft()``.

Functions that compute shapes (:func:`frame_count`, :func:`bin_count`) take plain ints or
``tensorrt.plugin.ShapeExpr`` alike: they use only ``-``, ``//`` and ``+``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

PLUGIN_NAMESPACE = "trtq"
PLUGIN_NAME = "STFT"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
#: The extern "C" __global__ function in stft.cu (its PTX entry name).
KERNEL_NAME = "trtq_stft_kernel"
#: As in stft.cu: shared memory holds 12 bytes per sample, within the default 48 KiB.
MAX_FRAME_LENGTH = 4096
MAX_BLOCK = 256
MAX_BATCH = 65535

HERE = Path(__file__).resolve().parent
LIBRARY = "libtrtq_stft.so"
PTX = "stft.ptx"


def build_dir() -> Path:
    """Where ``make -C plugins/stft`` put its output: ``$TRTQ_STFT_BUILD``, else this folder."""
    return Path(os.environ.get("TRTQ_STFT_BUILD") or HERE)


def frame_count(signal_length: Any, frame_length: int, frame_step: int) -> Any:
    """ONNX STFT's number of frames: 1 + (signal_length - frame_length) // frame_step."""
    return (signal_length - frame_length) // frame_step + 1


def bin_count(frame_length: int) -> int:
    """DFT bins of a onesided transform of a real signal."""
    return frame_length // 2 + 1


def block_size(frame_length: int) -> int:
    """Threads per block: whole warps covering the bins, at most 256 (stft.cu's rule)."""
    return min(-(-bin_count(frame_length) // 32) * 32, MAX_BLOCK)


def shared_bytes(frame_length: int) -> int:
    """Dynamic shared memory per block: float2 twiddles and float samples."""
    return 12 * frame_length


def check_attributes(frame_step: int, frame_length: int, onesided: int) -> None:
    """ValueError unless the kernel computes this configuration."""
    if onesided != 1:
        raise ValueError(f"{PLUGIN_ID} computes onesided transforms only (onesided={onesided})")
    if not 1 <= frame_length <= MAX_FRAME_LENGTH:
        raise ValueError(
            f"{PLUGIN_ID}: frame_length {frame_length} is not in 1..{MAX_FRAME_LENGTH}"
        )
    if frame_step < 1:
        raise ValueError(f"{PLUGIN_ID}: frame_step must be positive, not {frame_step}")


def read_ptx(directory: str | Path | None = None) -> str:
    """The kernel's PTX (``make`` writes it), for TensorRT to embed in the engine."""
    path = Path(directory or build_dir()) / PTX
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build it with `make -C {HERE}`")
    return path.read_text()


_LIBRARIES: dict[Path, ctypes.CDLL] = {}


def load_library(path: str | Path | None = None) -> ctypes.CDLL:
    """``libtrtq_stft.so`` with its C functions typed (loaded once per path)."""
    path = Path(path or build_dir() / LIBRARY).resolve()
    if path in _LIBRARIES:
        return _LIBRARIES[path]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build it with `make -C {HERE}`")
    lib = ctypes.CDLL(str(path))
    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    lib.trtq_stft.argtypes = [c_void_p, c_void_p, c_void_p, c_int, c_int, c_int, c_int, c_void_p]
    lib.trtq_stft.restype = c_int
    for name in ("trtq_stft_block_size", "trtq_stft_shared_bytes"):
        getattr(lib, name).argtypes = [c_int]
        getattr(lib, name).restype = c_int
    lib.trtq_stft_frames.argtypes = [c_int, c_int, c_int]
    lib.trtq_stft_frames.restype = c_int
    lib.trtq_stft_max_frame_length.argtypes = []
    lib.trtq_stft_max_frame_length.restype = c_int
    lib.trtq_stft_error_string.argtypes = [c_int]
    lib.trtq_stft_error_string.restype = ctypes.c_char_p
    _LIBRARIES[path] = lib
    return lib


def launch(
    signal: int,
    window: int | None,
    out: int,
    batch: int,
    signal_length: int,
    frame_length: int,
    frame_step: int,
    stream: int = 0,
    *,
    library: ctypes.CDLL | None = None,
) -> None:
    """Enqueue the STFT of device arrays (addresses) on ``stream``; RuntimeError if refused.

    ``signal`` is [batch, signal_length(, 1)] float32, ``window`` [frame_length] float32 or
    None (rectangular), ``out`` [batch, frames, frame_length // 2 + 1, 2] float32.
    """
    lib = library or load_library()
    code = lib.trtq_stft(
        signal, window, out, batch, signal_length, frame_length, frame_step, stream or None
    )
    if code != 0:
        why = lib.trtq_stft_error_string(code).decode(errors="replace")
        raise RuntimeError(
            f"trtq_stft(batch={batch}, signal_length={signal_length}, frame_length="
            f"{frame_length}, frame_step={frame_step}) failed: {why} (cudaError {code})"
        )


def build(directory: str | Path | None = None, *, nvcc: str = "nvcc") -> Path:
    """Build both artifacts into ``directory`` with this folder's Makefile; returns the folder.

    Without ``make``, runs the Makefile's two default nvcc commands itself.
    """
    out = Path(directory or build_dir()).resolve()
    if shutil.which("make"):
        commands = [["make", "-s", "-C", str(HERE), f"BUILD={out}", f"NVCC={nvcc}"]]
    else:
        out.mkdir(parents=True, exist_ok=True)
        source, flags = str(HERE / "stft.cu"), ["-O3", "-std=c++17"]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (80, 90)]
        gencode.append("-gencode=arch=compute_75,code=compute_75")
        shared = ["-shared", "-Xcompiler", "-fPIC"]
        commands = [
            [nvcc, *flags, *gencode, *shared, "-o", str(out / LIBRARY), source],
            [nvcc, *flags, "-arch=compute_75", "-ptx", "-o", str(out / PTX), source],
        ]
    for command in commands:
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout}{proc.stderr}")
    return out
