"""The HTML report: one self-contained file that shows a quantize report (``--html``,
``trtq report``).

**How the plots are drawn, and why.** A small renderer written for this page, in the page's
own inline script, draws SVG from the data (``html_assets/report.js``). The alternatives:

* matplotlib to inline SVG: a 30 MB dependency (an optional extra at best), one SVG per
  tensor made in advance: a detector with 200 quantized tensors means 200 histograms of
  ~40 kB each, an 8 MB page that takes seconds to parse, and no interaction (no tensor
  picker, no zoom, no filters) beyond what CSS can do;
* a charting library (Vega-Lite, Plotly, Chart.js) inlined once: 200 kB to 3.5 MB of
  minified JavaScript in every report, and a third-party script to keep up to date;
* the renderer here: about 30 kB of JavaScript, no dependency, and the page draws only what
  is looked at: the data of every tensor is embedded once (histograms summed to 512 bins by
  :mod:`trtq.report.page`) and one histogram is drawn at a time, chosen with a search box and
  a list. The plots trtq needs are few and simple (bars on a log scale, vertical markers, a
  bar chart), which keeps it small and testable.

**Offline.** Nothing is fetched when the page is viewed: styles and script are inline, fonts
are the system's, and the page's Content-Security-Policy forbids every other source
(``default-src 'none'``); its one script is allowed by its SHA-256, not by
``'unsafe-inline'``, so nothing else can run even if a name slipped through escaping.

**Escaping.** Names come from the model (tensor and node names) and can hold anything.
The data is embedded as JSON in a ``<script type="application/json">`` element with ``<``,
``>`` and ``&`` written as ``\\u003c``, ``\\u003e``, ``\\u0026``, so no name can close the
element; the script puts every name into the page as text (``textContent``), never as HTML.
The title, the only text Python writes into the HTML, is HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from trtq.calib.cache import CalibrationStats
from trtq.errors import DataError
from trtq.fileio import write_text
from trtq.report.page import Comparison, comparison_from_json, page_data

_ASSETS = "html_assets"
_MARKER = re.compile(r"<!--trtq:(\w+)-->")


def render(
    report: Mapping[str, Any],
    stats: CalibrationStats | None = None,
    comparisons: Sequence[Comparison] = (),
    *,
    sensitivity: Mapping[str, Any] | None = None,
    stats_note: str | None = None,
) -> str:
    """The page for ``report`` (a quantize report), with ``stats``' histograms,
    ``comparisons`` (FP32 against the quantized model on other data) and ``sensitivity``
    (``trtq sensitivity --report`` output)."""
    data = page_data(report, stats, comparisons, sensitivity=sensitivity, stats_note=stats_note)
    script = _asset("report.js")
    values = {
        "title": html.escape(f"trtq report: {report.get('model') or 'model in memory'}"),
        "csp": _content_security_policy(script),
        "style": _asset("report.css"),
        "data": embed_json(data),
        "script": script,
    }
    # One pass over the template: text inserted for one marker is never searched for another.
    return _MARKER.sub(lambda match: values[match[1]], _asset("report.html"))


def write(
    path: str | Path,
    report: Mapping[str, Any],
    stats: CalibrationStats | None = None,
    comparisons: Sequence[Comparison] = (),
    *,
    sensitivity: Mapping[str, Any] | None = None,
    stats_note: str | None = None,
) -> None:
    """Render the page (see :func:`render`) and write it atomically to ``path``."""
    page = render(report, stats, comparisons, sensitivity=sensitivity, stats_note=stats_note)
    write_text(path, page)


def embed_json(data: Any) -> str:
    """JSON that can sit inside a ``<script>`` element: no ``<``, ``>`` or ``&`` left raw.

    Those three only occur inside JSON strings, where their ``\\u`` escapes mean the same;
    ``ensure_ascii`` also escapes U+2028/U+2029.
    """
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def read_report(path: str | Path) -> dict:
    """A quantize report written by ``trtq quantize --report``, or a one-line error."""
    data = _read_json(path, "report")
    if not isinstance(data, dict) or "quantized_tensors" not in data or "coverage" not in data:
        raise DataError(
            f"{path} is not a trtq quantize report", "write one with trtq quantize --report"
        )
    return data


def read_comparison(path: str | Path) -> Comparison:
    """``trtq compare --json`` output (or a quantize report's check), or a one-line error."""
    data = _read_json(path, "comparison")
    try:
        return comparison_from_json(data, str(path))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(
            f"{path} is not the output of trtq compare --json ({exc})",
            "write it with trtq compare REF CAND --data DATA --json > FILE",
        ) from exc


def read_sensitivity(path: str | Path) -> dict:
    """``trtq sensitivity --report`` output, or a one-line error."""
    data = _read_json(path, "sensitivity")
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, list) or not all(
        isinstance(n, dict) and "name" in n and "harm" in n for n in nodes
    ):
        raise DataError(
            f"{path} is not the output of trtq sensitivity",
            "write it with trtq sensitivity MODEL --calib DATA --report FILE",
        )
    return data


def stats_for(
    report: Mapping[str, Any], report_path: str | Path, stats_path: str | Path | None
) -> tuple[CalibrationStats | None, str | None]:
    """(the stats behind ``report``, or None and why not).

    ``stats_path`` if given; else the file the report names (as written, then beside the
    report). Stats that hold none of the report's tensors were made for something else.
    """
    if stats_path is None:
        named = report.get("stats")
        if not named:
            return None, "the report names no stats file: pass --stats STATS.json"
        candidates = [Path(named), Path(report_path).parent / Path(named).name]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            return None, f"the stats file the report names ({named}) is not there: pass --stats"
        stats_path = found
    stats = CalibrationStats.read(stats_path)
    wanted = [t["name"] for t in report.get("quantized_tensors") or []]
    if wanted and not any(name in stats.histograms for name in wanted):
        raise DataError(
            f"{stats_path} has no histogram for any tensor of the report",
            "pass the stats file written with this report (trtq quantize --stats)",
        )
    return stats, None


def _read_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{what} file not found: {path}", "check the path") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(f"{path} is not JSON", f"pass the {what} JSON trtq wrote") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{path} is a directory", f"pass the {what} file") from exc


def _content_security_policy(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return (
        "default-src 'none'; "
        f"script-src 'sha256-{digest}'; "
        "style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'"
    )


def _asset(name: str) -> str:
    return resources.files("trtq.report").joinpath(_ASSETS, name).read_text(encoding="utf-8")
