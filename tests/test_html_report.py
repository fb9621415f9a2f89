"""The HTML report (`trtq quantize --html`, `trtq report`): its data, its escaping, and the
page itself rendered in a real headless browser (Debian's `chromium`).

The browser tests need `chromium` (`.ci/run` installs it with apt-get); where it is missing
they are skipped, saying so. They load the page with two scripts added (and allowed by the
page's Content-Security-Policy through their hashes): one first, collecting every error,
console error, policy violation and alert; one last, which drives the tensor picker like a
user (a click on "next", a choice in the list, the zoom box) and writes what it saw into the
DOM, which `--dump-dom` returns.
"""

from __future__ import annotations

import base64
import hashlib
import html as html_lib
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import CALIB_DATA

from trtq.calib.cache import CalibrationStats
from trtq.calib.histogram import Histogram
from trtq.calib.ranges import entropy_amax, max_amax, mse_amax, percentile_amax
from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR
from trtq.report import html
from trtq.report.metrics import OutputAgreement
from trtq.report.page import DISPLAY_BINS, page_data, reason_kind

MODEL = str(CALIB_DATA / "mnist_cnn.onnx")
CALIB = str(CALIB_DATA / "mnist_calib.npz")
SECTIONS = ("summary", "calibration", "float-nodes", "islands", "sensitivity", "fidelity")
HOSTILE = "</script><script>alert(1)</script>"
HOSTILE_NODE = '<img src=x onerror="alert(2)">&amp;'


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The MNIST sample quantized with --report, --stats and --html, as `make demo` does."""
    folder = tmp_path_factory.mktemp("html")
    paths = {name: folder / name for name in ("m.onnx", "r.json", "s.json", "r.html")}
    argv = ["quantize", MODEL, "--calib", CALIB, "-o", paths["m.onnx"], "--report",
            paths["r.json"], "--stats", paths["s.json"], "--html", paths["r.html"],
            "--no-progress", "-q"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return paths


@pytest.fixture(scope="module")
def report(quantized) -> dict:
    return json.loads(quantized["r.json"].read_text())


@pytest.fixture(scope="module")
def stats(quantized) -> CalibrationStats:
    return CalibrationStats.read(quantized["s.json"])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[dict, CalibrationStats, dict]:
    """A fallback search to a fidelity target, and `trtq sensitivity`'s figures (its file)."""
    import trtq

    result = trtq.quantize(MODEL, CALIB, target_cosine=0.99995, limit=256)
    assert result.report["fallback"]["moved"]
    path = tmp_path_factory.mktemp("sensitivity") / "sensitivity.json"
    argv = ["sensitivity", MODEL, "--calib", CALIB, "--limit", "256", "--report", str(path),
            "--no-progress", "-q"]  # fmt: skip
    assert main(argv) == 0
    return result.report, result.stats, json.loads(path.read_text())


# --- the page's data --------------------------------------------------------------------


def test_each_methods_threshold_is_computed_from_the_tensors_histogram(report, stats):
    data = page_data(report, stats)
    tensors = data["calibration"]["tensors"]
    assert [t["name"] for t in tensors] == [t["name"] for t in report["quantized_tensors"]]
    for tensor in tensors:
        hist = stats.histograms[tensor["name"]]
        found = {c["method"]: c["amax"] for c in tensor["candidates"]}
        assert found == {
            "max": max_amax(hist),
            "percentile": percentile_amax(hist, report["percentile"]),
            "mse": mse_amax(hist),
            "entropy": entropy_amax(hist),
        }
        # Summed down for display, nothing lost.
        shown = tensor["histogram"]
        assert len(shown["counts"]) == min(hist.bins, DISPLAY_BINS)
        assert sum(shown["counts"]) == hist.count
        assert shown["width"] * len(shown["counts"]) == hist.range
    # The chosen amax is the report's; on MNIST it is mse's, clipping what mse clips.
    first = tensors[0]
    mse = next(c for c in first["candidates"] if c["method"] == "mse")
    assert first["amax"] == report["quantized_tensors"][0]["amax"] == mse["amax"]
    assert first["clipped"] == mse["clipped"]
    # The MNIST background spike: entropy's raw minimum clips the body and is refused.
    entropy = next(c for c in first["candidates"] if c["method"] == "entropy")
    assert entropy["clipped"] > 0.05 and entropy["refused"]


def test_a_range_group_member_shows_its_group(report, stats):
    group = report["range_groups"][0]
    tensors = {t["name"]: t for t in page_data(report, stats)["calibration"]["tensors"]}
    assert tensors[group[0]]["group"] == group[1:]
    assert tensors[group[0]]["amax"] == tensors[group[1]]["amax"]


def test_summary_holds_versions_coverage_by_op_and_checks(report, stats):
    summary = page_data(report, stats)["summary"]
    assert all(summary["versions"].values())
    by_op = {row["op"]: row for row in summary["coverage_by_op"]}
    assert set(by_op) == {"Conv", "Gemm"}
    assert sum(r["total_macs"] for r in by_op.values()) == report["coverage"]["total_macs"]
    assert sum(r["quantized_macs"] for r in by_op.values()) == report["coverage"]["quantized_macs"]
    assert {g["name"] for g in summary["gates"]} == {"min-cosine", "max-rel-l2"}
    assert all(g["kind"] == "floor" and g["passed"] for g in summary["gates"])


def test_float_nodes_get_a_reason_kind_to_filter_by():
    assert (
        reason_kind("tiny (1 input channel): INT8 does not pay below 16 channels")
        == "tiny (N input channel): INT8 does not pay below N channels"
    )
    assert reason_kind("tiny (10 outputs): INT8 does not pay below 16 channels") == (
        "tiny (N outputs): INT8 does not pay below N channels"
    )
    assert (
        reason_kind("inside the body of If /cond/If_0: left in float")
        == "inside the body of If …: left in float"
    )
    assert reason_kind("activation /a/Relu_output_0 reaches |x| = 612.5 > 512") == (
        "activation … reaches |x| = N > N"
    )
    assert reason_kind("Conv in --exclude-ops") == "Conv in --exclude-ops"


def test_the_error_histogram_counts_every_element():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(6, 10))
    candidate = reference + rng.normal(0, 0.01, size=reference.shape)
    agreement = OutputAgreement()
    for rows in (slice(0, 4), slice(4, 6)):
        agreement.update(reference[rows], candidate[rows])
    result = agreement.result()
    errors = result.error_histogram
    assert errors.count == 60 and errors.amax == pytest.approx(result.max_abs)
    restored = Histogram.from_json(result.to_json()["abs_error_histogram"])
    assert np.array_equal(restored.counts, errors.counts)


def test_harm_per_node_and_fallback_steps_come_from_the_search_and_trtq_sensitivity(tuned):
    report, stats, sensitivity = tuned
    search = report["fallback"]
    data = page_data(report, stats, sensitivity=sensitivity)
    bars = data["sensitivity"]["bars"]
    assert [b["label"] for b in bars] == [n["name"] for n in sensitivity["nodes"]]
    assert [b["value"] for b in bars] == sorted(
        (n["harm"] for n in sensitivity["nodes"]), reverse=True
    )
    steps = data["fallback"]["table"]
    assert len(steps["rows"]) == len(search["steps"]) and steps["rows"][0][1] == "start"
    assert data["fallback"]["about"]["moved to FP32"] == f"{len(search['moved'])} node(s)"
    # Without trtq sensitivity's figures, the search's own ranking is drawn.
    ranking = page_data(report, stats)["sensitivity"]
    assert {b["label"] for b in ranking["bars"]} == {n["node"] for n in search["harm"]}
    assert [b["value"] for b in ranking["bars"]] == sorted(
        (n["harm"] for n in search["harm"]), reverse=True
    )
    plain = page_data({k: v for k, v in report.items() if k != "fallback"}, stats)
    assert plain["sensitivity"] is None and plain["fallback"] is None


# --- the HTML ---------------------------------------------------------------------------


def test_the_page_fetches_nothing_and_allows_only_its_own_script(quantized):
    page = quantized["r.html"].read_text()
    assert not re.search(r"<(link|img|iframe|object|embed)\b", page, re.I)
    assert not re.search(r"\b(src|href)\s*=\s*[\"']?(https?:|//)", page, re.I)
    assert "@import" not in page and "url(" not in page
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)[1]
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy.split("style-src")[0]
    script = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(script) == 1
    assert f"'sha256-{_sha256(script[0])}'" in policy


def test_names_cannot_break_out_of_the_data(report, stats):
    page = html.render(_hostile(report, stats), _hostile_stats(report, stats))
    assert HOSTILE not in page and HOSTILE_NODE not in page
    assert len(re.findall(r"<script\b", page, re.I)) == 2
    assert len(re.findall(r"</script", page, re.I)) == 2
    embedded = re.search(r'<script type="application/json" id="trtq-data">(.*?)</script>', page)
    data = json.loads(embedded[1])
    assert data["calibration"]["tensors"][0]["name"] == HOSTILE
    assert data["float_nodes"][0]["name"] == HOSTILE_NODE


def test_trtq_report_reads_the_stats_the_report_names_and_a_comparison(
    quantized, tuned, tmp_path, capsys
):
    sensitivity = tmp_path / "sensitivity.json"
    sensitivity.write_text(json.dumps(tuned[2]))
    capsys.readouterr()
    assert main(["compare", MODEL, str(quantized["m.onnx"]), "--data",
                 str(CALIB_DATA / "mnist_test.npz"), "--limit", "200", "--json"]) == 0  # fmt: skip
    comparison = tmp_path / "compare.json"
    comparison.write_text(capsys.readouterr().out)
    page = tmp_path / "page.html"
    argv = ["report", str(quantized["r.json"]), "--compare", str(comparison), "--sensitivity",
            str(sensitivity), "-o", str(page)]  # fmt: skip
    assert main(argv) == 0
    data = _embedded(page.read_text())
    assert data["sensitivity"]["title"].startswith("trtq sensitivity on ")
    assert all(t["histogram"] for t in data["calibration"]["tensors"])
    titles = [source["title"] for source in data["fidelity"]]
    assert titles == ["Check after writing", f"trtq compare: {comparison}"]
    compared = data["fidelity"][1]
    assert compared["accuracy"]["samples"] == 200
    assert sum(compared["outputs"][0]["error_histogram"]["counts"]) == 200 * 10


def test_trtq_report_finds_the_stats_beside_the_report_or_says_they_are_missing(
    quantized, report, tmp_path, capsys
):
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "s.json").write_bytes(quantized["s.json"].read_bytes())
    (moved / "r.json").write_text(json.dumps({**report, "stats": "elsewhere/s.json"}))
    assert main(["report", str(moved / "r.json"), "-o", str(moved / "page.html")]) == 0
    tensors = _embedded((moved / "page.html").read_text())["calibration"]["tensors"]
    assert all(t["histogram"] for t in tensors)
    (moved / "s.json").unlink()
    capsys.readouterr()
    assert main(["report", str(moved / "r.json"), "-o", str(moved / "page.html")]) == 0
    assert "elsewhere/s.json) is not there" in capsys.readouterr().err
    calibration = _embedded((moved / "page.html").read_text())["calibration"]
    assert not any(t["histogram"] for t in calibration["tensors"])
    assert "is not there" in calibration["note"]


def test_trtq_report_refuses_bad_inputs_in_one_line(quantized, tmp_path, capsys):
    page = str(tmp_path / "page.html")
    not_json = tmp_path / "broken.json"
    not_json.write_text("{")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something else"}))
    foreign_stats = tmp_path / "foreign.json"
    stats = CalibrationStats.read(quantized["s.json"])
    stats.histograms = {"another tensor": next(iter(stats.histograms.values()))}
    stats.ranges = {}
    stats.write(foreign_stats)
    for argv, expected in (
        ([str(not_json)], "is not JSON"),
        ([str(other)], "is not a trtq quantize report"),
        ([str(quantized["r.json"]), "--stats", str(foreign_stats)], "no histogram for any"),
        ([str(quantized["r.json"]), "--compare", str(other)], "not the output of trtq compare"),
        ([str(quantized["r.json"]), "--sensitivity", str(other)], "not the output of trtq sens"),
        ([str(quantized["r.json"]), "--compare", str(tmp_path / "missing.json")], "not found"),
    ):
        capsys.readouterr()
        assert main(["report", *argv, "-o", page]) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1


def test_quantize_refuses_an_html_page_over_its_report(tmp_path, capsys):
    same = str(tmp_path / "r.json")
    argv = ["quantize", MODEL, "--calib", CALIB, "-o", str(tmp_path / "m.onnx"),
            "--report", same, "--html", same]  # fmt: skip
    assert main(argv) == EXIT_USER_ERROR
    assert "--html" in capsys.readouterr().err


# --- in the browser ---------------------------------------------------------------------

#: Runs first: every error, console error, policy violation and alert is collected.
ERROR_PROBE = """
window.__problems = [];
window.addEventListener("error", function (e) { __problems.push("error: " + e.message); });
window.addEventListener("securitypolicyviolation", function (e) {
  __problems.push("CSP: " + e.violatedDirective + " " + e.blockedURI);
});
var __consoleError = console.error;
console.error = function () {
  __problems.push("console.error: " + Array.prototype.join.call(arguments, " "));
  __consoleError.apply(console, arguments);
};
window.alert = function (message) { __problems.push("alert: " + message); };
"""

#: Runs last: uses the page like a person would and writes what it saw into the DOM.
PICKER_DRIVER = """
(function () {
  var seen = {};
  function plot() {
    var p = document.getElementById("tensor-plot");
    var bars = p ? p.querySelector("path.bars-kept") : null;
    return { tensor: p && p.getAttribute("data-tensor"), bars: bars && bars.getAttribute("d"),
             markers: p ? p.querySelectorAll("line.marker").length : 0 };
  }
  function options() {
    var list = document.getElementById("tensor-select");
    return list ? Array.prototype.map.call(list.options, function (o) { return o.text; }) : [];
  }
  try {
    seen.options = options();
    seen.first = plot();
    if (!document.getElementById("tensor-next")) throw "no picker";
    document.getElementById("tensor-next").click();
    seen.afterNext = plot();
    var list = document.getElementById("tensor-select");
    list.value = list.options[list.options.length - 1].value;
    list.dispatchEvent(new Event("change"));
    seen.afterSelect = plot();
    seen.selected = list.options[list.selectedIndex].text;
    document.getElementById("tensor-zoom").click();
    seen.afterZoom = plot();
    var search = document.getElementById("tensor-search");
    search.value = seen.options[0].slice(-12);
    search.dispatchEvent(new Event("input"));
    seen.searched = options();
  } catch (e) {
    if (e !== "no picker") __problems.push("driver: " + e);
  }
  try {
    var reason = document.getElementById("float-reason");
    if (reason) {
      var rows = function () {
        return document.querySelectorAll("#float-nodes tbody tr").length;
      };
      seen.floatRows = rows();
      reason.value = reason.options[1].value;
      reason.dispatchEvent(new Event("change"));
      seen.floatRowsFiltered = rows();
    }
    var islands = document.getElementById("islands-reason");
    seen.islandRows = islands ? document.querySelectorAll("#islands tbody tr").length : null;
    seen.harmBars = document.querySelectorAll("#sensitivity-chart rect.harm-bar").length;
    seen.stepRows = document.querySelectorAll("#fallback-steps tbody tr").length;
    seen.errorPlots = document.querySelectorAll("#fidelity .error-histogram svg").length;
    seen.notes = Array.prototype.map.call(document.querySelectorAll("main .note"),
      function (n) { return n.textContent; });
    seen.scripts = document.querySelectorAll("script").length;
    seen.rendered = Array.prototype.map.call(document.querySelectorAll("main > section"),
      function (s) { return [s.id, s.getAttribute("data-rendered")]; });
  } catch (e) {
    __problems.push("driver: " + e);
  }
  setTimeout(function () {
    seen.problems = window.__problems;
    var out = document.createElement("pre");
    out.id = "trtq-test-results";
    out.textContent = JSON.stringify(seen);
    document.body.appendChild(out);
  }, 200);
})();
"""


@pytest.fixture(scope="session")
def chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed: the page cannot be rendered here (.ci/run "
                    "installs it: apt-get install -y chromium)")  # fmt: skip
    return browser


def run_chromium(browser: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def drive(browser: str, page: str, tmp_path) -> tuple[dict, str]:
    """Load ``page`` with the probe and the driver; what the driver saw, and the browser log."""
    instrumented = tmp_path / "instrumented.html"
    instrumented.write_text(instrument(page))
    proc = run_chromium(
        browser, tmp_path, "--virtual-time-budget=3000", "--dump-dom", instrumented.as_uri()
    )
    found = re.search(r'<pre id="trtq-test-results">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the page did not finish: {proc.stderr[-2000:]}"
    return json.loads(html_lib.unescape(found[1])), proc.stderr


def instrument(page: str) -> str:
    """``page`` with the probe first and the driver last, both allowed by hash."""
    hashes = f"'sha256-{_sha256(ERROR_PROBE)}' 'sha256-{_sha256(PICKER_DRIVER)}'"
    page = page.replace("script-src ", f"script-src {hashes} ", 1)
    page = page.replace("<title>", f"<script>{ERROR_PROBE}</script><title>", 1)
    return page.replace("</body>", f"<script>{PICKER_DRIVER}</script></body>", 1)


def test_the_page_renders_in_chromium_and_its_picker_works(chromium, quantized, report, tmp_path):
    seen, log = drive(chromium, quantized["r.html"].read_text(), tmp_path)
    assert seen["problems"] == []
    assert not re.search(r"Uncaught|Refused to", log), log[-2000:]
    assert seen["rendered"] == [[section, "true"] for section in SECTIONS]
    names = [t["name"] for t in report["quantized_tensors"]]
    assert seen["options"] == names
    assert seen["first"]["tensor"] == names[0] and seen["first"]["markers"] == 5
    # A click on "next" and a choice in the list each draw another tensor's histogram.
    assert seen["afterNext"]["tensor"] == names[1]
    assert seen["afterNext"]["bars"] != seen["first"]["bars"]
    assert seen["afterSelect"]["tensor"] == seen["selected"] == names[-1]
    assert seen["afterSelect"]["bars"] != seen["afterNext"]["bars"]
    assert seen["afterZoom"]["tensor"] == names[-1]
    assert seen["afterZoom"]["bars"] != seen["afterSelect"]["bars"]
    assert names[0] in seen["searched"] and len(seen["searched"]) < len(names)
    assert seen["floatRows"] == 2 and seen["floatRowsFiltered"] == 1
    assert seen["scripts"] == 4  # the data, the page's script, the probe and the driver


def test_every_kind_of_report_renders_in_chromium(chromium, report, tuned, tmp_path):
    """FP16 islands; sensitivity and fallback; FP16 alone; ranges from a cache without data."""
    import trtq
    from trtq.calib.cache import TrtCache

    mixed = trtq.quantize(MODEL, CALIB, high_precision="fp16", max_abs=4.0, limit=64)
    islands = mixed.report["mixed_precision"]["fp32_nodes"]
    assert islands and any("reaches" in node["reason"] for node in islands)
    seen, _ = drive(chromium, html.render(mixed.report, mixed.stats), tmp_path)
    assert seen["problems"] == []
    assert seen["rendered"] == [[section, "true"] for section in SECTIONS]
    assert seen["islandRows"] == len(islands) and seen["errorPlots"] == 1

    searched, searched_stats, sensitivity = tuned
    page = html.render(searched, searched_stats, sensitivity=sensitivity)
    seen, _ = drive(chromium, page, tmp_path)
    assert seen["problems"] == []
    assert seen["rendered"] == [[section, "true"] for section in SECTIONS]
    assert seen["harmBars"] == len(sensitivity["nodes"])
    assert seen["stepRows"] == len(searched["fallback"]["steps"])

    fp16 = trtq.quantize(MODEL, CALIB, precision="fp16", limit=64)
    seen, _ = drive(chromium, html.render(fp16.report, fp16.stats), tmp_path)
    assert seen["problems"] == [] and seen["options"] == []
    assert seen["rendered"] == [[section, "true"] for section in SECTIONS]
    assert "No activation was quantized, so there is nothing calibrated to show." in seen["notes"]

    cache = tmp_path / "mnist.cache"
    amax = {t["name"]: t["amax"] for t in report["quantized_tensors"]}
    TrtCache.from_amax(amax, method="mse").write(cache)
    from_cache = trtq.quantize(MODEL, cache=str(cache))
    page = html.render(from_cache.report, from_cache.stats, stats_note="from a cache")
    seen, _ = drive(chromium, page, tmp_path)
    assert seen["problems"] == [] and seen["options"] == list(amax)
    assert seen["rendered"] == [[section, "true"] for section in SECTIONS]
    assert "No histograms: from a cache." in seen["notes"] and seen["errorPlots"] == 0


def test_hostile_names_stay_text_in_chromium(chromium, report, stats, tmp_path):
    page = html.render(_hostile(report, stats), _hostile_stats(report, stats))
    seen, _ = drive(chromium, page, tmp_path)
    assert seen["problems"] == []  # no alert ran, nothing broke
    assert seen["options"][0] == HOSTILE and seen["first"]["tensor"] == HOSTILE
    assert seen["scripts"] == 4


def test_a_screenshot_of_the_page_is_not_blank(chromium, quantized, tmp_path):
    from PIL import Image

    shot = tmp_path / "page.png"
    proc = run_chromium(
        chromium,
        tmp_path,
        "--window-size=1280,1800",
        f"--screenshot={shot}",
        quantized["r.html"].as_uri(),
    )
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape == (1800, 1280, 3)
    grey = pixels.mean(axis=2)
    assert (grey < 200).mean() > 0.03  # text, bars and plots, not an empty white page
    assert grey.std() > 20
    colours = np.unique(pixels.reshape(-1, 3)[::7].astype(np.uint8), axis=0)
    assert len(colours) > 100  # the histogram's blues and reds, badges, anti-aliased text
    blue = (pixels[..., 2] > 180) & (pixels[..., 0] < 140)
    assert blue.mean() > 0.005  # the histogram bars and the coverage bar are drawn


# --- helpers ----------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def _embedded(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="trtq-data">(.*?)</script>', page)
    return json.loads(found[1])


def _hostile(report: dict, stats: CalibrationStats) -> dict:
    """The report with its first tensor and float node renamed to break out of the page."""
    tensors = [dict(t) for t in report["quantized_tensors"]]
    tensors[0]["name"] = HOSTILE
    nodes = [dict(n) for n in report["float_nodes"]]
    nodes[0]["name"] = HOSTILE_NODE
    return {**report, "quantized_tensors": tensors, "float_nodes": nodes, "model": HOSTILE}


def _hostile_stats(report: dict, stats: CalibrationStats) -> CalibrationStats:
    first = report["quantized_tensors"][0]["name"]
    renamed = {HOSTILE if name == first else name: h for name, h in stats.histograms.items()}
    return CalibrationStats(renamed, stats.num_samples, stats.num_batches, stats.model_sha256)
