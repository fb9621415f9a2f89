"""trtq's TensorRT layer against NVIDIA's real Python bindings for TensorRT 10.13 and 11.4.

TensorRT's native libraries cannot be installed here or on CI, but its Python
bindings can: ``scripts/trt_bindings.sh`` (run by ``make test``) installs the
``tensorrt-cu12-bindings`` (10.13) and ``tensorrt-cu13-bindings`` (11.4) wheels
into ``.trt/10`` and ``.trt/11`` and links them against stub libraries
(``scripts/trt_stubs/stub.c``) whose factories return NULL. Each version is
then imported in its own subprocess (the two cannot share one), which reports
what it found as JSON:

* the features :func:`trtq.trt.compat.detect` finds match the published facts;
* every TensorRT attribute trtq uses exists in that version;
* a Python subclass of the real ``IInt8EntropyCalibrator2`` works on 10.x, and
  11.x gets a one-line error instead;
* with no GPU (a builder factory that returns nullptr) trtq says "no usable
  TensorRT/GPU" in one line;
* importing any trtq module does not import tensorrt.

Without ``.trt`` these tests are skipped, except on CI (``CI`` set), where a
missing install is a failure: the step that prepares it broke.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from trtq.errors import MissingDependencyError, UserError

REPO = Path(__file__).resolve().parent.parent
TRT_DIR = Path(os.environ.get("TRTQ_TRT_DIR", REPO / ".trt"))

# What the real bindings offer (ARCHITECTURE.md §TensorRT 10 and 11), checked against detect().
EXPECTED_FEATURES = {
    "10": {
        "version": "10.13.3.9",
        "major": 10,
        "weak_typing": True,
        "int8_calibrators": True,
        "strongly_typed_flag": True,
        "explicit_batch_flag": True,
        "device_memory_size_v2": True,
        "version_compatible": True,
        "hardware_compatibility": True,
        "builder_optimization_level": True,
        "timing_cache": True,
        "set_dynamic_range": True,
    },
    "11": {
        "version": "11.4.0.106",
        "major": 11,
        "weak_typing": False,
        "int8_calibrators": False,
        "strongly_typed_flag": True,  # still there, deprecated and ignored
        "explicit_batch_flag": False,
        "device_memory_size_v2": True,
        "version_compatible": True,
        "hardware_compatibility": True,
        "builder_optimization_level": True,
        "timing_cache": True,
        "set_dynamic_range": False,
    },
}

# ARCHITECTURE.md §TensorRT 10 and 11: each of these exists in 10.13 and is gone in 11.4.
REMOVED_IN_11 = (
    "BuilderFlag.FP16",
    "BuilderFlag.BF16",
    "BuilderFlag.INT8",
    "BuilderFlag.FP8",
    "BuilderFlag.INT4",
    "BuilderFlag.FP4",
    "BuilderFlag.OBEY_PRECISION_CONSTRAINTS",
    "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
    "BuilderFlag.WEIGHTLESS",
    "IBuilderConfig.int8_calibrator",
    "IBuilderConfig.set_calibration_profile",
    "IBuilderConfig.set_quantization_flag",
    "QuantizationFlag",
    "IInt8Calibrator",
    "IInt8EntropyCalibrator2",
    "IInt8MinMaxCalibrator",
    "IInt8LegacyCalibrator",
    "Builder.platform_has_fast_fp16",
    "Builder.platform_has_fast_int8",
    "ITensor.set_dynamic_range",
    "ILayer.precision",
    "ILayer.set_output_type",
    "ICudaEngine.device_memory_size",
    "ICudaEngine.create_execution_context_without_device_memory",
    "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
)

# Runs inside a subprocess with one version's bindings on the path; prints one JSON line.
PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    removed_in_11 = json.loads(sys.argv[1])
    result = {}

    # Import every trtq module first: none may import tensorrt, even though it is importable.
    import trtq

    errors = {}
    for info in pkgutil.walk_packages(trtq.__path__, "trtq."):
        if info.name.endswith(".__main__"):  # runs the CLI
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            errors[info.name] = f"{type(exc).__name__}: {exc}"
    result["module_import_errors"] = errors
    result["tensorrt_modules_after_trtq"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("tensorrt", "tensorrt_bindings")
    )

    from trtq.errors import UserError
    from trtq.trt import compat, create_builder, create_runtime, import_tensorrt

    trt = import_tensorrt()
    result["tensorrt_file"] = trt.__file__
    result["tensorrt_bindings_imported"] = "tensorrt_bindings" in sys.modules

    features = compat.detect(trt)
    result["features"] = features.as_dict()
    result["required"] = list(compat.required_attributes(features))
    result["missing"] = compat.missing_attributes(trt, features)
    result["removed_in_11_present"] = {
        name: compat.has_attribute(trt, name) for name in removed_in_11
    }
    result["creation_flag_values"] = {
        name: int(value) for name, value in trt.NetworkDefinitionCreationFlag.__members__.items()
    }
    result["network_flags"] = {
        "strongly_typed": compat.network_flags(trt, features, strongly_typed=True),
        "default": compat.network_flags(trt, features, strongly_typed=False),
    }

    def user_error(call, *args):
        try:
            call(*args)
        except UserError as exc:
            return {"type": type(exc).__name__, "message": str(exc)}
        return None

    result["builder_error"] = user_error(create_builder, trt, trt.Logger(trt.Logger.ERROR))
    result["runtime_error"] = user_error(create_runtime, trt, trt.Logger(trt.Logger.ERROR))
    result["plugin_registry"] = repr(trt.get_plugin_registry())

    calibrators = {}
    for algorithm in ("entropy", "minmax"):
        try:
            base = compat.calibrator_base(trt, algorithm)
        except UserError as exc:
            calibrators[algorithm] = {"error": str(exc)}
            continue

        class Calibrator(base):
            def __init__(self):
                base.__init__(self)

            def get_batch_size(self):
                return 8

            def get_batch(self, names, *args):
                return None

            def read_calibration_cache(self):
                return None

            def write_calibration_cache(self, cache):
                return None

        calibrator = Calibrator()
        calibrators[algorithm] = {
            "base": base.__name__,
            "is_real_base": base is getattr(trt, base.__name__),
            "is_instance": isinstance(calibrator, trt.IInt8Calibrator),
            "algorithm": str(calibrator.get_algorithm()),
            "batch_size": calibrator.get_batch_size(),
        }
    result["calibrators"] = calibrators

    print("PROBE-RESULT " + json.dumps(result))
    """
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _prepend(path: Path, existing: str | None) -> str:
    return os.pathsep.join([str(path), *([existing] if existing else [])])


def bindings_env(major: str) -> dict[str, str]:
    """Environment that makes ``import tensorrt`` load version ``major`` on the stubs.

    Skips without ``.trt/<major>``, except on CI where that is a failure.
    """
    site, stubs = TRT_DIR / major, TRT_DIR / "stubs" / major
    if (
        not (site / "tensorrt" / "__init__.py").is_file()
        or not (stubs / f"libnvinfer.so.{major}").is_file()
    ):
        reason = (
            f"TensorRT {major} bindings are not prepared in {TRT_DIR} "
            "(run `make test` or scripts/trt_bindings.sh)"
        )
        if _in_ci():
            pytest.fail(f"{reason}; on CI this means the install step failed")
        pytest.skip(reason)
    env = dict(os.environ)
    env["PYTHONPATH"] = _prepend(site, _prepend(REPO, os.environ.get("PYTHONPATH")))
    env["LD_LIBRARY_PATH"] = _prepend(stubs, os.environ.get("LD_LIBRARY_PATH"))
    return env


def run_python(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module", params=["10", "11"], ids=["trt10", "trt11"])
def probe(request) -> dict:
    """What one version's subprocess found (see PROBE), with ``major`` added."""
    major = request.param
    proc = run_python(PROBE, bindings_env(major), json.dumps(REMOVED_IN_11))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE-RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"probe for TensorRT {major} failed (rc {proc.returncode}):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    result = json.loads(lines[-1].removeprefix("PROBE-RESULT "))
    result["major"] = major
    return result


def test_real_bindings_are_imported(probe):
    site = (TRT_DIR / probe["major"]).resolve()
    assert Path(probe["tensorrt_file"]).resolve().is_relative_to(site)
    # Importing tensorrt_bindings besides tensorrt would load the extension twice.
    assert not probe["tensorrt_bindings_imported"]


def test_detected_features_match_the_facts(probe):
    assert probe["features"] == EXPECTED_FEATURES[probe["major"]]


def test_every_attribute_trtq_uses_exists(probe):
    assert probe["missing"] == [], (
        f"TensorRT {probe['features']['version']} lacks attributes listed in "
        "trtq.trt.compat (USED_ATTRIBUTES / FEATURE_ATTRIBUTES)"
    )
    assert len(probe["required"]) > 50


def test_design_removals_in_11(probe):
    present = probe["removed_in_11_present"]
    expected = probe["major"] == "10"
    assert {name for name, there in present.items() if there != expected} == set()


def test_network_flags(probe):
    values = probe["creation_flag_values"]
    flags = probe["network_flags"]
    assert flags["default"] == 0
    if probe["major"] == "10":
        # EXPLICIT_BATCH (0) still exists, so STRONGLY_TYPED is bit 1 ...
        assert values["STRONGLY_TYPED"] == 1
        assert flags["strongly_typed"] == 1 << values["STRONGLY_TYPED"]
    else:
        # ... and bit 0 in 11.x; there every network is strongly typed and the flag is ignored.
        assert values["STRONGLY_TYPED"] == 0
        assert "EXPLICIT_BATCH" not in values
        assert flags["strongly_typed"] == 0


def test_calibrators(probe):
    calibrators = probe["calibrators"]
    if probe["major"] == "10":
        assert calibrators["entropy"] == {
            "base": "IInt8EntropyCalibrator2",
            "is_real_base": True,
            "is_instance": True,
            "algorithm": "CalibrationAlgoType.ENTROPY_CALIBRATION_2",
            "batch_size": 8,
        }
        assert calibrators["minmax"]["base"] == "IInt8MinMaxCalibrator"
        assert calibrators["minmax"]["algorithm"] == "CalibrationAlgoType.MINMAX_CALIBRATION"
    else:
        for outcome in calibrators.values():
            message = outcome["error"]
            assert "\n" not in message
            assert "TensorRT 11 removed implicit INT8 calibration" in message
            assert "trtq quantize" in message


def test_no_gpu_is_one_clean_line(probe):
    for key in ("builder_error", "runtime_error"):
        error = probe[key]
        assert error is not None, f"{key}: the stubbed factory should have failed"
        assert error["type"] == "UserError"
        assert "\n" not in error["message"]
        assert error["message"].startswith("no usable TensorRT/GPU")
    assert probe["plugin_registry"] == "None"


def test_trtq_modules_do_not_import_tensorrt_even_when_importable(probe):
    assert probe["module_import_errors"] == {}
    assert probe["tensorrt_modules_after_trtq"] == []


def test_missing_native_libraries_are_one_line():
    """The bindings without libnvinfer: what a pip install without NVIDIA's libraries gives."""
    env = bindings_env("10")
    env["LD_LIBRARY_PATH"] = os.environ.get("LD_LIBRARY_PATH", "")
    code = textwrap.dedent(
        """
        from trtq.errors import MissingDependencyError
        from trtq.trt import import_tensorrt
        try:
            import_tensorrt()
        except MissingDependencyError as exc:
            print("ERROR " + str(exc))
        else:
            print("LOADED")
        """
    )
    proc = run_python(code, env)
    assert proc.returncode == 0, proc.stderr
    if "LOADED" in proc.stdout:
        pytest.skip("a real libnvinfer.so.10 is on this machine's library path")
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("ERROR ")]
    assert "libnvinfer.so.10" in line
    assert "pip install 'trtq[trt]'" in line


# --- in this interpreter, without the bindings -------------------------------------------------


def test_import_tensorrt_missing_is_one_line(monkeypatch):
    from trtq.trt import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what `import tensorrt` sees when absent
    with pytest.raises(MissingDependencyError) as info:
        import_tensorrt()
    message = str(info.value)
    assert "\n" not in message
    assert "'tensorrt'" in message
    assert "pip install 'trtq[trt]'" in message
    assert "nvcr.io/nvidia/tensorrt" in message


def test_trtq_does_not_import_tensorrt():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import trtq, trtq.trt, trtq.trt.compat
        for info in pkgutil.walk_packages(trtq.__path__, "trtq."):
            if not info.name.endswith(".__main__"):  # that one runs the CLI
                importlib.import_module(info.name)
        trt_names = ("tensorrt", "tensorrt_bindings")
        print(sorted(m for m in sys.modules if m.split(".")[0] in trt_names))
        """
    )
    proc = run_python(code, dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _fake_trt(error: str) -> types.SimpleNamespace:
    def factory(logger):
        raise TypeError(error)

    return types.SimpleNamespace(__version__="10.13.3.9", Builder=factory, Runtime=factory)


def test_create_builder_turns_nullptr_into_user_error():
    from trtq.trt import create_builder, create_runtime

    fake = _fake_trt("pybind11::init(): factory function returned nullptr")
    for create in (create_builder, create_runtime):
        with pytest.raises(UserError) as info:
            create(fake, object())
        assert not isinstance(info.value, MissingDependencyError)
        assert str(info.value).startswith("no usable TensorRT/GPU: TensorRT 10.13.3.9")
        assert "\n" not in str(info.value)


def test_create_builder_keeps_other_type_errors():
    from trtq.trt import create_builder

    with pytest.raises(TypeError, match="incompatible constructor arguments"):
        create_builder(_fake_trt("__init__(): incompatible constructor arguments"), 42)


def test_attribute_lists_are_well_formed():
    from trtq.trt import compat

    assert len(set(compat.USED_ATTRIBUTES)) == len(compat.USED_ATTRIBUTES)
    fields = {field.name for field in compat.dataclasses.fields(compat.TrtFeatures)}
    for (feature, present), names in compat.FEATURE_ATTRIBUTES.items():
        assert feature in fields and isinstance(present, bool)
        assert not set(names) & set(compat.USED_ATTRIBUTES), feature
    for name in compat.USED_ATTRIBUTES:
        assert all(part.isidentifier() for part in name.split(".")), name


def test_calibrator_base_rejects_unknown_algorithm():
    from trtq.trt import compat

    with pytest.raises(UserError, match="unknown calibration algorithm"):
        compat.calibrator_base(types.SimpleNamespace(), "percentile")  # type: ignore[arg-type]
