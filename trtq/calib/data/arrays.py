""".npz and .npy files: opened from their headers, arrays matched to model inputs."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtq.calib.data.checks import check_dtype, check_shapes
from trtq.calib.data.formats import Batch
from trtq.calib.data.messages import dims, expected_shape, one_line, quoted
from trtq.errors import DataError
from trtq.graph.load import TensorSpec

log = logging.getLogger(__name__)


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


def array_file(path: Path, inputs: list[TensorSpec]) -> _ArrayFile:
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
    check_shapes(shapes, inputs, where, batched=False)
    for spec in inputs:
        check_dtype(spec, stored[keys[spec.name]][1], where)
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
        f"cannot read {path} ({one_line(exc)})",
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
                f"{len(inputs)} inputs ({quoted(names)})",
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
            f"{where} has no array for input {quoted(missing)} (arrays found: {_listing(stored)})",
            "save one array per model input, keyed by the input name",
        )
    ignored = [key for key in stored if key not in keys.values()]
    if ignored:
        log.debug("%s: ignoring %s (not model inputs)", where, quoted(ignored))
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
        f"input '{spec.name}': expected shape {expected_shape(spec)} (or {dims(spec.shape[1:])} "
        f"for one sample), got {dims(shape)} in {where}",
        "save the data with the model input's rank (the batch dim may be left out)",
    )


def _listing(stored: Mapping[Any, tuple[tuple[int, ...], np.dtype]]) -> str:
    return ", ".join(f"{key} {dims(shape)}" for key, (shape, _) in stored.items()) or "none"
