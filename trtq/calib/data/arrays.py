""".npz and .npy files: opened from their headers, arrays matched to model inputs.

A header is a claim about data not yet read, so it is checked against the file before
anything is planned or allocated: the bytes a ``10**9 x 784`` array needs must be there
(for an .npz member: within the size the zip declares for it, which in turn must be
within what its compression can produce from the stored bytes). Data is then read
lazily, only the samples asked for: .npy files are memory-mapped, .npz members are
decompressed as a stream up to the last row requested, so ``--limit 16`` reads 16
samples of a 6 GB member, and a pass over it holds one batch at a time.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from trtq.calib.data.checks import check_dtype, check_shapes
from trtq.calib.data.feeds import whole_feed
from trtq.calib.data.formats import Batch
from trtq.calib.data.messages import dims, expected_shape, one_line, quoted
from trtq.errors import DataError
from trtq.graph.load import TensorSpec

log = logging.getLogger(__name__)

#: Deflate's best case: 258 bytes from 2 bits (1032:1), plus room for a tiny stream.
_DEFLATE_MAX_RATIO = 1032
_DEFLATE_SLACK = 1024
#: What zipfile, numpy and zlib raise for a file that is not what it claims to be.
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)
_SKIP_CHUNK = 1 << 24


@dataclass(frozen=True)
class _Stored:
    """One array as its .npy header describes it; nothing of its data read yet."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    #: The .npz member holding it; None for a .npy file.
    member: str | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class _ArrayFile:
    """The arrays of one .npz/.npy file that feed the model, known from their headers.

    ``arrays`` maps each input to its stored array; ``shapes`` are the arrays' shapes
    with a leading batch dim of 1 added to one-sample arrays. ``whole`` says why the file
    is one model call, one sample, read as it is (:mod:`.feeds`); None when its arrays
    hold ``count`` samples along dim 0.
    """

    path: Path
    arrays: dict[str, _Stored]
    shapes: dict[str, tuple[int, ...]]
    whole: str | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def count(self) -> int:
        return 1 if self.whole else next(iter(self.shapes.values()))[0]

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        if self.whole:
            return tuple(self.shapes.values())
        return tuple(shape[1:] for shape in self.shapes.values())

    def read(self) -> Batch:
        """Each input's rows, read only when sliced (``rows[start:stop]``).

        A whole feed is read at once, as it is (its sizes were checked against the file).
        """
        if self.whole:
            return self._read_all()
        if self.path.suffix.lower() == ".npy":
            try:
                array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except _READ_ERRORS as exc:
                raise _unreadable(self.path, exc) from exc
            return {name: array.reshape(self.shapes[name]) for name in self.arrays}
        return {
            name: _MemberRows(self.path, stored, self.shapes[name])  # type: ignore[misc]
            for name, stored in self.arrays.items()
        }

    def _read_all(self) -> Batch:
        try:
            if self.path.suffix.lower() == ".npy":
                array = np.load(self.path, allow_pickle=False)
                return {name: array.reshape(self.shapes[name]) for name in self.arrays}
            with zipfile.ZipFile(self.path) as archive:
                return {
                    name: _read_member(archive, stored).reshape(self.shapes[name])
                    for name, stored in self.arrays.items()
                }
        except _READ_ERRORS as exc:
            raise _unreadable(self.path, exc) from exc


class _MemberRows:
    """The rows of one .npz member, decompressed in order as they are sliced.

    ``rows[a:b]`` reads the member's stream only up to row ``b``. Slices move forward, as
    batches do; a slice before the current row starts the stream again (each calibration
    pass reads its files from the start). A Fortran-ordered member has no contiguous
    rows and is read whole on first use (its size was checked against the file).
    """

    def __init__(self, path: Path, stored: _Stored, shape: tuple[int, ...]) -> None:
        self._path, self._stored, self._shape = path, stored, shape
        self._row_bytes = math.prod(shape[1:]) * stored.dtype.itemsize
        self._archive: zipfile.ZipFile | None = None
        self._stream: IO[bytes] | None = None
        self._next_row = 0
        self._whole: np.ndarray | None = None

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self._shape[0])
        stop = max(start, stop)
        try:
            if self._stored.fortran_order:
                return self._read_whole()[start:stop]
            if self._stream is None or start < self._next_row:
                self._open()
            self._skip((start - self._next_row) * self._row_bytes)
            data = self._read((stop - start) * self._row_bytes)
        except _READ_ERRORS as exc:
            raise _unreadable(self._path, exc) from exc
        self._next_row = stop
        return np.frombuffer(data, dtype=self._stored.dtype).reshape(stop - start, *self._shape[1:])

    def _open(self) -> None:
        self.close()
        self._archive = zipfile.ZipFile(self._path)
        self._stream = self._archive.open(f"{self._stored.member}.npy")
        _read_header(self._stream)
        self._next_row = 0

    def _read(self, size: int) -> bytes:
        assert self._stream is not None
        data = self._stream.read(size)
        if len(data) < size:
            raise EOFError(f"array '{self._stored.member}' ends early")
        return data

    def _skip(self, size: int) -> None:
        while size > 0:
            size -= len(self._read(min(size, _SKIP_CHUNK)))

    def _read_whole(self) -> np.ndarray:
        if self._whole is None:
            with zipfile.ZipFile(self._path) as archive:
                self._whole = _read_member(archive, self._stored).reshape(self._shape)
        return self._whole

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._archive is not None:
            self._archive.close()
        self._stream = self._archive = None

    def __del__(self) -> None:
        self.close()


def _read_member(archive: zipfile.ZipFile, stored: _Stored) -> np.ndarray:
    """One .npz member, whole."""
    with archive.open(f"{stored.member}.npy") as stream:
        return np.lib.format.read_array(stream, allow_pickle=False)


def array_file(path: Path, inputs: list[TensorSpec]) -> _ArrayFile:
    stored = _stored_arrays(path)
    where = str(path)
    keys = _match_keys(stored, inputs, where)
    arrays = {spec.name: stored[keys[spec.name]] for spec in inputs}
    shapes = {spec.name: _batch_shape(spec, arrays[spec.name].shape, where) for spec in inputs}
    whole = whole_feed(shapes, inputs)
    counts = {name: shape[0] for name, shape in shapes.items() if shape}
    if whole is None and len(set(counts.values())) > 1:  # the model names one batch dim
        listing = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise DataError(
            f"{where} holds different numbers of samples per input ({listing})",
            "give every input the same number of samples",
        )
    # A whole feed is one call as it is: its dim 0 must fit the model too.
    check_shapes(shapes, inputs, where, batched=whole is not None)
    for spec in inputs:
        check_dtype(spec, arrays[spec.name].dtype, where)
    if whole is None:
        _check_samples_hold_data(shapes, where)
    return _ArrayFile(path, arrays, shapes, whole)


def _check_samples_hold_data(shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Samples of no bytes at all cost nothing to claim: 10**9 of them would be planned."""
    count = next(iter(shapes.values()))[0]
    if count > 1 and all(math.prod(shape[1:]) == 0 for shape in shapes.values()):
        listing = ", ".join(f"{name} {dims(shape)}" for name, shape in shapes.items())
        raise DataError(
            f"{where} holds {count} samples with no values ({listing})",
            "save samples that hold data",
        )


def _stored_arrays(path: Path) -> dict[str | None, _Stored]:
    """Every array in a .npy (key None) or .npz file, from headers checked against the file."""
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as file:
                stored = _read_header(file)
                _check_claim(stored, file.tell(), os.fstat(file.fileno()).st_size, str(path))
                return {None: stored}
        arrays = {}
        with path.open("rb") as raw, zipfile.ZipFile(raw) as archive:
            file_size = os.fstat(raw.fileno()).st_size
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename.removesuffix(".npy")
                where = f"{path} (array '{key}')"
                _check_member(info, file_size, where)
                with archive.open(info) as file:
                    header = _read_header(file)
                    stored = _Stored(header.shape, header.dtype, header.fortran_order, key)
                    _check_claim(stored, file.tell(), info.file_size, where)
                arrays[key] = stored
        return arrays
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def _read_header(file: IO[bytes]) -> _Stored:
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return _Stored(shape, dtype, fortran_order, None)


def _check_member(info: zipfile.ZipInfo, file_size: int, where: str) -> None:
    """The sizes a zip declares for a member are possible for the bytes it stores."""
    if info.flag_bits & 0x1:
        raise DataError(f"{where} is encrypted", "save it without a password (numpy.savez)")
    if info.compress_type == zipfile.ZIP_STORED:
        most = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        most = info.compress_size * _DEFLATE_MAX_RATIO + _DEFLATE_SLACK
    else:
        raise DataError(
            f"{where} is compressed with zip method {info.compress_type}, which numpy does "
            "not write",
            "re-save it with numpy.savez or numpy.savez_compressed",
        )
    if info.header_offset + info.compress_size > file_size:
        raise DataError(
            f"{where}: the zip declares {_size(info.compress_size)} of data, but the file is "
            f"{_size(file_size)}",
            "the file is truncated: copy or save it again",
        )
    if info.file_size > most:
        raise DataError(
            f"{where}: the zip declares {_size(info.file_size)} uncompressed from "
            f"{_size(info.compress_size)} stored, more than its compression can produce",
            "the file is corrupt or a zip bomb: re-save it with numpy.savez",
        )


def _check_claim(stored: _Stored, data_start: int, available: int, where: str) -> None:
    """The array the header describes fits in the bytes that follow it."""
    if stored.dtype.hasobject:
        return  # pickled objects: refused by the dtype check, never read
    held = max(available - data_start, 0)
    if stored.nbytes > held:
        raise DataError(
            f"{where}: the header claims a {dims(stored.shape)} {stored.dtype} array "
            f"({_size(stored.nbytes)}), but only {_size(held)} of data follow it",
            "the file is truncated or not what it says: save it again with numpy.save",
        )


def _size(count: int) -> str:
    """``123 bytes``, ``4.2 MB``, ``3.1 TB``."""
    if count < 1000:
        return f"{count} bytes"
    exponent = min(int(math.log10(count)) // 3, 5)
    return f"{count / 1000**exponent:.1f} {('kB', 'MB', 'GB', 'TB', 'PB')[exponent - 1]}"


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"cannot read {path} ({one_line(exc)})",
        "re-save it with numpy.save / numpy.savez (no pickled objects)",
    )


def _match_keys(
    stored: Mapping[str | None, _Stored],
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


def _only_candidate(stored: Mapping[str, _Stored], spec: TensorSpec, where: str) -> str:
    """The one array with the input's rank (many samples), else with one rank less (one)."""
    rank = len(spec.shape)
    for wanted in (rank, rank - 1):
        candidates = [key for key, array in stored.items() if len(array.shape) == wanted]
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


def _listing(stored: Mapping[Any, _Stored]) -> str:
    return ", ".join(f"{key} {dims(array.shape)}" for key, array in stored.items()) or "none"
