"""What the HTML report shows, computed in Python: one JSON-safe dict for the page's script.

The page only draws. Everything that takes trtq's own arithmetic is done here, so the page
and the command line agree to the last digit:

* per quantized tensor, the amax each range method of :mod:`trtq.calib.ranges` would pick
  from the tensor's histogram (``max``, ``percentile``, ``mse``, and ``entropy``'s raw KL
  minimum, before the spike guard), the share of the non-zero values each one clips
  (:func:`~trtq.calib.ranges.clipped_share`), and the amax that was chosen: the report's,
  which for a range group comes from the members' merged histogram;
* the histogram itself, summed down to at most :data:`DISPLAY_BINS` bins (a plot has no use
  for 2048 bins, and a 200-tensor detector must stay a small page);
* float nodes and FP32 islands with a reason *kind* (the reason with names and numbers
  blanked: "tiny (… output channels): INT8 does not pay below N channels") to filter by;
* the harm per node (``trtq sensitivity`` output, or the ranking of the fallback search of
  ``quantize --target-*``) as bars, and the search's steps with the worst output's figures;
* per output, FP32 against the quantized model: the check after writing (in every report)
  and any ``trtq compare --json`` results given, each with its |error| histogram.

Everything returned is finite: a NaN or infinity becomes None (strict JSON has neither).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtq.calib.cache import CalibrationStats
from trtq.calib.histogram import Histogram
from trtq.calib.ranges import (
    clipped_share,
    entropy_amax,
    entropy_refusal,
    max_amax,
    mse_amax,
    percentile_amax,
)

#: The most bins a histogram is drawn with (a power of two: histograms are summed down).
DISPLAY_BINS = 512
#: The percentile drawn when the report does not record the one it was made with.
DEFAULT_PERCENTILE = 99.99
#: A token that is a graph name (a path, a snake_case or dotted name), or a plain number.
_NAME_TOKEN = re.compile(r"[^\s]*[/_:][^\s]*|[^\s]+\.[^\s.]+")
_NUMBER_TOKEN = re.compile(r"[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?")


@dataclass(frozen=True)
class Comparison:
    """FP32 against the quantized model on some data: where from, and the figures per output."""

    title: str
    detail: str
    #: Output name -> the figures of :meth:`trtq.report.metrics.Agreement.to_json`.
    outputs: Mapping[str, Mapping[str, Any]]
    #: :meth:`trtq.report.compare.AccuracyResult.to_json`, when labels were scored.
    accuracy: Mapping[str, Any] | None = None


def page_data(
    report: Mapping[str, Any],
    stats: CalibrationStats | None = None,
    comparisons: Sequence[Comparison] = (),
    *,
    sensitivity: Mapping[str, Any] | None = None,
    stats_note: str | None = None,
) -> dict:
    """The page's data: ``report`` (the quantize report), its ``stats`` and ``comparisons``.

    ``sensitivity`` is the output of ``trtq sensitivity --report`` for the same model.
    ``stats_note`` says why there are no histograms when ``stats`` is None (the page shows
    it in place of the plots).
    """
    percentile = _percentile(report, stats)
    return _finite(
        {
            "summary": _summary(report),
            "calibration": {
                "method": report.get("method"),
                "percentile": percentile,
                "note": None if stats is not None else stats_note,
                "tensors": _tensors(report, stats, percentile),
            },
            "float_nodes": _nodes(report.get("float_nodes") or []),
            "islands": _islands(report.get("mixed_precision")),
            "sensitivity": _sensitivity(report, sensitivity),
            "fallback": _fallback(report.get("fallback")),
            "fidelity": [_comparison(c) for c in (_checked(report), *comparisons) if c],
        }
    )


def comparison_from_json(data: Mapping[str, Any], source: str) -> Comparison:
    """A :class:`Comparison` from ``trtq compare --json`` output, or from a quantize report
    (its check after writing)."""
    if "verification" in data:
        checked = _checked(data)
        if checked is None:
            raise ValueError(f"the report {source} records no figures (not verified)")
        return Comparison(f"{checked.title}: {source}", checked.detail, checked.outputs)
    return Comparison(
        title=f"trtq compare: {source}",
        detail=f"{data['reference']} against {data['candidate']} on {data['data']}: "
        f"{data['samples']} samples",
        outputs=data["outputs"],
        accuracy=data.get("accuracy"),
    )


def reason_kind(reason: str) -> str:
    """The reason with graph names blanked (…) and numbers replaced by N: what to filter by."""
    words = []
    for word in reason.split():
        core = word.strip("(),;:'\"")
        if _NUMBER_TOKEN.fullmatch(core):
            word = word.replace(core, "N")
        elif core.startswith("--") or core in ("Q/DQ", "|x|"):
            pass  # flags and notation, not names
        elif _NAME_TOKEN.fullmatch(core):
            word = word.replace(core, "…")
        words.append(word)
    return " ".join(words)


# --- summary ----------------------------------------------------------------------------


def _summary(report: Mapping[str, Any]) -> dict:
    verification = report.get("verification") or {}
    floor = (verification.get("floor") or {}).get("checks") or []
    gates = [{"kind": "gate", **g} for g in verification.get("gates") or []]
    gates += [{"kind": "floor", **g} for g in floor]
    coverage = report.get("coverage") or {}
    mixed = report.get("mixed_precision") or {}
    return {
        "model": report.get("model"),
        "output": report.get("output"),
        "stats": report.get("stats"),
        "versions": {
            "trtq": report.get("trtq_version"),
            "onnx": report.get("onnx_version"),
            "ONNX Runtime": report.get("onnxruntime_version"),
        },
        "precision": report.get("precision"),
        "high_precision": mixed.get("precision"),
        "method": report.get("method"),
        "calibration": report.get("calibration"),
        "coverage": {k: v for k, v in coverage.items() if k != "by_op"} or None,
        "coverage_by_op": [{"op": op, **share} for op, share in coverage.get("by_op", {}).items()],
        "mixed_coverage": mixed.get("coverage"),
        "quantized_tensors": len(report.get("quantized_tensors") or []),
        "float_nodes": len(report.get("float_nodes") or []),
        "verification": {
            "status": verification.get("status"),
            "backend": verification.get("backend"),
            "data": verification.get("data"),
        },
        "gates": gates,
        "passed": verification.get("passed"),
    }


# --- calibration ------------------------------------------------------------------------


def _percentile(report: Mapping[str, Any], stats: CalibrationStats | None) -> float:
    if isinstance(report.get("percentile"), int | float):
        return float(report["percentile"])
    if stats is not None and stats.scope is not None:
        return stats.scope.percentile
    return DEFAULT_PERCENTILE


def _tensors(
    report: Mapping[str, Any], stats: CalibrationStats | None, percentile: float
) -> list[dict]:
    groups = {name: group for group in report.get("range_groups") or [] for name in group}
    histograms = stats.histograms if stats is not None else {}
    tensors = []
    for entry in report.get("quantized_tensors") or []:
        name = entry["name"]
        hist = histograms.get(name)
        amax = float(entry["amax"])
        tensors.append(
            {
                "name": name,
                "role": entry.get("role"),
                "amax": amax,
                "method": entry.get("method"),
                "reason": entry.get("reason"),
                "group": [n for n in groups.get(name, ()) if n != name],
                "histogram": _display_histogram(hist) if hist is not None else None,
                "candidates": _candidates(hist, percentile) if hist is not None else [],
                "clipped": _clipped(hist, amax) if hist is not None else None,
            }
        )
    return tensors


def _candidates(hist: Histogram, percentile: float) -> list[dict]:
    """Where each method would put amax on this histogram alone, and what it would clip."""
    if hist.count == 0:
        return []
    found = {
        "max": max_amax(hist),
        "percentile": percentile_amax(hist, percentile),
        "mse": mse_amax(hist),
        "entropy": entropy_amax(hist),
    }
    candidates = []
    for method, amax in found.items():
        clipped = _clipped(hist, amax)
        # compute_range's spike guard: such an entropy threshold is never used.
        refused = method == "entropy" and entropy_refusal(hist, amax) is not None
        candidates.append({"method": method, "amax": amax, "clipped": clipped, "refused": refused})
    return candidates


def _clipped(hist: Histogram, amax: float) -> float:
    """Share of the non-zero values above ``amax``; a bin that ``amax`` cuts counts as clipped
    (exact for the methods' amaxes, which are bin edges or the max)."""
    return clipped_share(hist, amax) if hist.count else 0.0


def _display_histogram(hist: Histogram) -> dict:
    counts = hist.counts
    if hist.bins > DISPLAY_BINS:
        counts = counts.reshape(DISPLAY_BINS, -1).sum(axis=1)
    return {
        "width": hist.range / len(counts),
        "counts": counts.tolist(),
        "count": hist.count,
        "max": hist.amax,
        "nan": hist.nan_count,
        "sentinel": hist.sentinel_count,
    }


# --- float nodes, islands, sensitivity, fallback ----------------------------------------


def _nodes(nodes: Sequence[Mapping[str, Any]]) -> list[dict]:
    return [{**node, "kind": reason_kind(str(node.get("reason") or ""))} for node in nodes]


def _islands(mixed: Mapping[str, Any] | None) -> dict | None:
    if not mixed:
        return None
    return {
        "precision": mixed.get("precision"),
        "coverage": mixed.get("coverage"),
        "activation_limit": mixed.get("activation_limit"),
        "reduced_precision_nodes": mixed.get("reduced_precision_nodes"),
        "nodes": _nodes(mixed.get("fp32_nodes") or []),
    }


def _sensitivity(report: Mapping[str, Any], found: Mapping[str, Any] | None) -> dict | None:
    """Harm per node: from ``trtq sensitivity`` output when given, else from the ranking the
    fallback search made (``report["fallback"]["harm"]``), largest first."""
    if found is not None:
        nodes = found["nodes"]
        figures = found.get("all_quantized")
        return {
            "title": f"trtq sensitivity on {found.get('data')}",
            "metric": "harm: the worst output's relative L2 error with only this node in "
            f"{str(found.get('precision')).upper()}",
            "bars": _bars([(n["name"], n["harm"]) for n in nodes]),
            "about": {
                "precision": f"{found.get('precision')} (others {found.get('high_precision')})",
                "method": found.get("method"),
                "every node quantized": _worst_text(figures) if figures else None,
                "evaluations": f"{found.get('evaluations')} in {found.get('seconds')} s",
            },
            "table": _table(
                [
                    "node",
                    "op",
                    "MACs",
                    "harm",
                    "alone: cosine",
                    "all but: cosine",
                    "all but: rel L2",
                ],
                [
                    [
                        n["name"],
                        n.get("op"),
                        n.get("macs"),
                        n["harm"],
                        *_worst(n.get("alone"))[:1],
                        *_worst(n.get("all_but")),
                    ]
                    for n in nodes
                ],
            ),
        }
    fallback = report.get("fallback") or {}
    if not fallback.get("harm"):
        return None
    return {
        "title": "Ranking of the fallback search",
        "metric": "harm: distance from FP32 with only this node quantized, in shares of what "
        "the target allows (1 = all of it)",
        "bars": _bars([(n["node"], n["harm"]) for n in fallback["harm"]]),
        "about": {},
        "table": _table(
            ["node", "MACs", "harm", "harm per million MACs"],
            [
                [n["node"], n["macs"], n["harm"], _per_million(n["harm"], n["macs"])]
                for n in fallback["harm"]
            ],
        ),
    }


def _fallback(found: Mapping[str, Any] | None) -> dict | None:
    """The fallback search (``quantize --target-*``): its target and every step it took."""
    if not found:
        return None
    target = found.get("target") or {}
    wanted = [
        f"{label} {target[key]:g}"
        for key, label in (
            ("min_cosine", "mean cosine >="),
            ("max_rel_l2", "relative L2 <="),
            ("max_drop", "accuracy drop (points) <="),
        )
        if target.get(key) is not None
    ]
    moved = found.get("moved") or []
    rows = []
    for number, step in enumerate(found.get("steps") or [], start=1):
        outcome = "met" if step.get("met") else "missed"
        if step.get("action") == "restore" and not step.get("kept"):
            outcome += ", undone"
        rows.append(
            [
                number,
                step.get("action"),
                step.get("node"),
                step.get("op"),
                step.get("macs"),
                step.get("precision"),
                step.get("in_high_precision"),
                _percent(step.get("coverage")),
                *_worst(step),
                outcome,
            ]
        )
    return {
        "about": {
            "target": ", ".join(wanted),
            "judged on": found.get("data"),
            f"moved to {str(found.get('high_precision')).upper()}": f"{len(moved)} node(s)",
            "evaluations": f"{found.get('evaluations')} in {found.get('seconds')} s "
            f"({found.get('workers')} worker(s))",
            "ranking": f"{found.get('ranking_evaluations')} of single nodes on "
            f"{found.get('ranking_samples')} samples"
            if found.get("ranking_evaluations")
            else None,
        },
        "table": _table(
            [
                "#",
                "step",
                "node",
                "op",
                "MACs",
                "precision",
                "nodes in high precision",
                "coverage",
                "cosine",
                "rel L2",
                "target",
            ],
            rows,
        ),
    }


def _bars(pairs: Sequence[tuple[str, Any]]) -> list[dict]:
    bars = [{"label": str(label), "value": value} for label, value in pairs if _is_number(value)]
    return sorted(bars, key=lambda bar: -bar["value"])


def _worst(score: Mapping[str, Any] | None) -> list[str]:
    """The worst output's mean cosine and relative L2 of one evaluation, as text."""
    outputs = (score or {}).get("outputs") or {}
    cosines = [o.get("cosine_mean") for o in outputs.values()]
    errors = [o.get("rel_l2") for o in outputs.values()]
    if not outputs or None in cosines or None in errors:
        return ["n/a", "n/a"]  # no figures, or NaN in an output
    return [f"{min(cosines):.6f}", f"{max(errors):.4g}"]


def _worst_text(score: Mapping[str, Any]) -> str:
    cosine, rel_l2 = _worst(score)
    return f"worst output: cosine {cosine}, rel L2 {rel_l2}"


def _table(labels: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict:
    """A table for the page: a column is right-aligned when its cells are numbers."""
    columns = [
        {"label": label, "num": any(_is_number(row[i]) for row in rows)}
        for i, label in enumerate(labels)
    ]
    return {"columns": columns, "rows": [list(row) for row in rows]}


def _percent(value: Any) -> str | None:
    return f"{value:.1%}" if _is_number(value) else None


def _per_million(harm: Any, macs: Any) -> float | None:
    return harm / macs * 1e6 if _is_number(harm) and _is_number(macs) and macs else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- fidelity ---------------------------------------------------------------------------


def _checked(report: Mapping[str, Any]) -> Comparison | None:
    """The check after writing, as a comparison (None when nothing was run)."""
    verification = report.get("verification") or {}
    if not verification.get("outputs"):
        return None
    data = verification.get("data") or {}
    return Comparison(
        title="Check after writing",
        detail=f"first {data.get('samples')} samples of {data.get('source')}, "
        f"run with {verification.get('backend')}",
        outputs=verification["outputs"],
    )


def _comparison(comparison: Comparison) -> dict:
    outputs = []
    for name, figures in comparison.outputs.items():
        errors = figures.get("abs_error_histogram")
        outputs.append(
            {
                "name": name,
                **{k: v for k, v in figures.items() if k != "abs_error_histogram"},
                "error_histogram": None
                if errors is None
                else _display_histogram(Histogram.from_json(errors)),
            }
        )
    return {
        "title": comparison.title,
        "detail": comparison.detail,
        "outputs": outputs,
        "accuracy": comparison.accuracy,
    }


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (and numpy scalar) made JSON-safe."""
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
