"""GPU: the trtq::STFT kernel (``plugins/stft/stft.cu``) on a real device.

``stft.cu`` is compiled with nvcc (``make -C plugins/stft`` into a temporary folder) and run
on a real 16 kHz recording (``plugins/stft/testdata``) three ways, each compared with the
float64 numpy reference (``trtq.graph.plugins.stft_reference``, max abs diff <= 1e-3 of the
largest magnitude):

* through the C launcher ``trtq_stft()`` (ctypes), for several frame lengths and windows;
* as PTX, launched with CuPy exactly as TensorRT launches an ahead-of-time plugin: the
  geometry and scalar arguments that the plugin's ``aot_impl`` returns (evaluated through
  ``tensorrt.plugin``), or, without TensorRT's Python bindings, those of ``stft_kernel.py``;
* through NVIDIA's ``tensorrt.plugin`` JIT plugin: ``enqueue`` of the plugin created as the
  ONNX parser creates it, with device pointers, on a CUDA stream.

Then a batch of 16 x 10 s clips is timed on the GPU against numpy's FFT on the CPU, both
printed (and written to ``$OUT/stft_timing.json`` when ``OUT`` is set).

TensorRT's native libraries are not on the lent machine; ``scripts/gpu_check.sh`` puts the
real 10.13 bindings over stub libraries on the path, which is all the plugin tests need
(they skip without them). Needs nvcc, make, CuPy. Marked ``gpu``: ``make test`` skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from test_plugins import (
    AUDIO,
    FRAME_LENGTH,
    FRAME_STEP,
    PLUGIN,
    FakeRegistry,
    aot_launch,
    create_stft,
    hann,
    load_kernel_module,
    read_wav,
    symbolic_tensorrt,
    tensor_desc,
)

from trtq.graph.plugins import stft_reference

pytestmark = pytest.mark.gpu

#: (frame_length, frame_step, Hann window or rectangular)
CONFIGS = [(400, 160, True), (512, 128, False), (255, 100, True), (4096, 1024, True), (1, 1, False)]
TOLERANCE = 1e-3


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    if devices == 0:
        pytest.skip("no CUDA device")
    return cupy


@pytest.fixture(scope="module")
def kernel():
    return load_kernel_module()


@pytest.fixture(scope="module")
def built(kernel, tmp_path_factory) -> Path:
    if not shutil.which("nvcc"):
        pytest.skip("nvcc is needed to compile plugins/stft/stft.cu")
    return kernel.build(tmp_path_factory.mktemp("stft-gpu"))


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    """[2, 22849]: the recording, and the same recording reversed and quieter."""
    clip = read_wav(AUDIO)
    return np.stack([clip, 0.25 * clip[::-1]])


@pytest.fixture(scope="module")
def trt_plugin(built):
    """(tensorrt, the trtq::STFT creator): the plugin module imported over a stand-in registry."""
    pytest.importorskip("tensorrt.plugin", reason="TensorRT's Python bindings are not installed")
    import tensorrt as trt

    from trtq.trt.plugins import load_plugins

    registry = FakeRegistry()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRTQ_STFT_BUILD", str(built))
        patch.setattr(trt, "get_plugin_registry", lambda: registry)
        symbolic_tensorrt(trt, patch.setattr)
        load_plugins(trt, trt.Logger(trt.Logger.ERROR), [PLUGIN])
        yield trt, registry.get_creator("STFT", "1", "trtq")


def device_arrays(cp, signal: np.ndarray, window: np.ndarray | None, length: int, step: int):
    batch, samples = signal.shape
    frames = 1 + (samples - length) // step
    out = cp.full((batch, frames, length // 2 + 1, 2), np.nan, dtype=cp.float32)
    return cp.asarray(signal[..., None]), None if window is None else cp.asarray(window), out


@pytest.mark.parametrize(("length", "step", "windowed"), CONFIGS)
def test_c_launcher_matches_reference(cp, kernel, built, audio, length, step, windowed):
    window = hann(length) if windowed else None
    signal, d_window, out = device_arrays(cp, audio, window, length, step)
    stream = cp.cuda.Stream(non_blocking=True)
    kernel.launch(
        signal.data.ptr,
        None if d_window is None else d_window.data.ptr,
        out.data.ptr,
        audio.shape[0],
        audio.shape[1],
        length,
        step,
        stream.ptr,
        library=kernel.load_library(built / kernel.LIBRARY),
    )
    stream.synchronize()
    expected = stft_reference(audio, window, step, length)
    assert max_relative_error(cp.asnumpy(out), expected) <= TOLERANCE


def load_ptx(cp, ptx: str, name: str, folder: Path):
    """A kernel from PTX text (CuPy's RawModule reads PTX from a file)."""
    path = folder / "kernel.ptx"
    path.write_text(ptx)
    return cp.RawModule(path=str(path)).get_function(name)


def test_ptx_launched_with_the_kernel_geometry(cp, kernel, built, audio, tmp_path):
    length, step = FRAME_LENGTH, FRAME_STEP
    window = hann(length)
    signal, d_window, out = device_arrays(cp, audio, window, length, step)
    batch, samples = audio.shape
    frames = kernel.frame_count(samples, length, step)
    function = load_ptx(cp, kernel.read_ptx(built), kernel.KERNEL_NAME, tmp_path)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        function(
            (frames, batch, 1),
            (kernel.block_size(length), 1, 1),
            (signal, d_window, *np.int32([batch, samples, length, step, frames]), out),
            shared_mem=kernel.shared_bytes(length),
        )
    stream.synchronize()
    expected = stft_reference(audio, window, step, length)
    assert max_relative_error(cp.asnumpy(out), expected) <= TOLERANCE


def test_ptx_launched_as_the_aot_plugin_asks(cp, trt_plugin, audio, tmp_path):
    trt, creator = trt_plugin
    plugin, _ = create_stft(trt, creator, "STRICT_AOT")
    batch, samples = audio.shape
    aot = aot_launch(trt, plugin, {"B": batch, "L": samples})
    launch = aot["launch"]
    window = hann(FRAME_LENGTH)
    signal, d_window, out = device_arrays(cp, audio, window, FRAME_LENGTH, FRAME_STEP)
    function = load_ptx(cp, aot["ptx"], aot["kernel"], tmp_path)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        function(
            (launch["grid_x"], launch["grid_y"], launch["grid_z"]),
            (launch["block_x"], launch["block_y"], launch["block_z"]),
            (signal, d_window, *np.int32(aot["args"]), out),
            shared_mem=launch["shared_mem"],
        )
    stream.synchronize()
    expected = stft_reference(audio, window, FRAME_STEP, FRAME_LENGTH)
    assert max_relative_error(cp.asnumpy(out), expected) <= TOLERANCE


def test_jit_plugin_enqueue_runs_the_kernel(cp, trt_plugin, audio):
    trt, creator = trt_plugin
    plugin, _ = create_stft(trt, creator, "STRICT_JIT")
    window = hann(FRAME_LENGTH)
    signal, d_window, out = device_arrays(cp, audio, window, FRAME_LENGTH, FRAME_STEP)
    descs = [tensor_desc(trt, a.shape) for a in (signal, d_window, out)]
    stream = cp.cuda.Stream(non_blocking=True)
    plugin.enqueue(
        descs[:2],
        descs[2:],
        [signal.data.ptr, d_window.data.ptr],
        [out.data.ptr],
        [None, None],
        [None],
        stream.ptr,
    )
    stream.synchronize()
    expected = stft_reference(audio, window, FRAME_STEP, FRAME_LENGTH)
    assert max_relative_error(cp.asnumpy(out), expected) <= TOLERANCE


def numpy_stft(signal: np.ndarray, window: np.ndarray, step: int, length: int) -> np.ndarray:
    """The CPU baseline: numpy's FFT of windowed float32 frames, [B, frames, bins, 2]."""
    frames = np.lib.stride_tricks.sliding_window_view(signal, length, axis=-1)[:, ::step]
    spectrum = np.fft.rfft(frames * window, axis=-1)
    return np.stack([spectrum.real, spectrum.imag], axis=-1).astype(np.float32)


def test_speed_against_numpy_fft(cp, kernel, built, audio, capsys):
    """16 clips of 10 s at 16 kHz: 400-sample Hann frames every 160 samples (25 ms / 10 ms)."""
    rng = np.random.default_rng(0)
    batch, samples = 16, 10 * 16000
    clip = audio[0]
    tiled = np.resize(clip, samples)
    signal = np.stack([tiled * rng.uniform(0.2, 1.0) for _ in range(batch)])
    signal = (signal + 1e-3 * rng.standard_normal(signal.shape)).astype(np.float32)
    window = hann(FRAME_LENGTH)
    lib = kernel.load_library(built / kernel.LIBRARY)

    cpu_times = []
    for _ in range(3):
        start = time.perf_counter()
        expected = numpy_stft(signal, window, FRAME_STEP, FRAME_LENGTH)
        cpu_times.append(time.perf_counter() - start)

    stream = cp.cuda.Stream(non_blocking=True)
    d_signal, d_window, out = device_arrays(cp, signal, window, FRAME_LENGTH, FRAME_STEP)

    def run():
        kernel.launch(
            d_signal.data.ptr,
            d_window.data.ptr,
            out.data.ptr,
            batch,
            samples,
            FRAME_LENGTH,
            FRAME_STEP,
            stream.ptr,
            library=lib,
        )

    for _ in range(3):
        run()
    stream.synchronize()
    kernel_ms = []
    for _ in range(20):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        run()
        stop.record(stream)
        stop.synchronize()
        kernel_ms.append(cp.cuda.get_elapsed_time(start, stop))
    host_out = cp.cuda.alloc_pinned_memory(out.nbytes)
    result = np.frombuffer(host_out, np.float32, out.size).reshape(out.shape)
    round_trips = []
    for _ in range(5):
        start = time.perf_counter()
        d_signal.set(signal[..., None], stream=stream)
        run()
        out.get(stream=stream, out=result)
        stream.synchronize()
        round_trips.append(time.perf_counter() - start)

    assert max_relative_error(result, expected) <= TOLERANCE
    timing = {
        "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "batch": f"{batch} x {samples / 16000:.0f} s at 16 kHz, frame 400, hop 160",
        "frames": int(out.shape[1]),
        "gpu_kernel_ms": float(np.median(kernel_ms)),
        "gpu_with_copies_ms": 1e3 * float(np.median(round_trips)),
        "cpu_numpy_fft_ms": 1e3 * float(np.median(cpu_times)),
        "max_relative_error": max_relative_error(result, expected),
    }
    timing["speedup_kernel"] = timing["cpu_numpy_fft_ms"] / timing["gpu_kernel_ms"]
    with capsys.disabled():
        print(
            f"\nSTFT {timing['batch']} on {timing['device']}: GPU kernel "
            f"{timing['gpu_kernel_ms']:.3f} ms ({timing['gpu_with_copies_ms']:.2f} ms with "
            f"host<->device copies), CPU numpy FFT {timing['cpu_numpy_fft_ms']:.1f} ms "
            f"(x{timing['speedup_kernel']:.0f})"
        )
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "stft_timing.json").write_text(json.dumps(timing, indent=2))
