"""``trtq sensitivity``: what quantizing each node costs at the model's outputs.

Per quantized node of the plan, two configurations (:mod:`trtq.tune.evaluate`):

* *alone*: only that node quantized. The harm it does by itself, free of the others'
  noise; the table is sorted by it (the worst output's relative L2 error, which sees
  noise and scale errors alike; cosine is blind to the latter).
* *all but*: every node quantized except that one. Against the full plan, the gain of
  moving it to high precision; where it differs from the harm alone, the node interacts
  with the others (its error is amplified, or masked, downstream).

Ranges are calibrated once, and each configuration uses the full plan's ranges. With N
nodes that is 2N + 1 evaluations (2N + 2 with FP16/BF16 as high precision, whose floor,
no node quantized, is shown too), spread over ``--workers`` processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from trtq import quantizer
from trtq.graph import fp16, qdq
from trtq.quantizer import CalibrationOptions, Prepared
from trtq.report.compare import ComparisonReport
from trtq.report.metrics import json_number
from trtq.tune.evaluate import Evaluations, make_job, open_executor, score_json, worst
from trtq.tune.holdout import Evaluation


@dataclass(frozen=True)
class NodeSensitivity:
    """One node: its figures quantized alone, and with every other node quantized."""

    node: qdq.NodeDecision
    alone: ComparisonReport
    all_but: ComparisonReport

    @property
    def harm(self) -> float:
        """The worst output's relative L2 error with only this node quantized (NaN: inf)."""
        _, rel_l2 = worst(self.alone)
        return math.inf if math.isnan(rel_l2) else rel_l2

    def to_json(self) -> dict:
        return {
            "name": self.node.name,
            "op": self.node.op,
            "macs": self.node.macs,
            "harm": json_number(self.harm),
            "alone": score_json(self.alone),
            "all_but": score_json(self.all_but),
        }


@dataclass(frozen=True)
class Sensitivity:
    """Every quantized node's sensitivity, most harmful first, and what it was measured on."""

    data: str
    precision: str
    high_precision: str
    method: str
    full: ComparisonReport  # every node quantized
    floor: ComparisonReport | None  # no node quantized (FP16/BF16 only: FP32 is the reference)
    nodes: list[NodeSensitivity]
    evaluations: int
    workers: int
    seconds: float

    def to_json(self) -> dict:
        return {
            "data": self.data,
            "precision": self.precision,
            "high_precision": self.high_precision,
            "method": self.method,
            "evaluations": self.evaluations,
            "workers": self.workers,
            "seconds": round(self.seconds, 3),
            "all_quantized": score_json(self.full),
            "none_quantized": None if self.floor is None else score_json(self.floor),
            "nodes": [node.to_json() for node in self.nodes],
        }


def measure(
    prepared: Prepared,
    evaluation: Evaluation,
    *,
    method: str,
    workers: int = 1,
    providers: Sequence[str] | None = None,
    progress: bool = False,
    ray: str | bool | None = None,
) -> Sensitivity:
    """The sensitivity of every quantized node of ``prepared`` on ``evaluation``; on a Ray
    cluster with ``ray`` (True: a local instance, or its address)."""
    started = time.perf_counter()
    job = make_job(prepared, evaluation, providers=providers)
    decisions = [d for d in prepared.plan.decisions if d.quantized]
    everything = frozenset(d.name for d in decisions)
    high = prepared.mixed.precision if prepared.mixed is not None else "fp32"
    configurations = [frozenset()]
    configurations += [everything - {d.name} for d in decisions]
    configurations += [frozenset({d.name}) for d in decisions]
    if prepared.mixed is not None:
        configurations.append(everything)
    with Evaluations(open_executor(job, workers, ray), progress=progress) as evaluate:
        scores = evaluate(configurations)
        runs = evaluate.runs
    count = len(decisions)
    nodes = [
        NodeSensitivity(d, scores[1 + i], scores[1 + count + i]) for i, d in enumerate(decisions)
    ]
    nodes.sort(key=lambda n: -n.harm)  # stable: ties keep graph order
    return Sensitivity(
        data=evaluation.description,
        precision=job.precision,
        high_precision=high,
        method=method,
        full=scores[0],
        floor=scores[-1] if prepared.mixed is not None else None,
        nodes=nodes,
        evaluations=runs,
        workers=workers,
        seconds=time.perf_counter() - started,
    )


def format_table(found: Sensitivity) -> str:
    """The text report: what was measured, then one row per node, most harmful first."""
    low, high = found.precision.upper(), found.high_precision.upper()
    outputs = len(found.full.outputs)
    worst = "" if outputs == 1 else f" (worst of {outputs} outputs; --json has each)"
    lines = [
        f"sensitivity of {len(found.nodes)} {low} nodes (ranges: {found.method}) on {found.data}",
        f"{found.evaluations} evaluations in {found.seconds:.1f} s "
        f"({found.workers} worker{'' if found.workers == 1 else 's'}); "
        f"figures against FP32{worst}",
        f"every node {low}: {_figures(found.full)}",
    ]
    if found.floor is not None:
        lines.append(f"no node {low} (all {high}): {_figures(found.floor)}")
    header = (
        "node",
        "op",
        "MACs",
        "alone: cosine",
        "rel L2",
        "all but: cosine",
        "rel L2",
    )
    rows = [header] + [
        (
            n.node.name,
            n.node.op,
            f"{n.node.macs:,}",
            *_cells(n.alone),
            *_cells(n.all_but),
        )
        for n in found.nodes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines.append("")
    lines += [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines += [
        "",
        f"alone: only that node in {low}; all but: every node in {low} except that one "
        f"(in {high}). Sorted by the relative L2 error alone.",
    ]
    return "\n".join(lines)


def _cells(score: ComparisonReport) -> tuple[str, str]:
    cosine, rel_l2 = worst(score)
    return f"{cosine:.6f}", f"{rel_l2:.4g}"


def _figures(score: ComparisonReport) -> str:
    cosine, rel_l2 = worst(score)
    return f"mean cosine {cosine:.6f}, rel L2 {rel_l2:.4g}"


def calibrate_and_measure(
    loaded: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]] | None,
    held_out: Evaluation,
    calibration: CalibrationOptions,
    placement: qdq.PlacementOptions,
    high_precision: str,
    freeze_inputs: Mapping[str, Any] | None,
    workers: int,
    ray: str | bool | None,
) -> Sensitivity:
    """Calibrate once, then measure every node (``trtq.sensitivity`` after its checks)."""
    prepared = quantizer.prepare(
        loaded,
        batches,
        placement=placement,
        mixed=None
        if high_precision == "fp32"
        else fp16.MixedPrecisionOptions(precision=high_precision),
        calibration=calibration,
        frozen={name: np.asarray(value) for name, value in (freeze_inputs or {}).items()},
    )
    return measure(
        prepared,
        held_out,
        method=calibration.method,
        workers=workers,
        providers=calibration.providers,
        progress=calibration.progress,
        ray=ray,
    )
