"""Loading runs no code the caller did not name; files trtq reads or writes never become code.

* Plugins (``.py`` modules and ``.so`` libraries) load only from ``plugins=[...]`` /
  ``--plugins``: never because the engine's sidecar lists them, never because they sit
  next to the engine. The sidecar's record only appears in error messages.
* A version-compatible engine's embedded host code runs only with
  ``allow_host_code=True`` / ``--allow-host-code``, never because the sidecar says so.
* The sidecar is validated against its schema (every field's type, the engine's
  SHA-256); one that fails is ignored with a one-line warning, since it is optional.
* ``--export-loader`` scripts hold file and input names as data: hostile names (quotes,
  triple quotes, backslashes, newlines) stay names.

The engine runs on the fakes of tests/test_runtime_engine.py (no GPU).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest
from conftest import CALIB_DATA
from test_runtime_engine import (
    PLAN,
    TENSORS,
    Driver,
    fake_trt,
    names,
    one_line,
    sidecar_for,
    write_engine,
)

import trtq
import trtq.runtime.engine as engine_module
from trtq.calib.data import open_batches
from trtq.errors import ModelError, UserError
from trtq.graph.load import TensorSpec, load_model, model_inputs
from trtq.polygraphy import write_loader_script
from trtq.runtime.engine import TensorRTEngine
from trtq.trt import builder as trt_builder
from trtq.trt.sidecar import (
    SIDECAR_MAX_BYTES,
    SidecarError,
    make_sidecar,
    read_sidecar,
    sidecar_path,
    validate_sidecar,
)

#: Python that leaves a trace when it runs: what a hostile plugin or name would do.
TRACE = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture
def driver() -> Driver:
    return Driver()


@pytest.fixture
def trt(driver):
    return fake_trt(driver)


def hostile_plugins(folder, marker) -> tuple:
    """A .py plugin that leaves a trace when imported, and a .so, both next to the engine."""
    module = folder / "evil_plugin.py"
    module.write_text(TRACE.format(marker=str(marker)))
    library = folder / "libevil.so"
    library.write_bytes(b"\x7fELF")
    return module, library


# --- plugins: only what the caller names ---------------------------------------------------


def test_plugins_in_the_sidecar_or_next_to_the_engine_never_load(tmp_path, trt, driver):
    marker = tmp_path / "ran.txt"
    module, library = hostile_plugins(tmp_path, marker)
    sidecar = sidecar_for(build_options={"plugins": [str(module), str(library)]})
    engine = TensorRTEngine(write_engine(tmp_path, sidecar), trt=trt, driver=driver)
    assert engine.sidecar is not None  # a valid sidecar, read, and still nothing loaded
    assert not marker.exists()
    assert "load_library" not in names(trt)


def test_plugins_the_caller_names_do_load(tmp_path, trt, driver):
    marker = tmp_path / "ran.txt"
    module, library = hostile_plugins(tmp_path, marker)
    TensorRTEngine(write_engine(tmp_path), plugins=[module, library], trt=trt, driver=driver)
    assert marker.read_text() == "ran"
    assert ("load_library", str(library)) in trt.calls


def test_a_plugin_string_is_not_a_list_of_characters(tmp_path, trt, driver):
    with pytest.raises(UserError) as info:
        TensorRTEngine(write_engine(tmp_path), plugins="libnms.so", trt=trt, driver=driver)
    one_line(info, "plugins must be a list of paths, not one str", "plugins=['libnms.so']")


def test_failed_deserialization_names_what_the_sidecar_records(tmp_path, driver):
    built_with = ["/build/libnms.so", "/build/evil\nname.so"]
    sidecar = sidecar_for(
        tensorrt_version="10.8.0.43",
        build_options={"plugins": built_with, "version_compatible": True},
    )
    path = write_engine(tmp_path, sidecar)
    (tmp_path / "libnms.so").write_bytes(b"\x7fELF")
    trt = fake_trt(driver, deserializes=False)
    with pytest.raises(ModelError) as info:
        TensorRTEngine(path, plugins=[tmp_path / "libnms.so"], trt=trt, driver=driver)
    message = one_line(info, "could not deserialize model.engine")
    assert "'evil\\nname.so'" in message and "'libnms.so'" not in message  # given: not missing
    assert "allow_host_code=True (--allow-host-code)" in message
    assert names(trt).count("load_library") == 1  # only the one passed


# --- host code: only when the caller allows it ---------------------------------------------


@pytest.mark.parametrize("recorded", [True, "no", "yes", 1])
def test_host_code_is_never_allowed_by_the_sidecar(tmp_path, trt, driver, recorded):
    sidecar = sidecar_for(build_options={"plugins": [], "version_compatible": recorded})
    TensorRTEngine(write_engine(tmp_path, sidecar), trt=trt, driver=driver)
    assert "runtime.engine_host_code_allowed" not in names(trt)


def test_host_code_needs_a_real_true(tmp_path, trt, driver):
    with pytest.raises(UserError) as info:
        TensorRTEngine(write_engine(tmp_path), allow_host_code="no", trt=trt, driver=driver)
    one_line(info, "allow_host_code must be True or False, not 'no'")
    TensorRTEngine(write_engine(tmp_path), allow_host_code=True, trt=trt, driver=driver)
    assert names(trt).index("runtime.engine_host_code_allowed") < names(trt).index(
        "deserialize_cuda_engine"
    )


def test_cli_flags_reach_the_loader(monkeypatch, tmp_path, driver, capsys):
    from trtq.cli import main

    trt = fake_trt(driver, tensors=(TENSORS[0], TENSORS[2]))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(engine_module, "import_cuda_driver", lambda: driver)
    marker = tmp_path / "ran.txt"
    module, _ = hostile_plugins(tmp_path, marker)
    path = write_engine(tmp_path, sidecar_for(build_options={"plugins": [str(module)]}))
    np.save(tmp_path / "x.npy", np.ones((4, 4), np.float32))
    run = ["run", str(path), "--data", str(tmp_path / "x.npy")]
    assert main(run) == 0, capsys.readouterr().err
    assert not marker.exists() and "runtime.engine_host_code_allowed" not in names(trt)
    assert main([*run, "--allow-host-code", "--plugins", str(module)]) == 0
    assert marker.exists() and ("runtime.engine_host_code_allowed", True) in trt.calls


# --- the sidecar's schema -------------------------------------------------------------------


def built_sidecar(plan: bytes = PLAN) -> dict:
    """A sidecar exactly as ``trtq build`` writes it (make_sidecar on a build result)."""
    io = [
        {
            "name": "x",
            "mode": "input",
            "dtype": "float32",
            "shape": [-1, 4],
            "profile": {"min": [1, 4], "opt": [4, 4], "max": [16, 4]},
        },
        {"name": "y", "mode": "output", "dtype": "float32", "shape": [-1, 4]},
    ]
    features = type("Features", (), {"version": "10.13.3.9"})()
    result = trt_builder.BuildResult(plan, io, features, 2.5)  # type: ignore[arg-type]
    options = trt_builder.BuildOptions(
        min_shapes={"x": (1, 4)}, opt_shapes={"x": (4, 4)}, max_shapes={"x": (16, 4)}
    )
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    sidecar = make_sidecar(result, options, source_model=b"onnx", gpu=gpu)
    return json.loads(json.dumps(sidecar))  # as read back from the file


def test_what_trtq_build_writes_is_valid(tmp_path):
    sidecar = built_sidecar()
    validate_sidecar(sidecar)
    path = write_engine(tmp_path, sidecar)
    assert read_sidecar(path, PLAN) == sidecar
    assert read_sidecar(tmp_path / "other.engine", PLAN) is None  # no sidecar: None


def _set(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    target = data
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("build_options.version_compatible", "no", "build_options.version_compatible should "),
        ("build_options.plugins", "libnms.so", "build_options.plugins should be a list"),
        ("build_options.plugins", [3], "build_options.plugins[0] should be a string"),
        ("gpu.compute_capability", 9.0, "gpu.compute_capability should be a compute capab"),
        ("gpu", "H100", "gpu should be an object, not a string"),
        ("tensorrt_version", 10, "tensorrt_version should be a string, not the number 10"),
        ("engine_sha256", "ab" * 16, "engine_sha256 should be a SHA-256"),
        ("engine_sha256", DELETE, "engine_sha256 should be present, not missing"),
        ("format", "other", 'format should be "trtq-engine"'),
        ("format_version", 2, "format_version should be 1, not the number 2"),
        ("format_version", True, "format_version should be 1, not a boolean"),
        ("precision", "int8", "precision should be"),
        ("engine_bytes", -1, "engine_bytes should be a whole number >= 0"),
        ("build_seconds", "fast", "build_seconds should be a number of seconds"),
        ("io", {"x": 1}, "io should be a list"),
        ("io.0", {"name": "x"}, "io[0].mode should be present"),
        ("frontend", [], "frontend should be an object"),
    ],
)
def test_each_field_is_type_checked(tmp_path, field, value, fragment):
    sidecar = built_sidecar()
    if field.startswith("io."):
        sidecar["io"][0] = value
    else:
        _set(sidecar, field, value)
    with pytest.raises(SidecarError) as info:
        validate_sidecar(sidecar, "model.engine.json")
    one_line(info, "model.engine.json is not a trtq engine sidecar: " + fragment)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "is not readable JSON"),
        ('{"format": NaN}', "NaN is not JSON"),
        (b"\xff\xfe{}", "is not readable JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not readable JSON"),
        ("[]", "should be an object, not a list"),
        ("null", "should be an object, not null"),
    ],
)
def test_unreadable_sidecars_are_one_line(tmp_path, content, fragment):
    path = tmp_path / "model.engine"
    path.write_bytes(PLAN)
    target = sidecar_path(path)
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SidecarError) as info:
        read_sidecar(path, PLAN)
    one_line(info, "model.engine.json", fragment, "delete the sidecar")


def test_a_sidecar_about_another_engine_or_size_is_refused(tmp_path):
    path = write_engine(tmp_path, built_sidecar(plan=b"another plan"))
    with pytest.raises(SidecarError) as info:
        read_sidecar(path, PLAN)
    one_line(info, "describes another engine")
    _set(sidecar := built_sidecar(), "engine_bytes", 7)
    path = write_engine(tmp_path, sidecar)
    with pytest.raises(SidecarError) as info:
        read_sidecar(path, PLAN)
    one_line(info, f"records engine_bytes 7, not the {len(PLAN)} bytes of model.engine")


def test_special_and_huge_sidecars_are_not_read(tmp_path):
    path = write_engine(tmp_path)
    target = sidecar_path(path)
    os.mkfifo(target)  # reading a FIFO would block forever
    with pytest.raises(SidecarError) as info:
        read_sidecar(path, PLAN)
    one_line(info, "model.engine.json is not a regular file")
    target.unlink()
    target.mkdir()
    with pytest.raises(SidecarError):
        read_sidecar(path, PLAN)
    target.rmdir()
    with open(target, "wb") as handle:  # sparse: costs no disk
        handle.truncate(SIDECAR_MAX_BYTES + 1)
    with pytest.raises(SidecarError) as info:
        read_sidecar(path, PLAN)
    one_line(info, "larger than a sidecar ever is")


def test_a_bad_sidecar_is_ignored_with_a_warning(tmp_path, trt, driver, caplog):
    bad = sidecar_for(gpu={"name": "NVIDIA L4", "compute_capability": 8.9})
    path = write_engine(tmp_path, bad)
    with caplog.at_level(logging.WARNING):
        engine = TensorRTEngine(path, trt=trt, driver=driver)
    assert engine.sidecar is None and engine.info()["built"] is None
    (record,) = [r for r in caplog.records if "model.engine.json" in r.getMessage()]
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert "gpu.compute_capability should be" in record.getMessage()
    assert "ignored, model.engine loads without it" in record.getMessage()


def test_trtq_load_reads_no_plugin_from_a_sidecar(monkeypatch, tmp_path, driver):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(driver))
    monkeypatch.setattr(engine_module, "import_cuda_driver", lambda: driver)
    marker = tmp_path / "ran.txt"
    module, _ = hostile_plugins(tmp_path, marker)
    path = write_engine(tmp_path, sidecar_for(build_options={"plugins": [str(module)]}))
    with trtq.load(path) as engine:
        assert engine.sidecar["build_options"]["plugins"] == [str(module)]
    assert not marker.exists()


# --- polygraphy loader scripts: names are data ----------------------------------------------

HOSTILE_NAMES = [
    'a"""b',
    "c'''d",
    'e"""\n' + TRACE.format(marker="ran.txt") + '"""',  # relative: lands in the cwd
    'e\\"""\n' + TRACE.format(marker="ran.txt") + '"""',
    "f\\",
    "g\nh",
    "i{}%s%(x)s",
    "j'\"k",
]


def import_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("index", range(len(HOSTILE_NAMES)))
def test_loader_scripts_keep_hostile_names_as_data(tmp_path, monkeypatch, index):
    hostile = HOSTILE_NAMES[index]
    monkeypatch.chdir(tmp_path)  # a trace written by injected code would land here
    folder = tmp_path / hostile
    folder.mkdir()
    data = folder / (hostile + ".npz")
    shutil.copy(CALIB_DATA / "mnist_calib.npz", data)
    inputs = model_inputs(load_model(CALIB_DATA / "mnist_cnn.onnx"))
    script_path = folder / f"{hostile}.py"  # in a hostile folder, under a hostile name
    write_loader_script(script_path, data, inputs, 4, limit=8, purpose=hostile)
    module = import_script(script_path, f"hostile_loader_{index}")
    assert not (tmp_path / "ran.txt").exists()
    assert str(data.resolve()) == module.SOURCE
    batches = list(module.load_data())
    expected = list(open_batches(data, inputs, batch_size=4, limit=8))
    assert len(batches) == len(expected) == 2
    for got, want in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(got["input"], want["input"])


def test_hostile_input_names_stay_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    specs = [TensorSpec(name, np.dtype("float32"), (name, 3)) for name in HOSTILE_NAMES]
    script = write_loader_script(tmp_path / "l.py", tmp_path, specs, None)
    module = import_script(script, "hostile_inputs")
    assert not (tmp_path / "ran.txt").exists()
    assert [(s.name, s.shape) for s in module.INPUTS] == [(n, (n, 3)) for n in HOSTILE_NAMES]
