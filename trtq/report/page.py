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
* sensitivity and fallback steps, when the report has them, reduced to bars and a table
  without assuming more of their layout than "records with a name and a number";
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
    ENTROPY_MAX_CLIPPED,
    clipped_share,
    entropy_amax,
    max_amax,
    mse_amax,
    percentile_amax,
)

#: The most bins a histogram is drawn with (a power of two: histograms are summed down).
DISPLAY_BINS = 512
#: The percentile drawn when the report does not record the one it was made with.
DEFAULT_PERCENTILE = 99.99
#: Keys that name the node of a sensitivity record, in order of preference.
_LABEL_KEYS = ("node", "name", "tensor", "op")
#: Keys that hold a sensitivity record's harm, in order of preference.
_HARM_KEYS = ("harm", "score", "sensitivity", "delta", "drop", "loss", "rel_l2", "error")
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
    stats_note: str | None = None,
) -> dict:
    """The page's data: ``report`` (the quantize report), its ``stats`` and ``comparisons``.

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
            "sensitivity": _sensitivity(report.get("sensitivity")),
            "fallback": _records_table(report.get("fallback")),
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
        refused = method == "entropy" and clipped > ENTROPY_MAX_CLIPPED
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


def _sensitivity(found: Any) -> dict | None:
    """Bars (label, harm) from whatever record list the report holds, largest harm first."""
    records = _records(found)
    if not records:
        return None
    label_key = next((k for k in _LABEL_KEYS if k in records[0]), None)
    harm_key = next((k for k in _HARM_KEYS if _is_number(records[0].get(k))), None)
    harm_key = harm_key or next((k for k, v in records[0].items() if _is_number(v)), None)
    if label_key is None or harm_key is None:
        return {"metric": None, "bars": [], "table": _records_table(records), "about": {}}
    bars = [
        {"label": str(r.get(label_key)), "value": r[harm_key]}
        for r in records
        if _is_number(r.get(harm_key))
    ]
    bars.sort(key=lambda bar: -bar["value"])
    return {
        "metric": harm_key,
        "bars": bars,
        "table": _records_table(records),
        "about": _scalars(found),
    }


def _records_table(found: Any) -> dict | None:
    """A table of records: the union of their keys as columns, scalars as cells."""
    records = _records(found)
    if not records:
        return None
    columns: list[str] = []
    for record in records:
        columns += [key for key in record if key not in columns]
    rows = [[_cell(record.get(column)) for column in columns] for record in records]
    return {"columns": columns, "rows": rows, "about": _scalars(found)}


def _records(found: Any) -> list[Mapping[str, Any]]:
    """The list of records in ``found``: itself, its first list of records, or name -> value."""
    if isinstance(found, list):
        return [r for r in found if isinstance(r, Mapping)]
    if not isinstance(found, Mapping):
        return []
    for value in found.values():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            return value
    if found and all(_is_number(v) for v in found.values()):
        return [{"name": name, "value": value} for name, value in found.items()]
    return []


def _scalars(found: Any) -> dict:
    """The plain settings beside a record list (metric, samples...), shown above it."""
    if not isinstance(found, Mapping):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, str | int | float | bool)}


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return ", ".join(str(_cell(v)) for v in value)
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return str(value)


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
