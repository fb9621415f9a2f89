"""The data a node's harm is measured on: held out from calibration, or given apart.

Ranges fitted to a batch flatter the model on that batch, so the evaluation samples
never set a range. By default they are taken out of the calibration data before
calibration reads it (:class:`HeldOut`):

* when the number of batches is known (files, folders, images, lists of batches),
  batches spread evenly over the whole data, so that data sorted by class is not
  judged on its last class alone;
* otherwise (a loader script, an iterator), the last batches: a window of them rides
  along the stream, one pass, holding no more than the held-out samples and one batch.

Either way, whole batches are held out (the fewest that hold the samples asked for; in
the first case never more than half of them). ``--eval DATA`` gives separate data instead
(:class:`Given`): its first samples are used, with labels if it has them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from trtq.calib.collect import Batch, batch_size
from trtq.calib.data import BatchSource
from trtq.errors import DataError, UserError
from trtq.report.verify import SampleKeeper

log = logging.getLogger(__name__)

#: Samples a configuration is evaluated on unless told otherwise: as many as the check after
#: writing uses, so that the figures of the last step and of the check agree.
DEFAULT_EVAL_SAMPLES = 64


class Evaluation(ABC):
    """Evaluation batches, where they came from, and labels (one per sample) if any."""

    description: str
    labels: np.ndarray | None = None
    label_output: str | None = None

    @abstractmethod
    def batches(self) -> list[Batch]:
        """The evaluation batches, in memory."""

    def keeper(self, model: onnx.ModelProto) -> SampleKeeper:
        """Every evaluation sample, for the check after writing: the written model is
        checked on the data the target was met on."""
        batches = self.batches()
        samples = sum(batch_size(b, model) for b in batches)
        source = BatchSource(
            lambda: iter(batches), self.description, num_batches=len(batches), num_samples=samples
        )
        return SampleKeeper(source, max(samples, 1), model)


@dataclass(frozen=True)
class EvaluationOptions:
    """Where the evaluation samples come from, and how many (see the module docstring)."""

    data: Iterable[Batch] | None = None  # None: held out from the calibration data
    samples: int = DEFAULT_EVAL_SAMPLES
    labels: np.ndarray | None = None
    label_output: str | None = None

    def split(
        self, calibration: Iterable[Batch] | None, model: onnx.ModelProto
    ) -> tuple[Iterable[Batch] | None, Evaluation]:
        """(the batches calibration may read, the evaluation data)."""
        if self.data is not None:
            given = Given(self.data, self.samples, model, self.labels, self.label_output)
            return calibration, given
        if calibration is None:
            raise UserError(
                "measuring nodes against FP32 needs evaluation data",
                "pass --eval DATA, or --calib DATA to hold samples out of it",
            )
        if self.labels is not None:
            raise UserError(
                "labels go with separate evaluation data, not with samples held out of --calib",
                "pass --eval DATA too",
            )
        held = HeldOut(calibration, self.samples, model)
        return held.calibration(), held


class Given(Evaluation):
    """The first ``samples`` samples of separate data (``--eval``), read once."""

    def __init__(
        self,
        data: Iterable[Batch],
        samples: int,
        model: onnx.ModelProto,
        labels: np.ndarray | None,
        label_output: str | None,
    ) -> None:
        kept = SampleKeeper(data, samples, model).samples()
        if not kept:
            raise DataError("the evaluation data yielded no batches", "check --eval DATA")
        self._batches = kept
        count = sum(batch_size(b, model) for b in kept)
        origin = getattr(data, "description", "evaluation batches given in Python")
        self.description = f"the first {count} samples of {origin}"
        self.label_output = label_output
        if labels is not None:
            if len(labels) < count:
                raise DataError(
                    f"{len(labels)} labels for {count} evaluation samples",
                    "give one label per sample, in data order",
                )
            self.labels = np.asarray(labels)[:count]

    def batches(self) -> list[Batch]:
        return list(self._batches)


class HeldOut(Evaluation):
    """Batches taken out of the calibration stream before calibration sees them.

    Hand :meth:`calibration` to calibration instead of the data: it yields every batch
    but the held-out ones, one-shot if the data is an iterator, re-iterable otherwise
    (every pass holds out the same batches). :meth:`batches` returns the held-out ones,
    reading the data through once if no one has yet (ranges from a stats file).
    """

    def __init__(self, source: Iterable[Batch], samples: int, model: onnx.ModelProto) -> None:
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        self._model = model  # what a sample is (see trtq.calib.collect.batch_size)
        self._source = source
        self._samples = samples
        self._origin = getattr(source, "description", "the calibration batches")
        self._num_batches: int | None = None
        if not isinstance(source, Iterator):
            with contextlib.suppress(TypeError):  # a loader script: known once read
                self._num_batches = len(source)  # type: ignore[arg-type]
        self._stream: Iterable[Batch] | None = None
        self._held: list[Batch] | None = None
        self.description = f"samples held out of {self._origin}"

    def calibration(self) -> Iterable[Batch]:
        """The batches that may set ranges (call once)."""
        if isinstance(self._source, Iterator):
            self._stream = self._pass(self._source)
        else:
            source = self._source
            self._stream = BatchSource(
                lambda: self._pass(iter(source)),
                f"{self._origin}, less the evaluation batches",
                num_batches=None,
                num_samples=None,
            )
        return self._stream

    def batches(self) -> list[Batch]:
        if self._held is None:
            if self._stream is None:
                self.calibration()
            for _ in self._stream:  # type: ignore[union-attr]
                pass
        if self._held is None:  # a one-shot stream a reader left half-read
            raise UserError(
                "the evaluation batches come last in the data, which was not read to the end",
                "pass --eval DATA",
            )
        return list(self._held)

    def _pass(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        if self._num_batches is not None:
            given, held, how = yield from self._spread(batches, self._num_batches)
        else:
            given, held, how = yield from self._last(batches)
        if not given or not held:
            raise DataError(
                f"{self._origin} is too small to hold out {self._samples} samples for "
                "evaluation and calibrate on the rest",
                "pass more data, fewer --eval-samples, or --eval DATA",
            )
        count = sum(batch_size(b, self._model) for b in held)
        plural = "batch" if len(held) == 1 else "batches"
        self.description = (
            f"{count} samples ({len(held)} {plural}, {how}) held out of {self._origin}"
        )
        if count < self._samples and self._held is None:  # once, on the first pass
            log.warning(
                "only %d of the %d evaluation samples asked for are held out (at most half "
                "the batches): pass --eval DATA for more",
                count,
                self._samples,
            )
        self._held = held

    def _spread(self, batches: Iterator[Batch], total: int):
        """Hold out batches evenly spaced over ``total`` (at most half of them)."""
        held: list[Batch] = []
        given = 0
        positions: set[int] = set()
        for index, batch in enumerate(batches):
            if index == 0:
                per_batch = max(batch_size(batch, self._model), 1)
                wanted = min(math.ceil(self._samples / per_batch), total // 2)
                positions = {int((j + 0.5) * total / wanted) for j in range(wanted)}
            if index in positions:
                held.append(batch)
            else:
                given += 1
                yield batch
        return given, held, "spread over the data"

    def _last(self, batches: Iterator[Batch]):
        """Hold out the fewest last batches that make up the samples (a sliding window)."""
        window: deque[Batch] = deque()
        count = given = 0
        for batch in batches:
            window.append(batch)
            count += batch_size(batch, self._model)
            while count - batch_size(window[0], self._model) >= self._samples:
                oldest = window.popleft()
                count -= batch_size(oldest, self._model)
                given += 1
                yield oldest
        return given, list(window), "the last ones"
