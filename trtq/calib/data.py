"""Calibration and evaluation data: batches of model inputs from files, images or a script.

Every source becomes a :class:`BatchSource`, an iterable of ``{input_name: ndarray}``
batches that fit the model (names, ranks, fixed dims and dtypes checked). It can be
iterated again, and yields the same batches each time, because calibration makes
several passes over the same data.

Accepted sources (see :func:`open_batches`):

* a ``.npz`` file keyed by input name, or a ``.npy`` file for a single-input model;
* a folder of ``.npz``/``.npy`` files, each holding one sample or many;
* a folder of images, decoded with Pillow and preprocessed by :class:`ImagePreprocess`;
* a ``.py`` data loader script with ``load_data()``, polygraphy's convention.

Files are checked from their headers when the source is opened, so a bad file is
reported before the model runs, and read one at a time while iterating, so a large
folder never sits in memory at once. Samples are regrouped into batches of the
requested size; a batch ends early where the per-sample shape changes (models with
dynamic dims), so stacking never fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import math
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from trtq.errors import DataError, require
from trtq.graph.load import Dim, TensorSpec

log = logging.getLogger(__name__)

#: One batch of model inputs, keyed by input name.
Batch = dict[str, np.ndarray]
Layout = Literal["NCHW", "NHWC"]
Color = Literal["RGB", "BGR", "GRAY"]

ARRAY_SUFFIXES = (".npz", ".npy")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: Batch size used when the model's batch dim is dynamic and none is asked for.
DEFAULT_BATCH_SIZE = 8
ACCEPTED_SOURCES = (
    "a .npz file keyed by input name, a .npy file, a folder of .npz/.npy files, "
    f"a folder of images ({' '.join(IMAGE_SUFFIXES)}) or a .py script with load_data()"
)


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image becomes model input: ``(pixel * scale - mean) / std``, in the model's layout.

    ``resize`` is (height, width), the order of the spatial dims in the model's NCHW or
    NHWC shape, so ``--resize 32x100`` reads like the input shape ``Nx3x32x100``. Images
    are resized bilinearly. Without ``resize`` they are resized to the model's fixed
    spatial dims; where only one of the two is fixed (text lines of fixed height), the
    other follows the image's aspect ratio; where neither is, images keep their size and
    images of different sizes end up in separate batches.

    ``mean`` and ``std`` hold one value for every channel or one per channel, in the order
    the model sees the channels (B, G, R for ``color="BGR"``). ``scale`` is applied first,
    so the default 1/255 maps pixels to [0, 1] and ImageNet statistics apply as published.
    ``layout`` and ``color`` default to what the model input implies: 1 or 3 channels at
    dim 1 means NCHW, at the last dim NHWC; one channel means GRAY, three RGB.
    """

    resize: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    layout: Layout | None = None
    color: Color | None = None

    def __post_init__(self) -> None:
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise DataError(
                f"image resize {self.resize} is not a (height, width) pair of positive sizes",
                "give it like --resize 224x224",
            )
        if not self.mean or not self.std:
            raise DataError("image mean and std need at least one value", "give one per channel")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std, self.scale)):
            raise DataError("image mean, std and scale must be finite numbers", "fix the values")
        if 0 in self.std:
            raise DataError(f"image std {self.std} has a zero", "give every channel a non-zero std")
        _check_choice("layout", self.layout, ("NCHW", "NHWC"))
        _check_choice("color", self.color, ("RGB", "BGR", "GRAY"))

    @classmethod
    def parse(
        cls,
        resize: str | None = None,
        mean: str | None = None,
        std: str | None = None,
        scale: str | None = None,
        layout: str | None = None,
        color: str | None = None,
    ) -> ImagePreprocess | None:
        """Build from command-line text: ``"224x224"``, ``"0.485,0.456,0.406"``, ``"1/255"``.

        Returns None when no option is given, so a CLI can pass the result straight to
        :func:`open_batches`, which refuses image options for data that is not images.
        """
        given = {
            "resize": None if resize is None else _parse_resize(resize),
            "mean": None if mean is None else _parse_numbers("--mean", mean),
            "std": None if std is None else _parse_numbers("--std", std),
            "scale": None if scale is None else _parse_scale(scale),
            "layout": None if layout is None else layout.strip().upper(),
            "color": None if color is None else color.strip().upper(),
        }
        options = {name: value for name, value in given.items() if value is not None}
        return cls(**options) if options else None


class BatchSource:
    """Batches of model inputs that can be iterated any number of times.

    Each iteration re-reads the source from the start and yields the same batches in the
    same order (for a loader script: whatever its ``load_data()`` yields on each call), so
    calibration can make one pass to find ranges and another to fill histograms.
    ``num_batches`` and ``num_samples`` are known for files and images (progress bars,
    sharding) and None for loader scripts, which are only run when iterated.
    """

    def __init__(
        self,
        batches: Callable[[], Iterator[Batch]],
        description: str,
        *,
        num_batches: int | None,
        num_samples: int | None,
    ) -> None:
        self._batches = batches
        self.description = description
        self.num_batches = num_batches
        self.num_samples = num_samples

    def __iter__(self) -> Iterator[Batch]:
        return self._batches()

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"the number of batches is not known in advance: {self.description}")
        return self.num_batches

    def __repr__(self) -> str:
        return f"BatchSource({self.description!r})"


def open_batches(
    source: str | Path,
    inputs: Sequence[TensorSpec],
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    preprocess: ImagePreprocess | None = None,
    check_finite: bool = True,
) -> BatchSource:
    """Validated, re-iterable batches for a model with ``inputs``, read from ``source``.

    The source kind is told from the path: a ``.npz`` or ``.npy`` file, a folder of them,
    a folder of images, or a ``.py`` loader script (see the module docstring). Samples
    from files and images are regrouped into batches of ``batch_size``, which defaults to
    the model's fixed batch dim, or :data:`DEFAULT_BATCH_SIZE` when that is dynamic. A
    last batch that does not fill a fixed batch dim is dropped with a warning. Batches from
    a loader script are used as they come and only checked.

    ``limit`` caps the number of samples; files past it are never opened. ``preprocess``
    applies to image folders only (defaults: see :class:`ImagePreprocess`). With
    ``check_finite``, a NaN or Inf in float data is an error, since it would poison the
    calibration ranges. Every problem with the data raises a one-line :class:`DataError`.
    """
    path = Path(source)
    inputs = list(inputs)
    _check_request(inputs, batch_size, limit)
    if not path.exists():
        raise DataError(f"data not found: {path}", f"pass {ACCEPTED_SOURCES}")
    if path.is_file() and path.suffix.lower() == ".py":
        _refuse_preprocess(preprocess, path)
        if batch_size is not None:
            log.warning("batch size %d ignored: %s yields its own batches", batch_size, path)
        return _script_source(path, inputs, limit, check_finite)
    size, keep_partial = _batch_rule(inputs, batch_size)
    pieces, unit = _pieces(path, inputs, preprocess)
    taken, slices = _take(pieces, limit)
    plan = _plan_batches(taken, slices, size, keep_partial)
    if not plan:
        raise _no_batch(path, sum(s.stop - s.start for s in slices), size)
    num_samples = sum(_count(batch) for batch in plan)
    plural = "batch" if len(plan) == 1 else "batches"
    return BatchSource(
        lambda: _read_batches(taken, plan, inputs, check_finite),
        f"{num_samples} {unit} in {len(plan)} {plural} from {path}",
        num_batches=len(plan),
        num_samples=num_samples,
    )


def check_batch(
    batch: Mapping[str, Any],
    inputs: Sequence[TensorSpec],
    where: str,
    *,
    check_finite: bool = True,
) -> Batch:
    """Check one ready-made batch against the model inputs; return it cast to their dtypes.

    Loader-script batches, and any other batch fed to the model, meet the same checks as
    re-batched files: every input present, ranks and fixed dims equal, dynamic dims of the
    same name equal across inputs, dtypes castable without loss (float64 to float32 too),
    and, with ``check_finite``, no NaN or Inf. ``where`` names the batch in error
    messages. Keys that are not model inputs are dropped.
    """
    missing = [spec.name for spec in inputs if spec.name not in batch]
    if missing:
        raise DataError(
            f"{where} has no array for input {_quoted(missing)} "
            f"(keys given: {_quoted(batch) or 'none'})",
            "key each array by its model input name",
        )
    names = {spec.name for spec in inputs}
    ignored = [key for key in batch if key not in names]
    if ignored:
        log.debug("%s: ignoring %s (not model inputs)", where, _quoted(ignored))
    arrays = {spec.name: np.asarray(batch[spec.name]) for spec in inputs}
    _check_shapes({name: array.shape for name, array in arrays.items()}, inputs, where)
    for spec in inputs:
        _check_dtype(spec, arrays[spec.name].dtype, where)
    return _convert(arrays, inputs, where, check_finite)


# --------------------------------------------------------------------------- CLI text


def _parse_resize(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise DataError(f"--resize {text!r} is not HEIGHTxWIDTH", "write it like --resize 224x224")
    return int(match[1]), int(match[2])


def _parse_numbers(flag: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise DataError(
            f"{flag} {text!r} is not a comma-separated list of numbers",
            f"write it like {flag} 0.485,0.456,0.406",
        ) from None


def _parse_scale(text: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise DataError(
            f"--scale {text!r} is not a number or fraction", "write it like --scale 1/255"
        ) from None


def _check_choice(option: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise DataError(f"image {option} {value!r} is unknown", f"use one of {', '.join(choices)}")


# --------------------------------------------------------------------------- request


def _check_request(inputs: list[TensorSpec], batch_size: int | None, limit: int | None) -> None:
    if not inputs:
        raise DataError("the model has no inputs to feed", "check that the right model is given")
    for option, value in (("batch size", batch_size), ("limit", limit)):
        if value is not None and value < 1:
            raise DataError(
                f"{option} must be at least 1, got {value}", f"pass a positive {option}"
            )


def _batch_rule(inputs: list[TensorSpec], batch_size: int | None) -> tuple[int, bool]:
    """The batch size for re-batched files, and whether a short last batch can be kept."""
    scalars = [spec.name for spec in inputs if not spec.shape]
    if scalars:
        raise DataError(
            f"input {_quoted(scalars)} has no batch dim, so file data cannot be batched for it",
            "feed this model with a .py loader script",
        )
    fixed = {spec.shape[0]: spec for spec in inputs if isinstance(spec.shape[0], int)}
    if len(fixed) > 1:
        raise DataError(
            "the model's inputs have different fixed batch dims ("
            + ", ".join(f"{spec.name} {_dims(spec.shape)}" for spec in fixed.values())
            + ")",
            "feed this model with a .py loader script",
        )
    if not fixed:
        return batch_size or DEFAULT_BATCH_SIZE, True
    size, spec = next(iter(fixed.items()))
    if batch_size not in (None, size):
        raise DataError(
            f"batch size {batch_size} does not fit input '{spec.name}' of shape "
            f"{_dims(spec.shape)}, whose batch dim is fixed",
            f"pass batch size {size}, or export the model with a dynamic batch dim",
        )
    return size, False


def _refuse_preprocess(preprocess: ImagePreprocess | None, path: Path) -> None:
    if preprocess is not None:
        raise DataError(
            f"image preprocessing options were given, but {path} holds no images",
            "drop --resize/--mean/--std/--scale/--layout/--color for this data",
        )


def _no_batch(path: Path, samples: int, batch_size: int) -> DataError:
    if not samples:
        return DataError(f"{path} holds no samples", f"pass {ACCEPTED_SOURCES}")
    return DataError(
        f"{path} gives no complete batch: {samples} samples, but the model's batch dim is "
        f"fixed at {batch_size}",
        f"provide at least {batch_size} samples",
    )


# --------------------------------------------------------------------------- checks


def _check_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    inputs: Sequence[TensorSpec],
    where: str,
    *,
    batched: bool = True,
) -> None:
    """Ranks, fixed dims, and dynamic dims of one name having one size across inputs.

    Dim 0 is only checked when ``batched``: file data is regrouped along it.
    """
    first = 0 if batched else 1
    named: dict[str, tuple[int, str]] = {}
    for spec in inputs:
        shape = shapes[spec.name]
        pairs = list(zip(spec.shape[first:], shape[first:], strict=False))
        if len(shape) != len(spec.shape) or any(
            isinstance(want, int) and want != got for want, got in pairs
        ):
            raise DataError(
                f"input '{spec.name}': expected shape {_expected(spec)}, got {_dims(shape)} "
                f"in {where}",
                "reshape the data to the model input's shape",
            )
        for want, got in pairs:
            if isinstance(want, str) and want != "?":
                size, owner = named.setdefault(want, (got, spec.name))
                if size != got:
                    raise DataError(
                        f"dynamic dim '{want}' is {size} in input '{owner}' but {got} in "
                        f"input '{spec.name}' in {where}",
                        f"give every input the same size along '{want}'",
                    )


def _check_dtype(spec: TensorSpec, dtype: np.dtype, where: str) -> None:
    # float64 is numpy's default float and models take float32: narrowing it is what
    # users mean. Any other cast that can lose information is refused.
    if np.can_cast(dtype, spec.dtype, "safe") or (dtype == np.float64 and spec.dtype == np.float32):
        return
    raise DataError(
        f"input '{spec.name}': expected dtype {spec.dtype}, got {dtype} in {where}",
        f"save the data as {spec.dtype} (casting {dtype} to it could lose information)",
    )


def _convert(
    arrays: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec], where: str, check_finite: bool
) -> Batch:
    """Cast each array to its input's dtype (known to be safe) and look for NaN/Inf."""
    batch = {}
    # A float64 beyond float32's range becomes Inf, which the finite check reports.
    with np.errstate(over="ignore"):
        for spec in inputs:
            array = np.asarray(arrays[spec.name], dtype=spec.dtype)
            if check_finite:
                _check_finite(spec.name, array, where)
            batch[spec.name] = array
    return batch


def _check_finite(name: str, array: np.ndarray, where: str) -> None:
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nans = int(np.isnan(array).sum())
    infs = int(finite.size - finite.sum()) - nans
    found = " and ".join(f"{n} {kind}" for n, kind in ((nans, "NaN"), (infs, "Inf")) if n)
    raise DataError(
        f"input '{name}' has {found} values in {where}",
        "clean the data: drop or repair the samples that hold them",
    )


# --------------------------------------------------------------------------- pieces


class _Piece(Protocol):
    """Samples from one file: how many, of what shape, and how to read them."""

    @property
    def where(self) -> str: ...

    @property
    def count(self) -> int: ...

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...]: ...

    def read(self) -> Batch: ...


def _pieces(
    path: Path, inputs: list[TensorSpec], preprocess: ImagePreprocess | None
) -> tuple[Iterator[_Piece], str]:
    """The files of ``path`` as pieces, opened lazily, and what their samples are called."""
    if path.is_dir():
        arrays, images = _folder_files(path)
        if images:
            recipe = _image_recipe(inputs, preprocess or ImagePreprocess())
            return (_image_file(image, recipe) for image in images), "images"
    elif path.suffix.lower() in ARRAY_SUFFIXES:
        arrays = [path]
    else:
        raise DataError(f"unsupported data file: {path}", f"pass {ACCEPTED_SOURCES}")
    _refuse_preprocess(preprocess, path)
    return (_array_file(file, inputs) for file in arrays), "samples"


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The array files and the image files of a folder, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(
            f"data folder {folder} holds no files",
            f"put the data directly in it (subfolders are not read): {ACCEPTED_SOURCES}",
        )
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if arrays and images:
        raise DataError(
            f"data folder {folder} mixes array files ({arrays[0].name}) and images "
            f"({images[0].name})",
            "keep one kind of data per folder",
        )
    if not arrays and not images:
        raise DataError(
            f"data folder {folder} has no usable files (e.g. {files[0].name})",
            f"fill it with {ACCEPTED_SOURCES}",
        )
    skipped = len(files) - len(arrays) - len(images)
    if skipped:
        log.debug("%s: skipping %d files that are neither arrays nor images", folder, skipped)
    return arrays, images


@dataclass(frozen=True)
class _Slice:
    """Samples ``start:stop`` of the piece at index ``piece``."""

    piece: int
    start: int
    stop: int


def _take(pieces: Iterable[_Piece], limit: int | None) -> tuple[list[_Piece], list[_Slice]]:
    """The pieces that hold the first ``limit`` samples; files past the limit are never opened."""
    taken: list[_Piece] = []
    slices: list[_Slice] = []
    remaining = math.inf if limit is None else limit
    for piece in pieces:
        stop = min(piece.count, remaining)
        if stop:
            slices.append(_Slice(len(taken), 0, stop))
        taken.append(piece)
        remaining -= stop
        if remaining <= 0:
            break
    return taken, slices


def _plan_batches(
    pieces: Sequence[_Piece], slices: Iterable[_Slice], batch_size: int, keep_partial: bool
) -> list[list[_Slice]]:
    """Group samples into batches of ``batch_size``, ending a batch where the shape changes."""
    batches: list[list[_Slice]] = []
    dropped = 0
    for _, run in itertools.groupby(slices, key=lambda s: pieces[s.piece].sample_shapes):
        run_batches = list(_fill(run, batch_size))
        if _count(run_batches[-1]) < batch_size and not keep_partial:
            dropped += _count(run_batches.pop())
        batches.extend(run_batches)
    if dropped:
        log.warning(
            "dropping %d samples that do not fill a batch of %d (the model's batch dim is fixed)",
            dropped,
            batch_size,
        )
    return batches


def _fill(slices: Iterable[_Slice], batch_size: int) -> Iterator[list[_Slice]]:
    batch: list[_Slice] = []
    room = batch_size
    for piece_slice in slices:
        start = piece_slice.start
        while start < piece_slice.stop:
            take = min(room, piece_slice.stop - start)
            batch.append(_Slice(piece_slice.piece, start, start + take))
            start += take
            room -= take
            if room == 0:
                yield batch
                batch, room = [], batch_size
    if batch:
        yield batch


def _count(batch: list[_Slice]) -> int:
    return sum(s.stop - s.start for s in batch)


def _read_batches(
    pieces: Sequence[_Piece],
    plan: list[list[_Slice]],
    inputs: Sequence[TensorSpec],
    check_finite: bool,
) -> Iterator[Batch]:
    """Read the planned batches, holding one file's data at a time."""
    current, arrays = -1, {}
    for batch in plan:
        parts = []
        for part in batch:
            if part.piece != current:
                current, arrays = part.piece, pieces[part.piece].read()
            rows = {name: array[part.start : part.stop] for name, array in arrays.items()}
            where = _where(pieces[part.piece], part)
            parts.append(_convert(rows, inputs, where, check_finite))
        yield {spec.name: np.concatenate([p[spec.name] for p in parts]) for spec in inputs}


def _where(piece: _Piece, part: _Slice) -> str:
    if piece.count == 1:
        return piece.where
    return f"{piece.where} [samples {part.start}:{part.stop}]"


# --------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class _ArrayFile:
    """The arrays of one .npz/.npy file that feed the model, known from their headers.

    ``keys`` maps each input to its .npz member (None for a .npy file); ``shapes`` are
    the arrays' shapes with a leading batch dim of 1 added to one-sample arrays.
    """

    path: Path
    keys: dict[str, str | None]
    shapes: dict[str, tuple[int, ...]]

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def count(self) -> int:
        return next(iter(self.shapes.values()))[0]

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(shape[1:] for shape in self.shapes.values())

    def read(self) -> Batch:
        try:
            if self.path.suffix.lower() == ".npy":
                # Memory-mapped: only the rows of each batch are read.
                stored = {None: np.load(self.path, mmap_mode="r", allow_pickle=False)}
            else:
                with np.load(self.path, allow_pickle=False) as npz:
                    stored = {key: npz[key] for key in self.keys.values()}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise _unreadable(self.path, exc) from exc
        return {name: stored[key].reshape(self.shapes[name]) for name, key in self.keys.items()}


def _array_file(path: Path, inputs: list[TensorSpec]) -> _ArrayFile:
    stored = _stored_arrays(path)
    where = str(path)
    keys = _match_keys(stored, inputs, where)
    shapes = {spec.name: _batch_shape(spec, stored[keys[spec.name]][0], where) for spec in inputs}
    counts = {name: shape[0] for name, shape in shapes.items()}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise DataError(
            f"{where} holds different numbers of samples per input ({listing})",
            "give every input the same number of samples",
        )
    _check_shapes(shapes, inputs, where, batched=False)
    for spec in inputs:
        _check_dtype(spec, stored[keys[spec.name]][1], where)
    return _ArrayFile(path, keys, shapes)


def _stored_arrays(path: Path) -> dict[str | None, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array in a .npy (key None) or .npz file, from headers only."""
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as file:
                return {None: _read_header(file)}
        stored = {}
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as file:
                        stored[member.removesuffix(".npy")] = _read_header(file)
        return stored
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from exc


def _read_header(file) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(file)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return shape, dtype


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"cannot read {path} ({_one_line(exc)})",
        "re-save it with numpy.save / numpy.savez (no pickled objects)",
    )


def _match_keys(
    stored: Mapping[str | None, tuple[tuple[int, ...], np.dtype]],
    inputs: list[TensorSpec],
    where: str,
) -> dict[str, str | None]:
    """Which stored array feeds which input: by name, or the one array that fits."""
    names = [spec.name for spec in inputs]
    if None in stored:
        if len(inputs) > 1:
            raise DataError(
                f"{where} is a .npy file, which holds one array, but the model has "
                f"{len(inputs)} inputs ({_quoted(names)})",
                "save .npz files with one array per input name (numpy.savez)",
            )
        return {names[0]: None}
    if all(name in stored for name in names):
        keys = {name: name for name in names}
    elif len(inputs) == 1:
        keys = {names[0]: _only_candidate(stored, inputs[0], where)}
    else:
        missing = [name for name in names if name not in stored]
        raise DataError(
            f"{where} has no array for input {_quoted(missing)} (arrays found: {_listing(stored)})",
            "save one array per model input, keyed by the input name",
        )
    ignored = [key for key in stored if key not in keys.values()]
    if ignored:
        log.debug("%s: ignoring %s (not model inputs)", where, _quoted(ignored))
    return keys


def _only_candidate(
    stored: Mapping[str, tuple[tuple[int, ...], np.dtype]], spec: TensorSpec, where: str
) -> str:
    """The one array with the input's rank (many samples), else with one rank less (one)."""
    rank = len(spec.shape)
    for wanted in (rank, rank - 1):
        candidates = [key for key, (shape, _) in stored.items() if len(shape) == wanted]
        if len(candidates) == 1:
            log.debug("%s: feeding array '%s' to input '%s'", where, candidates[0], spec.name)
            return candidates[0]
        if candidates:
            which = f"several arrays of rank {wanted}"
            break
    else:
        which = f"no array of rank {rank} or {rank - 1}"
    raise DataError(
        f"{where} has no array named '{spec.name}' and {which} to use instead "
        f"(arrays found: {_listing(stored)})",
        f"save the data under the key '{spec.name}'",
    )


def _batch_shape(spec: TensorSpec, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """``shape`` with a batch dim: arrays one rank short of the input hold one sample."""
    if len(shape) == len(spec.shape):
        return shape
    if len(shape) == len(spec.shape) - 1:
        return (1, *shape)
    raise DataError(
        f"input '{spec.name}': expected shape {_expected(spec)} (or {_dims(spec.shape[1:])} "
        f"for one sample), got {_dims(shape)} in {where}",
        "save the data with the model input's rank (the batch dim may be left out)",
    )


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class _ImageRecipe:
    """:class:`ImagePreprocess` resolved against the model's image input."""

    spec: TensorSpec
    layout: Layout
    color: Color
    height: int | None  # None: follow the image
    width: int | None
    mean: np.ndarray
    std: np.ndarray
    scale: float

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the input made from an image of PIL size (width, height)."""
        width, height = image_size
        if self.height and self.width:
            return self.height, self.width
        if self.height:
            return self.height, max(1, round(width * self.height / height))
        if self.width:
            return max(1, round(height * self.width / width)), self.width
        return height, width

    def sample_shape(self, image_size: tuple[int, int]) -> tuple[int, ...]:
        height, width = self.output_size(image_size)
        channels = 1 if self.color == "GRAY" else 3
        return (channels, height, width) if self.layout == "NCHW" else (height, width, channels)

    def apply(self, image, where: str) -> np.ndarray:
        """One PIL image as a batch of one, in the model's layout and dtype."""
        pil_image = _pil_image()
        image = image.convert("L" if self.color == "GRAY" else "RGB")
        height, width = self.output_size(image.size)
        if image.size != (width, height):
            image = image.resize((width, height), pil_image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32).reshape(height, width, -1)
        if self.color == "BGR":
            pixels = pixels[..., ::-1]
        values = (pixels * np.float32(self.scale) - self.mean) / self.std
        if self.layout == "NCHW":
            values = values.transpose(2, 0, 1)
        return _pixels_as(values[np.newaxis], self.spec, where)


@dataclass(frozen=True)
class _ImageFile:
    path: Path
    recipe: _ImageRecipe
    size: tuple[int, int]  # PIL's (width, height)
    count: int = 1

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.recipe.sample_shape(self.size),)

    def read(self) -> Batch:
        try:
            with _pil_image().open(self.path) as image:
                return {self.recipe.spec.name: self.recipe.apply(image, self.where)}
        except OSError as exc:
            raise _undecodable(self.path, exc) from exc


def _pil_image():
    require("PIL", "images", "reading calibration images")
    from PIL import Image

    return Image


def _image_file(path: Path, recipe: _ImageRecipe) -> _ImageFile:
    """Read only the image's header: its size decides its batch."""
    try:
        with _pil_image().open(path) as image:
            return _ImageFile(path, recipe, image.size)
    except OSError as exc:
        raise _undecodable(path, exc) from exc


def _undecodable(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"cannot decode image {path} ({_one_line(exc)})", "re-save it or remove it from the folder"
    )


def _image_recipe(inputs: list[TensorSpec], preprocess: ImagePreprocess) -> _ImageRecipe:
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].dtype.kind not in "fiu":
        shapes = ", ".join(f"{spec.name} {spec.dtype} {_dims(spec.shape)}" for spec in inputs)
        raise DataError(
            f"a folder of images feeds one 4-D numeric input, but the model takes {shapes}",
            "pass .npz/.npy data or a .py loader script instead",
        )
    spec = inputs[0]
    layout = preprocess.layout or _infer_layout(spec)
    nchw = layout == "NCHW"
    channel_dim = spec.shape[1] if nchw else spec.shape[3]
    color = preprocess.color or ("GRAY" if channel_dim == 1 else "RGB")
    channels = 1 if color == "GRAY" else 3
    if isinstance(channel_dim, int) and channel_dim != channels:
        raise DataError(
            f"input '{spec.name}' of shape {_dims(spec.shape)} has {channel_dim} channels as "
            f"{layout}, but {color} images have {channels}",
            "pass the --layout and --color that fit the model",
        )
    height, width = spec.shape[2:] if nchw else spec.shape[1:3]
    if preprocess.resize is not None:
        _check_resize(spec, preprocess.resize, (height, width))
        height, width = preprocess.resize
    return _ImageRecipe(
        spec,
        layout,
        color,
        height if isinstance(height, int) else None,
        width if isinstance(width, int) else None,
        _per_channel("mean", preprocess.mean, color, channels),
        _per_channel("std", preprocess.std, color, channels),
        preprocess.scale,
    )


def _infer_layout(spec: TensorSpec) -> Layout:
    if spec.shape[1] in (1, 3):
        return "NCHW"
    if spec.shape[3] in (1, 3):
        return "NHWC"
    raise DataError(
        f"cannot tell whether input '{spec.name}' of shape {_dims(spec.shape)} is NCHW or NHWC",
        "pass --layout NCHW or --layout NHWC",
    )


def _check_resize(spec: TensorSpec, resize: tuple[int, int], spatial: Sequence[Dim]) -> None:
    if any(
        isinstance(want, int) and want != got for want, got in zip(spatial, resize, strict=True)
    ):
        raise DataError(
            f"--resize {resize[0]}x{resize[1]} does not fit input '{spec.name}' of shape "
            f"{_dims(spec.shape)}",
            "drop --resize to use the model's size",
        )


def _per_channel(option: str, values: tuple[float, ...], color: Color, channels: int) -> np.ndarray:
    if len(values) not in (1, channels):
        raise DataError(
            f"image {option} {values} has {len(values)} values, but {color} images have "
            f"{channels} channel(s)",
            f"give one {option} value or {channels}",
        )
    return np.asarray(values, dtype=np.float32)


def _pixels_as(values: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    """Cast preprocessed pixels to the input dtype; integer inputs take whole numbers only."""
    if spec.dtype.kind == "f":
        return values.astype(spec.dtype)
    info = np.iinfo(spec.dtype)
    if np.any(values != np.round(values)) or values.min() < info.min or values.max() > info.max:
        raise DataError(
            f"input '{spec.name}' is {spec.dtype}, but the preprocessed pixels of {where} are "
            f"not whole numbers in [{info.min}, {info.max}]",
            "pass --scale 1 and no --mean/--std to feed raw pixel values",
        )
    return values.astype(spec.dtype)


# --------------------------------------------------------------------------- loader scripts


def _script_source(
    path: Path, inputs: list[TensorSpec], limit: int | None, check_finite: bool
) -> BatchSource:
    load_data = _load_data_function(path)
    # The last batch may only be shortened to meet ``limit`` when every batch dim is dynamic.
    can_cut = all(spec.shape and not isinstance(spec.shape[0], int) for spec in inputs)
    return BatchSource(
        lambda: _script_batches(load_data, path, inputs, limit, check_finite, can_cut),
        f"batches from loader script {path}",
        num_batches=None,
        num_samples=None,
    )


def _load_data_function(path: Path) -> Callable[[], Iterable[Any]]:
    """Import the script (its own folder importable, like ``python script.py``)."""
    name = f"trtq_data_loader_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DataError(f"cannot load {path} as a Python module", "pass a .py loader script")
    module = importlib.util.module_from_spec(spec)
    # Registered so that dataclasses and pickling inside the script find their module.
    sys.modules[name] = module
    try:
        with _on_sys_path(path.parent):
            spec.loader.exec_module(module)
    except (ImportError, SyntaxError) as exc:
        raise DataError(
            f"cannot import loader script {path}: {_one_line(exc)}",
            f"fix the script; `python {path}` shows the full error",
        ) from exc
    load_data = getattr(module, "load_data", None)
    if not callable(load_data):
        raise DataError(
            f"loader script {path} defines no load_data() function",
            "define load_data() that yields dicts {input_name: numpy array}, as for polygraphy",
        )
    return load_data


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def _script_batches(
    load_data: Callable[[], Iterable[Any]],
    path: Path,
    inputs: list[TensorSpec],
    limit: int | None,
    check_finite: bool,
    can_cut: bool,
) -> Iterator[Batch]:
    remaining = math.inf if limit is None else limit
    for index, raw in enumerate(load_data()):
        where = f"batch {index} of {path}"
        if not isinstance(raw, Mapping):
            raise DataError(
                f"{where} is a {type(raw).__name__}, not a dict",
                "make load_data() yield dicts {input_name: numpy array}",
            )
        batch = check_batch(raw, inputs, where, check_finite=check_finite)
        rows = next((len(array) for array in batch.values() if array.ndim), 1)
        if rows > remaining:
            if not can_cut:
                log.info("stopping before %s: it would go past the limit of %s", where, limit)
                return
            batch = {name: array[: int(remaining)] for name, array in batch.items()}
            rows = int(remaining)
        yield batch
        remaining -= rows
        if remaining <= 0:
            return


# --------------------------------------------------------------------------- formatting


def _dims(shape: Sequence[Dim]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _expected(spec: TensorSpec) -> str:
    """The input's shape for a message: ``Nx3x224x224 (N dynamic)``."""
    dynamic = list(dict.fromkeys(d for d in spec.shape if isinstance(d, str)))
    return f"{_dims(spec.shape)} ({', '.join(dynamic)} dynamic)" if dynamic else _dims(spec.shape)


def _quoted(names: Iterable[Any]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _listing(stored: Mapping[Any, tuple[tuple[int, ...], np.dtype]]) -> str:
    return ", ".join(f"{key} {_dims(shape)}" for key, (shape, _) in stored.items()) or "none"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
