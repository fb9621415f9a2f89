"""``--method auto``: each activation's range chosen by its effect on the model's outputs.

Every histogram method judges a tensor by its own error (mse: the expected squared
error of the tensor; entropy: the information its histogram loses), and one method for
every tensor cannot fit all of them: a tensor feeding a classifier head may want its
outliers kept (max), its neighbour the tail clipped (a percentile). What matters is the
error the network's *outputs* see. So the search tries, per quantized tensor (per range
group: its members share one range), the amax each method would pick from its histogram,
and keeps the one that gives the outputs the smallest error against FP32 on a few
calibration samples.

The candidates (:func:`candidates`): ``max``, ``percentile`` 99.9 / 99.99 / 99.999 (and
the one asked for), ``mse``, ``entropy`` (when its spike guard keeps it, see
:mod:`trtq.calib.ranges`) and the mean of the per-batch maxima (recorded by the
histograms as calibration streams). Candidates within :data:`SAME_AMAX` of one already
listed are the same scale for every practical purpose and are tried once.

The search is greedy coordinate descent: every tensor starts at the range of the
histogram method (:data:`START_METHOD` unless the caller says otherwise); the tensors are
visited once, in graph (topological) order, each trying its candidates with every other
tensor at its current choice, and keeping the best, if it lowers the objective by at
least :data:`MIN_GAIN` (relative) and is no worse on either half of the samples (so that
one odd sample cannot pick a range on its own: on a few samples, a greedy search over
dozens of tensors otherwise fits their noise). Visiting producers before consumers means every
consumer is tuned against the ranges its inputs will really have.

Objective: the relative L2 error of the outputs against FP32 (``||y_q - y|| / ||y||``
over the sample batch, per float output, then the root mean square over outputs). Cosine
is reported too but not optimised: it is blind to a uniform scale error.

Cost. The FP32 outputs are computed once. The quantized model is built once, as an
evaluation copy in which every activation's scale is a graph *input* instead of an
initializer, so one ONNX Runtime session serves every trial and a trial is only
``session.run`` on the sample batches with other scale values. With U units (range
groups and lone tensors) and at most C distinct candidates each (C <= 8), the search
runs at most ``1 + U * (C - 1)`` evaluations of the model on ``samples`` samples
(:data:`DEFAULT_SAMPLES`); :attr:`SearchResult.evaluations` is the exact count and
:attr:`SearchResult.bound` the bound for this model, both in the report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import onnx

from trtq.calib.collect import Batch, batch_size, first_samples
from trtq.calib.histogram import Histogram
from trtq.calib.ranges import (
    DEFAULT_METHOD,
    METHODS,
    TensorRange,
    compute_range,
    max_amax,
    mse_amax,
    percentile_amax,
    safe_amax,
)
from trtq.errors import UserError
from trtq.graph import qdq
from trtq.graph.edit import numpy_dtype, representable_scale
from trtq.sessions import open_session, reference_session

log = logging.getLogger(__name__)

#: The method name that asks for the search.
AUTO = "auto"
#: What ``trtq quantize --method`` accepts: a histogram method, or the search.
QUANTIZE_METHODS = (*METHODS, AUTO)
#: The histogram method every tensor starts from (and `trtq calibrate` records for auto).
START_METHOD = DEFAULT_METHOD
#: Percentiles tried besides the one asked for.
PERCENTILES = (99.9, 99.99, 99.999)
#: Calibration samples the outputs are measured on.
DEFAULT_SAMPLES = 16
#: Candidates whose amax differ by less than this (relative) are one candidate.
SAME_AMAX = 0.005
#: A candidate replaces the current choice only if it lowers the objective by this much.
MIN_GAIN = 1e-3
#: Label of the mean-of-per-batch-max candidate.
BATCH_MAX = "mean batch max"


def histogram_method(method: str) -> str:
    """The histogram method behind ``method``: :data:`START_METHOD` for auto, else itself."""
    return START_METHOD if method == AUTO else method


def candidates(
    hist: Histogram,
    percentile: float = 99.99,
    *,
    batch_max: float | None = None,
) -> dict[str, float]:
    """Every method's amax on ``hist``, by label, near-duplicates dropped (first label wins).

    ``batch_max`` (the mean of the per-batch maxima) defaults to the histogram's own.
    """
    found: dict[str, float] = {"max": max_amax(hist)}
    for p in sorted({*PERCENTILES, percentile}):
        found[f"percentile {p:g}"] = percentile_amax(hist, p)
    found["mse"] = mse_amax(hist)
    entropy = compute_range("entropy", hist, "entropy")
    if entropy.method == "entropy":  # refused as a spike's otherwise (and then mse's)
        found["entropy"] = entropy.amax
    if batch_max is None and hist.batch_updates:
        batch_max = hist.batch_max_sum / hist.batch_updates
    if batch_max is not None:
        found[BATCH_MAX] = batch_max
    return _distinct({label: safe_amax(amax) for label, amax in found.items()})


def _distinct(found: Mapping[str, float]) -> dict[str, float]:
    kept: dict[str, float] = {}
    for label, amax in found.items():
        if all(abs(amax - other) > SAME_AMAX * max(amax, other) for other in kept.values()):
            kept[label] = amax
    return kept


@dataclass(frozen=True)
class Fidelity:
    """The outputs against FP32 on the sample batch: the objective and the mean cosine.

    ``halves`` is the objective on each half of the samples: a choice must help both
    (:meth:`better_than`), so that one odd sample cannot pick a range alone.
    """

    rel_l2: float
    cosine: float
    halves: tuple[float, float] = (math.nan, math.nan)

    def better_than(self, other: Fidelity) -> bool:
        """Lower by :data:`MIN_GAIN` overall, and no worse on either half of the samples."""
        if not self.rel_l2 < other.rel_l2 * (1 - MIN_GAIN):
            return False
        return all(
            not mine > theirs for mine, theirs in zip(self.halves, other.halves, strict=True)
        )

    def to_json(self) -> dict:
        return {"rel_l2": _finite(self.rel_l2), "cosine": _finite(self.cosine)}


class OutputError:
    """Measures the outputs of the quantized model for any activation ranges, one session.

    The model is quantized once by :func:`trtq.graph.qdq.insert` with the plan (weights
    quantized, every activation Q/DQ in place); then each activation's scale initializer
    becomes a graph input of the same name, so a trial feeds new scales to the same session.
    ``runs`` counts trials (each is one pass over the sample batches).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        plan: qdq.QuantPlan,
        ranges: Mapping[str, TensorRange],
        batches: Sequence[Batch],
        *,
        precision: str = "int8",
        providers: Sequence[str] | None = None,
    ) -> None:
        wanted = {v.name for v in model.graph.input}
        whole = [{k: v for k, v in b.items() if k in wanted} for b in batches]
        self.samples = sum(batch_size(b, model) for b in whole)
        self._batches, self._half = _halves(whole, model)
        if not self._batches:
            raise UserError(
                "--method auto measures the outputs on calibration samples, and there are none",
                "pass --calib DATA",
            )
        self._qmax = qdq.QMAX[precision]
        quantized = qdq.insert(model, plan, ranges, precision)
        self._scales = _expose_scales(quantized, plan.activations())
        self._session = open_session(quantized, providers, name="the range search's model")
        names = [o.name for o in model.graph.output]
        reference = reference_session(model, providers)
        self._reference = [
            dict(zip(names, reference.run(names, b), strict=True)) for b in self._batches
        ]
        self._names = [n for n in names if _is_float(self._reference[0][n])]
        self.runs = 0

    def __call__(self, amax: Mapping[str, float]) -> Fidelity:
        """The outputs' error with ``amax`` per quantized tensor."""
        feeds = {
            scale: np.asarray(representable_scale(amax[tensor] / self._qmax, dtype), dtype)
            for tensor, (scale, dtype) in self._scales.items()
        }
        # Per half of the samples and output: [error energy, reference energy, dot, output energy]
        sums = np.zeros((2, len(self._names), 4))
        for batch, half, expected in zip(self._batches, self._half, self._reference, strict=True):
            outputs = self._session.run(self._names, {**batch, **feeds})
            for k, (name, got) in enumerate(zip(self._names, outputs, strict=True)):
                ref = np.asarray(expected[name], np.float64).ravel()
                out = np.asarray(got, np.float64).ravel()
                sums[half, k] += (
                    np.sum((out - ref) ** 2),
                    np.sum(ref**2),
                    np.dot(out, ref),
                    np.sum(out**2),
                )
        self.runs += 1
        total = sums.sum(axis=0)
        cos = [d / math.sqrt(e * g) if e and g else 1.0 for _, e, d, g in total]
        halves = (_objective(sums[0]), _objective(sums[1]))
        return Fidelity(_objective(total), float(np.mean(cos)) if cos else 1.0, halves)


def _objective(sums: np.ndarray) -> float:
    """RMS over outputs of the relative L2 error (``sums``: one row per output, see the caller)."""
    if not len(sums):
        return 0.0
    rel = [math.sqrt(err / ref) if ref else math.sqrt(err) for err, ref, _, _ in sums]
    rms = math.sqrt(sum(r * r for r in rel) / len(rel))
    return rms if math.isfinite(rms) else math.inf


def _halves(batches: Sequence[Batch], model: onnx.ModelProto) -> tuple[list[Batch], list[int]]:
    """The sample batches cut in two halves by samples: (parts, the half each part is in).

    A batch is cut where its inputs are batch-major (:func:`first_samples`); a batch that
    cannot be (one sample, a whole feed) goes to the halves in turn.
    """
    parts: list[Batch] = []
    half: list[int] = []
    for index, batch in enumerate(batches):
        cut = batch_size(batch, model) // 2
        first = first_samples(batch, cut, model) if cut else dict(batch)
        if not cut or all(first[k].shape == np.shape(v) for k, v in batch.items()):
            parts.append(batch)
            half.append(index % 2)
            continue
        second = {k: v[cut:] if first[k].shape != np.shape(v) else v for k, v in batch.items()}
        parts += [first, second]
        half += [0, 1]
    return parts, half


def _expose_scales(
    model: onnx.ModelProto, activations: Iterable[str]
) -> dict[str, tuple[str, np.dtype]]:
    """Turn each activation's scale initializer into a graph input; {tensor: (input, dtype)}."""
    wanted = set(activations)
    scale_of = {
        node.input[0]: node.input[1]
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] in wanted
    }
    initializers = {init.name: init for init in model.graph.initializer}
    exposed = {}
    for tensor, scale in scale_of.items():
        init = initializers[scale]
        model.graph.initializer.remove(init)
        model.graph.input.append(onnx.helper.make_tensor_value_info(scale, init.data_type, []))
        exposed[tensor] = (scale, numpy_dtype(init.data_type))
    missing = wanted - exposed.keys()
    if missing:
        raise RuntimeError(f"no QuantizeLinear found for {sorted(missing)[0]}")
    return exposed


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Unit:
    """Tensors that share one range (a range group, or one tensor), and its candidates."""

    tensors: tuple[str, ...]
    start: TensorRange
    start_label: str  # the start range's method as a candidate label
    candidates: dict[str, float]


@dataclass(frozen=True)
class Choice:
    """What the search settled on for one unit, and the objective before and after."""

    unit: Unit
    label: str
    amax: float
    before: Fidelity
    after: Fidelity

    def reason(self, samples: int) -> str:
        start = self.unit.start
        tried = len(self.unit.candidates)
        head = (
            f"range search: kept {self.label} (amax {self.amax:.4g})"
            if self.label == self.unit.start_label
            else f"range search: {self.label} (amax {self.amax:.4g}) chosen over "
            f"{self.unit.start_label} (amax {start.amax:.4g})"
        )
        return (
            f"{head}; output relative L2 vs FP32 {self.before.rel_l2:.4g} -> "
            f"{self.after.rel_l2:.4g} on {samples} calibration samples, {tried} candidate"
            f"{'' if tried == 1 else 's'}"
        )

    def to_json(self) -> dict:
        return {
            "tensors": list(self.unit.tensors),
            "start": {"method": self.unit.start_label, "amax": self.unit.start.amax},
            "chosen": {"method": self.label, "amax": self.amax},
            "candidates": dict(self.unit.candidates),
            "before": self.before.to_json(),
            "after": self.after.to_json(),
        }


@dataclass
class SearchResult:
    """The searched ranges (one per quantized tensor) and the account of the search."""

    ranges: dict[str, TensorRange]
    choices: list[Choice]
    start: Fidelity
    final: Fidelity
    samples: int
    evaluations: int
    bound: int
    start_method: str
    changed: int = field(init=False)

    def __post_init__(self) -> None:
        self.changed = sum(c.label != c.unit.start_label for c in self.choices)

    def to_json(self) -> dict:
        return {
            "objective": "relative L2 of the outputs vs FP32 (root mean square over outputs)",
            "start_method": self.start_method,
            "samples": self.samples,
            "evaluations": self.evaluations,
            "bound": self.bound,
            "units": len(self.choices),
            "changed": self.changed,
            "before": self.start.to_json(),
            "after": self.final.to_json(),
            "choices": [c.to_json() for c in self.choices],
        }


def units(
    plan: qdq.QuantPlan,
    ranges: Mapping[str, TensorRange],
    histograms: Mapping[str, Histogram],
    percentile: float = 99.99,
) -> list[Unit]:
    """The plan's quantized tensors as search units, in graph order: one per range group."""
    group_of = {name: group for group in plan.range_groups for name in group}
    found: list[Unit] = []
    seen: set[str] = set()
    for name in plan.activations():
        if name in seen:
            continue
        members = group_of.get(name, (name,))
        seen.update(members)
        start = ranges[name]
        if not start.quantizable or any(m not in histograms for m in members):
            continue
        merged = reduce(Histogram.merge, (histograms[m] for m in members))
        # A group's values are its members' together: the largest member's batch max counts.
        means = [
            histograms[m].batch_max_sum / histograms[m].batch_updates
            for m in members
            if histograms[m].batch_updates
        ]
        options = candidates(merged, percentile, batch_max=max(means) if means else None)
        label = _label(start, percentile)
        options = _distinct({label: start.amax, **options})
        found.append(Unit(tuple(members), start, label, options))
    return found


def search(
    model: onnx.ModelProto,
    plan: qdq.QuantPlan,
    ranges: Mapping[str, TensorRange],
    histograms: Mapping[str, Histogram] | None,
    batches: Sequence[Batch],
    *,
    precision: str = "int8",
    percentile: float = 99.99,
    start_method: str = START_METHOD,
    providers: Sequence[str] | None = None,
) -> SearchResult:
    """Greedy per-unit range choice by output error (module docstring); ``ranges`` are the
    start (the plan's, shared within range groups, by ``start_method``).

    ``histograms`` None (ranges from a TensorRT cache, which holds scales only) or no
    ``batches`` (ranges from a stats file, no data) leave nothing to search with: a
    :class:`~trtq.errors.UserError`.
    """
    if histograms is None:
        raise UserError(
            "--method auto chooses among the ranges each method finds on the histograms, and a "
            "TensorRT cache holds only scales",
            "pass --calib DATA (or --stats FILE) instead of --cache, or pick another --method",
        )
    found = units(plan, ranges, histograms, percentile)
    measure = OutputError(model, plan, ranges, batches, precision=precision, providers=providers)
    current = {name: ranges[name].amax for name in plan.activations()}
    best = start = measure(current)
    choices = []
    for unit in found:
        before = best
        label, amax = unit.start_label, unit.start.amax
        for candidate, value in unit.candidates.items():
            if candidate == unit.start_label:
                continue
            trial = measure({**current, **dict.fromkeys(unit.tensors, value)})
            if trial.better_than(best):
                best, label, amax = trial, candidate, value
        current.update(dict.fromkeys(unit.tensors, amax))
        choices.append(Choice(unit, label, amax, before, best))
    result = dict(ranges)
    for choice in choices:
        reason = choice.reason(measure.samples)
        for name in choice.unit.tensors:
            result[name] = TensorRange(name, choice.amax, choice.label, reason=reason)
    bound = 1 + sum(len(u.candidates) - 1 for u in found)
    searched = SearchResult(
        result, choices, start, best, measure.samples, measure.runs, bound, start_method
    )
    log.info(
        "range search: %d of %d ranges changed, output relative L2 %.4g -> %.4g (%d evaluations "
        "on %d samples)",
        searched.changed,
        len(choices),
        start.rel_l2,
        best.rel_l2,
        measure.runs,
        measure.samples,
    )
    return searched


def _label(found: TensorRange, percentile: float) -> str:
    """A histogram method's range as a candidate label (a percentile names its value)."""
    return f"percentile {percentile:g}" if found.method == "percentile" else found.method
