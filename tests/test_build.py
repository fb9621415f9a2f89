"""`trtq build` and its layer, in three parts that all run on a CPU:

a. pure helpers: shape flags, optimization-profile coverage, the sidecar and its atomic writes;
b. recorded calls: a fake ``tensorrt`` module (TensorRT 10-like and 11-like) records every call
   :func:`trtq.trt.builder.build_serialized` and the CLI make, and the tests assert the sequence;
c. NVIDIA's real bindings on stub libraries (``.trt/10``, ``.trt/11`` from
   ``scripts/trt_bindings.sh``): every TensorRT name the builder uses exists in the version it
   targets, and ``trtq build`` reports "no usable TensorRT/GPU" in one line and writes nothing.
"""

from __future__ import annotations

import enum
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import onnx
import pytest
from conftest import CALIB_DATA, REPO

import trtq
from trtq.calib.cache import TrtCache
from trtq.calib.scope import trt_tensors
from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR, ModelError, UserError
from trtq.graph.load import model_inputs, model_outputs
from trtq.trt import builder as trt_builder
from trtq.trt import sidecar
from trtq.trt.builder import BuildOptions, build_serialized
from trtq.trt.calibrator import cache_calibrator
from trtq.trt.shapes import ShapeRange, TensorInfo, check_profile, parse_shapes

MODEL = CALIB_DATA / "mnist_cnn.onnx"
CALIB = CALIB_DATA / "mnist_calib.npz"
PLAN = b"\x00fake-serialized-engine\xff" * 8
TRT_DIR = Path(os.environ.get("TRTQ_TRT_DIR", REPO / ".trt"))


# --- a. pure helpers -----------------------------------------------------------------------


def test_parse_shapes_trtexec_syntax():
    assert parse_shapes("input:1x3x224x224,mask:1x128") == {
        "input": (1, 3, 224, 224),
        "mask": (1, 128),
    }
    # A repeated flag, spaces, an upper-case X, and TensorFlow-style names with a colon.
    assert parse_shapes(["a:2X3", " 'input:0':1x4 ", "x:0:5"]) == {
        "a": (2, 3),
        "input:0": (1, 4),
        "x:0": (5,),
    }
    assert parse_shapes(None) == {} == parse_shapes([])


@pytest.mark.parametrize(
    "text",
    ["input", "input:", ":1x3", "input:1x-1", "input:1xx3", "input:1x3x", "input:ax3", "x:1x0"],
)
def test_parse_shapes_rejects_bad_syntax_in_one_line(text):
    with pytest.raises(UserError) as error:
        parse_shapes(text)
    assert "\n" not in error.value.message
    assert "1x3x224x224" in error.value.message or "positive" in error.value.message


def test_parse_shapes_rejects_duplicates():
    with pytest.raises(UserError, match="given twice"):
        parse_shapes(["x:1x2", "x:1x3"])


def test_profile_from_shapes_or_ranges():
    assert BuildOptions(shapes={"x": (1, 3)}).profile() == {"x": ShapeRange((1, 3), (1, 3), (1, 3))}
    ranged = BuildOptions(
        min_shapes={"x": (1, 3)}, opt_shapes={"x": (4, 3)}, max_shapes={"x": (8, 3)}
    )
    assert ranged.profile() == {"x": ShapeRange((1, 3), (4, 3), (8, 3))}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (BuildOptions(shapes={"x": (1,)}, min_shapes={"x": (1,)}), "both --shapes and"),
        (BuildOptions(min_shapes={"x": (1,)}, max_shapes={"x": (2,)}), "no shape in --opt-shapes"),
        (
            BuildOptions(min_shapes={"x": (4,)}, opt_shapes={"x": (2,)}, max_shapes={"x": (8,)}),
            "min <= opt <= max",
        ),
        (
            BuildOptions(min_shapes={"x": (1,)}, opt_shapes={"x": (1, 2)}, max_shapes={"x": (1,)}),
            "differ in rank",
        ),
    ],
)
def test_profile_flag_errors(options, message):
    with pytest.raises(UserError, match=message):
        options.profile()


INPUTS = [
    TensorInfo("images", (-1, 3, 224, 224), "float32"),
    TensorInfo("mask", (-1, -1), "int64"),
    TensorInfo("scale", (1,), "float32"),
]


def test_profile_must_cover_every_dynamic_input():
    with pytest.raises(UserError) as error:
        check_profile(INPUTS, BuildOptions(shapes={"images": (2, 3, 224, 224)}).profile())
    message = error.value.message
    assert "mask (-1x-1)" in message and "images" not in message.split("need shapes:")[1][:10]
    assert "--shapes mask:1x1" in message
    with pytest.raises(UserError) as error:
        check_profile(INPUTS, {})
    assert "--shapes images:1x3x224x224,mask:1x1" in error.value.message
    check_profile(
        INPUTS, BuildOptions(shapes={"images": (2, 3, 224, 224), "mask": (2, 7)}).profile()
    )


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (
            {"image": (1, 3, 224, 224)},
            r"'image', which the model has no input.*images, mask, scale",
        ),
        ({"images": (1, 224, 224)}, "has 3 dimension.*the input has 4"),
        ({"images": (1, 1, 224, 224)}, "dimension 1 is fixed to 3"),
        ({"scale": (2,)}, "dimension 0 is fixed to 1"),
    ],
)
def test_profile_shape_errors(shapes, message):
    with pytest.raises(UserError, match=message):
        check_profile(INPUTS, BuildOptions(shapes={"mask": (1, 1), **shapes}).profile())


def _result(plan: bytes = PLAN) -> trt_builder.BuildResult:
    features = types.SimpleNamespace(version="11.4.0.106")
    io = [
        {
            "name": "input",
            "mode": "input",
            "dtype": "float32",
            "shape": [-1, 1, 28, 28],
            "profile": {"min": [1, 1, 28, 28], "opt": [8, 1, 28, 28], "max": [32, 1, 28, 28]},
        },
        {"name": "logits", "mode": "output", "dtype": "float32", "shape": [-1, 10]},
    ]
    return trt_builder.BuildResult(plan, io, features, 1.23456)  # type: ignore[arg-type]


def test_sidecar_content(tmp_path):
    cache = tmp_path / "m.cache"
    cache.write_text("TRT-101303-EntropyCalibration2\nx: 3c010a14\n")
    options = BuildOptions(shapes={"input": (8, 1, 28, 28)}, workspace=1 << 30)
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    data = sidecar.make_sidecar(
        _result(), options, source_model=MODEL, calibration_cache=cache, gpu=gpu
    )
    assert data["format"] == "trtq-engine" and data["tensorrt_version"] == "11.4.0.106"
    assert data["gpu"] == gpu and data["precision"] == "graph"
    assert data["source_model_sha256"] == sidecar.sha256_of(MODEL.read_bytes())
    assert data["calibration_cache_sha256"] == sidecar.sha256_of(cache.read_bytes())
    assert data["engine_sha256"] == sidecar.sha256_of(PLAN) and data["engine_bytes"] == len(PLAN)
    assert data["build_seconds"] == 1.235
    assert data["io"][0]["profile"]["opt"] == [8, 1, 28, 28]
    assert data["build_options"]["profile"]["input"]["max"] == [8, 1, 28, 28]
    assert data["build_options"]["workspace"] == 1 << 30
    json.dumps(data)  # plain JSON all the way down
    without = sidecar.make_sidecar(_result(), options, source_model=b"onnx", gpu=gpu)
    assert without["calibration_cache"] is None and without["calibration_cache_sha256"] is None
    with pytest.raises(ValueError):
        sidecar.make_sidecar(_result(), options, source_model=MODEL, precision="int8", gpu=gpu)


def test_write_engine_raw_plan_and_sidecar(tmp_path):
    engine = tmp_path / "m.engine"
    written = sidecar.write_engine(engine, PLAN, {"precision": "graph"})
    assert written == tmp_path / "m.engine.json"
    assert engine.read_bytes() == PLAN  # nothing prepended: trtexec and polygraphy load it
    assert json.loads(written.read_text()) == {"precision": "graph"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json"]


def test_write_engine_is_atomic(tmp_path, monkeypatch):
    engine = tmp_path / "m.engine"
    sidecar.write_engine(engine, b"old plan", {"old": True})

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(UserError, match="No space left on device"):  # one line, exit 2
        sidecar.write_engine(engine, PLAN, {"new": True})
    monkeypatch.undo()
    # The previous pair is intact and no temporary file is left behind.
    assert engine.read_bytes() == b"old plan"
    assert json.loads(sidecar.sidecar_path(engine).read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json"]
    with pytest.raises(UserError, match=r"folder .*missing does not exist"):
        sidecar.write_engine(tmp_path / "missing" / "m.engine", PLAN, {})


def test_gpu_info_never_fails(tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    assert sidecar.gpu_info([broken, lambda: None]) == {"name": None, "compute_capability": None}
    # nvidia-smi as the last resort: a fake one on PATH.
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 9.0'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert sidecar.gpu_info([broken, sidecar._nvidia_smi]) == {
        "name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
    }
    smi.write_text("#!/bin/sh\nexit 9\n")
    assert sidecar.gpu_info([sidecar._nvidia_smi])["name"] is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert sidecar.gpu_info() == {"name": None, "compute_capability": None}


# --- b. recorded calls on a fake tensorrt module --------------------------------------------


class Recorder(list):
    """Every call the fake module sees, as ``(name, *args)`` tuples, in order."""

    def names(self) -> list[str]:
        return [call[0] for call in self]

    def find(self, name: str) -> list[tuple]:
        return [call for call in self if call[0] == name]

    def index_of(self, name: str) -> int:
        return self.names().index(name)


_NP_TO_TRT = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32"}


def fake_trt(
    major: int = 11,
    *,
    parse_errors: list[dict] | None = None,
    plan: bytes | None = PLAN,
    registry: bool = True,
    plugin_loads: bool = True,
) -> types.ModuleType:
    """A ``tensorrt`` look-alike with 10.13's or 11.4's names; ``trt.calls`` records the calls.

    The parser reads the real ONNX model, so the network's inputs and outputs (and
    their dynamic dimensions) are the model's.
    """
    calls = Recorder()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.3.9" if major == 10 else "11.4.0.106"
    trt.calls = calls
    weak = major == 10
    flags = ["DEBUG", "REFIT", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    trt.BuilderFlag = enum.Enum("BuilderFlag", flags + (["FP16", "INT8", "BF16"] if weak else []))
    creation = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if weak else {"STRONGLY_TYPED": 0}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE", "TACTIC_SHARED_MEMORY"])
    trt.HardwareCompatibilityLevel = enum.Enum(
        "HardwareCompatibilityLevel", ["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"]
    )
    trt.DataType = enum.Enum("DataType", ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64"])

    class Logger:
        ERROR, WARNING, INFO, VERBOSE = 1, 2, 3, 4

        def __init__(self, severity):
            calls.append(("Logger", severity))

    class ITensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, shape, dtype

    class INetworkDefinition:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs = flags, [], []

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class ParserError:
        def __init__(self, **fields):
            self.fields = fields

        def desc(self):
            return self.fields["desc"]

        def node_name(self):
            return self.fields.get("node_name", "")

        def node_operator(self):
            return self.fields.get("node_operator", "")

        def node(self):
            return self.fields.get("node", -1)

    class OnnxParser:
        def __init__(self, network, logger):
            calls.append(("OnnxParser",))
            self.network, self.errors = network, []

        def parse(self, data, path=None):
            calls.append(("parse", len(data)))
            return self._read(onnx.load_from_string(bytes(data)))

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return self._read(onnx.load(path))

        def _read(self, model):
            trt.parsed_model = model
            for specs, target in ((model_inputs(model), self.network.inputs),
                                  (model_outputs(model), self.network.outputs)):  # fmt: skip
                for spec in specs:
                    shape = tuple(d if isinstance(d, int) else -1 for d in spec.shape)
                    dtype = trt.DataType[_NP_TO_TRT[str(spec.dtype)]]
                    target.append(ITensor(spec.name, shape, dtype))
            self.errors = [ParserError(**e) for e in parse_errors or []]
            return not self.errors

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

    class IOptimizationProfile:
        def set_shape(self, name, min, opt, max):
            calls.append(("set_shape", name, tuple(min), tuple(opt), tuple(max)))

    class ITimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return memoryview(self.data + b"+new timings")

    class IBuilderConfig:
        builder_optimization_level = 3
        hardware_compatibility_level = None

        def __setattr__(self, name, value):
            calls.append(("config." + name, value))
            object.__setattr__(self, name, value)

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))
            return 0

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return ITimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            object.__setattr__(self, "_cache", cache)
            return True

        def get_timing_cache(self):
            return self._cache

    if weak:
        IBuilderConfig.int8_calibrator = None

        def set_calibration_profile(self, profile):
            calls.append(("set_calibration_profile",))

        IBuilderConfig.set_calibration_profile = set_calibration_profile

        class IInt8Calibrator:
            def __init__(self):
                calls.append(("calibrator.__init__", type(self).__name__))

        class IInt8EntropyCalibrator2(IInt8Calibrator):
            pass

        class IInt8MinMaxCalibrator(IInt8Calibrator):
            pass

        trt.IInt8Calibrator = IInt8Calibrator
        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
        trt.IInt8MinMaxCalibrator = IInt8MinMaxCalibrator

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return INetworkDefinition(flags)

        def create_builder_config(self):
            calls.append(("create_builder_config",))
            return IBuilderConfig()

        def create_optimization_profile(self):
            calls.append(("create_optimization_profile",))
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return None if plan is None else memoryview(plan)

    class IPluginRegistry:
        def load_library(self, path):
            calls.append(("load_library", path))
            return object() if plugin_loads else None

    def get_plugin_registry():
        calls.append(("get_plugin_registry",))
        return IPluginRegistry() if registry else None

    def init_libnvinfer_plugins(logger, namespace):
        calls.append(("init_libnvinfer_plugins", namespace))
        return True

    for obj in (Logger, ITensor, INetworkDefinition, ParserError, OnnxParser, IOptimizationProfile,
                ITimingCache, IBuilderConfig, Builder, IPluginRegistry, get_plugin_registry,
                init_libnvinfer_plugins):  # fmt: skip
        setattr(trt, obj.__name__, obj)
    return trt


def _flag(trt, name: str):
    return trt.BuilderFlag[name]


def test_strongly_typed_build_on_trt11_like(tmp_path):
    trt = fake_trt(11)
    options = BuildOptions(
        min_shapes={"input": (1, 1, 28, 28)},
        opt_shapes={"input": (8, 1, 28, 28)},
        max_shapes={"input": (32, 1, 28, 28)},
        workspace=1 << 30,
        builder_optimization_level=5,
        version_compatible=True,
        hardware_compatibility=True,
    )
    result = build_serialized(MODEL, options, trt=trt)
    assert result.plan == PLAN and result.features.major == 11
    calls = trt.calls
    # 11.x: every network is strongly typed, the deprecated flag is not even set.
    assert calls.find("create_network") == [("create_network", 0)]
    assert calls.find("parse_from_file") == [("parse_from_file", str(MODEL))]
    assert calls.find("set_shape") == [
        ("set_shape", "input", (1, 1, 28, 28), (8, 1, 28, 28), (32, 1, 28, 28))
    ]
    assert ("set_memory_pool_limit", trt.MemoryPoolType.WORKSPACE, 1 << 30) in calls
    assert ("config.builder_optimization_level", 5) in calls
    assert calls.find("set_flag") == [("set_flag", _flag(trt, "VERSION_COMPATIBLE"))]
    level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    assert ("config.hardware_compatibility_level", level) in calls
    assert "config.int8_calibrator" not in calls.names()
    assert "set_calibration_profile" not in calls.names()
    order = [
        "init_libnvinfer_plugins",
        "Builder",
        "create_network",
        "OnnxParser",
        "parse_from_file",
        "create_builder_config",
        "add_optimization_profile",
        "build_serialized_network",
    ]
    assert [n for n in calls.names() if n in order] == order
    assert result.io == [
        {
            "name": "input",
            "mode": "input",
            "dtype": "float32",
            "shape": [-1, 1, 28, 28],
            "profile": {"min": [1, 1, 28, 28], "opt": [8, 1, 28, 28], "max": [32, 1, 28, 28]},
        },
        {"name": "logits", "mode": "output", "dtype": "float32", "shape": [-1, 10]},
    ]


def test_trt11_like_refuses_weak_precision():
    trt = fake_trt(11)
    options = BuildOptions(shapes={"input": (1, 1, 28, 28)}, strongly_typed=False)
    for precision in ("fp16", "int8"):
        options.weak_precision = precision
        with pytest.raises(UserError) as error:
            build_serialized(MODEL, options, trt=trt)
        assert error.value.message == (
            "TensorRT 11 has no FP16/INT8 builder flags; trtq puts precision in the graph "
            "instead. run without --calib-mode trt."
        )
    assert "Builder" not in trt.calls.names()  # refused before any TensorRT work


def test_qdq_model_on_trt10_like_sets_strongly_typed(tmp_path):
    trt = fake_trt(10)
    build_serialized(MODEL.read_bytes(), BuildOptions(shapes={"input": (4, 1, 28, 28)}), trt=trt)
    strongly_typed = int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert trt.calls.find("create_network") == [("create_network", 1 << strongly_typed)]
    assert trt.calls.find("parse") == [("parse", MODEL.stat().st_size)]
    assert trt.calls.find("set_flag") == []  # no FP16/INT8: precision is the graph's


def test_weak_int8_with_calibrator_on_trt10_like(tmp_path):
    trt = fake_trt(10)
    cache = tmp_path / "m.cache"
    TrtCache.from_amax({"input": 1.0}).write(cache)
    calibrator = cache_calibrator(trt, cache)
    assert isinstance(calibrator, trt.IInt8EntropyCalibrator2)
    assert calibrator.read_calibration_cache() == cache.read_bytes()
    assert calibrator.get_batch(["input"]) is None  # serves the cache, never data
    options = BuildOptions(
        shapes={"input": (8, 1, 28, 28)},
        strongly_typed=False,
        weak_precision="int8",
        calibrator=calibrator,
    )
    build_serialized(MODEL, options, trt=trt)
    calls = trt.calls
    assert calls.find("create_network") == [("create_network", 0)]
    assert calls.find("set_flag") == [("set_flag", _flag(trt, "INT8"))]
    assert calls.find("config.int8_calibrator") == [("config.int8_calibrator", calibrator)]
    # Dynamic batch: TensorRT 10 calibrates at the shapes of the profile.
    assert calls.index_of("add_optimization_profile") < calls.index_of("set_calibration_profile")
    fp16 = BuildOptions(
        shapes={"input": (8, 1, 28, 28)}, strongly_typed=False, weak_precision="fp16"
    )
    trt = fake_trt(10)
    build_serialized(MODEL, fp16, trt=trt)
    assert trt.calls.find("set_flag") == [("set_flag", _flag(trt, "FP16"))]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (BuildOptions(weak_precision="int8"), "need a weakly typed network"),
        (BuildOptions(weak_precision="int4", strongly_typed=False), "unknown weak precision"),
        (BuildOptions(calibrator=object()), "calibrator needs weak_precision='int8'"),
        (BuildOptions(builder_optimization_level=7), "out of range"),
    ],
)
def test_option_errors_before_any_tensorrt_work(options, message):
    trt = fake_trt(10)
    with pytest.raises(UserError, match=message):
        build_serialized(MODEL, options, trt=trt)
    assert "Builder" not in trt.calls.names()


def test_parser_errors_all_reported_with_node_names():
    trt = fake_trt(
        11,
        parse_errors=[
            {"desc": "Unsupported operator NonMaxSuppressionX", "node_name": "nms_0",
             "node_operator": "NonMaxSuppressionX", "node": 12},
            {"desc": "Attribute mode 'cubic'\nnot supported", "node_name": "resize_3",
             "node_operator": "Resize", "node": 30},
            {"desc": "Weights missing", "node": 4},
            {"desc": "Could not open file"},
        ],
    )  # fmt: skip
    with pytest.raises(ModelError) as error:
        build_serialized(MODEL, BuildOptions(shapes={"input": (1, 1, 28, 28)}), trt=trt)
    message = error.value.message
    assert "\n" not in message
    assert "(4 error(s))" in message
    assert "node 'nms_0' (NonMaxSuppressionX): Unsupported operator NonMaxSuppressionX" in message
    assert "node 'resize_3' (Resize): Attribute mode 'cubic'" in message
    assert "node #4: Weights missing" in message and "; Could not open file" in message
    assert "build_serialized_network" not in trt.calls.names()


def test_parser_error_text_survives_missing_methods():
    class Old:  # a ParserError from a version with fewer methods, and one method that throws
        def desc(self):
            return "bad node"

        def node(self):
            raise RuntimeError("no index")

    assert trt_builder.parser_error_text(Old()) == "bad node"


def test_plugins_load_before_parsing(tmp_path):
    first, second = tmp_path / "libone.so", tmp_path / "libtwo.so"
    first.write_bytes(b"\x7fELF")
    second.write_bytes(b"\x7fELF")
    trt = fake_trt(11)
    options = BuildOptions(shapes={"input": (1, 1, 28, 28)}, plugins=[first, str(second)])
    build_serialized(MODEL, options, trt=trt)
    loads = trt.calls.find("load_library")
    assert loads == [("load_library", str(first)), ("load_library", str(second))]
    last_load = max(i for i, c in enumerate(trt.calls) if c[0] == "load_library")
    assert last_load < trt.calls.index_of("parse_from_file")


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ({"registry": False}, r"cannot load plugin library .*libnms\.so: TensorRT has no plugin"),
        ({"plugin_loads": False}, r"TensorRT could not load plugin library .*libnms\.so"),
    ],
)
def test_plugin_failures_name_the_library(tmp_path, behaviour, message):
    plugin = tmp_path / "libnms.so"
    plugin.write_bytes(b"\x7fELF")
    trt = fake_trt(11, **behaviour)
    with pytest.raises(UserError, match=message) as error:
        build_serialized(MODEL, BuildOptions(plugins=[plugin]), trt=trt)
    assert "\n" not in error.value.message
    assert "parse_from_file" not in trt.calls.names()
    with pytest.raises(UserError, match=r"plugin library not found: .*nope\.so"):
        build_serialized(MODEL, BuildOptions(plugins=[tmp_path / "nope.so"]), trt=fake_trt(11))


def test_timing_cache_read_and_written_back(tmp_path):
    cache = tmp_path / "timing.cache"
    options = BuildOptions(shapes={"input": (1, 1, 28, 28)}, timing_cache=cache)
    trt = fake_trt(11)
    build_serialized(MODEL, options, trt=trt)  # no file yet: a new cache
    assert trt.calls.find("create_timing_cache") == [("create_timing_cache", b"")]
    assert trt.calls.find("set_timing_cache") == [("set_timing_cache", False)]
    assert cache.read_bytes() == b"+new timings"
    trt = fake_trt(11)
    build_serialized(MODEL, options, trt=trt)  # the file is read back in
    assert trt.calls.find("create_timing_cache") == [("create_timing_cache", b"+new timings")]
    assert cache.read_bytes() == b"+new timings+new timings"
    assert [p.name for p in tmp_path.iterdir()] == ["timing.cache"]  # no temporary left


def test_failed_build_is_one_line_and_keeps_the_timing_cache(tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    options = BuildOptions(shapes={"input": (1, 1, 28, 28)}, timing_cache=cache)
    with pytest.raises(UserError) as error:
        build_serialized(MODEL, options, trt=fake_trt(10, plan=None))
    assert error.value.message == "TensorRT could not build the engine (see the log above)."
    assert cache.read_bytes() == b"old"


def test_dynamic_input_without_shapes_is_an_error_before_the_build():
    trt = fake_trt(11)
    with pytest.raises(
        UserError, match=r"need shapes: input \(-1x1x28x28\).*--shapes input:1x1x28x28"
    ):
        build_serialized(MODEL, BuildOptions(), trt=trt)
    assert "build_serialized_network" not in trt.calls.names()


def test_static_model_gets_no_profile(tmp_path):
    model = onnx.load(MODEL)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    trt = fake_trt(11)
    result = build_serialized(model.SerializeToString(), BuildOptions(), trt=trt)
    assert "create_optimization_profile" not in trt.calls.names()
    assert result.io[0]["profile"] == {
        "min": [2, 1, 28, 28],
        "opt": [2, 1, 28, 28],
        "max": [2, 1, 28, 28],
    }


# --- the CLI on the fake module --------------------------------------------------------------


@pytest.fixture
def trt10(monkeypatch, fixed_gpu):
    trt = fake_trt(10)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


@pytest.fixture
def trt11(monkeypatch, fixed_gpu):
    trt = fake_trt(11)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


@pytest.fixture
def fixed_gpu(monkeypatch):
    """The sidecar's GPU query, made deterministic (the real one is tested above)."""
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    monkeypatch.setattr(sidecar, "gpu_info", lambda probes=None: dict(gpu))


def build(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(["build", *map(str, argv)])
    except SystemExit as stop:  # a flag refused while parsing
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_builds_graph_precision_and_writes_the_pair(trt11, tmp_path, capsys):
    engine = tmp_path / "mnist.engine"
    code, out, err = build(capsys, MODEL, "-o", engine, "--shapes", "input:8x1x28x28", "--json",
                           "--workspace", "1G", "--timing-cache", tmp_path / "t.cache")  # fmt: skip
    assert code == 0, err
    assert engine.read_bytes() == PLAN
    data = json.loads((tmp_path / "mnist.engine.json").read_text())
    assert json.loads(out) == data
    assert data["precision"] == "graph" and data["graph_precision"] == "as-is"
    assert data["built_model"] is None and data["tensorrt_version"] == "11.4.0.106"
    assert data["build_options"]["strongly_typed"] is True
    assert data["build_options"]["workspace"] == 1 << 30
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mnist.engine",
        "mnist.engine.json",
        "t.cache",
    ]


def test_cli_int8_runs_the_frontend_first(trt11, tmp_path, capsys):
    engine = tmp_path / "mnist.engine"
    code, out, err = build(capsys, MODEL, "-o", engine, "--int8", "--fp16", "--calib", CALIB,
                           "--shapes", "input:8x1x28x28", "--no-progress", "-q")  # fmt: skip
    assert code == 0, err
    prepared = tmp_path / "mnist.trtq.onnx"
    built = onnx.load(prepared)
    ops = {node.op_type for node in built.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Cast"} <= ops
    # The builder parsed exactly the graph that was written next to the engine.
    assert trt11.parsed_model.SerializeToString() == built.SerializeToString()
    assert trt11.calls.find("create_network") == [("create_network", 0)]
    data = json.loads((tmp_path / "mnist.engine.json").read_text())
    assert data["graph_precision"] == "int8+fp16" and data["built_model"] == str(prepared)
    assert data["built_model_sha256"] == sidecar.sha256_of(prepared)
    assert data["source_model_sha256"] == sidecar.sha256_of(MODEL)
    assert data["frontend"]["coverage"]["fraction"] > 0.9
    assert f"wrote {prepared}" in out


def test_cli_already_quantized_model_is_built_untouched(trt10, tmp_path, capsys):
    engine = tmp_path / "m.engine"
    qdq_model = tmp_path / "m.int8.onnx"
    assert main(["quantize", str(MODEL), "--calib", str(CALIB), "-o", str(qdq_model), "-q",
                 "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    code, _, err = build(capsys, qdq_model, "-o", engine, "--int8", "--shapes", "input:1x1x28x28")
    assert code == 0, err
    assert "already carries quantization (" in err and "QuantizeLinear x" in err
    assert "--int8 not applied" in err
    assert trt10.calls.find("parse_from_file") == [("parse_from_file", str(qdq_model))]
    strongly_typed = 1 << int(trt10.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert trt10.calls.find("create_network") == [("create_network", strongly_typed)]
    assert not (tmp_path / "m.trtq.onnx").exists()
    code, _, err = build(capsys, qdq_model, "-o", engine, "--int8", "--calib-mode", "trt",
                         "--cache", _cache(tmp_path))  # fmt: skip
    assert code == EXIT_USER_ERROR and "drop --calib-mode trt" in err


def _cache(folder: Path, version: str = "10.13.3", method: str = "entropy") -> Path:
    """A complete cache for MODEL: a scale for every float tensor TensorRT asks for."""
    path = folder / f"m-{version}.cache"
    amax = dict.fromkeys(trt_tensors(onnx.load(MODEL)), 1.0)
    TrtCache.from_amax(amax, method=method, trt_version=version).write(path)
    return path


def test_cli_calib_mode_trt_on_trt10_serves_the_cache(trt10, tmp_path, capsys):
    engine = tmp_path / "m.engine"
    cache = _cache(tmp_path)
    code, _, err = build(capsys, MODEL, "-o", engine, "--int8", "--calib-mode", "trt",
                         "--cache", cache, "--shapes", "input:8x1x28x28")  # fmt: skip
    assert code == 0, err
    calls = trt10.calls
    assert calls.find("create_network") == [("create_network", 0)]  # weakly typed
    assert calls.find("set_flag") == [("set_flag", trt10.BuilderFlag.INT8)]
    (_, calibrator), = calls.find("config.int8_calibrator")  # fmt: skip
    assert isinstance(calibrator, trt10.IInt8EntropyCalibrator2)
    assert calibrator.read_calibration_cache() == cache.read_bytes()
    data = json.loads((tmp_path / "m.engine.json").read_text())
    assert data["precision"] == "weak-int8"
    assert data["calibration_cache_sha256"] == sidecar.sha256_of(cache)
    assert data["build_options"]["calibrator"] == "CacheCalibrator"


def test_calibrator_factory_is_a_seam(trt10, tmp_path):
    seen = []

    def factory(trt, cache_path, algorithm):
        seen.append((trt, cache_path, algorithm))
        return trt.IInt8MinMaxCalibrator()

    cache = _cache(tmp_path, method="max")
    outcome = trtq.build(MODEL, tmp_path / "m.engine", int8=True, calib_mode="trt", cache=cache,
                         shapes="input:1x1x28x28", calibrator_factory=factory)  # fmt: skip
    assert seen == [(trt10, cache, "minmax")]
    assert outcome.sidecar["build_options"]["calibrator"] == "IInt8MinMaxCalibrator"


def test_calib_mode_trt_streams_calib_data_to_tensorrt(trt10, tmp_path):
    """calib with calib_mode trt: TensorRT's calibrator gets trtq's batches (pycuda seam)."""
    seen = []

    def streaming(trt, batches, cache_path, algorithm, shapes):
        assert shapes == {"input": (50, 1, 28, 28)}  # TensorRT calibrates at the opt shape
        seen.append((sum(len(b["input"]) for b in batches), cache_path, algorithm))
        return trt.IInt8EntropyCalibrator2()

    cache = tmp_path / "written-by-tensorrt.cache"  # need not exist: TensorRT writes it
    trtq.build(MODEL, tmp_path / "m.engine", int8=True, calib_mode="trt", calib=CALIB,
               cache=cache, batch_size=50, shapes={"input": (50, 1, 28, 28)},
               streaming_factory=streaming)  # fmt: skip
    assert seen == [(500, cache, "entropy")]
    assert trt10.calls.find("set_flag") == [("set_flag", trt10.BuilderFlag.INT8)]


def test_build_api_takes_a_proto_and_shape_mappings(trt11, tmp_path):
    """trtq.build: a model in memory is parsed from its bytes, and recorded by its hash."""
    model = onnx.load(MODEL)
    outcome = trtq.build(model, tmp_path / "m.engine", shapes={"input": [8, 1, 28, 28]},
                         workspace="1G")  # fmt: skip
    assert outcome.engine.read_bytes() == PLAN and outcome.built_model is None
    assert outcome.sidecar_path == tmp_path / "m.engine.json"
    assert json.loads(outcome.sidecar_path.read_text()) == outcome.sidecar
    assert trt11.calls.find("parse") == [("parse", model.ByteSize())]
    assert outcome.sidecar["source_model"] is None
    assert outcome.sidecar["source_model_sha256"] == sidecar.sha256_of(model.SerializeToString())
    assert outcome.sidecar["build_options"]["workspace"] == 1 << 30
    assert outcome.sidecar["build_options"]["profile"]["input"]["max"] == [8, 1, 28, 28]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"model": 42}, "model must be the path of an .onnx file or an onnx.ModelProto, not int"),
        ({"calib_mode": "tensorrt"}, "unknown calibration mode 'tensorrt'"),
        ({"shapes": {"input": (0, 1, 28, 28)}}, "dimensions must be positive integers"),
        ({"shapes": {"input": (8, 1, 28, 28)}, "workspace": -1}, "bad workspace size -1"),
        ({"shapes": "input:8x1x28x28", "workspace": "lots"}, "bad memory size 'lots'"),
        ({"int8": True, "calib": {"input": 1}}, "data must be a path or an iterable"),
    ],
)
def test_build_api_argument_errors_write_nothing(trt11, tmp_path, arguments, message):
    arguments = {"model": MODEL, **arguments}
    with pytest.raises(UserError, match=re.escape(message)) as error:
        trtq.build(output=tmp_path / "m.engine", **arguments)
    assert "\n" not in error.value.message
    assert list(tmp_path.iterdir()) == []


def test_cli_calib_mode_trt_refused_on_trt11(trt11, tmp_path, capsys):
    code, _, err = build(capsys, MODEL, "-o", tmp_path / "m.engine", "--fp16", "--calib-mode",
                         "trt", "--shapes", "input:1x1x28x28")  # fmt: skip
    assert code == EXIT_USER_ERROR
    assert err == (
        "trtq: error: TensorRT 11 has no FP16/INT8 builder flags; trtq puts precision in the "
        "graph instead. run without --calib-mode trt.\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--int8"], "--int8 needs activation ranges"),
        (["--calib", str(CALIB)], "add --int8"),
        (["--fp16", "--cache", "{cache}"], "--cache gives INT8 ranges"),
        (["--int8", "--calib-mode", "trt"], "needs calibration data or a TensorRT calibration"),
        (
            ["--int8", "--fp16", "--calib-mode", "trt", "--cache", "{cache}"],
            "give --int8 or --fp16",
        ),
        (["--fp16", "--calib-mode", "trt", "--calib", str(CALIB)], "FP16 flag needs none"),
        (["--int8", "--calib-mode", "trt", "--cache", "{old}"], "TensorRT would ignore the cache"),
        (["--cache", "missing.cache", "--int8"], "--cache: file not found"),
        (["--plugins", "missing.so"], "--plugins: file not found: missing.so"),
        (["--shapes", "input:1x28x28"], "has 3 dimension"),
        (["--shapes", "input:1x1x28x28", "--max-shapes", "input:8x1x28x28"], "both --shapes"),
        (["--shapes", "input=1x1x28x28"], "bad shape"),
        ([], r"need shapes: input \(-1x1x28x28\).*--shapes input:1x1x28x28"),
    ],
)
def test_cli_user_errors_write_nothing(trt10, tmp_path, capsys, argv, message):
    cache, old = _cache(tmp_path), _cache(tmp_path, "10.0.1")
    before = set(tmp_path.iterdir())
    argv = [a.format(cache=cache, old=old) for a in argv]
    code, _, err = build(capsys, MODEL, "-o", tmp_path / "m.engine", *argv, "--no-progress")
    assert code == EXIT_USER_ERROR, err
    # Flags are checked as they are parsed ("trtq build: error: argument --shapes: ...").
    assert len(err.splitlines()) == 1 and re.match(r"trtq( build)?: error:", err)
    assert re.search(message, err), err
    assert set(tmp_path.iterdir()) == before


def test_cli_without_tensorrt_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ModuleNotFoundError
    code, out, err = build(capsys, MODEL, "-o", tmp_path / "m.engine", "--int8", "--calib", CALIB)
    assert code == EXIT_USER_ERROR and out == ""
    assert len(err.splitlines()) == 1
    assert "pip install 'trtq[trt]'" in err and "nvcr.io/nvidia/tensorrt" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_without_tensorrt_in_a_fresh_interpreter(tmp_path):
    if (
        subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode
        == 0
    ):
        pytest.skip("tensorrt is importable in this interpreter")
    proc = subprocess.run(
        [sys.executable, "-m", "trtq", "build", str(MODEL), "-o", str(tmp_path / "m.engine")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == EXIT_USER_ERROR and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "pip install 'trtq[trt]'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# --- c. NVIDIA's real bindings on stub libraries ----------------------------------------------

#: Every TensorRT name trtq.trt.builder (and its cache calibrator) touches, always...
BUILDER_ATTRIBUTES = (
    "__version__",
    "Logger",
    "Logger.WARNING",
    "Logger.INFO",
    "init_libnvinfer_plugins",
    "get_plugin_registry",
    "IPluginRegistry.load_library",
    "Builder",
    "Builder.create_network",
    "Builder.create_builder_config",
    "Builder.create_optimization_profile",
    "Builder.build_serialized_network",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    "INetworkDefinition.num_inputs",
    "INetworkDefinition.num_outputs",
    "INetworkDefinition.get_input",
    "INetworkDefinition.get_output",
    "ITensor.name",
    "ITensor.shape",
    "ITensor.dtype",
    "OnnxParser",
    "OnnxParser.parse",
    "OnnxParser.parse_from_file",
    "OnnxParser.num_errors",
    "OnnxParser.get_error",
    "ParserError.desc",
    "ParserError.node_name",
    "ParserError.node_operator",
    "ParserError.node",
    "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.set_flag",
    "IBuilderConfig.add_optimization_profile",
    "MemoryPoolType.WORKSPACE",
    "IOptimizationProfile.set_shape",
    *(f"DataType.{name}" for name in trt_builder.DTYPE_NAMES),
)
#: ... and where a feature (trtq.trt.compat.TrtFeatures) says it may.
FEATURE_ATTRIBUTES = {
    "builder_optimization_level": ("IBuilderConfig.builder_optimization_level",),
    "version_compatible": ("BuilderFlag.VERSION_COMPATIBLE",),
    "hardware_compatibility": (
        "IBuilderConfig.hardware_compatibility_level",
        "HardwareCompatibilityLevel.AMPERE_PLUS",
    ),
    "timing_cache": (
        "IBuilderConfig.create_timing_cache",
        "IBuilderConfig.set_timing_cache",
        "IBuilderConfig.get_timing_cache",
        "ITimingCache.serialize",
    ),
    "weak_typing": tuple(f"BuilderFlag.{f}" for f in trt_builder.WEAK_PRECISION_FLAGS.values()),
    "int8_calibrators": (
        "IBuilderConfig.int8_calibrator",
        "IBuilderConfig.set_calibration_profile",
        "IInt8EntropyCalibrator2.get_batch_size",
        "IInt8EntropyCalibrator2.get_batch",
        "IInt8EntropyCalibrator2.read_calibration_cache",
        "IInt8EntropyCalibrator2.write_calibration_cache",
        "IInt8MinMaxCalibrator",
    ),
}

# Runs with one version's bindings on the path; prints one JSON line.
ATTRIBUTE_PROBE = textwrap.dedent(
    """
    import json, sys
    from trtq.calib.cache import TrtCache
    from trtq.trt import compat, import_tensorrt
    from trtq.trt.calibrator import cache_calibrator
    from trtq.errors import UserError

    always, by_feature, cache = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    trt = import_tensorrt()
    features = compat.detect(trt)
    names = list(always)
    for feature, extra in by_feature.items():
        if getattr(features, feature):
            names += extra
    result = {
        "features": features.as_dict(),
        "checked": len(names),
        "missing": [n for n in names if not compat.has_attribute(trt, n)],
        "absent_features": [f for f in by_feature if not getattr(features, f)],
    }
    try:
        calibrator = cache_calibrator(trt, cache)
        result["calibrator"] = {
            "is_real_base": isinstance(calibrator, trt.IInt8EntropyCalibrator2),
            "algorithm": str(calibrator.get_algorithm()),
            "cache_served": calibrator.read_calibration_cache() == open(cache, "rb").read(),
        }
    except UserError as exc:
        result["calibrator"] = {"error": str(exc)}
    print("PROBE-RESULT " + json.dumps(result))
    """
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def bindings_env(major: str) -> dict[str, str]:
    """``import tensorrt`` -> NVIDIA's bindings for ``major`` on the stubs (as trt_bindings.sh)."""
    site, stubs = TRT_DIR / major, TRT_DIR / "stubs" / major
    if not (site / "tensorrt" / "__init__.py").is_file() or not any(stubs.glob("libnvinfer.so.*")):
        reason = f"TensorRT {major} bindings are not prepared in {TRT_DIR} (make test)"
        if _in_ci():
            pytest.fail(f"{reason}; on CI this means the install step failed")
        pytest.skip(reason)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(REPO), env.get("PYTHONPATH")]))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(stubs), env.get("LD_LIBRARY_PATH")]))
    return env


@pytest.mark.parametrize("major", ["10", "11"])
def test_real_bindings_have_every_name_the_builder_uses(major, tmp_path):
    cache = _cache(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", ATTRIBUTE_PROBE, json.dumps(BUILDER_ATTRIBUTES),
         json.dumps(FEATURE_ATTRIBUTES), str(cache)],
        env=bindings_env(major), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE-RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("PROBE-RESULT "))
    assert result["missing"] == [], f"TensorRT {major} lacks names trtq.trt.builder uses"
    if major == "10":
        assert result["absent_features"] == []
        assert result["calibrator"] == {
            "is_real_base": True,
            "algorithm": "CalibrationAlgoType.ENTROPY_CALIBRATION_2",
            "cache_served": True,
        }
    else:
        assert result["absent_features"] == ["weak_typing", "int8_calibrators"]
        assert "has no IInt8EntropyCalibrator2" in result["calibrator"]["error"]


@pytest.mark.parametrize("major", ["10", "11"])
def test_real_bindings_without_gpu_fail_in_one_line_and_write_nothing(major, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trtq", "build", str(MODEL), "-o", str(tmp_path / "X.engine")],
        env=bindings_env(major), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("trtq: error: no usable TensorRT/GPU")
    assert list(tmp_path.iterdir()) == []
