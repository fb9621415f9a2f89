"""Score configurations of a calibrated plan against FP32: cached, on a pluggable executor.

A *configuration* is the set of the plan's quantized nodes left in high precision
instead (a frozenset of node names): ``frozenset()`` is the full plan, the set of every
quantized node the model without Q/DQ. Its model is built the way ``trtq quantize``
builds the one it writes (:func:`trtq.quantizer.lower`, with the plan's node decisions
filtered by :meth:`~trtq.graph.qdq.QuantPlan.with_float`), with the ranges of the full
plan: moving one node to float changes no other tensor's scale, so each figure is that
configuration's alone. It is run on the evaluation batches with ONNX Runtime (Q/DQ as
fake quantization, as ``trtq compare``) and measured against FP32 outputs computed once.

The parts, so that another backend fits in (a Ray cluster, issue 14):

* :class:`Job` - everything a worker needs, picklable: the model as bytes, the plan, the
  ranges, the evaluation batches and their FP32 outputs. Sent once per worker;
* :class:`Evaluator` - built from a job in the worker; scores one configuration;
* an executor (:class:`InProcess`, :class:`ProcessPool`) - maps configurations to scores:
  ``map(configurations)`` yields them in order, ``close()`` releases the workers. A
  cluster backend is one more class with these two methods (an actor per worker built
  from the job, a task per configuration);
* :class:`Evaluations` - the cache in front of an executor: a configuration is scored
  once, whatever asks for it how often.

Ranking runs (``ranking=True``) score a configuration on a part of the evaluation
batches only (:attr:`Job.ranking`, within :data:`RANKING_MACS`): the fallback's
sensitivity pass, one evaluation per quantized node, only orders the nodes, and an
order needs fewer samples than a verdict. The part is the batches that carry the most
of the full plan's error (:func:`with_ranking`): quantization noise is concentrated on
a few hard samples (on natural photos, a quarter of the samples carry most of a
MobileNet's 1 - cosine), and the target's mean is decided there, so nodes are ranked by
the harm they do where it counts. Every figure that decides whether a target holds
comes from the whole evaluation set.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from trtq.calib.collect import Batch
from trtq.calib.data.feeds import is_whole_feed, samples_in
from trtq.calib.ranges import TensorRange
from trtq.errors import UserError
from trtq.graph import fp16, qdq
from trtq.graph.load import model_inputs
from trtq.quantizer import Prepared, fp16_limits, lower
from trtq.report.compare import AccuracyResult, ComparisonReport
from trtq.report.metrics import (
    LabelAccuracy,
    OutputAgreement,
    json_number,
    per_sample_cosine,
    top1,
)
from trtq.sessions import open_session, reference_session

if TYPE_CHECKING:
    from trtq.tune.holdout import Evaluation

#: A configuration: the quantized nodes of the plan left in high precision instead.
Configuration = frozenset[str]
#: The reason written on a node the fallback moved out of INT8/FP8.
FALLBACK_REASON = "sensitivity fallback"
#: Ranking runs take as many evaluation samples as cost no more multiply-accumulates than
#: this (16 samples of a MobileNet at 224x224, 3 of MiniLM at 64 tokens)...
RANKING_MACS = 2_500_000_000
#: ...but never fewer than this many (nor more than the evaluation set holds).
MIN_RANKING_SAMPLES = 4


@dataclass(frozen=True)
class Job:
    """What building and scoring any configuration takes; pickled once per worker."""

    model: bytes  # the planning graph (normalised, frozen inputs folded), serialized
    plan: qdq.QuantPlan  # the full plan, unusable ranges already left in float
    ranges: Mapping[str, TensorRange]  # the full plan's, shared within range groups
    precision: str  # int8 or fp8
    mixed: fp16.MixedPrecisionOptions | None  # --high-precision fp16/bf16
    fp16_amax: Mapping[str, float]  # observed |x| per tensor, for the FP16/BF16 plan
    example: Batch | None  # one batch, for the shapes the FP16/BF16 plan reads
    batches: tuple[Batch, ...]  # the evaluation data, only the inputs the model takes
    reference: tuple[dict[str, np.ndarray], ...]  # FP32 outputs of each batch
    labels: np.ndarray | None = None
    label_output: str | None = None
    reference_accuracy: float | None = None
    providers: tuple[str, ...] | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads per session
    #: Samples per evaluation batch; 0 marks a whole feed (one model call, one sample, no
    #: batch axis in its outputs: see trtq.calib.data.feeds).
    sizes: tuple[int, ...] = ()
    macs_per_sample: int = 0  # of the FP32 model, for the ranking runs' budget
    #: Indices of the batches a ranking run scores (None: all of them; see with_ranking).
    ranking: tuple[int, ...] | None = None

    @property
    def quantized(self) -> list[str]:
        """The nodes a configuration may leave in high precision, in graph order."""
        return [d.name for d in self.plan.decisions if d.quantized]

    def batch_indices(self, ranking: bool) -> range | tuple[int, ...]:
        """The batches a run scores: all, or the ranking part for a ranking run."""
        if ranking and self.ranking is not None:
            return self.ranking
        return range(len(self.batches))


def make_job(
    prepared: Prepared,
    evaluation: Evaluation,
    *,
    providers: Sequence[str] | None = None,
) -> Job:
    """The job for ``prepared`` (the pipeline up to Q/DQ insertion) on ``evaluation``.

    The FP32 outputs of the evaluation batches are computed here, once for every
    configuration and every worker.
    """
    if prepared.placement is None:
        raise UserError(
            "measuring nodes against FP32 needs INT8/FP8 placement",
            "use --precision int8 or fp8",
        )
    model = prepared.model
    wanted = {v.name for v in model.graph.input}
    batches = tuple({k: v for k, v in b.items() if k in wanted} for b in evaluation.batches())
    if not batches:
        raise UserError("the evaluation data yielded no batches", "check --eval DATA")
    session = reference_session(model, providers)
    names = _float_outputs(model)
    reference = tuple(
        dict(zip(names, session.run(names, dict(batch)), strict=True)) for batch in batches
    )
    declared = model_inputs(model)
    sizes = tuple(
        0 if is_whole_feed(batch, declared) else samples_in(batch, declared) for batch in batches
    )
    labels, label_output, accuracy = evaluation.labels, None, None
    if labels is not None:
        label_output = evaluation.label_output or names[0]
        if label_output not in names:
            raise UserError(
                f"no float output named '{label_output}'", f"choose one of: {', '.join(names)}"
            )
        scores = np.concatenate([outputs[label_output] for outputs in reference])
        _check_labels(label_output, scores, labels)
        accuracy = float(np.mean(top1(scores) == labels))
    return Job(
        model=model.SerializeToString(),
        plan=prepared.plan,
        ranges=dict(prepared.ranges),
        precision=prepared.placement.precision,
        mixed=prepared.mixed,
        fp16_amax=fp16_limits(prepared.stats) if prepared.mixed is not None else {},
        example=prepared.example,
        batches=batches,
        reference=reference,
        labels=labels,
        label_output=label_output,
        reference_accuracy=accuracy,
        providers=tuple(providers) if providers else None,
        sizes=sizes,
        macs_per_sample=sum(prepared.node_macs.values()),
    )


def with_ranking(job: Job, shares: Sequence[float]) -> Job:
    """``job`` whose ranking runs score the batches with the largest ``shares`` (of the full
    plan's error, :meth:`Evaluator.shares`) that make up the samples :data:`RANKING_MACS`
    affords (at least :data:`MIN_RANKING_SAMPLES`), in data order; all batches if they
    are all needed."""
    sizes = [max(size, 1) for size in job.sizes]
    wanted = max(MIN_RANKING_SAMPLES, RANKING_MACS // max(job.macs_per_sample, 1))
    if wanted >= sum(sizes):
        return dataclasses.replace(job, ranking=None)
    chosen: list[int] = []
    for index in sorted(range(len(sizes)), key=lambda i: (-shares[i], i)):
        if sum(sizes[i] for i in chosen) >= wanted:
            break
        chosen.append(index)
    if len(chosen) == len(sizes):
        return dataclasses.replace(job, ranking=None)
    return dataclasses.replace(job, ranking=tuple(sorted(chosen)))


def _float_outputs(model: onnx.ModelProto) -> list[str]:
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    names = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in floats]
    if not names:
        raise UserError(
            "the model has no float output to measure against FP32", "check the model's outputs"
        )
    return names


def _check_labels(output: str, scores: np.ndarray, labels: np.ndarray) -> None:
    if scores.ndim < 2 or scores[0].size < 2:
        raise UserError(
            f"output '{output}' has shape {scores.shape}: not one row of class scores per sample",
            "choose the classifier output with --label-output",
        )
    if len(labels) != len(scores):
        raise UserError(
            f"{len(labels)} labels for {len(scores)} evaluation samples",
            "give one label per sample, in data order",
        )


class Evaluator:
    """Builds and scores configurations of one job (one per worker process)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._model = onnx.load_model_from_string(job.model)
        self._graph = gs.import_onnx(self._model)

    def plan(self, configuration: Configuration) -> qdq.QuantPlan:
        return self.job.plan.with_float(
            configuration, FALLBACK_REASON, self.job.ranges, self._graph
        )

    def build(self, configuration: Configuration) -> onnx.ModelProto:
        """The model ``trtq quantize`` would write for this configuration."""
        job = self.job
        model, _ = lower(
            self._model,
            self.plan(configuration),
            job.ranges,
            job.precision,
            job.mixed,
            job.fp16_amax,
            job.example,
        )
        return model

    def __call__(self, configuration: Configuration, ranking: bool = False) -> ComparisonReport:
        """The configuration's figures on the evaluation batches (the ranking part of them
        for a ranking run)."""
        return self._run(configuration, self.job.batch_indices(ranking))[0]

    def shares(self, configuration: Configuration) -> tuple[ComparisonReport, list[float]]:
        """The configuration's figures on every batch, and each batch's share of its error:
        per output, the batch's part of the summed 1 - cosine and of the summed squared
        error, the largest over outputs and the two (what :func:`with_ranking` sorts by)."""
        return self._run(configuration, range(len(self.job.batches)))

    def _run(
        self, configuration: Configuration, indices: Sequence[int]
    ) -> tuple[ComparisonReport, list[float]]:
        job = self.job
        session = open_session(self.build(configuration), job.providers, threads=job.threads)
        names = list(job.reference[0])
        agreements = {name: OutputAgreement() for name in names}
        accuracy = LabelAccuracy()
        sizes = [max(size, 1) for size in job.sizes]
        starts = np.cumsum([0, *sizes])
        labelled = job.labels is not None and job.label_output is not None
        errors = np.zeros((len(indices), len(names), 2))  # per batch, output: 1 - cos, squared
        for row, index in enumerate(indices):
            expected = job.reference[index]
            got = dict(zip(names, session.run(names, dict(job.batches[index])), strict=True))
            whole = job.sizes[index] == 0
            for column, name in enumerate(names):
                agreements[name].update(expected[name], got[name], one_sample=whole)
                errors[row, column] = _error_energy(expected[name], got[name], whole)
            first, end = int(starts[index]), int(starts[index + 1])
            if labelled:
                accuracy.update(got[job.label_output], job.labels[first:end])
        found = None
        seen = sum(sizes[i] for i in indices)
        if labelled:
            found = AccuracyResult(
                job.label_output, seen, job.reference_accuracy or 0.0, accuracy.accuracy
            )
        outputs = {name: agreement.result() for name, agreement in agreements.items()}
        totals = errors.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            parts = np.where(totals > 0, errors / totals, 0.0)
        shares = [float(np.nan_to_num(p, nan=1.0).max(initial=0.0)) for p in parts]
        return ComparisonReport(seen, len(indices), outputs, found), shares


def _error_energy(reference: np.ndarray, candidate: np.ndarray, whole: bool) -> tuple[float, float]:
    """(summed 1 - cosine over the samples, summed squared error) of one output's batch."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if whole:
        ref, cand = ref.reshape(1, -1), cand.reshape(1, -1)
    cosine = per_sample_cosine(ref, cand)
    with np.errstate(invalid="ignore", over="ignore"):
        squared = float(np.sum((cand - ref) ** 2))
    return float(np.sum(1.0 - cosine)), squared


def worst(score: ComparisonReport) -> tuple[float, float]:
    """(the lowest mean cosine, the highest relative L2 error) over the outputs."""
    cosine = min(a.cosine_mean for a in score.outputs.values())
    rel_l2 = max(a.rel_l2 for a in score.outputs.values())
    return cosine, rel_l2


def score_json(score: ComparisonReport) -> dict:
    """The figures of one configuration, per output: what a step or a table row needs."""
    return {
        "samples": score.samples,
        "outputs": {
            name: {
                "cosine_mean": json_number(a.cosine_mean),
                "cosine_min": json_number(a.cosine_min),
                "rel_l2": json_number(a.rel_l2),
                "max_abs": json_number(a.max_abs),
                "top1_agreement": None if a.top1 is None else json_number(a.top1),
            }
            for name, a in score.outputs.items()
        },
        "accuracy": score.accuracy.to_json() if score.accuracy else None,
    }


class Executor(Protocol):
    """Scores configurations somewhere: here, in worker processes, on a cluster."""

    def map(
        self, configurations: Sequence[Configuration], ranking: bool = False
    ) -> Iterator[ComparisonReport]:
        """The scores of ``configurations``, in their order (ranking runs if ``ranking``)."""
        ...

    def close(self) -> None: ...


class InProcess:
    """Every configuration in this process, one after the other."""

    def __init__(self, job: Job) -> None:
        self._evaluator = Evaluator(job)

    def map(
        self, configurations: Sequence[Configuration], ranking: bool = False
    ) -> Iterator[ComparisonReport]:
        return (self._evaluator(c, ranking) for c in configurations)

    def close(self) -> None:
        pass


#: The evaluator of this worker process (set by the pool's initializer).
_WORKER: Evaluator | None = None


def _start_worker(job: Job) -> None:
    global _WORKER
    _WORKER = Evaluator(job)


def _score_in_worker(configuration: Configuration, ranking: bool) -> ComparisonReport:
    if _WORKER is None:
        raise RuntimeError("worker process started without its job")
    return _WORKER(configuration, ranking)


class ProcessPool:
    """Configurations scored in ``workers`` processes, each holding the job once.

    The processes are spawned, not forked: a fork would inherit ONNX Runtime's thread
    pools mid-state. Each session gets an equal share of the cores, so ``workers``
    sessions side by side do not fight over them.
    """

    def __init__(self, job: Job, workers: int) -> None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(dataclasses.replace(job, threads=threads),),
        )

    def map(
        self, configurations: Sequence[Configuration], ranking: bool = False
    ) -> Iterator[ComparisonReport]:
        return self._pool.map(_score_in_worker, configurations, [ranking] * len(configurations))

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def open_executor(job: Job, workers: int = 1, ray: str | bool | None = None) -> Executor:
    """This process for one worker, a process pool for more; with ``ray`` (True: a local
    instance, or an address), the Ray cluster (:mod:`trtq.tune.ray_executor`)."""
    if ray is not None and ray is not False:
        from trtq.ray_cluster import address_of
        from trtq.tune.ray_executor import RayExecutor

        return RayExecutor(job, address_of(ray))
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}", "e.g. --workers 2")
    return InProcess(job) if workers == 1 else ProcessPool(job, workers)


class Evaluations:
    """Scores by configuration, each computed once (the cache is keyed by the set of nodes,
    and whether the run was a ranking run).

    ``runs`` counts the configurations actually scored on the whole evaluation set,
    ``ranking_runs`` those scored on its ranking part; asking again for one already scored
    costs nothing. ``partial_ranking`` False (the job ranks on every batch): a ranking run is
    a whole run. Use as a context manager to release the executor.
    """

    def __init__(
        self, executor: Executor, *, progress: bool = False, partial_ranking: bool = False
    ) -> None:
        self._executor = executor
        self._progress = progress
        self._partial = partial_ranking
        self._scores: dict[tuple[Configuration, bool], ComparisonReport] = {}
        self.runs = 0
        self.ranking_runs = 0

    def __enter__(self) -> Evaluations:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._executor.close()

    def __call__(
        self, configurations: Sequence[Configuration], ranking: bool = False
    ) -> list[ComparisonReport]:
        """The scores of ``configurations``; those not seen before are run, in one batch."""
        ranking = ranking and self._partial
        wanted = [(frozenset(c), ranking) for c in configurations]
        missing = list(dict.fromkeys(c for c in wanted if c not in self._scores))
        if missing:
            scores = self._executor.map([c for c, _ in missing], ranking)
            with tqdm(
                scores,
                total=len(missing),
                unit="model",
                desc="evaluating",
                # None: off when stderr is not a terminal (logs, CI).
                disable=None if self._progress and len(missing) >= 2 else True,
                leave=False,
            ) as bar:
                for key, score in zip(missing, bar, strict=True):
                    self._scores[key] = score
            if ranking:
                self.ranking_runs += len(missing)
            else:
                self.runs += len(missing)
        return [self._scores[c] for c in wanted]

    def add(self, configuration: Configuration, score: ComparisonReport) -> None:
        """Count in a whole run made elsewhere (the full plan, scored before the executor
        existed to choose the ranking batches)."""
        key = (frozenset(configuration), False)
        if key not in self._scores:
            self._scores[key] = score
            self.runs += 1

    def one(self, configuration: Configuration) -> ComparisonReport:
        return self([configuration])[0]
