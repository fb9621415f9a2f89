"""``trtq quantize --target-*``: the most INT8 that keeps a fidelity target.

Start from the full plan. If it misses the target on the evaluation data, move nodes to
the high precision (FP32, or FP16/BF16 with ``--high-precision``) in order of harm per
multiply-accumulate, until the target holds: the shortest such prefix of the order,
found by galloping (the 1, 2, 4, ... most harmful nodes, then halving the gap between the
longest prefix that missed and the shortest that held). Then try each moved node back in
INT8, least harmful first, and keep it there if the target still holds. Every step is one
evaluation and is reported: the node (for a fall-back step, the last of its prefix), how
many nodes are in high precision, the fidelity and the coverage after it.

A node's harm is measured with only that node quantized, in the target's own terms
(:meth:`Target.harm`): noise from independent nodes adds up in energy, so these figures
add up to the full plan's, roughly, and harm per MAC ranks the nodes that buy the most
fidelity for the least INT8 lost.

Cost, for N quantized nodes of which k move (each evaluation: build the model, run the
evaluation samples):

* the full plan: 1 evaluation (nothing more if it meets the target);
* every node in high precision: 1 (if that misses the target too, nothing can meet it:
  exit 3, naming the figure);
* the sensitivity pass: N, in parallel on ``--workers``, each on the ranking part of the
  evaluation samples (the ones the full plan errs most on, within
  :data:`~trtq.tune.evaluate.RANKING_MACS`: 16 of 64 MobileNet crops): it only orders the
  nodes, and every step that decides whether the target holds runs every sample;
* falling back: about 2 log2(k) (galloping, then bisection; the fidelity of a prefix grows
  with its length nearly, not strictly, monotonically: where it does not, the prefix found
  still meets the target and the next pass returns what it does not need);
* bringing back: one per node moved, k, sequential (the first one is free when the last
  fall-back step was the prefix one node shorter).

So N + 2 + 2 log2(k) + k evaluations, at most 2N + 2 + 2 log2(N); growth is linear in the
number of nodes, and the N evaluations of the sensitivity pass, the bulk, are the cheap
ones and spread over the workers. The fall-back and bring-back steps run one at a time
(each depends on the last), so the steps are the same whatever the number of workers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from trtq.calib.collect import Batch
from trtq.errors import GateFailedError, UserError
from trtq.graph import qdq
from trtq.quantizer import Prepared
from trtq.report.compare import ComparisonReport, GateResult, evaluate_gates
from trtq.tune.evaluate import (
    Configuration,
    Evaluations,
    Evaluator,
    make_job,
    open_executor,
    score_json,
    with_ranking,
    worst,
)
from trtq.tune.holdout import Evaluation, EvaluationOptions


@dataclass(frozen=True)
class Target:
    """What the outputs must keep against FP32 (None: not asked for); all must hold.

    ``min_cosine`` bounds every output's mean cosine, ``max_rel_l2`` every output's
    relative L2 error, ``max_drop`` the top-1 accuracy lost on labels, in points.
    """

    min_cosine: float | None = None
    max_rel_l2: float | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        if self.min_cosine is None and self.max_rel_l2 is None and self.max_drop is None:
            raise ValueError("a target needs at least one of min_cosine, max_rel_l2, max_drop")

    def gates(self, score: ComparisonReport) -> list[GateResult]:
        return evaluate_gates(
            score, min_cosine=self.min_cosine, max_rel_l2=self.max_rel_l2, max_drop=self.max_drop
        )

    def met(self, score: ComparisonReport) -> bool:
        return all(gate.passed for gate in self.gates(score))

    def harm(self, score: ComparisonReport) -> float:
        """How far ``score`` is from FP32, in shares of what the target allows.

        1 - cosine and the squared relative L2 error are noise energies, which add up
        over independent nodes; each is divided by its allowance so that two targets
        weigh alike. Accuracy moves in whole samples, too coarse to rank single nodes:
        with only ``max_drop``, 1 - cosine stands in for it. NaN counts as the worst.
        """
        cosine, rel_l2 = worst(score)
        parts = []
        if self.min_cosine is not None:
            parts.append((1 - cosine) / max(1 - self.min_cosine, 1e-12))
        if self.max_rel_l2 is not None:
            parts.append(rel_l2**2 / max(self.max_rel_l2**2, 1e-24))
        if not parts:
            parts.append(1 - cosine)
        largest = max(parts)
        return math.inf if math.isnan(largest) else largest

    def describe(self) -> str:
        parts = []
        if self.min_cosine is not None:
            parts.append(f"mean cosine >= {self.min_cosine:g}")
        if self.max_rel_l2 is not None:
            parts.append(f"relative L2 <= {self.max_rel_l2:g}")
        if self.max_drop is not None:
            parts.append(f"accuracy drop <= {self.max_drop:g} pts")
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {
            "min_cosine": self.min_cosine,
            "max_rel_l2": self.max_rel_l2,
            "max_drop": self.max_drop,
        }


@dataclass(frozen=True)
class Budget:
    """``quantize --target-*``: the target, the data it is judged on, and the workers."""

    target: Target
    evaluation: EvaluationOptions = field(default_factory=EvaluationOptions)
    workers: int = 1
    providers: Sequence[str] | None = None
    progress: bool = False
    #: Evaluate on a Ray cluster (True: a local instance, or its address): the sensitivity
    #: pass spreads over its workers.
    ray: str | bool | None = None

    def split(
        self, batches: Iterable[Batch] | None, model: onnx.ModelProto
    ) -> tuple[Iterable[Batch] | None, Evaluation]:
        """(the batches calibration may read, the evaluation data)."""
        if self.target.max_drop is not None and self.evaluation.labels is None:
            raise UserError(
                "an accuracy target needs labelled evaluation data",
                "pass --eval DATA with labels (an .npz with a 'labels' array, or --labels)",
            )
        return self.evaluation.split(batches, model)

    def search(self, prepared: Prepared, evaluation: Evaluation) -> Search:
        return search(prepared, evaluation, self)


@dataclass(frozen=True)
class Step:
    """One evaluation of the search: the node changed, and the model's figures after it."""

    action: str  # "start", "fall back" or "restore"
    node: qdq.NodeDecision | None
    precision: str | None  # the node's precision in the configuration evaluated
    score: ComparisonReport
    met: bool
    kept: bool  # False for a restore that broke the target, and was undone
    coverage: float  # share of the MACs quantized in the configuration evaluated
    in_high_precision: int = 0  # nodes in high precision in the configuration evaluated

    def to_json(self) -> dict:
        node = self.node
        return {
            "action": self.action,
            "node": None if node is None else node.name,
            "op": None if node is None else node.op,
            "macs": None if node is None else node.macs,
            "precision": self.precision,
            "met": self.met,
            "kept": self.kept,
            "coverage": self.coverage,
            "in_high_precision": self.in_high_precision,
            **score_json(self.score),
        }


@dataclass
class Search:
    """What the search did and found: every step, the harm per node, the plan chosen."""

    target: Target
    data: str
    precision: str
    high_precision: str
    plan: qdq.QuantPlan
    steps: list[Step] = field(default_factory=list)
    #: Harm in isolation per node, most harmful per MAC first (empty if none was needed).
    harm: dict[str, float] = field(default_factory=dict)
    moved: list[str] = field(default_factory=list)
    #: Evaluations on every evaluation sample (the steps)...
    evaluations: int = 0
    #: ...and those of the sensitivity pass, on ``ranking_samples`` of them.
    ranking_evaluations: int = 0
    ranking_samples: int = 0
    workers: int = 1
    seconds: float = 0.0

    def to_json(self) -> dict:
        macs = {d.name: d.macs for d in self.plan.decisions}
        return {
            "target": self.target.to_json(),
            "data": self.data,
            "precision": self.precision,
            "high_precision": self.high_precision,
            "moved": self.moved,
            "evaluations": self.evaluations,
            "ranking_evaluations": self.ranking_evaluations,
            "ranking_samples": self.ranking_samples,
            "workers": self.workers,
            "seconds": round(self.seconds, 3),
            "steps": [step.to_json() for step in self.steps],
            "harm": [
                {"node": name, "macs": macs.get(name, 0), "harm": _finite(value)}
                for name, value in self.harm.items()
            ],
        }


#: ``step(action, node, configuration, score)``: records one evaluation, says if it met the target.
Record = Callable[[str, "str | None", Configuration, ComparisonReport], bool]


class TargetUnreachableError(GateFailedError):
    """Even with every quantized node in high precision the target is missed (exit 3).

    ``result`` is the :class:`Search` up to that point: the full plan and the all-high-
    precision configuration, with their figures.
    """


def search(prepared: Prepared, evaluation: Evaluation, budget: Budget) -> Search:
    """The configuration with the most INT8 that meets ``budget.target`` (module docstring)."""
    started = time.perf_counter()
    target = budget.target
    plan = prepared.plan
    nodes = {d.name: d for d in plan.decisions if d.quantized}
    total_macs = sum(d.macs for d in plan.decisions)
    quantized_macs = sum(d.macs for d in nodes.values())
    high = prepared.mixed.precision if prepared.mixed is not None else "fp32"
    job = make_job(prepared, evaluation, providers=budget.providers)
    start, shares = Evaluator(job).shares(frozenset())
    job = with_ranking(job, shares)
    low = job.precision
    found = Search(target, evaluation.description, low, high, plan, workers=budget.workers)

    def coverage(floats: Configuration) -> float:
        moved = sum(nodes[name].macs for name in floats)
        return (quantized_macs - moved) / total_macs if total_macs else 0.0

    def step(action: str, node: str | None, floats: Configuration, score: ComparisonReport) -> bool:
        """Record one evaluation; whether it meets the target."""
        met = target.met(score)
        precision = None if node is None else (high if node in floats else low)
        decision = None if node is None else nodes[node]
        kept = met if action == "restore" else True
        found.steps.append(
            Step(action, decision, precision, score, met, kept, coverage(floats), len(floats))
        )
        return met

    executor = open_executor(job, budget.workers, budget.ray)
    partial = job.ranking is not None
    with Evaluations(executor, progress=budget.progress, partial_ranking=partial) as evaluate:
        try:
            floats = frozenset()
            evaluate.add(floats, start)
            if not step("start", None, floats, start):
                _check_reachable(evaluate, frozenset(nodes), target, found, step)
                found.harm, found.ranking_samples = _ranking(evaluate, list(nodes), nodes, target)
                floats = _fall_back(evaluate, list(found.harm), step)
                floats = _bring_back(evaluate, floats, list(found.harm), step)
        finally:
            found.evaluations = evaluate.runs
            found.ranking_evaluations = evaluate.ranking_runs
            found.seconds = time.perf_counter() - started
    found.moved = [name for name in nodes if name in floats]
    found.plan = plan.with_float(floats, _reason(high, target), prepared.ranges, prepared.graph)
    return found


def _reason(high: str, target: Target) -> str:
    return f"sensitivity fallback: {high.upper()} to keep {target.describe()}"


def _check_reachable(
    evaluate: Evaluations, everything: Configuration, target: Target, found: Search, step: Record
) -> None:
    if step("all high precision", None, everything, evaluate.one(everything)):
        return
    missed = "; ".join(g.detail for g in target.gates(found.steps[-1].score) if not g.passed)
    hint = (
        f"{found.high_precision.upper()} alone misses it: use --high-precision fp32, or lower "
        "the target"
        if found.high_precision != "fp32"
        else "lower the target, or check the evaluation data"
    )
    raise TargetUnreachableError(
        f"the target ({target.describe()}) cannot be met even with all {len(everything)} "
        f"quantized nodes in {found.high_precision.upper()}: {missed}. {hint}",
        found,
    )


def _ranking(
    evaluate: Evaluations,
    names: list[str],
    nodes: Mapping[str, qdq.NodeDecision],
    target: Target,
) -> tuple[dict[str, float], int]:
    """Harm of each node quantized alone, most harmful per MAC first (ties: graph order),
    and the samples it was measured on (ranking runs)."""
    everything = frozenset(names)
    scores = evaluate([everything - {name} for name in names], ranking=True)
    harm = {name: target.harm(score) for name, score in zip(names, scores, strict=True)}
    order = sorted(
        range(len(names)),
        key=lambda i: (-harm[names[i]] / max(nodes[names[i]].macs, 1), i),
    )
    return {names[i]: harm[names[i]] for i in order}, scores[0].samples


def _fall_back(evaluate: Evaluations, order: list[str], step: Record) -> Configuration:
    """The shortest prefix of ``order`` that meets the target, in high precision (galloping,
    then bisection: see the module docstring). The whole order is known to meet it."""
    missed, held = 0, len(order)  # the longest prefix known to miss, the shortest to hold
    length = 1
    while length < held:  # galloping: 1, 2, 4, ... nodes
        if _try_prefix(evaluate, order, length, step):
            held = length
        else:
            missed, length = length, 2 * length
    while held - missed > 1:  # bisection between the two
        length = (missed + held) // 2
        if _try_prefix(evaluate, order, length, step):
            held = length
        else:
            missed = length
    return frozenset(order[:held])


def _try_prefix(evaluate: Evaluations, order: list[str], length: int, step: Record) -> bool:
    configuration = frozenset(order[:length])
    return step("fall back", order[length - 1], configuration, evaluate.one(configuration))


def _bring_back(
    evaluate: Evaluations, floats: Configuration, order: list[str], step: Record
) -> Configuration:
    """Put each moved node back in INT8, least harmful first; keep it where the target holds."""
    for name in [n for n in reversed(order) if n in floats]:
        trial = floats - {name}
        if step("restore", name, trial, evaluate.one(trial)):
            floats = trial
    return floats


def format_steps(found: dict) -> list[str]:
    """The search as text, from its JSON (``report["fallback"]``): one line per step."""
    moved = len(found["moved"])
    workers = found["workers"]
    high = found["high_precision"].upper()
    ranked = found.get("ranking_evaluations", 0)
    ranking = (
        f" and {ranked} of single nodes on {found['ranking_samples']} samples" if ranked else ""
    )
    lines = [
        f"target {Target(**found['target']).describe()} on {found['data']}: "
        f"{moved} node{'' if moved == 1 else 's'} moved to {found['high_precision'].upper()}, "
        f"{found['evaluations']} evaluation{'' if found['evaluations'] == 1 else 's'}"
        f"{ranking} in {found['seconds']:.1f} s "
        f"({workers} worker{'' if workers == 1 else 's'})"
    ]
    for step in found["steps"]:
        what = step["action"]
        if what == "all high precision":
            what = f"every node in {found['high_precision'].upper()}"
        if step["node"] is not None:
            what += f" {step['node']} ({step['op']}, {step['macs']:,} MACs)"
            what += f" -> {step['precision'].upper()}"
        if step["action"] == "fall back":
            what += f" ({step.get('in_high_precision')} most harmful in {high})"
        verdict = "met" if step["met"] else "missed"
        if step["action"] == "restore":
            verdict += ", kept" if step["kept"] else ", undone"
        lines.append(f"  {what}: {_figures(step)}, coverage {step['coverage']:.1%}: {verdict}")
    return lines


def _figures(step: dict) -> str:
    """Worst output's mean cosine and relative L2, and the accuracy drop if labelled."""
    outputs = step["outputs"].values()
    cosines = [o["cosine_mean"] for o in outputs]
    errors = [o["rel_l2"] for o in outputs]
    cosine = "nan" if None in cosines else f"{min(cosines):.6f}"
    rel_l2 = "nan" if None in errors else f"{max(errors):.4g}"
    text = f"cosine {cosine}, rel L2 {rel_l2}"
    if step.get("accuracy"):
        text += f", accuracy drop {step['accuracy']['drop_points']:.2f} pts"
    return text


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
