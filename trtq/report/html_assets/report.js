
// trtq's HTML report: draws the JSON element "trtq-data" (trtq/report/page.py) as
// tables and SVG plots. No library, nothing fetched; every name goes in as text, never HTML.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("trtq-data").textContent);
  var SVGNS = "http://www.w3.org/2000/svg";
  var METHOD_COLORS = { max: "#7a5195", percentile: "#ef5675", mse: "#2f6fdb", entropy: "#ffa600" };
  var KEPT_COLOR = "#6b8fd6", CLIPPED_COLOR = "#c8372d", CLIP_SHADE = "#f3c6c2";

  // --- DOM helpers ----------------------------------------------------------------------

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    setAttributes(node, attrs);
    (children || []).forEach(function (child) {
      if (child === null || child === undefined) return;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function svg(tag, attrs, parent) {
    var node = document.createElementNS(SVGNS, tag);
    setAttributes(node, attrs);
    if (parent) parent.appendChild(node);
    return node;
  }

  function setAttributes(node, attrs) {
    Object.keys(attrs || {}).forEach(function (key) {
      var value = attrs[key];
      if (value === null || value === undefined) return;
      if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, String(value));
    });
  }

  function sectionBody(id) {
    return document.querySelector("#" + id + " .body");
  }

  function note(text) {
    return el("p", { "class": "note", text: text });
  }

  function kvGrid(pairs) {
    return el("div", { "class": "grid" }, pairs.map(function (pair) {
      return el("div", { "class": "kv" }, [
        el("div", { "class": "k", text: pair[0] }),
        el("div", { "class": "v" }, [pair[1] instanceof Node ? pair[1] : String(pair[1])]),
      ]);
    }));
  }

  // columns: [{label, num}]; rows: arrays of cells (text or Node); rowClass(row index) optional.
  function table(columns, rows, rowClass) {
    var head = el("tr", {}, columns.map(function (c) {
      return el("th", { "class": c.num ? "num" : null, text: c.label });
    }));
    var body = el("tbody", {}, rows.map(function (row, i) {
      return el("tr", { "class": rowClass ? rowClass(i) : null }, row.map(function (cell, j) {
        var cls = columns[j].num ? "num" : columns[j].name ? "name" : null;
        return el("td", { "class": cls }, [cell instanceof Node ? cell : fmtCell(cell)]);
      }));
    }));
    return el("table", {}, [el("thead", {}, [head]), body]);
  }

  function badge(passed, text, failClass) {
    var cls = passed === true ? "pass" : passed === false ? failClass || "fail" : "info";
    return el("span", { "class": "badge " + cls, text: text });
  }

  function shareBar(fraction) {
    var bar = el("div", { "class": "bar" }, [el("span")]);
    bar.firstChild.style.width = Math.max(0, Math.min(1, fraction || 0)) * 100 + "%";
    return bar;
  }

  // --- number formats -------------------------------------------------------------------

  function fmtCell(value) {
    if (value === null || value === undefined) return "";
    if (typeof value === "number") return fmtNum(value);
    return String(value);
  }

  function fmtNum(x) {
    if (x === null || x === undefined) return "n/a";
    if (Number.isInteger(x)) return x.toLocaleString("en-US");
    if (Math.abs(x) >= 1e5 || (x !== 0 && Math.abs(x) < 1e-3)) return x.toExponential(3);
    return String(Number(x.toPrecision(4)));
  }

  function fmtFixed(x, digits) {
    return x === null || x === undefined ? "n/a" : x.toFixed(digits);
  }

  function pct(x, digits) {
    return x === null || x === undefined ? "n/a" : (x * 100).toFixed(digits === undefined ? 1 : digits) + "%";
  }

  function fmtCount(x) {
    var units = [[1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (var i = 0; i < units.length; i++) {
      if (x >= units[i][0]) return String(Number((x / units[i][0]).toPrecision(3))) + units[i][1];
    }
    return String(x);
  }

  function niceTicks(min, max, count) {
    if (!(max > min)) return [min];
    var raw = (max - min) / count, power = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 2.5, 5, 10].map(function (f) { return f * power; })
      .filter(function (s) { return s >= raw; })[0];
    var ticks = [];
    for (var v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
    return ticks;
  }

  // --- plots ----------------------------------------------------------------------------

  // A histogram of |values| on a log count scale. h: {width, counts}; options: xmin, xmax,
  // clipAt (bars past it are drawn as clipped), width/height. Returns the scale for markers.
  function logHistogram(h, options) {
    var W = options.width || 760, H = options.height || 300;
    var m = { l: 52, r: 18, t: options.top || 16, b: 38 };
    var xmin = options.xmin || 0, xmax = options.xmax, plotW = W - m.l - m.r, plotH = H - m.t - m.b;
    var first = Math.max(0, Math.floor(xmin / h.width));
    var visible = Math.min(h.counts.length, Math.ceil(xmax / h.width - 1e-9));
    var peak = 1;
    for (var i = first; i < visible; i++) peak = Math.max(peak, h.counts[i]);
    var yLow = -0.3, yTop = Math.max(1, Math.ceil(Math.log10(peak)));
    var x = function (v) { return m.l + ((Math.max(v, xmin) - xmin) / (xmax - xmin)) * plotW; };
    var y = function (c) { return m.t + plotH - ((Math.log10(c) - yLow) / (yTop - yLow)) * plotH; };
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: "100%", role: "img" });
    var grid = svg("g", { "class": "grid" }, root);
    var axis = svg("g", { "class": "axis" }, root);
    for (var k = 0; k <= yTop; k++) {
      svg("line", { x1: m.l, x2: W - m.r, y1: y(Math.pow(10, k)), y2: y(Math.pow(10, k)) }, grid);
      svg("text", { x: m.l - 6, y: y(Math.pow(10, k)) + 4, "text-anchor": "end", text: fmtCount(Math.pow(10, k)) }, axis);
    }
    niceTicks(xmin, xmax, 6).forEach(function (v) {
      if (v > xmax || v < xmin) return;
      svg("line", { x1: x(v), x2: x(v), y1: m.t + plotH, y2: m.t + plotH + 4 }, axis);
      svg("text", { x: x(v), y: m.t + plotH + 16, "text-anchor": "middle", text: fmtNum(v) }, axis);
    });
    if (options.clipAt !== undefined && options.clipAt < xmax) {
      svg("rect", { x: x(options.clipAt), y: m.t, width: x(xmax) - x(options.clipAt), height: plotH,
        fill: CLIP_SHADE, "fill-opacity": 0.45 }, root);
    }
    var kept = "", clipped = "", base = m.t + plotH;
    for (var j = first; j < visible; j++) {
      if (!h.counts[j]) continue;
      var x0 = x(j * h.width), x1 = x(Math.min((j + 1) * h.width, xmax));
      var rect = "M" + x0.toFixed(2) + " " + base + "V" + y(h.counts[j]).toFixed(2) +
        "H" + Math.max(x1, x0 + 0.8).toFixed(2) + "V" + base + "Z";
      if (options.clipAt !== undefined && j * h.width >= options.clipAt) clipped += rect;
      else kept += rect;
    }
    svg("path", { d: kept || "M0 0", fill: KEPT_COLOR, "class": "bars-kept" }, root);
    svg("path", { d: clipped || "M0 0", fill: CLIPPED_COLOR, "class": "bars-clipped" }, root);
    svg("line", { x1: m.l, x2: W - m.r, y1: base, y2: base }, axis);
    svg("line", { x1: m.l, x2: m.l, y1: m.t, y2: base }, axis);
    svg("text", { x: W - m.r, y: H - 4, "text-anchor": "end", text: options.xLabel || "|x|" }, axis);
    svg("text", { x: 12, y: m.t + plotH / 2, transform: "rotate(-90 12 " + (m.t + plotH / 2) + ")",
      "text-anchor": "middle", text: "count (log)" }, axis);
    return { svg: root, x: x, top: m.t, bottom: base, left: m.l, right: W - m.r, xmin: xmin, xmax: xmax };
  }

  function lastNonZero(counts) {
    for (var i = counts.length - 1; i >= 0; i--) if (counts[i]) return i;
    return 0;
  }

  // Vertical markers with their labels in up to three rows above the plot.
  function drawMarkers(plot, markers) {
    var groups = [];
    markers.slice().sort(function (a, b) { return a.x - b.x; }).forEach(function (mk) {
      if (mk.x > plot.xmax || mk.x < plot.xmin) return;
      var last = groups[groups.length - 1];
      if (last && Math.abs(plot.x(mk.x) - plot.x(last.x)) < 1.5) last.items.push(mk);
      else groups.push({ x: mk.x, items: [mk] });
    });
    var rowEnds = [-1e9, -1e9, -1e9];
    groups.forEach(function (group) {
      var px = plot.x(group.x);
      group.items.forEach(function (mk) {
        svg("line", { x1: px, x2: px, y1: plot.top, y2: plot.bottom, stroke: mk.color,
          "stroke-width": mk.chosen ? 3 : 1.6, "stroke-dasharray": mk.chosen ? null : "5 3",
          "class": mk.chosen ? "marker chosen" : "marker" }, plot.svg);
      });
      var label = group.items.map(function (mk) { return mk.label; }).join(" = ");
      var widthPx = label.length * 6 + 8, row = 0;
      while (row < 2 && rowEnds[row] > px - widthPx / 2) row++;
      rowEnds[row] = px + widthPx / 2;
      var anchor = px + widthPx / 2 > plot.right ? "end" : px - widthPx / 2 < plot.left ? "start" : "middle";
      svg("text", { x: px, y: 12 + row * 13, "text-anchor": anchor, "font-weight": group.items.some(function (mk) { return mk.chosen; }) ? 700 : 400,
        text: label }, plot.svg);
    });
  }

  // --- summary --------------------------------------------------------------------------

  function renderSummary(body) {
    var s = DATA.summary, v = s.versions;
    var belowFloor = s.gates.some(function (g) { return g.kind === "floor" && !g.passed; });
    var status = s.passed === false ? badge(false, "gate failed")
      : s.verification.status !== "verified" ? badge(null, s.verification.status || "not verified")
      : belowFloor ? badge(false, "verified: below the default floor", "warn") : badge(true, "verified");
    var precision = s.precision ? s.precision.toUpperCase() : "none";
    if (s.high_precision) precision += " + " + s.high_precision.toUpperCase() + " elsewhere";
    body.appendChild(kvGrid([
      ["model", s.model || "(in memory)"],
      ["written to", s.output || "(not written)"],
      ["precision", precision],
      ["range method", s.method + (s.method === "percentile" ? " " + DATA.calibration.percentile : "")],
      ["calibration", s.calibration ? s.calibration.samples + " samples, " + s.calibration.batches + " batches" : "ranges reused (no calibration run)"],
      ["quantized tensors / float nodes", s.quantized_tensors + " / " + s.float_nodes],
      ["versions", "trtq " + (v.trtq || "?") + ", onnx " + (v.onnx || "not recorded") + ", ONNX Runtime " + (v["ONNX Runtime"] || "not recorded")],
      ["check after writing", status],
      ["check data", s.verification.data ? s.verification.data.samples + " samples of " + s.verification.data.source + " (" + s.verification.backend + ")" : s.verification.backend || "none"],
    ]));
    if (s.precision && s.coverage) {
      var c = s.coverage;
      body.appendChild(el("h3", { text: "Coverage: " + pct(c.fraction) + " of " + fmtNum(c.total_macs) +
        " multiply-accumulates per sample run in " + s.precision.toUpperCase() + " (" + c.quantized_nodes + "/" + c.total_nodes + " compute nodes)" }));
      body.appendChild(shareBar(c.fraction));
      if (s.coverage_by_op.length) {
        body.appendChild(table(
          [{ label: "op" }, { label: "quantized nodes", num: true }, { label: "quantized MACs", num: true },
            { label: "total MACs", num: true }, { label: "coverage", num: true }, { label: "" }],
          s.coverage_by_op.map(function (o) {
            return [o.op, o.quantized_nodes + "/" + o.total_nodes, o.quantized_macs, o.total_macs, pct(o.fraction), shareBar(o.fraction)];
          })));
      }
    }
    if (s.mixed_coverage) {
      body.appendChild(el("h3", { text: "Reduced precision (" + (s.high_precision || "").toUpperCase() + " or quantized): " +
        pct(s.mixed_coverage.fraction) + " of the multiply-accumulates" }));
      body.appendChild(shareBar(s.mixed_coverage.fraction));
    }
    body.appendChild(el("h3", { text: "Gates and floor checks" }));
    if (!s.gates.length) {
      body.appendChild(note("No gate was asked for and no check ran (" + (s.verification.status || "not verified") + ")."));
    } else {
      body.appendChild(table(
        [{ label: "" }, { label: "kind" }, { label: "check" }, { label: "limit", num: true }, { label: "measured", num: true }, { label: "detail" }],
        s.gates.map(function (g) {
          var failed = g.kind === "gate" ? "FAILED" : "warning";
          return [badge(g.passed, g.passed ? "passed" : failed, g.kind === "gate" ? "fail" : "warn"),
            g.kind === "gate" ? "gate (exit 3)" : "default floor (warning)",
            g.name, g.limit, g.value, g.detail];
        })));
    }
  }

  // --- calibration ----------------------------------------------------------------------

  function renderCalibration(body) {
    var cal = DATA.calibration, tensors = cal.tensors;
    if (!tensors.length) {
      body.appendChild(note("No activation was quantized, so there is nothing calibrated to show."));
      return;
    }
    if (cal.note) body.appendChild(note("No histograms: " + cal.note + "."));
    var search = el("input", { type: "search", id: "tensor-search", placeholder: "filter " + tensors.length + " tensors by name" });
    var order = el("select", { id: "tensor-order", "aria-label": "order" }, [
      el("option", { value: "report", text: "report order" }),
      el("option", { value: "clipped", text: "most clipped first" }),
      el("option", { value: "name", text: "by name" }),
    ]);
    var zoom = el("input", { type: "checkbox", id: "tensor-zoom" });
    var prev = el("button", { id: "tensor-prev", type: "button", text: "◀ previous" });
    var next = el("button", { id: "tensor-next", type: "button", text: "next ▶" });
    var count = el("span", { "class": "note", id: "tensor-count" });
    var list = el("select", { id: "tensor-select", "class": "list", size: Math.max(6, Math.min(24, tensors.length)), "aria-label": "quantized tensors" });
    var plot = el("div", { id: "tensor-plot", "class": "plot" });
    body.appendChild(el("div", { "class": "controls" }, [search, order, prev, next,
      el("label", {}, [zoom, " zoom on the chosen amax (±25%)"]), count]));
    body.appendChild(el("div", { "class": "picker" }, [list, plot]));
    body.appendChild(note("Percentile drawn at " + cal.percentile + "%. Entropy is the raw KL minimum; trtq refuses it (and takes mse) " +
      "when it clips more than 5% of the non-zero values. Clipped shares are of the values outside bin 0."));

    var current = 0;
    function ordered() {
      var indices = tensors.map(function (t, i) { return i; });
      if (order.value === "clipped") indices.sort(function (a, b) { return (tensors[b].clipped || 0) - (tensors[a].clipped || 0); });
      if (order.value === "name") indices.sort(function (a, b) { return tensors[a].name < tensors[b].name ? -1 : 1; });
      var query = search.value.toLowerCase();
      return indices.filter(function (i) { return !query || tensors[i].name.toLowerCase().indexOf(query) >= 0; });
    }
    function fill() {
      var shown = ordered();
      list.textContent = "";
      shown.forEach(function (i) {
        list.appendChild(el("option", { value: i, title: tensors[i].name, text: tensors[i].name }));
      });
      count.textContent = shown.length + " of " + tensors.length + " tensors";
      if (shown.indexOf(current) >= 0) list.value = String(current);
    }
    function show(i) {
      current = i;
      list.value = String(i);
      plot.textContent = "";
      plot.setAttribute("data-tensor", tensors[i].name);
      drawTensor(plot, tensors[i], zoom.checked);
    }
    function step(delta) {
      var shown = ordered();
      if (!shown.length) return;
      var at = shown.indexOf(current);
      show(shown[(at + delta + shown.length) % shown.length]);
    }
    search.addEventListener("input", fill);
    order.addEventListener("change", fill);
    list.addEventListener("change", function () { if (list.value !== "") show(Number(list.value)); });
    zoom.addEventListener("change", function () { show(current); });
    prev.addEventListener("click", function () { step(-1); });
    next.addEventListener("click", function () { step(1); });
    fill();
    show(0);
  }

  function drawTensor(plot, t, zoomed) {
    plot.appendChild(el("div", { "class": "title", text: t.name }));
    var facts = [t.role ? "role: " + t.role : null,
      t.group.length ? "range shared with " + t.group.length + " other tensor(s) (chosen from their merged histogram): " + t.group.join(", ") : null,
      t.reason ? t.reason : null].filter(Boolean);
    facts.forEach(function (f) { plot.appendChild(el("div", { "class": "note", text: f })); });
    var h = t.histogram;
    if (!h) {
      plot.appendChild(note("No histogram for this tensor; chosen amax " + fmtNum(t.amax) + " (" + t.method + ")."));
      return;
    }
    var dataEnd = Math.max(h.max, t.amax, (lastNonZero(h.counts) + 1) * h.width);
    // Zoomed: the quarter either side of the chosen amax, where close thresholds part.
    var xmin = zoomed ? 0.75 * t.amax : 0;
    var xmax = zoomed ? Math.min(1.25 * t.amax, dataEnd * 1.04) : dataEnd * 1.04;
    var p = logHistogram(h, { xmin: xmin, xmax: xmax, clipAt: t.amax, top: 44, height: 320 });
    var markers = t.candidates.map(function (c) {
      return { x: c.amax, color: METHOD_COLORS[c.method], label: c.method };
    });
    markers.push({ x: t.amax, color: "#111", label: "chosen", chosen: true });
    drawMarkers(p, markers);
    plot.appendChild(p.svg);
    var readout = el("div", { "class": "readout", text: h.count.toLocaleString("en-US") + " values, max |x| " + fmtNum(h.max) +
      (h.nan ? ", " + h.nan + " NaN" : "") + (h.sentinel ? ", " + h.sentinel + " sentinels" : "") + ". Point at a bar for its count." });
    plot.appendChild(readout);
    p.svg.addEventListener("mousemove", function (event) {
      var box = p.svg.getBoundingClientRect(), scale = 760 / box.width;
      var value = p.xmin + ((event.clientX - box.left) * scale - p.left) / (p.right - p.left) * (p.xmax - p.xmin);
      var bin = Math.floor(value / h.width);
      if (bin < 0 || bin >= h.counts.length) return;
      readout.textContent = "|x| in [" + fmtNum(bin * h.width) + ", " + fmtNum((bin + 1) * h.width) + "): " +
        h.counts[bin].toLocaleString("en-US") + " values";
    });
    var rows = t.candidates.map(function (c) {
      var swatch = el("span", { "class": "swatch" });
      swatch.style.background = METHOD_COLORS[c.method];
      var remark = c.refused ? "refused by trtq: a spike, not a tail (clips over 5%)" : "";
      return { cells: [el("span", {}, [swatch, c.method]), c.amax, pct(c.clipped, 3), remark], chosenMethod: c.method === t.method };
    });
    var chosenSwatch = el("span", { "class": "swatch" });
    chosenSwatch.style.background = "#111";
    rows.push({ cells: [el("span", {}, [chosenSwatch, "chosen (" + t.method + (t.group.length ? ", range group" : "") + ")"]), t.amax, pct(t.clipped, 3), ""], chosenMethod: true });
    plot.appendChild(table([{ label: "threshold" }, { label: "amax", num: true }, { label: "clips (of non-zero values)", num: true }, { label: "" }],
      rows.map(function (r) { return r.cells; }), function (i) { return rows[i].chosenMethod ? "chosen" : null; }));
  }

  // --- float nodes and islands ----------------------------------------------------------

  function nodeTable(body, nodes, prefix, withOp) {
    var kinds = {};
    nodes.forEach(function (n) { kinds[n.kind] = (kinds[n.kind] || 0) + 1; });
    var kindSelect = el("select", { id: prefix + "-reason", "aria-label": "reason" },
      [el("option", { value: "", text: "every reason (" + nodes.length + ")" })].concat(
        Object.keys(kinds).sort().map(function (k) { return el("option", { value: k, text: k + " (" + kinds[k] + ")" }); })));
    var search = el("input", { type: "search", id: prefix + "-search", placeholder: "filter by name or reason" });
    var count = el("span", { "class": "note" });
    var holder = el("div", { "class": "scroll" });
    body.appendChild(el("div", { "class": "controls" }, [el("span", { text: "reason:" }), kindSelect, search, count]));
    body.appendChild(holder);
    var total = DATA.summary.coverage ? DATA.summary.coverage.total_macs : 0;
    function fill() {
      var query = search.value.toLowerCase();
      var shown = nodes.filter(function (n) {
        return (!kindSelect.value || n.kind === kindSelect.value) &&
          (!query || (n.name + " " + n.reason).toLowerCase().indexOf(query) >= 0);
      });
      var columns = [{ label: "node", name: true }];
      if (withOp) columns.push({ label: "op" }, { label: "MACs", num: true });
      columns.push({ label: "reason" });
      holder.textContent = "";
      holder.appendChild(table(columns, shown.map(function (n) {
        return withOp ? [n.name, n.op, n.macs, n.reason] : [n.name, n.reason];
      })));
      var macs = shown.reduce(function (sum, n) { return sum + (n.macs || 0); }, 0);
      count.textContent = shown.length + " of " + nodes.length + " nodes" +
        (withOp && total ? ", " + fmtNum(macs) + " MACs (" + pct(macs / total) + " of the model)" : "");
    }
    kindSelect.addEventListener("change", fill);
    search.addEventListener("input", fill);
    fill();
  }

  function renderFloatNodes(body) {
    if (!DATA.summary.precision) {
      body.appendChild(note("No INT8/FP8 quantization in this report."));
      return;
    }
    if (!DATA.float_nodes.length) {
      body.appendChild(note("Every compute node runs quantized."));
      return;
    }
    nodeTable(body, DATA.float_nodes, "float", true);
  }

  function renderIslands(body) {
    var islands = DATA.islands;
    if (!islands) {
      body.appendChild(note("No FP16/BF16 conversion in this report (the rest of the model stays FP32)."));
      return;
    }
    body.appendChild(note(islands.reduced_precision_nodes + " nodes run in " + islands.precision.toUpperCase() + ", " +
      islands.nodes.length + " kept FP32" + (islands.activation_limit ? "; activation limit |x| ≤ " + fmtNum(islands.activation_limit) : "") + "."));
    if (islands.nodes.length) nodeTable(body, islands.nodes, "islands", false);
  }

  // --- sensitivity and fallback ---------------------------------------------------------

  function renderSensitivity(body) {
    var sens = DATA.sensitivity, fallback = DATA.fallback;
    if (!sens && !fallback) {
      body.appendChild(note("This report has no sensitivity figures and no fallback search " +
        "(trtq quantize --target-cosine/--target-rel-l2/--target-drop; trtq report --sensitivity)."));
      return;
    }
    if (sens) {
      body.appendChild(el("h3", { text: sens.title }));
      body.appendChild(note(sens.metric));
      body.appendChild(about(sens.about));
      if (sens.bars.length) body.appendChild(barChart(sens.bars.slice(0, 30), "harm"));
      if (sens.bars.length > 30) body.appendChild(note("The 30 most harmful of " + sens.bars.length + " nodes; all are in the table."));
      body.appendChild(recordsTable(sens.table));
    }
    if (fallback) {
      body.appendChild(el("h3", { text: "Fallback steps" }));
      body.appendChild(about(fallback.about));
      body.appendChild(recordsTable(fallback.table, "fallback-steps"));
    }
  }

  function about(pairs) {
    return kvGrid(Object.keys(pairs).filter(function (k) { return pairs[k] !== null && pairs[k] !== ""; })
      .map(function (k) { return [k, fmtCell(pairs[k])]; }));
  }

  function recordsTable(records, id) {
    return el("div", { "class": "scroll", id: id }, [table(records.columns, records.rows)]);
  }

  function barChart(bars, metric) {
    var W = 1100, rowH = 20, labelW = 440, m = { t: 8, b: 28, r: 70 };
    var H = m.t + bars.length * rowH + m.b;
    var low = Math.min(0, Math.min.apply(null, bars.map(function (b) { return b.value; })));
    var high = Math.max(0, Math.max.apply(null, bars.map(function (b) { return b.value; })));
    if (high === low) high = low + 1;
    var x = function (v) { return labelW + ((v - low) / (high - low)) * (W - labelW - m.r); };
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: "100%", role: "img", id: "sensitivity-chart" });
    bars.forEach(function (bar, i) {
      var top = m.t + i * rowH;
      var label = bar.label.length > 70 ? "…" + bar.label.slice(-69) : bar.label;
      var text = svg("text", { x: labelW - 6, y: top + 14, "text-anchor": "end", text: label }, root);
      svg("title", { text: bar.label }, text);
      svg("rect", { x: Math.min(x(0), x(bar.value)), y: top + 3, width: Math.max(1, Math.abs(x(bar.value) - x(0))), height: rowH - 6,
        fill: "#c8372d", "class": "harm-bar" }, root);
      svg("text", { x: Math.max(x(0), x(bar.value)) + 4, y: top + 14, text: fmtNum(bar.value) }, root);
    });
    var axis = svg("g", { "class": "axis" }, root);
    svg("line", { x1: x(low), x2: x(high), y1: H - m.b + 2, y2: H - m.b + 2 }, axis);
    svg("text", { x: x(high), y: H - 6, "text-anchor": "end", text: metric || "" }, axis);
    return el("div", { "class": "plot" }, [root]);
  }

  // --- FP32 vs quantized ----------------------------------------------------------------

  function renderFidelity(body) {
    if (!DATA.fidelity.length) {
      body.appendChild(note("No figures: the model was not checked against FP32 (no data), and no comparison was given (trtq report --compare)."));
      return;
    }
    DATA.fidelity.forEach(function (source, s) {
      body.appendChild(el("h3", { text: source.title }));
      body.appendChild(note(source.detail));
      if (source.accuracy) {
        var a = source.accuracy;
        body.appendChild(note("Accuracy on " + a.samples + " labels (" + a.output + "): reference " + pct(a.reference, 2) +
          ", candidate " + pct(a.candidate, 2) + ", drop " + fmtFixed(a.drop_points, 2) + " points."));
      }
      body.appendChild(table(
        [{ label: "output", name: true }, { label: "cosine mean", num: true }, { label: "cosine min", num: true }, { label: "rel L2", num: true },
          { label: "max abs", num: true }, { label: "mean abs", num: true }, { label: "top-1 agreement", num: true }],
        source.outputs.map(function (o) {
          return [o.name, fmtFixed(o.cosine_mean, 6), fmtFixed(o.cosine_min, 6), fmtNum(o.rel_l2), fmtNum(o.max_abs), fmtNum(o.mean_abs),
            o.top1_agreement === null || o.top1_agreement === undefined ? "n/a" : pct(o.top1_agreement, 2)];
        })));
      var cards = el("div", { "class": "outputs" });
      source.outputs.forEach(function (o) {
        var card = el("div", { "class": "plot error-histogram" }, [el("div", { "class": "title", text: o.name + ": |quantized − FP32| per element" })]);
        var h = o.error_histogram;
        if (!h || !h.count) {
          card.appendChild(note("No error histogram in this data."));
        } else {
          var xmax = Math.max(h.max, (lastNonZero(h.counts) + 1) * h.width) * 1.04;
          var p = logHistogram(h, { xmax: xmax, width: 520, height: 220, xLabel: "|error|" });
          card.appendChild(p.svg);
          card.appendChild(note(h.count.toLocaleString("en-US") + " elements, max " + fmtNum(h.max) + (h.nan ? ", " + h.nan + " NaN" : "")));
        }
        cards.appendChild(card);
      });
      body.appendChild(cards);
    });
  }

  // --- run ------------------------------------------------------------------------------

  [["summary", renderSummary], ["calibration", renderCalibration], ["float-nodes", renderFloatNodes],
    ["islands", renderIslands], ["sensitivity", renderSensitivity], ["fidelity", renderFidelity]].forEach(function (entry) {
    var body = sectionBody(entry[0]);
    try {
      entry[1](body);
      body.parentNode.setAttribute("data-rendered", "true");
    } catch (error) {
      body.appendChild(note("This section could not be drawn: " + error));
      setTimeout(function () { throw error; });  // reported in the console, the rest still drawn
    }
  });
})();
