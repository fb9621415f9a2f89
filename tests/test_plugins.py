"""trtq::STFT: the graph pass, its numpy reference, the CUDA source and the TensorRT plugin.

The model is a real audio front end (opset-17 STFT with a Hann window -> power -> mel
filterbank -> log, as speech models compute it) fed a real 16 kHz recording
(``plugins/stft/testdata``). ONNX Runtime runs the original; ``onnx.reference`` with trtq's
numpy op runs the rewritten graph, and both must agree.

The plugin module is imported with NVIDIA's real TensorRT 10.13 and 11.4 Python bindings over
stub native libraries (``tests/test_trt_conformance.py``). Their plugin registry is None, so
``trtq build --plugins stft_plugin.py`` stops in one line; with a Python stand-in for the
registry, everything in ``tensorrt.plugin`` that is Python runs for real: registration, the
creator the ONNX parser would call (with the INT32 fields the parser makes from ONNX int
attributes), the JIT/AOT choice, output types, the autotune formats, and the JIT enqueue
path down to the C launcher. Shapes are symbolic: TensorRT's expression builder is native, so
a small Python one stands in for it (:class:`SymbolicBuilder`), and the descriptor and AOT
functions are evaluated through ``tensorrt.plugin``'s own ShapeExpr arithmetic.

Not ``from __future__ import annotations``: the probe defines a plugin whose annotations
``tensorrt.plugin`` must see as classes.
"""

import json
import operator
import re
import shutil
import sys
import types
import wave
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtq.errors import UserError
from trtq.graph.normalize import normalize
from trtq.graph.plugins import (
    PLUGIN_DOMAIN,
    STFT,
    onnxruntime_session,
    reference_evaluator,
    stft_reference,
    stft_to_plugin,
    use_plugins,
)
from trtq.sessions import open_session
from trtq.trt import plugins as trt_plugins

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = REPO / "plugins" / "stft"
PLUGIN = PLUGIN_DIR / "stft_plugin.py"
AUDIO = PLUGIN_DIR / "testdata" / "front_center_16k.wav"
TORCH_FRONTEND = PLUGIN_DIR / "testdata" / "torch_logmel.onnx"

RATE, FRAME_LENGTH, FRAME_STEP, MELS = 16000, 400, 160, 40


# --- data and model --------------------------------------------------------------------------


def read_wav(path: Path) -> np.ndarray:
    """A mono 16-bit PCM file as float32 in [-1, 1)."""
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    """[2, 22849]: the recording, and the same recording reversed and quieter."""
    clip = read_wav(AUDIO)
    return np.stack([clip, 0.25 * clip[::-1]])


def hann(length: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window's default)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)).astype(np.float32)


def mel_filterbank(bins: int, mels: int, rate: int) -> np.ndarray:
    """[bins, mels] triangular filters evenly spaced on the HTK mel scale."""
    mel = np.linspace(0, 2595 * np.log10(1 + rate / 2 / 700), mels + 2)
    edges = 700 * (10 ** (mel / 2595) - 1)
    freqs = np.linspace(0, rate / 2, bins)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - left) / (centre - left)
    falling = (right - freqs) / (right - centre)
    return np.maximum(0, np.minimum(rising, falling)).T.astype(np.float32)


def frontend_model(
    *,
    frame_step: int = FRAME_STEP,
    frame_length: int | None = FRAME_LENGTH,
    window: np.ndarray | None = None,
    step_as_input: bool = False,
    step_from_constant_node: bool = False,
    onesided: int = 1,
    signal_dtype: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """audio [B, L] -> STFT -> |X|^2 -> mel filterbank -> log: outputs logmel and spec."""
    window = hann(FRAME_LENGTH) if window is None else window
    bins = (frame_length or len(window)) // 2 + 1
    initializers = [
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        numpy_helper.from_array(window, "window"),
        numpy_helper.from_array(mel_filterbank(bins, MELS, RATE), "mel_filters"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
    ]
    inputs = [helper.make_tensor_value_info("audio", signal_dtype, ["batch", "samples"])]
    nodes = [helper.make_node("Unsqueeze", ["audio", "last_axis"], ["signal"])]
    if step_as_input:
        inputs.append(helper.make_tensor_value_info("frame_step", TensorProto.INT64, []))
    elif step_from_constant_node:
        value = numpy_helper.from_array(np.array(frame_step, np.int64))
        nodes.append(helper.make_node("Constant", [], ["frame_step"], value=value))
    else:
        initializers.append(numpy_helper.from_array(np.array(frame_step, np.int64), "frame_step"))
    stft_inputs = ["signal", "frame_step", "window"]
    if frame_length is not None:
        initializers.append(
            numpy_helper.from_array(np.array(frame_length, np.int64), "frame_length")
        )
        stft_inputs.append("frame_length")
    nodes += [
        helper.make_node("STFT", stft_inputs, ["spec"], name="stft", onesided=onesided),
        helper.make_node("ReduceSumSquare", ["spec"], ["power"], axes=[-1], keepdims=0),
        helper.make_node("MatMul", ["power", "mel_filters"], ["mel"]),
        helper.make_node("Add", ["mel", "eps"], ["mel_eps"]),
        helper.make_node("Log", ["mel_eps"], ["logmel"]),
    ]
    graph = helper.make_graph(
        nodes,
        "log_mel_frontend",
        inputs,
        [
            helper.make_tensor_value_info("logmel", TensorProto.FLOAT, ["batch", "frames", MELS]),
            helper.make_tensor_value_info("spec", TensorProto.FLOAT, ["batch", "frames", bins, 2]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def run_onnxruntime(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    outputs = open_session(model).run(None, feeds)
    return dict(zip([o.name for o in model.graph.output], outputs, strict=True))


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def rfft_stft(signal: np.ndarray, window: np.ndarray | None, step: int, length: int):
    """ONNX STFT by np.fft.rfft of windowed frames, in float64: [B, frames, bins, 2]."""
    frames = np.lib.stride_tricks.sliding_window_view(signal.astype(np.float64), length, -1)
    frames = frames[:, ::step] * (1.0 if window is None else window.astype(np.float64))
    spectrum = np.fft.rfft(frames, axis=-1)
    return np.stack([spectrum.real, spectrum.imag], axis=-1)


# --- the numpy reference ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "step", "windowed"),
    [(FRAME_LENGTH, FRAME_STEP, True), (512, 128, False), (255, 100, True), (1, 1, False)],
)
def test_reference_matches_rfft_of_windowed_frames(audio, length, step, windowed):
    window = hann(length) if windowed else None
    expected = rfft_stft(audio, window, step, length)
    actual = stft_reference(audio[..., None], window, step, length)
    assert actual.dtype == np.float32
    assert actual.shape == (2, 1 + (audio.shape[1] - length) // step, length // 2 + 1, 2)
    assert max_relative_error(actual, expected) <= 1e-6


def test_reference_refuses_complex_signals_and_short_ones():
    with pytest.raises(ValueError, match="real signal"):
        stft_reference(np.zeros((1, 800, 2), np.float32), None, 160, 400)
    with pytest.raises(ValueError, match="shorter than one frame"):
        stft_reference(np.zeros((1, 300), np.float32), None, 160, 400)


# --- the graph pass --------------------------------------------------------------------------


def test_onnxruntime_runs_the_original_front_end(audio):
    outputs = run_onnxruntime(frontend_model(), {"audio": audio})
    frames = 1 + (audio.shape[1] - FRAME_LENGTH) // FRAME_STEP
    assert outputs["spec"].shape == (2, frames, FRAME_LENGTH // 2 + 1, 2)
    assert outputs["logmel"].shape == (2, frames, MELS)
    assert np.isfinite(outputs["logmel"]).all()
    reference = stft_reference(audio, hann(FRAME_LENGTH), FRAME_STEP, FRAME_LENGTH)
    assert max_relative_error(outputs["spec"], reference) <= 1e-4


def test_rewritten_front_end_matches_onnxruntime(audio):
    original = frontend_model()
    model = use_plugins(original, ["stft"])
    onnx.checker.check_model(model, full_check=True)

    (node,) = [n for n in model.graph.node if n.domain == PLUGIN_DOMAIN]
    assert (node.op_type, node.name, list(node.input)) == ("STFT", "stft", ["signal", "window"])
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
        "frame_step": FRAME_STEP,
        "frame_length": FRAME_LENGTH,
        "onesided": 1,
        "plugin_namespace": b"trtq",
        "plugin_version": b"1",
        "aot": 1,
    }
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), ("trtq", 1)}
    assert not [n for n in model.graph.node if n.op_type == "STFT" and not n.domain]
    assert {i.name for i in model.graph.initializer} >= {"window", "mel_filters"}
    assert "frame_step" not in {i.name for i in model.graph.initializer}

    expected = run_onnxruntime(original, {"audio": audio})
    logmel, spec = reference_evaluator(model).run(None, {"audio": audio})
    assert max_relative_error(spec, expected["spec"]) <= 1e-4
    # Mel energies agree to float32 accuracy; the log magnifies ONNX Runtime's float32 FFT error
    # in near-silent bins only.
    assert max_relative_error(np.exp(logmel), np.exp(expected["logmel"])) <= 1e-4


def test_missing_window_becomes_a_rectangular_one(audio):
    graph = gs.import_onnx(frontend_model())
    stft = next(n for n in graph.nodes if n.op == "STFT")
    stft.inputs[2] = gs.Variable.empty()  # window omitted, frame_length given
    original = gs.export_onnx(graph.cleanup())
    model = use_plugins(original, ["stft"], aot=False)

    (node,) = [n for n in model.graph.node if n.domain == PLUGIN_DOMAIN]
    window = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[node.input[1]]
    np.testing.assert_array_equal(window, np.ones(FRAME_LENGTH, np.float32))
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "aot")) == 0
    expected = run_onnxruntime(original, {"audio": audio})["spec"]
    _, spec = reference_evaluator(model).run(None, {"audio": audio})
    assert max_relative_error(spec, expected) <= 1e-4


def test_frame_length_from_the_window_and_step_from_a_constant_node(audio):
    original = frontend_model(frame_length=None, step_from_constant_node=True)
    model = use_plugins(original, ["stft"])
    (node,) = [n for n in model.graph.node if n.domain == PLUGIN_DOMAIN]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["frame_step"], attrs["frame_length"]) == (FRAME_STEP, FRAME_LENGTH)
    assert not [n for n in model.graph.node if n.op_type == "Constant"]
    expected = run_onnxruntime(original, {"audio": audio})["spec"]
    _, spec = reference_evaluator(model).run(None, {"audio": audio})
    assert max_relative_error(spec, expected) <= 1e-4


@pytest.mark.parametrize("normalized", [False, True], ids=["as-exported", "normalized"])
def test_torch_exported_log_mel_front_end(audio, normalized):
    """torch.stft as torch.onnx.export writes it (testdata/export_torch_frontend.py)."""
    original = onnx.load(TORCH_FRONTEND)
    assert original.producer_name == "pytorch"
    if normalized:  # constant folding and shape inference: the signal is [batch, samples]
        original = normalize(original)
    model = use_plugins(original, ["stft"])
    (node,) = [n for n in model.graph.node if n.op_type == "STFT"]
    assert node.domain == PLUGIN_DOMAIN and len(node.input) == 2
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["frame_step"], attrs["frame_length"]) == (FRAME_STEP, FRAME_LENGTH)
    expected = run_onnxruntime(original, {"audio": audio})["logmel"]
    (logmel,) = reference_evaluator(model).run(None, {"audio": audio})
    assert logmel.shape == (2, 1 + audio.shape[1] // FRAME_STEP, MELS)
    assert max_relative_error(np.exp(logmel), np.exp(expected)) <= 1e-4
    # The rewritten graph on ONNX Runtime too: its own kernels, the plugin node in numpy.
    (on_ort,) = onnxruntime_session(model).run(None, {"audio": audio})
    assert max_relative_error(np.exp(on_ort), np.exp(expected)) <= 1e-4


def test_pass_is_a_graph_to_graph_function_that_leaves_other_graphs_alone():
    graph = gs.import_onnx(frontend_model())
    assert stft_to_plugin(graph) is graph
    ops = ["Unsqueeze", "STFT", "ReduceSumSquare", "MatMul", "Add", "Log"]
    assert [(n.op, n.domain or "") for n in graph.nodes] == [
        (op, "trtq" if op == "STFT" else "") for op in ops
    ]
    unchanged = gs.import_onnx(onnx.load(REPO / "calib_data" / "mnist_cnn.onnx"))
    ops = [n.op for n in unchanged.nodes]
    assert [n.op for n in stft_to_plugin(unchanged).nodes] == ops
    assert all(d.domain != PLUGIN_DOMAIN for d in unchanged.import_domains or [])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            lambda: frontend_model(step_as_input=True),
            r"^STFT node 'stft': frame_step \('frame_step'\) is computed at run time, but "
            r"trtq::STFT needs it as a constant\. fold constants first",
        ),
        (
            lambda: frontend_model(onesided=0),
            r"^STFT node 'stft' has onesided=0; trtq::STFT computes onesided transforms",
        ),
        (
            lambda: frontend_model(window=hann(512)),
            r"^STFT node 'stft': window length 512 differs from frame_length 400",
        ),
        (
            lambda: frontend_model(signal_dtype=TensorProto.FLOAT16, window=hann(400)),
            r"^STFT node 'stft': the signal is float16, trtq::STFT computes float32",
        ),
        (
            lambda: frontend_model(frame_step=0),
            r"^STFT node 'stft': frame_step 0, frame_length 400; trtq::STFT needs",
        ),
    ],
    ids=["runtime-step", "two-sided", "window-length", "fp16", "zero-step"],
)
def test_pass_refuses_what_the_plugin_cannot_compute(model, message):
    with pytest.raises(UserError, match=message) as info:
        use_plugins(model(), ["stft"])
    assert "\n" not in str(info.value)


def test_pass_refuses_complex_signals():
    graph = gs.import_onnx(frontend_model())
    signal = next(t for t in graph.tensors().values() if t.name == "signal")
    signal.shape = ["batch", "samples", 2]
    with pytest.raises(UserError, match="transforms a complex signal"):
        stft_to_plugin(graph)


def test_use_plugins_refuses_unknown_ops():
    with pytest.raises(UserError, match=r"no trtq plugin for dft\. choose from: stft"):
        use_plugins(frontend_model(), ["dft"])


def test_reference_op_is_an_onnx_reference_op_run():
    from onnx.reference.op_run import OpRun

    assert issubclass(STFT, OpRun)
    assert (STFT.__name__, STFT.op_domain) == ("STFT", "trtq")


# --- loading .py plugin modules (trt.plugins.load_plugins) ---------------------------------


def registry_trt(registry: object = True) -> types.SimpleNamespace:
    """The TensorRT calls load_plugins makes, recorded; ``registry=None``: the stubs' None."""
    calls: list[tuple] = []

    class Registry:
        def load_library(self, path):
            calls.append(("load_library", path))
            return object()

    return types.SimpleNamespace(
        calls=calls,
        init_libnvinfer_plugins=lambda logger, namespace: True,
        get_plugin_registry=lambda: Registry() if registry else None,
    )


def test_python_plugin_modules_are_imported_once(tmp_path):
    counter = tmp_path / "imports.txt"
    module = tmp_path / "my-plugin.py"
    module.write_text(
        f"from pathlib import Path\np = Path({str(counter)!r})\n"
        "p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
    )
    library = tmp_path / "libother.so"
    library.write_bytes(b"\x7fELF")
    trt = registry_trt()
    trt_plugins.load_plugins(trt, None, [module, library])
    trt_plugins.load_plugins(trt, None, [str(module)])
    assert counter.read_text() == "x"
    assert trt.calls == [("load_library", str(library))]
    loaded = trt_plugins.import_plugin_module(module)
    assert loaded.__name__.startswith("trtq_plugin_my_plugin_") and loaded.p == counter


def test_python_plugin_failures_are_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import tensorrt_that_is_not_here\n")
    with pytest.raises(UserError, match=r"^cannot import plugin module .*broken\.py: ") as info:
        trt_plugins.load_plugins(registry_trt(), None, [broken])
    assert "ModuleNotFoundError" in str(info.value) and "\n" not in str(info.value)
    assert not [m for m in sys.modules if m.startswith("trtq_plugin_broken_")]
    with pytest.raises(UserError, match=r"stft_plugin\.py: TensorRT has no plugin registry"):
        trt_plugins.load_plugins(registry_trt(registry=None), None, [PLUGIN])


# --- the CUDA source --------------------------------------------------------------------------


def load_kernel_module() -> types.ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_stft_kernel", PLUGIN_DIR / "stft_kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ptx_parameters(ptx: str, kernel: str) -> list[str]:
    """The .param types of ``kernel``'s entry, in order."""
    match = re.search(rf"\.entry\s+{kernel}\s*\((.*?)\)", ptx, re.S)
    assert match, f"no .entry {kernel} in the PTX"
    return re.findall(r"\.param\s+\.(\w+)", match.group(1))


#: signal, window, batch, signal_length, frame_length, frame_step, n_frames, out
KERNEL_PARAMETERS = ["u64", "u64", "u32", "u32", "u32", "u32", "u32", "u64"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """``make -C plugins/stft`` into a temporary folder (nvcc compiles without a GPU)."""
    if not shutil.which("nvcc"):
        pytest.skip("nvcc is needed to compile plugins/stft/stft.cu")
    return load_kernel_module().build(tmp_path_factory.mktemp("stft-build"))


def test_cuda_source_compiles_to_a_library_and_ptx(built):
    kernel = load_kernel_module()
    ptx = kernel.read_ptx(built)
    assert ptx_parameters(ptx, kernel.KERNEL_NAME) == KERNEL_PARAMETERS
    assert ".target sm_75" in ptx

    lib = kernel.load_library(built / "libtrtq_stft.so")  # CUDA runtime linked statically
    assert lib.trtq_stft_max_frame_length() == kernel.MAX_FRAME_LENGTH
    for length in (1, 64, 255, 400, 512, 1024, 4096):
        assert lib.trtq_stft_block_size(length) == kernel.block_size(length)
        assert lib.trtq_stft_shared_bytes(length) == kernel.shared_bytes(length)
        for total, step in ((length, 1), (22849, 160), (length + 7, 3)):
            assert lib.trtq_stft_frames(total, length, step) == kernel.frame_count(
                total, length, step
            )
    assert kernel.shared_bytes(kernel.MAX_FRAME_LENGTH) == 48 * 1024
    # Arguments are checked before anything touches the GPU: a null signal never launches.
    with pytest.raises(RuntimeError, match=r"^trtq_stft\(batch=1, .*\) failed: .*cudaError 1\)"):
        kernel.launch(0, None, 0x1000, 1, 800, 400, 160, library=lib)


# --- the plugin on NVIDIA's real tensorrt.plugin ----------------------------------------------


class FakeRegistry:
    """Stands in for TensorRT's plugin registry, which the stub libraries do not provide."""

    def __init__(self):
        self.creators = {}

    def register_creator(self, creator, namespace=""):
        key = (creator.name, creator.plugin_version, namespace)
        if key in self.creators:
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, name, version, namespace=""):
        return self.creators.get((name, version, namespace))


#: trt.DimensionOperation names -> what they compute.
DIMENSION_OPERATIONS = {
    "SUM": operator.add,
    "SUB": operator.sub,
    "PROD": operator.mul,
    "FLOOR_DIV": operator.floordiv,
    "CEIL_DIV": lambda a, b: -(-a // b),
    "MAX": max,
    "MIN": min,
}


class SymbolicDim:
    """A dimension expression: a named input dimension, a constant, or an operation."""

    def __init__(self, name=None, value=None, op=None, operands=()):
        self.name, self.value, self.op, self.operands = name, value, op, operands

    def is_constant(self):
        return self.value is not None

    def get_constant_value(self):
        return self.value

    def is_size_tensor(self):
        return False

    def evaluate(self, dims: dict[str, int]) -> int:
        if self.value is not None:
            return self.value
        if self.name is not None:
            return dims[self.name]
        return DIMENSION_OPERATIONS[self.op](*(o.evaluate(dims) for o in self.operands))


class SymbolicBuilder:
    """Stands in for TensorRT's IExprBuilder (native, so not constructible over the stubs)."""

    def constant(self, value):
        return SymbolicDim(value=int(value))

    def operation(self, op, first, second):
        return SymbolicDim(op=op.name, operands=(first, second))


def symbolic_tensorrt(trt, setattr_=setattr) -> None:
    """Let tensorrt.plugin's ShapeExpr wrap SymbolicDims (it checks isinstance IDimensionExpr)."""
    setattr_(trt, "IDimensionExpr", SymbolicDim)
    setattr_(trt, "DimsExprs", lambda rank: [None] * rank)


#: A PluginField points at its numpy array without owning it: keep the arrays alive.
_FIELD_DATA: list[np.ndarray] = []


def parser_fields(trt, **attributes):
    """The plugin fields TensorRT's ONNX parser makes from ONNX int attributes: INT32 x 1."""
    fields = []
    for name, value in attributes.items():
        _FIELD_DATA.append(np.array([value], np.int32))
        fields.append(trt.PluginField(name, _FIELD_DATA[-1], trt.PluginFieldType.INT32))
    return trt.PluginFieldCollection(fields)


SIGNAL_DIMS = (SymbolicDim(name="B"), SymbolicDim(name="L"), SymbolicDim(value=1))


def create_stft(trt, creator, request: str, signal_dims=SIGNAL_DIMS):
    """A plugin as the ONNX parser creates it, with types and symbolic shapes resolved."""
    fields = parser_fields(trt, frame_step=FRAME_STEP, frame_length=FRAME_LENGTH, onesided=1)
    request = getattr(trt.QuickPluginCreationRequest, request)
    plugin = creator.create_plugin("STFT", "trtq", fields, trt.TensorRTPhase.BUILD, request)
    plugin.get_output_data_types([trt.DataType.FLOAT] * 2, [len(signal_dims), 1])
    window = [SymbolicDim(value=FRAME_LENGTH)]
    shapes = plugin.get_output_shapes([list(signal_dims), window], [], SymbolicBuilder())
    return plugin, shapes


def tensor_desc(trt, dims, dynamic=False):
    desc = trt.DynamicPluginTensorDesc() if dynamic else trt.PluginTensorDesc()
    inner = desc.desc if dynamic else desc
    inner.dims = trt.Dims(dims)
    inner.type = trt.DataType.FLOAT
    inner.format = trt.TensorFormat.LINEAR
    if dynamic:
        desc.min = desc.opt = desc.max = trt.Dims(dims)
    return desc


def aot_launch(trt, plugin, dims: dict[str, int]) -> dict:
    """What the AOT implementation tells TensorRT for these input dims, evaluated."""
    from tensorrt.plugin._tensor import SymIntExpr

    # TensorRT calls it from get_launch_params, with a fresh expression builder.
    SymIntExpr._exprBuilder = SymbolicBuilder()
    try:
        name, ptx, launch, args = plugin.aot_impl_function(
            *plugin.input_descs, *plugin.attrs.values(), plugin.output_descs, 0
        )
    finally:
        SymIntExpr._exprBuilder = None
    geometry = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")
    return {
        "kernel": name,
        "ptx": ptx,
        "launch": {k: getattr(launch, k)._expr.evaluate(dims) for k in geometry},
        "args": [a._expr.evaluate(dims) for a in args],
        "arg_types": [type(a).__name__ for a in args],
    }


def probe_plugin(plugin: str) -> dict:
    """Everything tensorrt.plugin lets us check without native TensorRT (run in a subprocess)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from trtq.trt.plugins import load_plugins

    result: dict = {"version": trt.__version__}
    logger = trt.Logger(trt.Logger.ERROR)
    result["registry"] = repr(trt.get_plugin_registry())
    try:
        load_plugins(trt, logger, [plugin])
        result["without_registry"] = None
    except UserError as exc:
        result["without_registry"] = str(exc)

    registry = FakeRegistry()
    trt.get_plugin_registry = lambda: registry
    load_plugins(trt, logger, [plugin])
    load_plugins(trt, logger, [plugin])  # imported once: registering twice would fail
    result["registered"] = [list(key) for key in registry.creators]
    creator = registry.get_creator("STFT", "1", "trtq")
    result["creator_is_v3_quick"] = isinstance(creator, trt.IPluginCreatorV3Quick)
    result["fields"] = {f.name: f.type.name for f in creator.field_names}

    fields = parser_fields(trt, frame_step=FRAME_STEP, frame_length=FRAME_LENGTH, onesided=1)
    result["created"] = {}
    for request in ("STRICT_AOT", "STRICT_JIT", "UNKNOWN"):
        try:
            created = creator.create_plugin(
                "STFT",
                "trtq",
                fields,
                trt.TensorRTPhase.BUILD,
                getattr(trt.QuickPluginCreationRequest, request),
            )
            result["created"][request] = type(created).__name__
        except Exception as exc:
            result["created"][request] = f"{type(exc).__name__}: {exc}"

    symbolic_tensorrt(trt)
    aot, shapes = create_stft(trt, creator, "STRICT_AOT")
    result["attributes"] = {k: np.asarray(v).tolist() for k, v in aot.attrs.items()}
    result["output_types"] = [t.name for t in aot.get_output_data_types([trt.float32] * 2, [3, 1])]
    result["output_shapes"] = {
        f"{b}x{n}": [d.evaluate({"B": b, "L": n}) for d in shapes[0]]
        for b, n in ((1, 400), (2, 22849), (16, 160000))
    }
    _, shapes = create_stft(trt, creator, "STRICT_AOT", SIGNAL_DIMS[:2])  # torch's [B, L]
    result["output_shape_rank_2"] = [d.evaluate({"B": 2, "L": 22849}) for d in shapes[0]]
    try:
        complex_signal = (*SIGNAL_DIMS[:2], SymbolicDim(value=2))
        create_stft(trt, creator, "STRICT_AOT", complex_signal)
        result["complex_signal"] = None
    except ValueError as exc:
        result["complex_signal"] = str(exc)
    try:
        launch = aot_launch(trt, aot, {"B": 2, "L": 22849})
        ptx = launch.pop("ptx")
        launch["ptx_parameters"] = ptx_parameters(ptx, launch["kernel"])
        result["aot"] = launch
    except FileNotFoundError as exc:
        result["aot"] = {"error": str(exc)}
    descs = [tensor_desc(trt, d, True) for d in ((2, 22849, 1), (400,), (2, 141, 201, 2))]
    result["formats"] = [
        [c.type.name, c.format.name] for c in aot.get_supported_format_combinations(descs, 2)
    ]
    jit, _ = create_stft(trt, creator, "STRICT_JIT")
    descs = [tensor_desc(trt, d) for d in ((2, 22849, 1), (400,), (2, 141, 201, 2))]
    try:  # a null signal: the C launcher refuses it before any GPU work, on any machine
        jit.enqueue(descs[:2], descs[2:], [0, 0x2000], [0x3000], [None] * 2, [None], 0)
        result["jit_enqueue"] = "launched"
    except Exception as exc:
        result["jit_enqueue"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"

    # A second copy of the module registers the same plugin again: refused in one line.
    copy = Path(plugin).parent.parent / "stft-copy"
    shutil.copytree(Path(plugin).parent, copy, dirs_exist_ok=True)
    try:
        load_plugins(trt, logger, [copy / "stft_plugin.py"])
        result["second_copy"] = None
    except UserError as exc:
        result["second_copy"] = str(exc)
    finally:
        shutil.rmtree(copy)

    # Why the attributes are NDArray[int32]: an `int` attribute, fed the parser's INT32 field.
    @trtp.register("trtq_probe::IntAttribute")
    def _desc(x: trtp.TensorDesc, k: int) -> trtp.TensorDesc:
        return x.like()

    @trtp.impl("trtq_probe::IntAttribute")
    def _impl(x: trtp.Tensor, k: int, outputs: tuple[trtp.Tensor], stream: int) -> None:
        pass

    probe = registry.get_creator("IntAttribute", "1", "trtq_probe")
    try:
        created = probe.create_plugin(
            "IntAttribute",
            "trtq_probe",
            parser_fields(trt, k=3),
            trt.TensorRTPhase.BUILD,
            trt.QuickPluginCreationRequest.STRICT_JIT,
        )
        result["int_attribute"] = {"k": created.attrs["k"]}
    except Exception as exc:
        result["int_attribute"] = f"{type(exc).__name__}: {exc}"
    result["numpy"] = np.__version__
    return result


PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import test_plugins
print("PROBE-RESULT " + json.dumps(test_plugins.probe_plugin(sys.argv[2])))
"""


@pytest.fixture(scope="module", params=["10", "11"], ids=["trt10", "trt11"])
def probe(request, built, tmp_path_factory) -> dict:
    from test_trt_conformance import bindings_env, run_python

    env = bindings_env(request.param)
    env["TRTQ_STFT_BUILD"] = str(built)
    # The probe copies the plugin folder beside the one it imports: work on a copy.
    plugin_dir = tmp_path_factory.mktemp(f"plugin-trt{request.param}") / "stft"
    shutil.copytree(PLUGIN_DIR, plugin_dir)
    proc = run_python(PROBE, env, str(Path(__file__).parent), str(plugin_dir / "stft_plugin.py"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE-RESULT ")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("PROBE-RESULT "))
    result["major"] = request.param
    return result


def test_plugin_needs_a_plugin_registry(probe):
    assert probe["registry"] == "None"  # the stubs: no GPU, no TensorRT
    assert probe["without_registry"].startswith("cannot load plugin library ")
    assert "stft_plugin.py: TensorRT has no plugin registry" in probe["without_registry"]


def test_plugin_registers_one_v3_quick_creator(probe):
    assert probe["registered"] == [["STFT", "1", "trtq"]]
    assert probe["creator_is_v3_quick"]
    assert probe["fields"] == {"frame_step": "INT32", "frame_length": "INT32", "onesided": "INT32"}
    assert probe["second_copy"].startswith("cannot import plugin module ")
    assert "already has a defintion for 'STFT'" in probe["second_copy"]  # (sic)


def test_plugin_is_created_as_the_onnx_parser_asks(probe):
    assert probe["created"]["STRICT_AOT"] == "_TemplateAOTPlugin"
    assert probe["created"]["STRICT_JIT"] == "_TemplateJITPlugin"
    # Without the node's `aot` attribute (or a network flag) TensorRT cannot choose.
    assert "has both AOT and JIT implementations" in probe["created"]["UNKNOWN"]
    assert probe["attributes"] == {"frame_step": [160], "frame_length": [400], "onesided": [1]}


def test_plugin_output_types_shapes_and_formats(probe):
    assert probe["output_types"] == ["FLOAT"]
    assert probe["output_shapes"] == {
        "1x400": [1, 1, 201, 2],
        "2x22849": [2, 141, 201, 2],
        "16x160000": [16, 998, 201, 2],
    }
    assert probe["output_shape_rank_2"] == [2, 141, 201, 2]
    assert probe["complex_signal"] == "trtq::STFT transforms real signals: [batch, length, 1]"
    assert probe["formats"] == [["FLOAT", "LINEAR"]] * 3


def test_plugin_aot_launch_matches_the_kernel(probe):
    aot = probe["aot"]
    assert aot["kernel"] == "trtq_stft_kernel"
    assert aot["ptx_parameters"] == KERNEL_PARAMETERS
    assert aot["launch"] == {
        "grid_x": 141,
        "grid_y": 2,
        "grid_z": 1,
        "block_x": 224,
        "block_y": 1,
        "block_z": 1,
        "shared_mem": 12 * 400,
    }
    # After the two input pointers: batch, signal_length, frame_length, frame_step, n_frames.
    assert aot["args"] == [2, 22849, 400, 160, 141]
    assert aot["arg_types"] == ["SymInt32"] * 5


def test_plugin_jit_enqueue_reaches_the_c_launcher(probe):
    assert probe["jit_enqueue"].startswith(
        "RuntimeError: trtq_stft(batch=2, signal_length=22849, frame_length=400, frame_step=160)"
        " failed: invalid argument"
    )


def test_int_attributes_would_break_on_tensorrt_10_with_numpy_2(probe):
    numpy_major_minor = tuple(int(p) for p in probe["numpy"].split(".")[:2])
    if probe["major"] == "10" and numpy_major_minor >= (2, 3):
        assert probe["int_attribute"] == (
            "TypeError: only 0-dimensional arrays can be converted to Python scalars"
        )
    else:
        assert probe["int_attribute"] == {"k": 3}
