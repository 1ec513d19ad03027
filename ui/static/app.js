// tinv UI: live updates, charts and copy buttons. Every string from the server is set with
// textContent or arrives as HTML that Jinja already escaped; nothing user-written is parsed here.
"use strict";

const FINAL = new Set(["Succeeded", "Failed"]);
const page = document.body.dataset.page;

// TensorBoard's smoothing: a debiased exponential moving average.
function smooth(values, weight) {
  const out = [];
  let last = 0;
  let n = 0;
  for (const v of values) {
    last = last * weight + (1 - weight) * v;
    n += 1;
    out.push(weight > 0 ? last / (1 - Math.pow(weight, n)) : v);
  }
  return out;
}

function readJSON(id) {
  const el = document.getElementById(id);
  return el ? JSON.parse(el.textContent) : null;
}

const LAYOUT = {
  margin: { l: 56, r: 16, t: 36, b: 44 },
  paper_bgcolor: "rgba(0,0,0,0)",
  plot_bgcolor: "#fbfcfe",
  font: { family: "system-ui, -apple-system, Segoe UI, sans-serif", size: 12, color: "#243042" },
  xaxis: { title: { text: "step" }, gridcolor: "#e6eaf0", zeroline: false },
  yaxis: { gridcolor: "#e6eaf0", zeroline: false },
  legend: { orientation: "h", y: -0.25 },
  hovermode: "x unified",
};
const CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

function smoothingControl(onChange) {
  const input = document.getElementById("smoothing");
  const out = document.getElementById("smoothing-value");
  if (!input) return () => 0;
  input.addEventListener("input", () => {
    out.textContent = Number(input.value).toFixed(2);
    onChange();
  });
  return () => Number(input.value);
}

// ------------------------------------------------------------------ runs list
function runsPage() {
  const form = document.getElementById("filters");
  const box = document.getElementById("runs");
  const updated = document.getElementById("updated");
  let timer = null;
  let inflight = false;

  function query() {
    return new URLSearchParams(new FormData(form)).toString();
  }
  async function refresh() {
    if (inflight) return;
    inflight = true;
    try {
      const resp = await fetch("/partials/runs?" + query(), { headers: { Accept: "text/html" } });
      if (resp.ok) {
        box.innerHTML = await resp.text(); // server-rendered, autoescaped by Jinja
        updated.textContent = "updated " + new Date().toLocaleTimeString();
        updated.dataset.refreshes = String(Number(updated.dataset.refreshes || 0) + 1);
      } else {
        updated.textContent = "refresh failed: HTTP " + resp.status;
      }
    } catch (err) {
      updated.textContent = "refresh failed: " + err;
    } finally {
      inflight = false;
    }
  }
  function changed() {
    history.replaceState(null, "", "/?" + query());
    clearTimeout(timer);
    timer = setTimeout(refresh, 150);
  }
  form.addEventListener("input", changed);
  form.addEventListener("submit", (e) => { e.preventDefault(); changed(); });
  box.addEventListener("click", (e) => {
    const a = e.target.closest("a.sort");
    if (!a) return;
    e.preventDefault();
    const params = new URL(a.href).searchParams;
    form.elements.sort.value = params.get("sort") || "age";
    form.elements.desc.value = params.get("desc") || "";
    changed();
  });
  setInterval(refresh, 2000);
}

// ------------------------------------------------------------------ job page
function jobPage() {
  let curves = readJSON("curves-data") || { loss: [], lr: [] };
  const lossEl = document.getElementById("loss-chart");
  const lrEl = document.getElementById("lr-chart");
  const weight = smoothingControl(draw);

  const empty = document.getElementById("no-scalars");
  function draw() {
    if (!window.Plotly) return;
    // nothing reported yet: the message, not two empty axes (they appear with the first points)
    lossEl.hidden = lrEl.hidden = curves.loss.length === 0 && curves.lr.length === 0;
    if (empty) empty.hidden = !lossEl.hidden;
    if (lossEl.hidden) return;
    const steps = curves.loss.map((p) => p[0]);
    const values = curves.loss.map((p) => p[1]);
    const w = weight();
    const loss = [
      { x: steps, y: values, name: "loss", mode: "lines", line: { color: "#93b4f5", width: 1 }, opacity: w > 0 ? 0.45 : 1 },
    ];
    if (w > 0) loss.push({ x: steps, y: smooth(values, w), name: "smoothed", mode: "lines", line: { color: "#2563eb", width: 2 } });
    Plotly.react(lossEl, loss, { ...LAYOUT, title: { text: "loss" } }, CONFIG);
    lossEl.dataset.points = String(values.length);
    const lr = [{ x: curves.lr.map((p) => p[0]), y: curves.lr.map((p) => p[1]), name: "learning rate", mode: "lines+markers", line: { color: "#059669" } }];
    Plotly.react(lrEl, lr, { ...LAYOUT, title: { text: "learning rate" }, yaxis: { ...LAYOUT.yaxis, exponentformat: "e", rangemode: "tozero" } }, CONFIG);
    lrEl.dataset.points = String(curves.lr.length);
  }
  draw();

  // live: re-read the curves and numbers while the job runs
  const phase = document.getElementById("phase");
  async function poll() {
    if (FINAL.has(phase.textContent.trim())) return;
    try {
      const resp = await fetch(location.pathname.replace(/^\/jobs\//, "/api/jobs/") + "/curves");
      if (!resp.ok) return;
      const data = await resp.json();
      curves = data.curves;
      phase.textContent = data.phase || phase.textContent;
      const s = data.stats;
      const fmt = (v) => (v === null || v === undefined ? "-" : typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : String(v));
      const set = (k, v) => { const el = document.querySelector(`[data-stat="${k}"]`); if (el) el.textContent = v; };
      set("steps", `${fmt(s.step)} / ${fmt(s.total_steps)} steps`);
      for (const k of ["loss", "learning_rate", "samples_per_second", "eta", "world_size", "updated_at"]) set(k, fmt(s[k]));
      document.getElementById("stat-bar").style.width = (s.percent || 0) + "%";
      draw();
    } catch (err) {
      /* the next poll tries again */
    }
  }
  setInterval(poll, 5000);

  // continue / fork snippets
  const box = document.getElementById("snippet-box");
  document.querySelectorAll("button.snip").forEach((btn) => {
    btn.addEventListener("click", () => {
      box.hidden = false;
      box.querySelectorAll("pre.yaml").forEach((pre) => { pre.hidden = pre.id !== btn.dataset.target; });
      const shown = document.getElementById(btn.dataset.target);
      document.getElementById("snippet-title").textContent = shown.dataset.title;
      box.dataset.shown = btn.dataset.target;
      box.scrollIntoView({ block: "nearest" });
    });
  });
  const copy = document.getElementById("copy");
  if (copy) copy.addEventListener("click", () => copyText(document.getElementById(box.dataset.shown).textContent, copy));
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "copied";
  } catch (err) {
    button.textContent = "copy failed";
  }
  setTimeout(() => { button.textContent = "copy"; }, 1500);
}

// ------------------------------------------------------------------ grid page
function gridPage() {
  document.querySelectorAll("button.copy-cmd").forEach((btn) => {
    btn.addEventListener("click", () => copyText(btn.parentElement.querySelector("code").textContent, btn));
  });
}

// ------------------------------------------------------------------ compare
function comparePage() {
  const series = readJSON("compare-data") || [];
  const el = document.getElementById("compare-chart");
  const weight = smoothingControl(draw);
  function draw() {
    if (!window.Plotly || !series.length) return;
    const w = weight();
    const traces = series.map((s, i) => ({
      x: s.points.map((p) => p[0]),
      y: w > 0 ? smooth(s.points.map((p) => p[1]), w) : s.points.map((p) => p[1]),
      name: s.name,
      mode: "lines",
      line: { color: COLORS[i % COLORS.length], width: 2 },
    }));
    Plotly.react(el, traces, { ...LAYOUT, title: { text: "loss" + (w > 0 ? ` (smoothed ${w.toFixed(2)})` : "") } }, CONFIG);
  }
  draw();
}

({ runs: runsPage, job: jobPage, grid: gridPage, compare: comparePage })[page]?.();
