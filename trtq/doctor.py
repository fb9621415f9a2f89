"""``trtq doctor``: what this machine offers trtq, and whether real engines come out right.

The test suite checks trtq's TensorRT layer against NVIDIA's real Python bindings over
stub libraries (no GPU), and its pycuda paths on a lent GPU; it never builds an engine.
This does, on the user's machine, because an engine belongs to one TensorRT version and
one GPU: the embedded MNIST sample is built as FP32, FP16 and INT8 engines with
:func:`trtq.build`, run through :func:`trtq.load` on the 1000 held-out digits, and
measured against the FP32 model in ONNX Runtime (mean cosine, top-1 agreement, accuracy
against the labels). Each precision has a floor (:data:`FLOORS`); a check below it fails.

Where engines cannot be built (no TensorRT, no usable GPU, no pycuda to run them, no
sample), the report says what is there and what is missing, and why the engine checks
were skipped. The NVIDIA driver and its GPUs are asked from libcuda directly
(:mod:`trtq.cuda.driver`), so a missing pycuda or ``nvidia-smi`` hides nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

import trtq
from trtq import runtime
from trtq.calib.data import open_batches
from trtq.cuda.driver import DriverInfo, probe_driver
from trtq.errors import DataError, MissingDependencyError, UserError
from trtq.graph.load import load_model, model_inputs
from trtq.report.metrics import Agreement, LabelAccuracy, OutputAgreement, json_number
from trtq.runtime.base import Engine
from trtq.trt import import_tensorrt, one_line
from trtq.trt.builder import open_builder
from trtq.trt.pipeline import build

#: The sample's files, in ``calib_data/`` of the repository (see calib_data/README.md).
SAMPLE_FILES = ("mnist_cnn.onnx", "mnist_calib.npz", "mnist_test.npz")
#: Where ``docker/install.sh`` puts the sample, under the environment's prefix: an installed
#: trtq (the Docker image's) has no checkout to find it in.
SAMPLE_INSTALLED = Path("share", "trtq", "sample")
#: Test digits per engine call: the engines' optimization profile is batch 1 to this.
BATCH = 100


@dataclass(frozen=True)
class Floor:
    """What an engine must reach against ONNX Runtime FP32 on the held-out digits."""

    #: Mean per-sample cosine of the logits, at least.
    cosine: float
    #: Share of digits where both predict the same class, at least.
    top1: float
    #: Accuracy lost against the labels, in percentage points, at most.
    drop_points: float


#: Per precision, with room for what TensorRT may rightly do: FP32 engines differ from ONNX
#: Runtime by kernel order and TF32 (on by default from Ampere on), FP16 by rounding, INT8
#: by quantization. Simulated in ONNX Runtime on this sample, trtq's FP16 graph reaches cosine
#: 0.9999999 and its INT8 graph 0.9998, both with the FP32 accuracy (99.3%) and every top-1
#: prediction; a broken engine (wrong scales, a dropped layer) lands far below.
FLOORS = {
    "fp32": Floor(cosine=0.9999, top1=0.995, drop_points=0.3),
    "fp16": Floor(cosine=0.999, top1=0.99, drop_points=0.5),
    "int8": Floor(cosine=0.995, top1=0.98, drop_points=1.0),
}

#: Loads an engine file to run (:func:`trtq.load`; tests stand in for it).
Loader = Callable[[Path], Engine]


@dataclass(frozen=True)
class Finding:
    """One line of the environment report: what was looked for, what was found."""

    name: str
    value: str
    ok: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "ok": self.ok}


@dataclass
class EngineCheck:
    """One precision's engine: built, run on the held-out digits, measured against FP32."""

    precision: str
    floor: Floor
    engine_bytes: int | None = None
    build_seconds: float | None = None
    agreement: Agreement | None = None
    accuracy: float | None = None
    reference_accuracy: float | None = None
    #: Why the engine could not be built or run (a one-line UserError).
    error: str | None = None

    @property
    def drop_points(self) -> float | None:
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return (self.reference_accuracy - self.accuracy) * 100

    def problems(self) -> list[str]:
        """Why the check failed, one entry per floor missed (empty: passed)."""
        if self.error is not None:
            return [self.error]
        if self.agreement is None:
            return ["not run"]
        found = []
        cosine, top1, drop = self.agreement.cosine_mean, self.agreement.top1, self.drop_points
        if not cosine >= self.floor.cosine:  # NaN fails too
            found.append(f"cosine {cosine:.6f} < {self.floor.cosine}")
        if top1 is None or not top1 >= self.floor.top1:
            found.append(f"top-1 agreement {_percent(top1)} < {self.floor.top1:.1%}")
        if drop is None or not drop <= self.floor.drop_points:
            shown = "unknown" if drop is None else f"{drop:.2f} points"
            found.append(f"accuracy drop {shown} > {self.floor.drop_points} points")
        return found

    @property
    def passed(self) -> bool:
        return not self.problems()

    def to_json(self) -> dict[str, Any]:
        agreement = self.agreement.to_json() if self.agreement else None
        return {
            "precision": self.precision,
            "passed": self.passed,
            "problems": self.problems(),
            "floor": vars(self.floor),
            "engine_bytes": self.engine_bytes,
            "build_seconds": self.build_seconds,
            "agreement": agreement,
            "accuracy": self.accuracy,
            "reference_accuracy": self.reference_accuracy,
            "drop_points": None if self.drop_points is None else json_number(self.drop_points),
        }


@dataclass(frozen=True)
class Diagnosis:
    """The environment, and the engine checks or why they were skipped."""

    environment: list[Finding]
    sample: Path | None
    checks: list[EngineCheck] = field(default_factory=list)
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        """No engine check failed (True when they were skipped: see :attr:`skipped`)."""
        return all(check.passed for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "trtq_version": trtq.__version__,
            "environment": [finding.to_json() for finding in self.environment],
            "sample": str(self.sample) if self.sample else None,
            "engine_checks": [check.to_json() for check in self.checks],
            "skipped": self.skipped,
            "passed": self.passed,
        }


def diagnose(
    sample_dir: str | Path | None = None,
    *,
    keep: str | Path | None = None,
    load: Loader | None = None,
) -> Diagnosis:
    """Report the environment and, where TensorRT and a GPU are usable, check real engines.

    ``sample_dir`` holds :data:`SAMPLE_FILES` (default: see :func:`find_sample`). The
    engines, sidecars and built graphs go to a temporary folder, or to ``keep``.
    ``load`` runs an engine file (default :func:`trtq.load`).
    """
    sample, looked = find_sample(sample_dir)
    trt, trt_text = _tensorrt()
    pycuda_ok, pycuda_text = _pycuda()
    driver = probe_driver()
    environment = [
        Finding(
            "Python", f"{platform.python_version()} ({platform.python_implementation()})", True
        ),
        Finding("trtq", f"{trtq.__version__} ({Path(trtq.__file__).parent})", True),
        *(_package(name) for name in ("numpy", "onnx", "onnxruntime")),
        Finding("TensorRT", trt_text, trt is not None),
        Finding("pycuda", pycuda_text, pycuda_ok),
        *_driver_findings(driver),
        Finding("MNIST sample", str(sample) if sample else _not_found(looked), sample is not None),
        _plugins(),
    ]
    blocker = _blocker(trt, trt_text, pycuda_ok, pycuda_text, sample, looked)
    if blocker is not None:
        return Diagnosis(environment, sample, skipped=blocker)
    assert sample is not None
    with _folder(keep) as folder:
        checks = check_engines(sample, folder, load=load)
    return Diagnosis(environment, sample, checks)


def check_engines(sample: Path, folder: Path, *, load: Loader | None = None) -> list[EngineCheck]:
    """Build the sample as FP32, FP16 and INT8 engines in ``folder``, run and measure them."""
    load = load or runtime.load
    model, calib, test = (sample / name for name in SAMPLE_FILES)
    inputs = model_inputs(load_model(model))
    data = open_batches(test, inputs, batch_size=BATCH)
    labels = _labels(test)
    with runtime.load(model) as reference:
        output = reference.outputs[0].name
        expected = [reference.infer(batch)[output] for batch in data]
    first = next(iter(data))
    largest = {name: tuple(array.shape) for name, array in first.items()}
    smallest = {name: (1, *shape[1:]) for name, shape in largest.items()}
    checks = []
    for precision, floor in FLOORS.items():
        check = EngineCheck(precision, floor)
        checks.append(check)
        try:
            outcome = build(
                model,
                folder / f"mnist.{precision}.engine",
                int8=precision == "int8",
                fp16=precision == "fp16",
                calib=calib if precision != "fp32" else None,  # FP16: ranges keep outliers FP32
                min_shapes=smallest,
                opt_shapes=largest,
                max_shapes=largest,
            )
            check.engine_bytes = outcome.sidecar["engine_bytes"]
            check.build_seconds = outcome.sidecar["build_seconds"]
            with load(outcome.engine) as engine:
                _measure(check, engine, data, expected, output, labels)
        except UserError as exc:
            check.error = exc.message
    return checks


def _measure(
    check: EngineCheck,
    engine: Engine,
    data: Any,
    expected: list[np.ndarray],
    output: str,
    labels: np.ndarray,
) -> None:
    agreement, accuracy, reference = OutputAgreement(), LabelAccuracy(), LabelAccuracy()
    done = 0
    for batch, wanted in zip(data, expected, strict=True):
        got = engine.infer(batch)[output]
        if got.shape != wanted.shape:
            raise UserError(
                f"the {check.precision} engine's '{output}' has shape {got.shape}, "
                f"ONNX Runtime's {wanted.shape}",
                "rerun with -v for TensorRT's log",
            )
        batch_labels = labels[done : done + len(wanted)]
        agreement.update(wanted, got)
        accuracy.update(got, batch_labels)
        reference.update(wanted, batch_labels)
        done += len(wanted)
    check.agreement = agreement.result()
    check.accuracy = accuracy.accuracy
    check.reference_accuracy = reference.accuracy


# --- the environment ------------------------------------------------------------------------


def find_sample(folder: str | Path | None = None) -> tuple[Path | None, list[Path]]:
    """The folder holding :data:`SAMPLE_FILES`, and every place looked in.

    A ``folder`` given must hold the sample (a one-line :class:`~trtq.errors.UserError`
    otherwise). Without one: ``calib_data/`` of the checkout trtq runs from, the copy
    ``docker/install.sh`` installs (:data:`SAMPLE_INSTALLED`), ``./calib_data``.
    """
    if folder is not None:
        path = Path(folder)
        missing = [name for name in SAMPLE_FILES if not (path / name).is_file()]
        if missing:
            raise UserError(
                f"--sample-dir {path} lacks the MNIST sample's {', '.join(missing)}",
                "point it at calib_data/ of a trtq checkout",
            )
        return path, [path]
    checkout = checkout_root()
    places = [checkout / "calib_data"] if checkout else []
    places += [Path(sys.prefix) / SAMPLE_INSTALLED, Path.cwd() / "calib_data"]
    for path in places:
        if all((path / name).is_file() for name in SAMPLE_FILES):
            return path, places
    return None, places


def checkout_root() -> Path | None:
    """The repository trtq runs from (an editable install or a source tree), or None."""
    root = Path(trtq.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def _tensorrt() -> tuple[Any, str]:
    """The ``tensorrt`` module and its version, or None and why it does not import."""
    try:
        trt = import_tensorrt()
    except MissingDependencyError as exc:
        cause = exc.__cause__
        if isinstance(cause, ModuleNotFoundError) and cause.name == "tensorrt":
            return None, "not installed (pip install 'trtq[trt]', or NVIDIA's TensorRT container)"
        return None, exc.problem
    return trt, str(getattr(trt, "__version__", "?"))


def _pycuda() -> tuple[bool, str]:
    """Whether ``pycuda.driver`` imports (engines run through it), and its version or why not."""
    installed = _version("pycuda")
    try:
        package = importlib.import_module("pycuda")
        importlib.import_module("pycuda.driver")
    except ImportError as exc:
        if installed is None:
            return False, "not installed (pip install 'trtq[gpu]')"
        return False, f"{installed} installed, but cannot be imported: {one_line(exc)}"
    return True, installed or str(getattr(package, "VERSION_TEXT", "?"))


def _package(name: str) -> Finding:
    version = _version(name)
    return Finding(name, version or "not installed", version is not None)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _driver_findings(driver: DriverInfo) -> list[Finding]:
    """The driver's CUDA version, then one line per GPU, or why there is none."""
    cuda = f"supports CUDA {driver.cuda_version}" if driver.cuda_version else "not found"
    findings = [Finding("NVIDIA driver", cuda, driver.cuda_version is not None)]
    for device in driver.devices:
        text = f"{device.name} (compute capability {device.compute_capability})"
        findings.append(Finding(f"GPU {device.ordinal}", text, True))
    if driver.problem:
        findings.append(Finding("GPU", f"none usable: {driver.problem}", False))
    return findings


def _plugins() -> Finding:
    """Plugins of the checkout's (or the current folder's) ``plugins/``: modules, libraries."""
    folder = (checkout_root() or Path.cwd()) / "plugins"
    found = sorted([*folder.glob("*/*_plugin.py"), *folder.glob("*/*.so")])
    if not found:
        return Finding("plugins", f"none in {folder}", True)
    return Finding("plugins", ", ".join(str(p.relative_to(folder)) for p in found), True)


def _blocker(
    trt: Any,
    trt_text: str,
    pycuda_ok: bool,
    pycuda_text: str,
    sample: Path | None,
    looked: list[Path],
) -> str | None:
    """Why engines cannot be checked here, or None. Creating a builder needs a usable GPU."""
    if trt is None:
        return f"TensorRT is {trt_text}" if trt_text.startswith("not installed") else trt_text
    try:
        open_builder(trt)
    except UserError as exc:
        return exc.problem
    if not pycuda_ok:
        return f"pycuda, which trtq.load runs engines with: {pycuda_text}"
    if sample is None:
        return f"the MNIST sample is not here ({_not_found(looked)}); pass --sample-dir"
    return None


def _labels(test: Path) -> np.ndarray:
    with np.load(test, allow_pickle=False) as arrays:
        if "labels" not in arrays:
            raise DataError(f"{test} has no 'labels' array", "use calib_data/mnist_test.npz")
        return np.asarray(arrays["labels"]).reshape(-1)


def _not_found(looked: list[Path]) -> str:
    return "not found in " + ", ".join(map(str, looked))


def _percent(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2%}"


@contextlib.contextmanager
def _folder(keep: str | Path | None) -> Iterator[Path]:
    if keep is not None:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="trtq-doctor-") as tmp:
        yield Path(tmp)
