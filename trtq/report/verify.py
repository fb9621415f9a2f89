"""The check after writing: run the rewritten model next to the FP32 original, judge the gap.

Every model trtq writes is run on up to :data:`DEFAULT_SAMPLES` samples of the
calibration data and measured against the FP32 model, per output: mean and min
per-sample cosine, relative L2 error and max abs error. Cosine alone is blind to a
uniform scale error (outputs 32x too small have cosine 1.0); relative L2 sees it.

The samples are the first ones calibration reads anyway: :class:`SampleKeeper` keeps
them as they stream by, so the data source is not read twice and no more than those
samples is ever held. Where calibration does not read the data (ranges from a stats
file or cache), the keeper reads just those first samples.

Two kinds of threshold apply (ARCHITECTURE.md §Principle: trtq vouches for every model it writes):

* the default floor (:data:`FLOOR_MIN_COSINE`, :data:`FLOOR_MAX_REL_L2`): below it,
  one warning line; the model is still written;
* gates the caller asks for (:class:`FidelityOptions`): a broken one is a failed
  quality gate (exit 3, as ``trtq compare``). An explicit gate replaces the floor
  for its metric.

ONNX Runtime's CPU provider executes Q/DQ graphs and most FP16 ops, but not every
op in FP16 or BF16. When it cannot run a model, small graphs are run with
``onnx.reference.ReferenceEvaluator`` (pure numpy, slow but complete); larger ones are
reported as unverified rather than guessed at. The report says which backend
produced the figures.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from trtq.calib.collect import Batch, batch_size, first_samples
from trtq.calib.data import BatchSource
from trtq.calib.data.feeds import is_whole_feed
from trtq.graph.load import model_inputs
from trtq.report.compare import GateResult, cosine_gate, rel_l2_gate
from trtq.report.metrics import Agreement, OutputAgreement
from trtq.sessions import open_session, reference_session

log = logging.getLogger(__name__)

#: Samples of the calibration data the check runs on unless told otherwise...
DEFAULT_SAMPLES = 64
#: ...as long as they cost no more multiply-accumulates than this (each runs in the FP32 model
#: and in the fake-quantized one, which runs 2-3x slower on a CPU): 32 samples of a
#: MobileNet, 7 of MiniLM at 64 tokens, 8 of the PP-OCR detector at 320x320, 2 of an
#: 800x608 detector; about 1 s on two cores. With 64 samples everywhere the check cost more
#: than the calibration on heavy models (bench/quantize_cost.py).
CHECK_MACS = 5_000_000_000
#: ...but never fewer samples than this.
MIN_CHECK_SAMPLES = 2
#: Below this mean cosine (any output) the check warns. Faithful INT8 on the MNIST sample
#: measures 0.9999, entropy's broken ranges 0.64 (README, "The check after writing").
FLOOR_MIN_COSINE = 0.99
#: Above this relative L2 error (any output) the check warns. Noise alone at cosine 0.99
#: amounts to a relative L2 of (1/0.99² - 1)^½ = 0.14, so this floor is no stricter than
#: the cosine floor on noise; what it adds is scale errors, which cosine cannot see.
FLOOR_MAX_REL_L2 = 0.15
#: Work the numpy reference evaluator may be given (multiply-accumulates, all samples).
REFERENCE_EVALUATOR_MAX_MACS = 200_000_000
#: The report's status when nothing could be run.
NO_DATA = "not verified: no data"


@dataclass(frozen=True)
class FidelityOptions:
    """How much data the check runs on, and the gates that fail it (None: no gate).

    ``samples`` None: :data:`DEFAULT_SAMPLES` within :data:`CHECK_MACS`
    (:meth:`samples_for`); a number: exactly that many, whatever they cost.
    """

    samples: int | None = None
    min_cosine: float | None = None
    max_rel_l2: float | None = None

    @property
    def gated(self) -> bool:
        return self.min_cosine is not None or self.max_rel_l2 is not None

    def samples_for(self, macs_per_sample: int) -> int:
        """Samples the check runs on a model of ``macs_per_sample``."""
        if self.samples is not None:
            return self.samples
        affordable = CHECK_MACS // max(macs_per_sample, 1)
        return max(MIN_CHECK_SAMPLES, min(DEFAULT_SAMPLES, affordable))


@dataclass
class Verification:
    """What the check measured, on which data, and what it concluded."""

    backend: str
    source: str | None = None
    samples: int = 0
    batches: int = 0
    outputs: dict[str, Agreement] = field(default_factory=dict)
    #: The gates the caller asked for (a gate that could not be measured fails).
    gates: list[GateResult] = field(default_factory=list)
    #: The default floor, for the metrics no gate covers.
    floor: list[GateResult] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.outputs:
            return "verified"
        if self.source is None:
            return NO_DATA
        return f"not verified: {self.backend.removeprefix('none: ')}"

    @property
    def passed(self) -> bool:
        """Every requested gate passed (True when none was requested)."""
        return all(gate.passed for gate in self.gates)

    def to_json(self) -> dict:
        data = None
        if self.source is not None:
            data = {"source": self.source, "samples": self.samples, "batches": self.batches}
        return {
            "status": self.status,
            "backend": self.backend,
            "data": data,
            "outputs": {name: agreement.to_json() for name, agreement in self.outputs.items()},
            "floor": {
                "min_cosine": FLOOR_MIN_COSINE,
                "max_rel_l2": FLOOR_MAX_REL_L2,
                "checks": [check.to_json() for check in self.floor],
            },
            "gates": [gate.to_json() for gate in self.gates],
            "passed": self.passed,
        }


class SampleKeeper:
    """Keeps the first ``limit`` samples of a stream of batches while calibration reads it.

    Hand :meth:`stream` to whoever reads the data instead of the batches themselves: it
    yields the same batches, one-shot if the source is an iterator, re-iterable (a
    :class:`BatchSource`) otherwise. Every pass over a re-iterable source yields the same
    batches in the same order, so a batch is kept by its position, once, whichever pass
    reaches it first. The batch that crosses ``limit`` is cut to it where its inputs are
    batch-major and free in the model (``first_samples``); a fixed batch dim is kept whole,
    and a whole feed (inputs without a shared batch axis) is one sample, never cut.
    """

    def __init__(self, batches: Iterable[Batch], limit: int, model: onnx.ModelProto) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.description = getattr(batches, "description", "batches given by the caller")
        self._source = batches
        self._limit = limit
        self._model = model
        self._kept: list[Batch] = []
        self._kept_samples = 0
        self._exhausted = False  # a pass reached the end of the data
        self._stream: Iterable[Batch] | None = None

    @property
    def limit(self) -> int:
        """The most samples kept."""
        return self._limit

    def stream(self) -> Iterable[Batch]:
        """The batches, for the calibration (call once)."""
        if isinstance(self._source, Iterator):
            self._stream = self._pass(self._source)
        elif isinstance(self._source, BatchSource):  # keeps its shards (Ray workers read them)
            source = self._source
            self._stream = source.watched(lambda: self._pass(iter(source)))
        else:
            source = self._source
            self._stream = BatchSource(
                lambda: self._pass(iter(source)),
                self.description,
                num_batches=getattr(source, "num_batches", None),
                num_samples=getattr(source, "num_samples", None),
            )
        return self._stream

    def samples(self) -> list[Batch]:
        """The kept batches; read the first ones now if no one has read that far."""
        if self._stream is None:
            self.stream()
        if not self._full and not self._exhausted:
            for _ in self._stream:  # a one-shot stream continues where its reader stopped
                if self._full:
                    break
        return list(self._kept)

    @property
    def _full(self) -> bool:
        return self._kept_samples >= self._limit

    def _pass(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for position, batch in enumerate(batches):
            if position == len(self._kept) and not self._full:
                self._keep(batch)
            yield batch
        self._exhausted = True

    def _keep(self, batch: Batch) -> None:
        wanted = self._limit - self._kept_samples
        if batch_size(batch, self._model) > wanted:
            # Copies, not views: a view would keep the whole batch's memory alive.
            cut = first_samples(batch, wanted, self._model)
            batch = {name: np.array(array, copy=True) for name, array in cut.items()}
        self._kept.append(batch)
        self._kept_samples += batch_size(batch, self._model)


def verify(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    data: SampleKeeper | None,
    macs_per_sample: int,
    options: FidelityOptions | None = None,
) -> Verification:
    """Measure ``candidate`` against ``reference`` on the kept samples; apply floor and gates.

    Logs one warning line when the figures are below the default floor (unless a gate
    failed: that is the caller's line to write), or when there is nothing to measure. The
    caller decides what a failed gate means (see :attr:`Verification.passed`).
    """
    options = options or FidelityOptions()
    batches = data.samples() if data is not None else []
    batches = _first(batches, options.samples_for(macs_per_sample), candidate)
    if not batches:  # ranges from a file only, or data already used up by the caller
        log.warning("%s: the written model was not compared with FP32 (pass --calib DATA)", NO_DATA)
        return Verification("none: no data to run", gates=_unmeasured_gates(options, NO_DATA))
    verification = _measure(reference, candidate, batches, macs_per_sample)
    verification.source = data.description
    if not verification.outputs:
        why = verification.status
        log.warning("%s", why)
        verification.gates = _unmeasured_gates(options, why)
        return verification
    verification.gates = _gates(verification.outputs, options.min_cosine, options.max_rel_l2)
    verification.floor = _gates(
        verification.outputs,
        None if options.min_cosine is not None else FLOOR_MIN_COSINE,
        None if options.max_rel_l2 is not None else FLOOR_MAX_REL_L2,
    )
    below = [check.detail for check in verification.floor if not check.passed]
    if below and verification.passed:  # a failed gate says it already, in its own line
        log.warning(
            "fidelity vs FP32 below the default floor on %d samples: %s (a gate, "
            "--min-cosine/--max-rel-l2, makes this an error)",
            verification.samples,
            "; ".join(below),
        )
    return verification


def _first(batches: Sequence[Batch], samples: int, model: onnx.ModelProto) -> list[Batch]:
    """The batches holding the first ``samples`` samples, the last one cut to fit."""
    taken, count = [], 0
    for batch in batches:
        if count >= samples:
            break
        if count + batch_size(batch, model) > samples:
            batch = first_samples(batch, samples - count, model)  # a fixed batch stays whole
        taken.append(batch)
        count += batch_size(batch, model)
    return taken


def _measure(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    batches: Sequence[Batch],
    macs_per_sample: int,
) -> Verification:
    """Both models on every batch, figures folded in batch by batch (outputs are not kept)."""
    # Data may carry more than the model takes now (a frozen input, labels): feed what it takes.
    wanted = {v.name for v in candidate.graph.input}
    inputs = model_inputs(candidate)
    names = [o.name for o in reference.graph.output]
    runner = _CandidateRunner(candidate, macs_per_sample)
    ref_session = reference_session(reference)
    agreements: dict[str, OutputAgreement] = {}
    samples = used = 0
    for batch in batches:
        feeds = {name: array for name, array in batch.items() if name in wanted}
        ran = runner.run(feeds)
        if ran is None:
            break
        actual, feeds = ran
        expected = dict(zip(names, ref_session.run(names, feeds), strict=True))
        whole = is_whole_feed(feeds, inputs)  # one call, one sample: outputs have no batch axis
        for name, got in actual.items():
            ref = np.asarray(expected[name])
            if not np.issubdtype(ref.dtype, np.floating):
                continue
            agreement = agreements.setdefault(name, OutputAgreement())
            agreement.update(ref, np.asarray(got), one_sample=whole)
        samples += batch_size(feeds, candidate)
        used += 1
    outputs = {name: agreements[name].result() for name in names if name in agreements}
    return Verification(runner.backend, samples=samples, batches=used, outputs=outputs)


class _CandidateRunner:
    """Runs the candidate with ONNX Runtime, or with onnx.reference within a work budget."""

    def __init__(self, model: onnx.ModelProto, macs_per_sample: int) -> None:
        self._model = model
        self._names = [o.name for o in model.graph.output]
        self._budget = REFERENCE_EVALUATOR_MAX_MACS // max(macs_per_sample, 1)  # samples
        self._session = None
        self._evaluator = None
        self._ran = False
        self.backend = "onnxruntime"
        try:
            self._session = open_session(model)
        except Exception as exc:  # ORT's NOT_IMPLEMENTED and friends have no common base class
            self._fall_back(exc)

    def run(
        self, feeds: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], Mapping[str, np.ndarray]] | None:
        """(outputs by name, the feeds they came from), or None when the budget is spent."""
        if self._session is not None:
            try:
                outputs = self._session.run(self._names, dict(feeds))
                self._ran = True
                return dict(zip(self._names, outputs, strict=True)), feeds
            except Exception as exc:
                if self._ran:  # it ran before: this is not a missing kernel
                    raise
                self._fall_back(exc)
        if self._evaluator is None or self._budget < 1:
            return None
        if batch_size(feeds, self._model) > self._budget:
            feeds = first_samples(feeds, self._budget, self._model)
        self._budget -= batch_size(feeds, self._model)
        outputs = self._evaluator.run(self._names, dict(feeds))
        return dict(zip(self._names, outputs, strict=True)), feeds

    def _fall_back(self, exc: Exception) -> None:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        log.info("ONNX Runtime cannot run the rewritten model (%s)", reason)
        self._session = None
        if self._budget < 1:
            why = "ONNX Runtime cannot run it and it is too large for onnx.reference"
            self.backend = f"none: {why} ({reason})"
            return
        from onnx.reference import ReferenceEvaluator

        self._evaluator = ReferenceEvaluator(self._model)
        self.backend = "onnx.reference"


def _gates(
    outputs: Mapping[str, Agreement], min_cosine: float | None, max_rel_l2: float | None
) -> list[GateResult]:
    gates = []
    if min_cosine is not None:
        gates.append(cosine_gate(outputs, min_cosine))
    if max_rel_l2 is not None:
        gates.append(rel_l2_gate(outputs, max_rel_l2))
    return gates


def _unmeasured_gates(options: FidelityOptions, why: str) -> list[GateResult]:
    """A requested gate that could not be measured fails: the model is not vouched for."""
    return [
        GateResult(name, limit, float("nan"), False, f"{name}: {why}")
        for name, limit in (("min-cosine", options.min_cosine), ("max-rel-l2", options.max_rel_l2))
        if limit is not None
    ]
