(function () {
  "use strict";
  // Every figure arrives formatted from the tables (qis_fhir/evidence/report.py); this script only
  // places text (textContent, never markup) and draws the forest plots from the numbers beside it.
  var DATA = JSON.parse(document.getElementById("evidence-data").textContent);
  var SVG_NS = "http://www.w3.org/2000/svg";
  var $ = function (id) { return document.getElementById(id); };

  function el(tag, attrs) {
    var node = document.createElement(tag);
    var kids = Array.prototype.slice.call(arguments, 2);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "class") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    kids.forEach(function (kid) {
      if (kid === null || kid === undefined || kid === "") return;
      node.appendChild(typeof kid === "string" ? document.createTextNode(kid) : kid);
    });
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fill(select, options, keep) {
    var previous = keep ? select.value : null;
    select.textContent = "";
    options.forEach(function (o) { select.appendChild(el("option", { value: o.id, text: o.label })); });
    if (previous !== null && options.some(function (o) { return o.id === previous; })) select.value = previous;
  }

  // ------------------------------------------------------------------ controls
  var sel = { condition: $("condition"), age_band: $("age-band"), sex: $("sex"), measure: $("measure"), period: $("period") };

  function fillChoices() {
    var choice = DATA.choices[sel.condition.value];
    fill(sel.measure, choice.measures, true);
    fill(sel.period, choice.periods, true);
    $("measure-field").hidden = choice.measures.length < 2;
    $("period-field").hidden = choice.periods.length < 2;
  }

  function currentCohort() {
    var v = {};
    Object.keys(sel).forEach(function (k) { v[k] = sel[k].value; });
    return DATA.cohorts.find(function (c) {
      return c.condition === v.condition && c.age_band === v.age_band && c.sex === v.sex &&
        c.measure === v.measure && c.period === v.period;
    });
  }

  // ------------------------------------------------------------------ figures
  function figure(main, interval, note) {
    if (!main) return el("span", { class: "na", text: note || "not estimated" });
    return el("span", { class: "fig" }, el("span", { class: "val", text: main }),
      interval ? el("span", { class: "ci", text: interval }) : null);
  }

  function localText(t, measure) {
    if (!t.local) return "no patients of your hospital in this group";
    var parts = [t.local.patients + " patients"];
    if (t.local.resp) parts.push(t.local.resp + " " + measure.words.response_lc);
    if (t.local.mean) parts.push(measure.words.mean_name.toLowerCase() + " " + t.local.mean + (t.unit ? " " + t.unit : ""));
    return parts.join(" \u00b7 ");
  }

  function rankedTable(group, measure) {
    var unit = measure.unit ? " (" + measure.unit + ")" : "";
    var head = el("tr", {},
      el("th", { scope: "col", text: "Rank" }), el("th", { scope: "col", text: "Treatment" }),
      el("th", { scope: "col", class: "num", text: "Patients" }), el("th", { scope: "col", class: "num", text: "Hospitals" }),
      el("th", { scope: "col", text: measure.words.response + ": all patients as if from one hospital" }),
      el("th", { scope: "col", text: measure.words.response + ": between hospitals" }),
      el("th", { scope: "col", text: measure.words.mean_name + unit }),
      el("th", { scope: "col", text: "Your hospital (" + DATA.local_site + ")" }));
    var body = el("tbody");
    group.treatments.forEach(function (t) {
      body.appendChild(el("tr", { "data-treatment": t.id },
        el("td", { class: "rank", text: t.rank || "\u2013" }),
        el("td", { class: "name" }, el("span", { class: "tname", text: t.name }),
          t.flags.length ? el("span", { class: "caution-count", title: t.flags.map(function (f) { return f.text; }).join("\n"),
            text: t.flags.length + (t.flags.length === 1 ? " caution" : " cautions") }) : null,
          t.rank ? el("span", { class: "basis", text: "ranked by the " + t.rank_basis }) : null),
        el("td", { class: "num patients", text: t.patients }),
        el("td", { class: "num sites", text: t.sites }),
        el("td", { class: "resp-pooled" }, figure(t.resp_pooled, t.resp_pooled_ci)),
        el("td", { class: "resp-re" }, figure(t.resp_re, t.resp_re_ci, t.resp_re_note),
          t.resp_pi ? el("span", { class: "pi", text: "another hospital: " + t.resp_pi }) : null),
        el("td", { class: "mean-change" }, figure(t.mean_re || t.mean_pooled, t.mean_re ? t.mean_re_ci : t.mean_pooled_ci),
          el("span", { class: "basis", text: t.mean_re ? "between hospitals" : "all as one hospital" })),
        el("td", { class: "local", text: localText(t, measure) })));
    });
    return el("div", { class: "table-wrap" }, el("table", { class: "ranked" }, el("thead", {}, head), body));
  }

  function detail(label, main, interval, note) {
    return el("div", { class: "detail" }, el("dt", { text: label }), el("dd", {}, figure(main, interval, note)));
  }

  function card(t, group, measure, domain) {
    var unit = t.unit ? " (" + t.unit + ")" : "";
    var rankLine = t.rank
      ? "Ranked " + t.rank + " of " + group.treatments.length + ", by the " + t.rank_basis + "."
      : "Not ranked.";
    var cautions = t.flags.length
      ? el.apply(null, ["ul", { class: "cautions" }].concat(t.flags.map(function (f) { return el("li", { "data-flag": f.code, text: f.text }); })))
      : el("p", { class: "no-cautions", text: "No cautions beyond the observational nature of the data." });
    return el("article", { class: "card", id: "treatment-" + t.id, "data-treatment": t.id },
      el("header", { class: "card-head" },
        el("h3", {}, el("span", { class: "badge", text: t.rank || "\u2013" }), el("span", { class: "tname", text: t.name })),
        el("p", { class: "sub", text: t.patients + " patients at " + t.sites + (t.sites === "1" ? " hospital. " : " hospitals. ") + rankLine })),
      el("dl", { class: "details" },
        detail(measure.words.response + ", all patients as if from one hospital", t.resp_pooled, t.resp_pooled_ci),
        detail(measure.words.response + ", between hospitals", t.resp_re, t.resp_re_ci, t.resp_re_note),
        detail("Expected range at another hospital", t.resp_pi, "", t.resp_pi_note),
        detail("How much hospitals differ in who " + measure.words.was + " (I\u00b2)", t.resp_i2, "", t.resp_re_note),
        detail(measure.words.mean_name + unit + ", all as one hospital", t.mean_pooled, t.mean_pooled_ci),
        detail(measure.words.mean_name + unit + ", between hospitals", t.mean_re, t.mean_re_ci, t.mean_re_note),
        detail(measure.words.mean_name + ", expected range at another hospital", t.mean_pi, "", t.mean_pi_note),
        detail("How much hospitals differ in " + measure.words.mean_name.toLowerCase() + " (I\u00b2)", t.mean_i2, "", t.mean_re_note),
        el("div", { class: "detail local-detail" }, el("dt", { text: "Your hospital (" + DATA.local_site + ")" }),
          el("dd", { class: "local", text: localText(t, measure) }))),
      el("div", { class: "cautions-box" }, el("h4", { text: "Cautions" }), cautions),
      forest(t, measure, domain));
  }

  // ------------------------------------------------------------------ forest plot
  var W = 980, LABEL_W = 230, PANEL_W = 330, GAP = 60, ROW = 30, TOP = 52, BOTTOM = 64;

  function niceTicks(lo, hi, count) {
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / count)));
    [1, 2, 2.5, 5, 10].some(function (m) { if ((hi - lo) / (step * m) <= count) { step *= m; return true; } return false; });
    var ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Math.round(v / step) * step);
    return ticks;
  }

  function meanDomain(group, withZero) { // a change is read against 0; a reading (140 mmHg) is not
    var lo = withZero ? 0 : Infinity, hi = withZero ? 0 : -Infinity;
    group.treatments.forEach(function (t) {
      var p = t.plot;
      [p.mean_pooled_lo, p.mean_pooled_hi, p.mean_re_lo, p.mean_re_hi, p.mean_pi_lo, p.mean_pi_hi].concat(
        p.sites.map(function (s) { return s.mean_lo === null ? s.mean : s.mean_lo; }),
        p.sites.map(function (s) { return s.mean_hi === null ? s.mean : s.mean_hi; })
      ).forEach(function (v) { if (v !== null && isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    });
    if (lo > hi) { lo = 0; hi = 0; } // no finite value at all
    var pad = (hi - lo || 1) * 0.06;
    return [lo - pad, hi + pad];
  }

  function panel(g, x0, domain, rows, spec) {
    var scale = function (v) { return x0 + (Math.min(Math.max(v, domain[0]), domain[1]) - domain[0]) / (domain[1] - domain[0]) * PANEL_W; };
    var yEnd = TOP + rows * ROW;
    g.appendChild(svg("text", { x: x0 + PANEL_W / 2, y: 20, class: "ptitle", "text-anchor": "middle" }, spec.title));
    niceTicks(domain[0], domain[1], 5).forEach(function (v) {
      var x = scale(v);
      g.appendChild(svg("line", { x1: x, x2: x, y1: TOP - 6, y2: yEnd, class: v === 0 && spec.zero ? "zero" : "grid" }));
      g.appendChild(svg("text", { x: x, y: yEnd + 16, class: "tick", "text-anchor": "middle" }, spec.tick(v)));
    });
    g.appendChild(svg("line", { x1: x0, x2: x0 + PANEL_W, y1: yEnd, y2: yEnd, class: "axis" }));
    g.appendChild(svg("text", { x: x0, y: yEnd + 36, class: "dir", "text-anchor": "start" }, spec.left));
    g.appendChild(svg("text", { x: x0 + PANEL_W, y: yEnd + 36, class: "dir", "text-anchor": "end" }, spec.right));
    return scale;
  }

  function whisker(g, scale, y, lo, hi, cls) {
    if (lo === null || hi === null) return;
    g.appendChild(svg("line", { x1: scale(lo), x2: scale(hi), y1: y, y2: y, class: cls }));
  }

  function diamond(g, scale, y, est, lo, hi, cls) {
    if (est === null || lo === null || hi === null) return false;
    var h = 8;
    g.appendChild(svg("polygon", {
      points: [scale(lo) + "," + y, scale(est) + "," + (y - h), scale(hi) + "," + y, scale(est) + "," + (y + h)].join(" "),
      class: cls
    }));
    return true;
  }

  function forest(t, measure, meanDom) {
    var p = t.plot;
    if (!p.sites.length) return el("p", { class: "empty", text: "No per-hospital figures are available for this treatment." });
    var rows = p.sites.length + 3; // sites, a gap, the two combined rows
    var H = TOP + rows * ROW + BOTTOM;
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, class: "forest", role: "img",
      "aria-label": "Forest plot for " + t.name });
    root.appendChild(svg("title", {}, "Results by hospital for " + t.name));
    var unit = measure.unit ? " (" + measure.unit + ")" : "";
    var lower = measure.direction === "lower", higher = measure.direction === "higher";
    var fewerBetter = measure.response_direction === "lower", lc = measure.words.response_lc;
    var x1 = LABEL_W, x2 = LABEL_W + PANEL_W + GAP;
    p.sites.forEach(function (s, i) { // zebra bands first, so the grid and the points sit on top
      if (i % 2 === 0) root.appendChild(svg("rect", { x: 0, y: TOP + i * ROW, width: W, height: ROW, class: "band" }));
    });
    var sResp = panel(root, x1, [0, 1], rows, {
      title: measure.words.response + " (%)", zero: false, tick: function (v) { return Math.round(v * 100) + "%"; },
      left: fewerBetter ? "\u2190 better: fewer " + lc : "fewer " + lc,
      right: fewerBetter ? "more " + lc : "more " + lc + " \u2192 better"
    });
    var sMean = panel(root, x2, meanDom, rows, {
      title: measure.words.mean_name + unit, zero: measure.words.mean_zero, tick: function (v) { return String(+v.toFixed(3)).replace("-", "\u2212"); },
      left: lower ? "\u2190 better: " + measure.words.mean_low : "\u2190 " + measure.words.mean_low,
      right: higher ? measure.words.mean_high + ": better \u2192" : measure.words.mean_high + " \u2192"
    });
    root.appendChild(svg("text", { x: 8, y: TOP - 14, class: "colhead" }, "Hospital (patients)"));

    p.sites.forEach(function (s, i) {
      var y = TOP + i * ROW + ROW / 2;
      var row = root.appendChild(svg("g", { class: "row" }));
      row.appendChild(svg("title", {}, s.text)); // the hospital's own figures, on hover
      row.appendChild(svg("rect", { x: 0, y: y - ROW / 2, width: W, height: ROW, class: "hit" }));
      row.appendChild(svg("text", { x: 8, y: y + 5, class: s.local ? "site local" : "site" },
        s.site + " (" + s.patients + ")" + (s.local ? " \u2014 yours" : "")));
      [[sResp, s.resp, s.resp_lo, s.resp_hi, s.resp_w], [sMean, s.mean, s.mean_lo, s.mean_hi, s.mean_w]].forEach(function (f) {
        if (f[1] === null) return;
        whisker(row, f[0], y, f[2], f[3], "ci");
        var size = 5 + 11 * Math.sqrt(f[4] === null ? 0.05 : f[4]);
        row.appendChild(svg("rect", { x: f[0](f[1]) - size / 2, y: y - size / 2, width: size, height: size, class: s.local ? "pt local" : "pt" }));
      });
    });

    var yOne = TOP + (p.sites.length + 1) * ROW + ROW / 2, yRe = yOne + ROW;
    root.appendChild(svg("line", { x1: 0, x2: W, y1: yOne - ROW / 2 - 2, y2: yOne - ROW / 2 - 2, class: "sep" }));
    root.appendChild(svg("text", { x: 8, y: yOne + 5, class: "pooled-label" }, "All as one hospital"));
    root.appendChild(svg("text", { x: 8, y: yRe + 5, class: "pooled-label" }, "Between hospitals"));
    [[sResp, "resp", t.resp_re_note], [sMean, "mean", t.mean_re_note]].forEach(function (f) {
      var s = f[0], k = f[1];
      diamond(root, s, yOne, p[k + "_pooled"], p[k + "_pooled_lo"], p[k + "_pooled_hi"], "diamond-one");
      whisker(root, s, yRe, p[k + "_pi_lo"], p[k + "_pi_hi"], "pi");
      if (!diamond(root, s, yRe, p[k + "_re"], p[k + "_re_lo"], p[k + "_re_hi"], "diamond-re")) {
        root.appendChild(svg("text", { x: s === sResp ? x1 + 4 : x2 + 4, y: yRe + 5, class: "na-svg" }, f[2] || "not estimated"));
      }
    });
    var legend = el("p", { class: "legend" },
      el("span", { class: "key key-pt" }), " one hospital (bigger square, more weight) with its interval  ",
      el("span", { class: "key key-one" }), " all patients as if from one hospital  ",
      el("span", { class: "key key-re" }), " between hospitals  ",
      el("span", { class: "key key-pi" }), " expected range at another hospital");
    return el("figure", { class: "forest-wrap" }, root, legend);
  }

  // ------------------------------------------------------------------ sections
  function renderCohort() {
    var cohort = currentCohort();
    var measure = DATA.measures[sel.measure.value];
    var out = $("cohort"), wider = $("wider");
    out.textContent = "";
    wider.textContent = "";
    var condLabel = sel.condition.options[sel.condition.selectedIndex].text;
    var who = sel.sex.options[sel.sex.selectedIndex].text + " \u00b7 " + sel.age_band.options[sel.age_band.selectedIndex].text;
    out.appendChild(el("h2", { id: "cohort-title", text: condLabel + ": " + who }));
    out.appendChild(el("p", { class: "design" }, el("strong", { text: measure.label + ". " }),
      "Measured as the " + measure.design + ". Intervals are " + DATA.level + " intervals."));
    var group = cohort && cohort.group !== null ? DATA.groups[cohort.group] : null;
    if (!group) {
      out.appendChild(el("p", { class: "empty", id: "cohort-empty", text: "No hospital reported this group of patients for this measure and period." }));
    } else {
      var dom = meanDomain(group, measure.words.mean_zero);
      out.appendChild(el("p", { class: "summary", id: "cohort-summary",
        text: group.patients + " patients across " + group.treatments.length +
          (group.treatments.length === 1 ? " treatment" : " treatments, " + measure.words.ranked) +
          " (" + measure.words.two_treatments + ")." +
          (group.patients_n < DATA.near_below ? " Fewer than " + DATA.near_below + " patients: see the wider evidence from nearby groups below." : "") }));
      out.appendChild(rankedTable(group, measure));
      out.appendChild(el("h2", { text: "Each treatment in detail" }));
      group.treatments.forEach(function (t) { out.appendChild(card(t, group, measure, dom)); });
    }
    var patients = group ? group.patients_n : 0;
    if (patients < DATA.near_below) {
      wider.appendChild(el("h2", { text: "Wider evidence: nearby groups of patients" }));
      wider.appendChild(el("p", { class: "wider-note", text:
        "The group you chose has fewer than " + DATA.near_below + " patients (" + (group ? group.patients : "0") + "). " +
        "Nearby groups are shown for context. They are different patients and may respond differently: " +
        "they are not results for the group you chose." }));
      if (!cohort || !cohort.near.length) {
        wider.appendChild(el("p", { class: "empty", text: "No nearby group of patients has results either." }));
      }
      (cohort ? cohort.near : []).forEach(function (n) {
        var g = DATA.groups[n.group];
        wider.appendChild(el("section", { class: "near", "data-cohort": g.sex + "|" + g.age_band },
          el("h3", {}, el("span", { class: "near-tag", text: "Wider evidence" }), " " + g.cohort + " (" + n.relation + "): " + g.patients + " patients"),
          rankedTable(g, measure)));
      });
    }
  }

  function renderStatic() {
    $("observational-text").textContent = DATA.observational + " ";
    var gl = $("glossary-list");
    DATA.glossary.forEach(function (e) { gl.appendChild(el("div", {}, el("dt", { text: e[0] }), el("dd", { text: e[1] }))); });
    var p = DATA.provenance, body = $("provenance-body");
    body.appendChild(el("p", { text: "Report built on " + p.run_date + ". Your hospital appears as " + p.local_site +
      ". Other hospitals are shown under stable letters, never by name." }));
    var rows = el("tbody");
    p.sites.forEach(function (s) {
      rows.appendChild(el("tr", {}, el("td", { text: s.site + (s.site === p.local_site ? " (yours)" : "") }),
        el("td", { text: s.as_of }), el("td", { class: "num", text: s.records })));
    });
    body.appendChild(el("div", { class: "table-wrap" }, el("table", { class: "sites", id: "provenance-sites" },
      el("thead", {}, el("tr", {}, el("th", { text: "Hospital" }), el("th", { text: "Data up to" }),
        el("th", { class: "num", text: "Summaries received" }))), rows)));
    var used = el("ul", { class: "facts" },
      el("li", { id: "records-used", text: p.used + " hospital summaries used; " + p.withheld + " withheld." }),
      el("li", { text: "Each summary holds one hospital's counts for one group of patients and one treatment. " +
        "Hospitals send a figure only for groups of at least " + p.min_cell_size + " patients; no individual patient's record leaves a hospital." }),
      el("li", { text: p.cells + " result rows (treatment \u00d7 group of patients \u00d7 period)." }),
      el("li", { text: "Shared definitions version " + p.mapping_version + "; network membership list version " + p.manifest_version + "." }));
    body.appendChild(used);
    if (p.withheld_reasons.length) {
      body.appendChild(el("p", { text: "Summaries withheld, and why:" }));
      body.appendChild(el.apply(null, ["ul", { class: "facts", id: "withheld" }].concat(p.withheld_reasons.map(function (r) {
        return el("li", { text: r.count + ": " + r.text });
      }))));
    }
  }

  function init() {
    fill(sel.condition, DATA.conditions);
    fill(sel.age_band, DATA.age_bands);
    fill(sel.sex, DATA.sexes);
    renderStatic();
    if (!DATA.groups.length) {
      $("controls").hidden = true;
      $("cohort").appendChild(el("p", { class: "empty", id: "cohort-empty", text: "No hospital has reported any results yet." }));
      return;
    }
    var start = DATA.groups.reduce(function (a, b) { return b.patients_n > a.patients_n ? b : a; });
    sel.condition.value = start.condition_id;
    sel.age_band.value = start.age_band;
    sel.sex.value = start.sex;
    fillChoices();
    sel.measure.value = start.measure;
    sel.period.value = start.period;
    sel.condition.addEventListener("change", function () { fillChoices(); renderCohort(); });
    [sel.age_band, sel.sex, sel.measure, sel.period].forEach(function (s) { s.addEventListener("change", renderCohort); });
    renderCohort();
  }

  init();
})();
