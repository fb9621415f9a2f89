"""Regrouping samples from files into batches of the requested size.

Each file is a :class:`Piece`: a number of samples of known shapes, read on demand.
Batches are planned as lists of :class:`Slice` (sample ranges of pieces) before any file
is read, then read one file at a time.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from trtq.calib.data.checks import convert
from trtq.calib.data.formats import Batch
from trtq.calib.data.messages import dims
from trtq.errors import DataError
from trtq.graph.load import TensorSpec

log = logging.getLogger(__name__)

#: Batch size used when the model's batch dim is dynamic and none is asked for.
DEFAULT_BATCH_SIZE = 8


def batch_rule(inputs: list[TensorSpec], batch_size: int | None) -> tuple[int, bool]:
    """The batch size for re-batched files, and whether a short last batch can be kept.

    For a model whose inputs may share a batch axis (:func:`.feeds.no_batch_axis` is None):
    dim 0 is fixed at one size, or nowhere.
    """
    fixed = {spec.shape[0]: spec for spec in inputs if isinstance(spec.shape[0], int)}
    if not fixed:
        return batch_size or DEFAULT_BATCH_SIZE, True
    size, spec = next(iter(fixed.items()))
    if batch_size not in (None, size):
        raise DataError(
            f"batch size {batch_size} does not fit input '{spec.name}' of shape "
            f"{dims(spec.shape)}, whose batch dim is fixed",
            f"pass batch size {size}, or export the model with a dynamic batch dim",
        )
    return size, False


class Piece(Protocol):
    """Samples from one file: how many, of what shape, and how to read them.

    A piece whose ``whole`` gives a reason is a whole feed (:mod:`.feeds`): one sample,
    read and passed on as it is, a batch of its own.
    """

    @property
    def where(self) -> str: ...

    @property
    def whole(self) -> str | None: ...

    @property
    def count(self) -> int: ...

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...]: ...

    def read(self) -> Batch: ...


@dataclass(frozen=True)
class Slice:
    """Samples ``start:stop`` of the piece at index ``piece``."""

    piece: int
    start: int
    stop: int


def take_samples(pieces: Iterable[Piece], limit: int | None) -> tuple[list[Piece], list[Slice]]:
    """The pieces that hold the first ``limit`` samples; files past the limit are never opened."""
    taken: list[Piece] = []
    slices: list[Slice] = []
    remaining = math.inf if limit is None else limit
    for piece in pieces:
        stop = min(piece.count, remaining)
        if stop:
            slices.append(Slice(len(taken), 0, stop))
        taken.append(piece)
        remaining -= stop
        if remaining <= 0:
            break
    return taken, slices


def plan_batches(
    pieces: Sequence[Piece], slices: Iterable[Slice], batch_size: int, keep_partial: bool
) -> list[list[Slice]]:
    """Group samples into batches of ``batch_size``, ending a batch where the shape changes."""
    batches: list[list[Slice]] = []
    dropped = 0
    for key, run in itertools.groupby(slices, key=lambda s: _batch_key(pieces[s.piece])):
        if key is None:
            batches.extend([piece_slice] for piece_slice in run)
            continue
        run_batches = list(_fill(run, batch_size))
        if count_samples(run_batches[-1]) < batch_size and not keep_partial:
            dropped += count_samples(run_batches.pop())
        batches.extend(run_batches)
    if dropped:
        log.warning(
            "dropping %d samples that do not fill a batch of %d (the model's batch dim is fixed)",
            dropped,
            batch_size,
        )
    return batches


def _batch_key(piece: Piece) -> tuple[tuple[int, ...], ...] | None:
    """Samples of one key may share a batch; None for a whole feed, which shares none."""
    return None if piece.whole else piece.sample_shapes


def _fill(slices: Iterable[Slice], batch_size: int) -> Iterator[list[Slice]]:
    batch: list[Slice] = []
    room = batch_size
    for piece_slice in slices:
        start = piece_slice.start
        while start < piece_slice.stop:
            take = min(room, piece_slice.stop - start)
            batch.append(Slice(piece_slice.piece, start, start + take))
            start += take
            room -= take
            if room == 0:
                yield batch
                batch, room = [], batch_size
    if batch:
        yield batch


def count_samples(batch: list[Slice]) -> int:
    return sum(s.stop - s.start for s in batch)


def read_batches(
    pieces: Sequence[Piece],
    plan: list[list[Slice]],
    inputs: Sequence[TensorSpec],
    check_finite: bool,
) -> Iterator[Batch]:
    """Read the planned batches, holding one file's data at a time."""
    current, arrays = -1, {}
    for batch in plan:
        piece = pieces[batch[0].piece]
        if piece.whole:
            yield convert(piece.read(), inputs, piece.where, check_finite)
            continue
        parts = []
        for part in batch:
            if part.piece != current:
                current, arrays = part.piece, pieces[part.piece].read()
            rows = {name: array[part.start : part.stop] for name, array in arrays.items()}
            where = _where(pieces[part.piece], part)
            parts.append(convert(rows, inputs, where, check_finite))
        yield {spec.name: np.concatenate([p[spec.name] for p in parts]) for spec in inputs}


def _where(piece: Piece, part: Slice) -> str:
    if piece.count == 1:
        return piece.where
    return f"{piece.where} [samples {part.start}:{part.stop}]"
