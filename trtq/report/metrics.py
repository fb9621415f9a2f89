"""Fidelity metrics between model outputs, and against labels.

Everything here is plain numpy on arrays whose first axis is the sample, so it can be
checked without a model. The accumulators take one batch at a time and keep only sums,
extremes and counts: comparing two models on a large data set needs the memory of one
batch, not of every output ever produced. Sums are kept in float64, so the result does
not depend on how the data was cut into batches (beyond rounding).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np

from trtq.calib.histogram import Histogram

#: Bins of the |candidate - reference| histogram each output keeps (a power of two): enough
#: to see the shape of the error in the HTML report, small enough for every JSON report.
ERROR_HISTOGRAM_BINS = 128


def top1(logits: np.ndarray) -> np.ndarray:
    """Predicted class per sample: argmax over the last axis."""
    return np.asarray(logits).reshape(len(logits), -1).argmax(axis=1)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose top-1 class equals the label."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} predictions but {len(labels)} labels")
    return float(np.mean(top1(logits) == labels))


def per_sample_cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's flattened values, in float64.

    Two all-zero samples count as identical (1) and a single all-zero one as unrelated
    (0): an output that quantization wipes out is then reported as a disagreement
    instead of a NaN. A NaN or Inf in either sample gives NaN, which fails any gate.
    """
    ref, cand = _per_sample(reference), _per_sample(candidate)
    dot = np.einsum("ij,ij->i", ref, cand)
    ref_sq = np.einsum("ij,ij->i", ref, ref)
    cand_sq = np.einsum("ij,ij->i", cand, cand)
    with np.errstate(divide="ignore", invalid="ignore"):
        # sqrt of the product (not the product of sqrts) makes identical samples exactly 1.
        cosine = dot / np.sqrt(ref_sq * cand_sq)
    cosine = np.where((ref_sq == 0) | (cand_sq == 0), 0.0, cosine)
    cosine = np.where((ref_sq == 0) & (cand_sq == 0), 1.0, cosine)
    return np.clip(cosine, -1.0, 1.0)


def top1_applies(shape: tuple[int, ...]) -> bool:
    """Whether argmax over the last axis is a class prediction: rank >= 2, more than one class.

    A rank-2 output ``[N, C]`` has one prediction per sample; higher ranks
    (``[N, H, W, C]``, ``[N, T, vocab]``) one per position.
    """
    return len(shape) >= 2 and shape[-1] > 1


@dataclass(frozen=True)
class Agreement:
    """How closely a candidate output follows the reference output, over all samples seen.

    ``rel_l2`` is ``||candidate - reference|| / ||reference||`` over the whole output;
    ``top1`` is the share of positions whose argmax over the last axis agrees, None where
    that is not a class prediction (see :func:`top1_applies`). ``error_histogram`` holds
    every element's ``|candidate - reference|`` (streaming, :data:`ERROR_HISTOGRAM_BINS`
    bins): how the error is spread, which the figures above summarise.
    """

    samples: int
    cosine_mean: float
    cosine_min: float
    rel_l2: float
    max_abs: float
    mean_abs: float
    top1: float | None
    error_histogram: Histogram | None = field(default=None, compare=False)

    def to_json(self) -> dict:
        return {
            "samples": self.samples,
            "cosine_mean": json_number(self.cosine_mean),
            "cosine_min": json_number(self.cosine_min),
            "rel_l2": json_number(self.rel_l2),
            "max_abs": json_number(self.max_abs),
            "mean_abs": json_number(self.mean_abs),
            "top1_agreement": None if self.top1 is None else json_number(self.top1),
            "abs_error_histogram": None
            if self.error_histogram is None
            else self.error_histogram.to_json(),
        }


class OutputAgreement:
    """Streaming :class:`Agreement` of one output: call :meth:`update` per batch, then
    :meth:`result`."""

    def __init__(self) -> None:
        self._samples = 0
        self._cosine_sum = 0.0
        self._cosine_min = math.inf
        self._diff_sq = 0.0
        self._ref_sq = 0.0
        self._abs_sum = 0.0
        self._max_abs = 0.0
        self._elements = 0
        self._top1_applies = True
        self._top1_matches = 0
        self._top1_positions = 0
        self._errors = Histogram.empty(ERROR_HISTOGRAM_BINS)

    def update(
        self, reference: np.ndarray, candidate: np.ndarray, *, one_sample: bool = False
    ) -> None:
        """Fold in one batch of both models' values for this output (same shapes).

        ``one_sample``: the batch is one model call without a batch axis (a whole feed,
        :mod:`trtq.calib.data.feeds`), so the output is one sample, whatever its dim 0.
        """
        ref = np.asarray(reference, dtype=np.float64)
        cand = np.asarray(candidate, dtype=np.float64)
        if ref.shape != cand.shape:
            raise ValueError(f"shapes differ: reference {ref.shape}, candidate {cand.shape}")
        if one_sample:
            cosine = per_sample_cosine(ref.reshape(1, -1), cand.reshape(1, -1))
        else:
            cosine = per_sample_cosine(ref, cand)
        self._samples += len(cosine)
        self._cosine_sum += float(cosine.sum())
        # np.minimum/np.maximum propagate NaN, where Python's min/max depend on argument order.
        self._cosine_min = float(np.minimum(self._cosine_min, cosine.min(initial=math.inf)))
        with np.errstate(invalid="ignore"):  # inf - inf (mask fills on both sides) is NaN: reported
            diff = np.abs(cand - ref)
        self._diff_sq += float(np.sum(diff * diff))
        self._ref_sq += float(np.sum(ref * ref))
        self._abs_sum += float(diff.sum())
        self._max_abs = float(np.maximum(self._max_abs, diff.max(initial=0.0)))
        self._elements += diff.size
        self._errors.update(diff)
        self._update_top1(ref, cand)

    def _update_top1(self, ref: np.ndarray, cand: np.ndarray) -> None:
        self._top1_applies = self._top1_applies and top1_applies(ref.shape)
        if self._top1_applies:
            self._top1_matches += int(np.sum(ref.argmax(axis=-1) == cand.argmax(axis=-1)))
            self._top1_positions += ref.size // ref.shape[-1]

    def result(self) -> Agreement:
        if not self._samples:
            raise ValueError("no samples: call update() with at least one batch")
        applies = self._top1_applies and self._top1_positions > 0
        return Agreement(
            samples=self._samples,
            cosine_mean=self._cosine_sum / self._samples,
            cosine_min=self._cosine_min,
            rel_l2=_relative(math.sqrt(self._diff_sq), math.sqrt(self._ref_sq)),
            max_abs=self._max_abs,
            mean_abs=self._abs_sum / self._elements if self._elements else 0.0,
            top1=self._top1_matches / self._top1_positions if applies else None,
            error_histogram=copy.deepcopy(self._errors),  # a snapshot: updates may go on
        )


class LabelAccuracy:
    """Streaming top-1 accuracy against labels (see :func:`top1`), one batch at a time."""

    def __init__(self) -> None:
        self.correct = 0
        self.samples = 0

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(logits):
            raise ValueError(f"{len(logits)} predictions but {len(labels)} labels")
        self.correct += int(np.sum(top1(logits) == labels))
        self.samples += len(labels)

    @property
    def accuracy(self) -> float:
        if not self.samples:
            raise ValueError("no samples: call update() with at least one batch")
        return self.correct / self.samples


def json_number(value: float) -> float | None:
    """``value``, or None for NaN/Inf, which strict JSON cannot hold."""
    return value if math.isfinite(value) else None


def _per_sample(values: np.ndarray) -> np.ndarray:
    """``values`` as float64 ``[samples, values per sample]``; a scalar is one sample."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        return array.reshape(1, 1)
    return array.reshape(array.shape[0], math.prod(array.shape[1:]))


def _relative(error: float, scale: float) -> float:
    if scale:
        return error / scale
    return 0.0 if error == 0 else math.inf
