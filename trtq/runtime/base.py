"""What every runtime backend shares: I/O specs, the :class:`Engine` interface, input checks.

A backend (ONNX Runtime in :mod:`trtq.runtime.onnxrt`, TensorRT in
:mod:`trtq.runtime.engine`) describes its tensors as :class:`IOSpec` and implements
:meth:`Engine._run`; everything a caller touches (``engine(**x)``, ``engine.infer(x)``,
``engine.inputs``) lives here, so code written against one backend runs on the other.

Input checks are split in two because serving calls are hot: the fast path compares
each array's rank, fixed dims and dtype against values precomputed at load time (well
under a microsecond per input); only when something differs does the slow path run,
which applies :mod:`trtq.calib.data.checks` - the same rules and one-line messages as
calibration data (safe casts such as uint8 -> float32 and float64 -> float32 are
done, lossy ones refused). That module pulls in ONNX, so it is imported there, on the
first mismatch, which keeps ``import trtq.runtime.base`` down to numpy.

Device arrays (objects with ``__cuda_array_interface__`` or a CUDA ``__dlpack__``)
are only accepted by backends that set :attr:`Engine.accepts_device_arrays`; they are
checked from their interface and handed to :meth:`Engine._run` unchanged (never cast).
"""

from __future__ import annotations

import abc
import logging
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from trtq.errors import DataError, UserError

if TYPE_CHECKING:  # trtq.graph.load imports onnx; only the slow path and the CLI need it
    from trtq.graph.load import TensorSpec

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
#: An optimization profile: the (min, opt, max) shapes an input accepts.
Profile = tuple[Shape, Shape, Shape]

#: DLPack device types that are host memory (kDLCPU, kDLCUDAHost, kDLCUDAManaged).
_HOST_DLPACK_DEVICES = frozenset({1, 3, 13})


@dataclass(frozen=True)
class IOSpec:
    """One input or output of an engine.

    ``shape`` has -1 where a dimension is dynamic. ``profile`` is the (min, opt, max)
    shapes a TensorRT engine was built for (None where any size is accepted, as in ONNX
    Runtime). ``dim_names`` keeps the model's names of dynamic dims where it has them
    (ONNX ``dim_param``), only so that error messages read ``batchx1x28x28``.
    """

    name: str
    dtype: np.dtype
    shape: Shape
    profile: Profile | None = None
    dim_names: tuple[str | None, ...] | None = None

    @property
    def is_static(self) -> bool:
        return all(d >= 0 for d in self.shape)

    @property
    def dynamic_axes(self) -> list[int]:
        return [axis for axis, d in enumerate(self.shape) if d < 0]

    def shape_str(self) -> str:
        """``batchx1x28x28``: dynamic dims by name, ``?`` where unnamed; ``scalar`` for rank 0."""
        return format_dims(self.symbolic_shape()) if self.shape else "scalar"

    def symbolic_shape(self) -> tuple[int | str, ...]:
        """The shape with each dynamic dim as its name, or ``"?"`` where it has none."""
        names = self.dim_names or (None,) * len(self.shape)
        return tuple(d if d >= 0 else (names[i] or "?") for i, d in enumerate(self.shape))

    def to_tensor_spec(self) -> TensorSpec:
        """As :class:`trtq.graph.load.TensorSpec`, the form :mod:`trtq.calib.data` checks."""
        from trtq.graph.load import TensorSpec

        return TensorSpec(self.name, np.dtype(self.dtype), self.symbolic_shape())

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "dtype": str(np.dtype(self.dtype)),
            "shape": list(self.symbolic_shape()),
        }
        if self.profile is not None:
            entry["profile"] = {
                k: list(s) for k, s in zip(("min", "opt", "max"), self.profile, strict=True)
            }
        return entry


def format_dims(shape: Iterable[int | str]) -> str:
    """``(1, 3, 224, 224)`` -> ``1x3x224x224`` (trtexec's syntax)."""
    return "x".join(str(d) for d in shape) or "scalar"


class Engine(abc.ABC):
    """A loaded model that runs batches: ``engine(**inputs)`` or ``engine.infer(inputs)``.

    Both return ``{output_name: numpy array}`` for every output, in ``outputs`` order.
    Inputs are checked against ``inputs`` (names, ranks, fixed dims, profile bounds,
    dtypes) before the backend sees them, with one-line :class:`~trtq.errors.DataError`
    messages. ``infer`` takes any mapping, so input names that are not Python
    identifiers (``"input:0"``) work there.

    Calls are thread-safe when the backend's ``_run`` is (both shipped backends are):
    the checks keep no per-call state. Use an engine as a context manager, or call
    :meth:`close`, to free what it holds before the garbage collector would.

    Writing a backend: subclass, build ``IOSpec`` lists, call
    ``super().__init__(path, inputs, outputs)`` and implement :meth:`_run`, which gets
    checked feeds (numpy arrays of the exact dtypes, or device arrays if
    :attr:`accepts_device_arrays`) and returns outputs by name. Optionally override
    :meth:`bench_breakdown` and :meth:`info`.
    """

    #: Short backend name for reports ("onnxruntime", "tensorrt").
    backend: ClassVar[str] = "base"
    #: Whether inputs may be CUDA device arrays (TensorRT) or must be host arrays.
    accepts_device_arrays: ClassVar[bool] = False

    def __init__(self, path: str | Path, inputs: Sequence[IOSpec], outputs: Sequence[IOSpec]):
        self.path = Path(path)
        self.inputs: list[IOSpec] = list(inputs)
        self.outputs: list[IOSpec] = list(outputs)
        self.input_names: list[str] = [spec.name for spec in self.inputs]
        self.output_names: list[str] = [spec.name for spec in self.outputs]
        self._check = InputChecker(
            self.inputs, self.path.name, device_arrays=self.accepts_device_arrays
        )

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run one batch: ``{input_name: array}`` -> ``{output_name: ndarray}``."""
        return self._run(self._check(inputs))

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        return self._run(self._check(inputs))

    def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The feeds :meth:`infer` would pass to the backend (checked and cast), or the error."""
        return self._check(inputs)

    @abc.abstractmethod
    def _run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run checked feeds; return every output by name."""

    def info(self) -> dict[str, Any]:
        """What ran the model, for reports: backend name, path, and backend details."""
        return {"backend": self.backend, "path": str(self.path)}

    def bench_breakdown(self, feeds: Mapping[str, Any], iterations: int) -> dict[str, float] | None:
        """Mean milliseconds per phase of one call (``h2d``, ``compute``, ``d2h``...).

        ``trtq bench`` prints this when a backend can time the phases apart (TensorRT,
        with CUDA events); None, the default, means it cannot and nothing is printed.
        """
        return None

    def close(self) -> None:  # noqa: B027 (optional hook: not every backend holds resources)
        """Free the backend's resources; the engine cannot run afterwards."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def tensor_specs(self) -> list[TensorSpec]:
        """The inputs as :func:`trtq.calib.data.open_batches` takes them."""
        return [spec.to_tensor_spec() for spec in self.inputs]

    def __repr__(self) -> str:
        ios = ", ".join(f"{s.name}: {s.shape_str()} {np.dtype(s.dtype)}" for s in self.inputs)
        return f"{type(self).__name__}({str(self.path)!r}, inputs=[{ios}])"


@dataclass(frozen=True)
class _Plan:
    """One input's checks, precomputed: the fast path only compares against these."""

    spec: IOSpec
    dtype: np.dtype
    rank: int
    #: ``shape -> the fixed dims' sizes``, compared against ``sizes`` (None: nothing fixed).
    pick: Callable[[Shape], Any] | None
    sizes: Any
    bounds: tuple[Shape, Shape] | None


class InputChecker:
    """Checks ``{name: array}`` against the engine's inputs; returns the feeds to run.

    Its only state is a cache of dtype casts already found safe, so one checker serves any
    number of threads.
    """

    def __init__(self, inputs: Sequence[IOSpec], model: str, *, device_arrays: bool) -> None:
        self.inputs = list(inputs)
        self.model = model
        self.where = f"the arrays passed to {model}"
        self.device_arrays = device_arrays
        self._plans = [_plan(spec) for spec in self.inputs]
        self._count = len(self._plans)
        self._names = [spec.name for spec in self.inputs]
        self._castable: set[tuple[str, np.dtype]] = set()

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        feeds: dict[str, Any] = {}
        for plan in self._plans:
            name = plan.spec.name
            try:
                value = inputs[name]
            except KeyError:
                raise self._missing(inputs) from None
            if type(value) is not np.ndarray:
                value = self._convert(plan, value)
                if type(value) is not np.ndarray:  # a device array, checked and kept as is
                    feeds[name] = value
                    continue
            shape = value.shape
            if len(shape) != plan.rank or (
                plan.pick is not None and plan.pick(shape) != plan.sizes
            ):
                self._bad_shape(plan, shape)
            if plan.bounds is not None:
                self._check_bounds(plan, shape)
            if value.dtype != plan.dtype:
                value = self._cast(plan, value)
            feeds[name] = value
        if len(inputs) != self._count:
            raise self._extra(inputs)
        return feeds

    # --- slow path: conversions and error messages ---------------------------------------

    def _convert(self, plan: _Plan, value: Any) -> Any:
        """A host array from anything numpy or DLPack reads; device arrays checked, kept."""
        name = plan.spec.name
        interface = getattr(value, "__cuda_array_interface__", None)
        if interface is not None:
            shape, dtype = tuple(interface["shape"]), np.dtype(interface["typestr"])
            return self._device_array(plan, value, shape, dtype)
        device = getattr(value, "__dlpack_device__", None)
        if device is not None and not hasattr(value, "__array__"):
            if int(device()[0]) not in _HOST_DLPACK_DEVICES:
                return self._device_array(plan, value, tuple(getattr(value, "shape", ())), None)
            try:
                return np.from_dlpack(value)
            except (TypeError, BufferError, RuntimeError) as exc:
                raise DataError(
                    f"input '{name}': cannot read the {type(value).__name__} passed to "
                    f"{self.model} through DLPack ({exc})",
                    "pass a numpy array",
                ) from exc
        try:
            return np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(
                f"input '{name}': cannot turn the {type(value).__name__} passed to "
                f"{self.model} into an array ({' '.join(str(exc).split())})",
                "pass a numpy array (copy device tensors to the host first)",
            ) from exc

    def _device_array(self, plan: _Plan, value: Any, shape: Shape, dtype: np.dtype | None) -> Any:
        name = plan.spec.name
        if not self.device_arrays:
            raise UserError(
                f"input '{name}' is a device array ({type(value).__name__}), but {self.model} "
                "runs on a backend that takes host arrays",
                "copy it to the host first (numpy), or run a TensorRT engine, which takes "
                "CUDA arrays as they are",
            )
        if len(shape) != plan.rank or (plan.pick is not None and plan.pick(shape) != plan.sizes):
            self._bad_shape(plan, shape)
        if plan.bounds is not None:
            self._check_bounds(plan, shape)
        if dtype is not None and dtype != plan.dtype:
            raise DataError(
                f"input '{name}': expected dtype {plan.dtype}, got a {dtype} device array in "
                f"{self.where}",
                f"cast it to {plan.dtype} on the device (trtq only casts host arrays)",
            )
        return value

    def _bad_shape(self, plan: _Plan, shape: Shape) -> None:
        from trtq.calib.data.checks import check_shapes
        from trtq.calib.data.messages import dims

        spec = plan.spec.to_tensor_spec()
        check_shapes({spec.name: tuple(shape)}, [spec], self.where)
        raise DataError(  # check_shapes applies the same rule, so this is a fallback only
            f"input '{spec.name}': expected shape {plan.spec.shape_str()}, got {dims(shape)} "
            f"in {self.where}",
            "reshape the data to the model input's shape",
        )

    def _check_bounds(self, plan: _Plan, shape: Shape) -> None:
        low, high = plan.bounds  # type: ignore[misc]
        if all(lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True)):
            return
        raise DataError(
            f"input '{plan.spec.name}': shape {format_dims(shape)} is outside the engine's "
            f"profile (min {format_dims(low)}, max {format_dims(high)}) in {self.where}",
            "feed shapes within the profile, or rebuild the engine with wider "
            "--min-shapes/--max-shapes",
        )

    def _cast(self, plan: _Plan, value: np.ndarray) -> np.ndarray:
        key = (plan.spec.name, value.dtype)
        if key not in self._castable:  # checked once per input and dtype
            from trtq.calib.data.checks import check_dtype

            check_dtype(plan.spec.to_tensor_spec(), value.dtype, self.where)
            self._castable.add(key)  # a set add is atomic: no lock needed across threads
        # float64 beyond float32's range becomes Inf, as in calibration data; not an error here.
        with np.errstate(over="ignore"):
            return value.astype(plan.dtype)

    def _missing(self, inputs: Mapping[str, Any]) -> DataError:
        missing = [spec.name for spec in self.inputs if spec.name not in inputs]
        given = ", ".join(f"'{key}'" for key in inputs) or "none"
        return DataError(
            f"no array for input {_quoted(missing)} of {self.model} (given: {given})",
            f"pass one array per input, keyed by name: {_quoted(self._names)}",
        )

    def _extra(self, inputs: Mapping[str, Any]) -> DataError:
        names = {spec.name for spec in self.inputs}
        unknown = [key for key in inputs if key not in names]
        return DataError(
            f"{_quoted(unknown)} {'is not an input' if len(unknown) == 1 else 'are not inputs'} "
            f"of {self.model}",
            f"its inputs are: {_quoted(spec.name for spec in self.inputs)}",
        )


def _plan(spec: IOSpec) -> _Plan:
    fixed = [(axis, size) for axis, size in enumerate(spec.shape) if size >= 0]
    pick = operator.itemgetter(*(axis for axis, _ in fixed)) if fixed else None
    # itemgetter of one axis returns the item, of several a tuple: compare like with like.
    sizes = (fixed[0][1] if len(fixed) == 1 else tuple(s for _, s in fixed)) if fixed else None
    bounds = None
    if spec.profile is not None:
        low, _, high = spec.profile
        bounds = (tuple(low), tuple(high))
    return _Plan(spec, np.dtype(spec.dtype), len(spec.shape), pick, sizes, bounds)


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


# --- shapes for synthetic inputs (trtq bench) ----------------------------------------------


def parse_shapes(text: str | Iterable[str] | None) -> dict[str, Shape]:
    """trtexec's shape syntax, ``"x:1x3x224x224,mask:1x128"`` -> ``{name: shape}``.

    The parser is :func:`trtq.trt.shapes.parse_shapes` (``trtq build`` takes the same
    flags); it is re-exported here so runtime code does not reach into trtq.trt.
    """
    from trtq.trt.shapes import parse_shapes as parse

    return parse(text)


def input_shapes(inputs: Sequence[IOSpec], given: Mapping[str, Shape]) -> dict[str, Shape]:
    """A concrete shape per input: ``given``, else the static shape, else the profile's opt.

    Raises a one-line error naming every input that has dynamic dims and none of these.
    """
    names = {spec.name for spec in inputs}
    unknown = [name for name in given if name not in names]
    if unknown:
        raise UserError(
            f"shapes given for {_quoted(unknown)}, which the model has no input called",
            f"its inputs are: {_quoted(spec.name for spec in inputs)}",
        )
    shapes: dict[str, Shape] = {}
    unresolved: list[IOSpec] = []
    for spec in inputs:
        if spec.name in given:
            shapes[spec.name] = tuple(given[spec.name])
        elif spec.is_static:
            shapes[spec.name] = tuple(spec.shape)
        elif spec.profile is not None:
            shapes[spec.name] = tuple(spec.profile[1])
        else:
            unresolved.append(spec)
    if unresolved:
        listed = ", ".join(f"{spec.name} ({spec.shape_str()})" for spec in unresolved)
        example = ",".join(
            f"{spec.name}:{format_dims(d if d >= 0 else 1 for d in spec.shape)}"
            for spec in unresolved
        )
        raise UserError(
            f"input(s) with dynamic dimensions need shapes: {listed}",
            f"pass e.g. --shapes {example}, or --data DATA",
        )
    return shapes


def random_inputs(
    inputs: Sequence[IOSpec], shapes: Mapping[str, Shape], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random arrays of the inputs' dtypes: floats in [0, 1), integers 0 or 1, random bools.

    Small non-negative integers are what index-like inputs (token ids, lengths) accept
    whatever the vocabulary, the range polygraphy's default data loader uses too.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        dtype, shape = np.dtype(spec.dtype), shapes[spec.name]
        if dtype.kind == "f":
            arrays[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype.kind == "b":
            arrays[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif dtype.kind in "iu":
            arrays[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            raise UserError(
                f"input '{spec.name}' has dtype {dtype}, for which trtq makes no random data",
                "pass --data DATA",
            )
    return arrays


def default_batch_size(inputs: Sequence[IOSpec], fallback: int) -> int | None:
    """A batch size that fits every profile's dynamic batch dim (None: no profile limits it).

    None too where an input's dim 0 is fixed: that size decides, or, for a sequence next to
    its fixed-size state, the inputs share no batch dim (each file is one call).
    """
    if any(spec.shape and spec.shape[0] >= 0 for spec in inputs):
        return None
    limits = [
        spec.profile[2][0]
        for spec in inputs
        if spec.profile is not None and spec.shape and spec.shape[0] < 0
    ]
    return min([fallback, *limits]) if limits else None


def count_samples(feeds: Mapping[str, Any]) -> int:
    """Samples in a batch: the first input's leading dim (1 for a scalar input)."""
    for value in feeds.values():
        shape = getattr(value, "shape", ())
        return int(shape[0]) if len(shape) else 1
    return 0
