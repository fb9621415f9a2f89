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
dynamic dims), so stacking never fails. A file whose inputs share no batch dim (a
sequence and its recurrent state) is a whole feed: one model call, passed as it is
(:mod:`.feeds`).

Where each stage lives: :mod:`.files` tells array files from images in a path;
:mod:`.arrays` and :mod:`.images` open them (:mod:`.images` also holds
:class:`ImagePreprocess`); :mod:`.batching` regroups their samples into batches;
:mod:`.checks` checks batches against the model inputs; :mod:`.script` runs loader
scripts; :mod:`.feeds` tells whole feeds from batches, here and for every consumer of
batches; :mod:`.formats` and :mod:`.messages` hold shared constants and message text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from trtq.calib.data.batching import (
    DEFAULT_BATCH_SIZE,
    Piece,
    batch_rule,
    count_samples,
    plan_batches,
    read_batches,
    take_samples,
)
from trtq.calib.data.checks import check_batch
from trtq.calib.data.files import file_pieces
from trtq.calib.data.formats import ACCEPTED_SOURCES, ARRAY_SUFFIXES, IMAGE_SUFFIXES, Batch
from trtq.calib.data.images import Color, ImagePreprocess, Layout, refuse_preprocess
from trtq.calib.data.script import script_batches
from trtq.errors import DataError
from trtq.graph.load import TensorSpec

__all__ = [
    "ACCEPTED_SOURCES",
    "ARRAY_SUFFIXES",
    "DEFAULT_BATCH_SIZE",
    "IMAGE_SUFFIXES",
    "Batch",
    "BatchSource",
    "Color",
    "DataRequest",
    "ImagePreprocess",
    "Layout",
    "check_batch",
    "open_batches",
]

log = logging.getLogger(__name__)


class BatchSource:
    """Batches of model inputs that can be iterated any number of times.

    Each iteration re-reads the source from the start and yields the same batches in the
    same order (for a loader script: whatever its ``load_data()`` yields on each call), so
    calibration can make one pass to find ranges and another to fill histograms.
    ``num_batches`` and ``num_samples`` are known for files and images (progress bars,
    sharding) and None for loader scripts, which are only run when iterated.

    Files and images can also be read in shards: :meth:`between` reads a run of batches
    and only the files they hold, ``file_starts`` are the batches that begin a file, and
    ``request`` opens the same batches in another process (a Ray worker).
    """

    def __init__(
        self,
        batches: Callable[[], Iterator[Batch]],
        description: str,
        *,
        num_batches: int | None,
        num_samples: int | None,
        request: DataRequest | None = None,
        between: Callable[[int, int], Iterator[Batch]] | None = None,
        file_starts: tuple[int, ...] = (),
    ) -> None:
        self._batches = batches
        self._between = between
        self.description = description
        self.num_batches = num_batches
        self.num_samples = num_samples
        self.request = request
        self.file_starts = file_starts

    def __iter__(self) -> Iterator[Batch]:
        return self._batches()

    def watched(self, batches: Callable[[], Iterator[Batch]]) -> BatchSource:
        """This source's batches as ``batches`` yields them, watched on the way (samples kept
        for a check); reading in shards, and the request, stay this source's."""
        return BatchSource(
            batches,
            self.description,
            num_batches=self.num_batches,
            num_samples=self.num_samples,
            request=self.request,
            between=self._between,
            file_starts=self.file_starts,
        )

    def between(self, start: int, stop: int) -> Iterator[Batch]:
        """Batches ``start`` to ``stop - 1`` of a pass, reading only the files they hold."""
        if self._between is None:
            raise TypeError(f"batches cannot be read in shards: {self.description}")
        return self._between(start, stop)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"the number of batches is not known in advance: {self.description}")
        return self.num_batches

    def __repr__(self) -> str:
        return f"BatchSource({self.description!r})"


@dataclass(frozen=True)
class DataRequest:
    """What :func:`open_batches` was asked for a data path: enough to open the same batches
    elsewhere. The path is absolute, so a process with another working directory (a Ray
    worker reading shared storage) finds the same files."""

    path: Path
    inputs: tuple[TensorSpec, ...]
    batch_size: int | None
    limit: int | None
    preprocess: ImagePreprocess | None
    check_finite: bool

    def open(self) -> BatchSource:
        return open_batches(
            self.path,
            self.inputs,
            batch_size=self.batch_size,
            limit=self.limit,
            preprocess=self.preprocess,
            check_finite=self.check_finite,
        )


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
    last batch that does not fill a fixed batch dim is dropped with a warning. A file whose
    inputs share no batch dim is one batch as it is, and one sample (:mod:`.feeds`): the
    batch size does not apply to it. Batches from a loader script are used as they come
    and only checked.

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
        refuse_preprocess(preprocess, path)
        if batch_size is not None:
            log.warning("batch size %d ignored: %s yields its own batches", batch_size, path)
        return BatchSource(
            script_batches(path, inputs, limit, check_finite),
            f"batches from loader script {path}",
            num_batches=None,
            num_samples=None,
        )
    pieces, unit = file_pieces(path, inputs, preprocess)
    taken, slices = take_samples(pieces, limit)
    whole = [taken[s.piece] for s in slices if taken[s.piece].whole]
    if whole:
        _log_whole_feeds(path, whole, len(slices), batch_size)
    if len(whole) == len(slices):  # nothing to batch: the batch size has no say
        size, keep_partial, unit = 1, True, "whole feeds"
    else:
        size, keep_partial = batch_rule(inputs, batch_size)
    plan = plan_batches(taken, slices, size, keep_partial)
    if not plan:
        raise _no_batch(path, sum(s.stop - s.start for s in slices), size)
    num_samples = sum(count_samples(batch) for batch in plan)
    plural = "batch" if len(plan) == 1 else "batches"
    request = DataRequest(
        path.absolute(), tuple(inputs), batch_size, limit, preprocess, check_finite
    )
    return BatchSource(
        lambda: read_batches(taken, plan, inputs, check_finite),
        f"{num_samples} {unit} in {len(plan)} {plural} from {path}",
        num_batches=len(plan),
        num_samples=num_samples,
        request=request,
        between=lambda start, stop: read_batches(taken, plan[start:stop], inputs, check_finite),
        file_starts=tuple(i for i, batch in enumerate(plan) if batch[0].start == 0),
    )


def _log_whole_feeds(path: Path, whole: list[Piece], files: int, batch_size: int | None) -> None:
    """One line: which files are whole feeds (see :mod:`.feeds`), and why the first is."""
    if files == 1:
        which = str(path)
    elif len(whole) == files:
        which = f"each of the {files} files of {path}"
    else:
        which = f"{len(whole)} of the {files} files of {path}"
    log.info(
        "taking %s as one model call, unsplit and unbatched%s (%s: %s)",
        which,
        f"; batch size {batch_size} does not apply" if batch_size else "",
        whole[0].where,
        whole[0].whole,
    )


def _check_request(inputs: list[TensorSpec], batch_size: int | None, limit: int | None) -> None:
    if not inputs:
        raise DataError("the model has no inputs to feed", "check that the right model is given")
    for option, value in (("batch size", batch_size), ("limit", limit)):
        if value is not None and value < 1:
            raise DataError(
                f"{option} must be at least 1, got {value}", f"pass a positive {option}"
            )


def _no_batch(path: Path, samples: int, batch_size: int) -> DataError:
    if not samples:
        return DataError(f"{path} holds no samples", f"pass {ACCEPTED_SOURCES}")
    return DataError(
        f"{path} gives no complete batch: {samples} samples, but the model's batch dim is "
        f"fixed at {batch_size}",
        f"provide at least {batch_size} samples",
    )
