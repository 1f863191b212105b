// cryolive dashboard: plain JS, canvas plots, no external code. Talks to /api (cookie from /api/login).
"use strict";

const METRICS = [
  ["defocus_angstrom", "defocus", "Å"],
  ["ctf_resolution_angstrom", "CTF fit resolution", "Å"],
  ["astigmatism_angstrom", "astigmatism", "Å"],
  ["ctf_figure_of_merit", "CTF figure of merit", ""],
  ["motion_total_angstrom", "total motion", "Å"],
  ["motion_early_angstrom", "early motion", "Å"],
  ["motion_late_angstrom", "late motion", "Å"],
  ["max_local_motion_angstrom", "largest local motion", "Å"],
  ["ice_thickness", "ice thickness (relative)", ""],
  ["particle_count", "particles", ""],
  ["stage_tilt_deg", "stage tilt", "°"],
  ["carbon_heterogeneity", "carbon (tile contrast)", ""],
  ["mean_pick_score", "mean pick score", ""],
];
const COLOURS = { 0: "#d33", 1: "#2a2", 2: "#999" };  // rejected, accepted, pending
const $ = (id) => document.getElementById(id);

const state = {
  session: null, ids: [], finished: [], names: [], metrics: {}, status: [], reasons: [],
  thresholds: {}, current: null, ws: null, classes: [], selection: new Set(), selectionDirty: false,
  drag: null, draws: 0,
};

async function api(path, options = {}) {
  const r = await fetch(path, { credentials: "same-origin", ...options });
  if (r.status === 401) { show("login"); throw new Error("not signed in"); }
  if (!r.ok) throw new Error(`${r.status} ${await r.text()}`);
  const type = r.headers.get("content-type") || "";
  return type.includes("json") ? r.json() : r;
}

function show(which) {
  for (const id of ["login", "sessions", "session"]) $(id).hidden = id !== which;
  $("logout").hidden = which === "login";
}

// ------------------------------------------------------------------------------------------- login
async function start() {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const r = await fetch("/api/login", { method: "POST", headers: { Authorization: "Bearer " + $("token").value.trim() } });
    if (!r.ok) { $("login-error").textContent = "This token is not valid (unknown, expired or revoked)."; return; }
    $("token").value = "";
    route();
  });
  $("logout").addEventListener("click", async () => { await fetch("/api/logout", { method: "POST" }); location.hash = ""; show("login"); });
  window.addEventListener("hashchange", route);
  $("pause").addEventListener("click", togglePause);
  $("prev").addEventListener("click", () => stepExposure(-1));
  $("next").addEventListener("click", () => stepExposure(1));
  $("save-selection").addEventListener("click", saveSelection);
  route();
}

async function route() {
  let me;
  try { me = await api("/api/me"); } catch (e) { return; }
  $("user").textContent = me.user;
  const m = location.hash.match(/^#\/session\/([A-Za-z0-9_.-]+)$/);
  if (state.ws) { state.ws.close(); state.ws = null; }
  if (m) return openSession(m[1]);
  show("sessions");
  $("where").textContent = "";
  const list = await api("/api/sessions");
  const box = $("session-list");
  box.replaceChildren();
  for (const s of list) {
    const c = document.createElement("div");
    c.className = "card";
    c.dataset.session = s.id;
    const counts = s.counts || {};
    c.innerHTML = `<b></b><br><small></small>`;
    c.querySelector("b").textContent = s.title;
    c.querySelector("small").textContent = s.error ? s.error :
      `${counts.done || 0} done · ${counts.failed || 0} failed · ${s.n_particles || 0} particles · ` +
      `${Math.round(s.exposures_per_hour || 0)}/h${s.paused ? " · paused" : ""}`;
    c.addEventListener("click", () => { location.hash = `#/session/${s.id}`; });
    box.appendChild(c);
  }
  if (!list.length) box.textContent = "No sessions shared with you yet.";
}

// ------------------------------------------------------------------------------------------- session page
async function openSession(id) {
  show("session");
  state.session = id;
  $("where").textContent = id;
  buildMetricPanels();
  const base = `/api/sessions/${id}`;
  Object.assign(state, { ids: [], finished: [], names: [], metrics: {}, status: [], reasons: [], current: null });
  connect(id);  // the exposure table comes with the WebSocket's first message, then only what is new
  const [summary, thr, classes] = await Promise.all([api(base), api(`${base}/thresholds`), api(`${base}/classes`)]);
  if (!state.ids.length) state.thresholds = thr.thresholds;
  setSummary(summary);
  setClasses(classes);
  show3D(summary);
}

function connect(id) {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/api/sessions/${id}/ws`);
  state.ws = ws;
  ws.onopen = () => $("live").classList.add("on");
  ws.onclose = () => {
    $("live").classList.remove("on");
    if (state.ws === ws && state.session === id) setTimeout(() => { if (state.ws === ws) connect(id); }, 2000);
  };
  ws.onmessage = (ev) => onUpdate(JSON.parse(ev.data));
}

function onUpdate(msg) {
  if (msg.type !== "update") return;
  const t = msg.exposures;
  let added = false;
  const known = new Set(state.ids);
  t.ids.forEach((eid, i) => {
    if (known.has(eid)) return;
    added = true;
    state.ids.push(eid); state.finished.push(t.finished[i]); state.names.push(t.names[i]);
    for (const [k] of METRICS) (state.metrics[k] = state.metrics[k] || []).push(t.metrics[k][i]);
    state.status.push(t.status[i]); state.reasons.push(t.reasons[i]);
  });
  if (msg.decisions) applyDecisions(msg.decisions);
  if (msg.thresholds && !state.drag) state.thresholds = msg.thresholds;
  setSummary(msg.summary);
  drawAll();
  if (added && ($("follow").checked || state.current === null)) selectExposure(state.ids[state.ids.length - 1]);
  if (msg.summary.class2d && msg.summary.class2d.n_classes !== state.classes.length) refreshClasses();
  show3D(msg.summary);
}

function applyDecisions(d) {
  const pos = new Map(state.ids.map((e, i) => [e, i]));
  d.ids.forEach((eid, j) => {
    const i = pos.get(eid);
    if (i !== undefined) { state.status[i] = d.status[j]; state.reasons[i] = d.reasons[j]; }
  });
}

function fmt(x, digits = 0) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

function setSummary(s) {
  $("count-done").textContent = s.counts.done;
  $("count-failed").textContent = s.counts.failed;
  $("count-queued").textContent = s.counts.pending + s.counts.processing;
  $("count-particles").textContent = s.n_particles;
  $("count-accepted").textContent = s.n_accepted;
  $("count-rejected").textContent = s.n_rejected;
  $("rate-exposures").textContent = fmt(s.exposures_per_hour);
  $("rate-particles").textContent = fmt(s.particles_per_hour);
  $("pause").textContent = s.paused ? "Resume" : "Pause";
  $("pause").dataset.paused = s.paused ? "1" : "0";
  $("paused-note").textContent = s.paused ? "paused" : "";
}

async function togglePause() {
  const paused = $("pause").dataset.paused !== "1";
  await api(`/api/sessions/${state.session}/pause`, {
    method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ paused }) });
  $("pause").dataset.paused = paused ? "1" : "0";
  $("pause").textContent = paused ? "Resume" : "Pause";
}

// ------------------------------------------------------------------------------------------- plots
function buildMetricPanels() {
  const box = $("metrics");
  box.replaceChildren();
  for (const [key, label, unit] of METRICS) {
    const p = document.createElement("div");
    p.className = "metric";
    p.dataset.metric = key;
    p.innerHTML = `<h4><span></span><button title="remove both bounds">no bounds</button></h4>
      <canvas class="series" width="370" height="110"></canvas><canvas class="hist" width="370" height="110"></canvas>`;
    p.querySelector("span").textContent = label + (unit ? ` (${unit})` : "");
    p.querySelector("button").addEventListener("click", () => saveThresholds({ [`min_${key}`]: null, [`max_${key}`]: null }));
    const series = p.querySelector("canvas.series");
    series.id = `series-${key}`;
    series.addEventListener("click", (ev) => pickPoint(ev, key));
    const hist = p.querySelector("canvas.hist");
    hist.id = `hist-${key}`;
    hist.addEventListener("mousedown", (ev) => startDrag(ev, key));
    box.appendChild(p);
  }
  window.addEventListener("mousemove", moveDrag);
  window.addEventListener("mouseup", endDrag);
}

const PAD = { l: 44, r: 8, t: 6, b: 18 };

function finiteRange(values, extra = []) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) if (v !== null && isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
  for (const v of extra) if (v !== null && v !== undefined && isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!isFinite(lo)) return null;
  if (hi === lo) { hi = lo + 1; lo = lo - 1; }
  const m = 0.04 * (hi - lo);
  return [lo - m, hi + m];
}

function axes(ctx, w, h, xr, yr, xlabel) {
  ctx.strokeStyle = "#889"; ctx.fillStyle = "#556"; ctx.font = "10px sans-serif"; ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(PAD.l, PAD.t); ctx.lineTo(PAD.l, h - PAD.b); ctx.lineTo(w - PAD.r, h - PAD.b); ctx.stroke();
  if (yr) { ctx.textAlign = "right"; ctx.fillText(nice(yr[1]), PAD.l - 3, PAD.t + 8); ctx.fillText(nice(yr[0]), PAD.l - 3, h - PAD.b); }
  if (xr) { ctx.textAlign = "left"; ctx.fillText(nice(xr[0]), PAD.l, h - 4); ctx.textAlign = "right"; ctx.fillText(nice(xr[1]), w - PAD.r, h - 4); }
  if (xlabel) { ctx.textAlign = "center"; ctx.fillText(xlabel, (PAD.l + w - PAD.r) / 2, h - 4); }
}

function nice(v) {
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  return v.toPrecision(3);
}

function drawAll() {
  for (const [key] of METRICS) { drawSeries(key); drawHist(key); }
  state.draws += 1;
  document.body.dataset.draws = state.draws;
  document.body.dataset.nExposures = state.ids.length;
}

function drawSeries(key) {
  const c = $(`series-${key}`);
  const ctx = c.getContext("2d");
  const w = c.width, h = c.height;
  ctx.clearRect(0, 0, w, h);
  const ys = state.metrics[key] || [];
  const xs = ys.map((_, i) => i + 1);  // exposures in the order they were done
  const xr = finiteRange(xs), yr = finiteRange(ys, [state.thresholds[`min_${key}`], state.thresholds[`max_${key}`]]);
  c.closest(".metric").hidden = !finiteRange(ys);  // a metric this session does not measure: no panel
  axes(ctx, w, h, null, yr, xr ? `exposure (1 … ${ys.length})` : "no exposures yet");
  let n = 0;
  if (xr && yr) {
    const sx = (w - PAD.l - PAD.r) / (xr[1] - xr[0]), sy = (h - PAD.t - PAD.b) / (yr[1] - yr[0]);
    for (const s of [2, 1, 0]) {
      ctx.fillStyle = COLOURS[s];
      for (let i = 0; i < ys.length; i++) {
        if (state.status[i] !== s || ys[i] === null) continue;
        ctx.fillRect(PAD.l + (xs[i] - xr[0]) * sx - 1, h - PAD.b - (ys[i] - yr[0]) * sy - 1, 3, 3);
        n++;
      }
    }
    const cur = state.ids.indexOf(state.current);
    if (cur >= 0 && ys[cur] !== null) {
      ctx.strokeStyle = "#000"; ctx.beginPath();
      ctx.arc(PAD.l + (xs[cur] - xr[0]) * sx, h - PAD.b - (ys[cur] - yr[0]) * sy, 5, 0, 2 * Math.PI); ctx.stroke();
    }
    drawBounds(ctx, key, w, h, yr, false);
  }
  c.dataset.nPoints = n;
  c.dataset.xr = xr ? xr.join(",") : "";
}

function drawBounds(ctx, key, w, h, range, vertical) {
  for (const side of ["min", "max"]) {
    const v = state.thresholds[`${side}_${key}`];
    if (v === null || v === undefined) continue;
    ctx.strokeStyle = "#d33"; ctx.lineWidth = 2; ctx.setLineDash([4, 3]); ctx.beginPath();
    if (vertical) {
      const x = PAD.l + (v - range[0]) / (range[1] - range[0]) * (w - PAD.l - PAD.r);
      ctx.moveTo(x, PAD.t); ctx.lineTo(x, h - PAD.b);
    } else {
      const y = h - PAD.b - (v - range[0]) / (range[1] - range[0]) * (h - PAD.t - PAD.b);
      ctx.moveTo(PAD.l, y); ctx.lineTo(w - PAD.r, y);
    }
    ctx.stroke(); ctx.setLineDash([]); ctx.lineWidth = 1;
  }
}

function histRange(key) {
  return finiteRange(state.metrics[key] || [], [state.thresholds[`min_${key}`], state.thresholds[`max_${key}`]]);
}

function drawHist(key) {
  const c = $(`hist-${key}`);
  const ctx = c.getContext("2d");
  const w = c.width, h = c.height;
  ctx.clearRect(0, 0, w, h);
  const vals = state.metrics[key] || [];
  const xr = state.drag && state.drag.key === key ? state.drag.range : histRange(key);
  c.dataset.range = xr ? xr.join(",") : "";
  c.dataset.padLeft = PAD.l; c.dataset.padRight = PAD.r;
  if (!xr) { axes(ctx, w, h, null, null, "no data"); return; }
  const nb = 40, bins = [new Array(nb).fill(0), new Array(nb).fill(0), new Array(nb).fill(0)];
  for (let i = 0; i < vals.length; i++) {
    const v = vals[i];
    if (v === null || !isFinite(v)) continue;
    const b = Math.min(nb - 1, Math.max(0, Math.floor((v - xr[0]) / (xr[1] - xr[0]) * nb)));
    bins[state.status[i] ?? 2][b] += 1;
  }
  let top = 1;
  for (let b = 0; b < nb; b++) top = Math.max(top, bins[0][b] + bins[1][b] + bins[2][b]);
  axes(ctx, w, h, xr, [0, top], null);
  const bw = (w - PAD.l - PAD.r) / nb, sy = (h - PAD.t - PAD.b) / top;
  for (let b = 0; b < nb; b++) {
    let y = h - PAD.b;
    for (const s of [1, 2, 0]) {
      const hh = bins[s][b] * sy;
      if (!hh) continue;
      ctx.fillStyle = COLOURS[s]; ctx.fillRect(PAD.l + b * bw + 0.5, y - hh, bw - 1, hh); y -= hh;
    }
  }
  drawBounds(ctx, key, w, h, xr, true);
  // handles for unset bounds, at the ends of the axis
  ctx.fillStyle = "#d33";
  for (const side of ["min", "max"]) {
    const v = state.thresholds[`${side}_${key}`];
    const x = v === null || v === undefined ? (side === "min" ? PAD.l : w - PAD.r) : PAD.l + (v - xr[0]) / (xr[1] - xr[0]) * (w - PAD.l - PAD.r);
    ctx.beginPath(); ctx.moveTo(x - 5, PAD.t); ctx.lineTo(x + 5, PAD.t); ctx.lineTo(x, PAD.t + 8); ctx.fill();
  }
}

function canvasX(ev, c) { const r = c.getBoundingClientRect(); return (ev.clientX - r.left) * c.width / r.width; }

function valueAt(c, x, range) { return range[0] + (x - PAD.l) / (c.width - PAD.l - PAD.r) * (range[1] - range[0]); }

function startDrag(ev, key) {
  const c = $(`hist-${key}`);
  const range = histRange(key);
  if (!range) return;
  const x = canvasX(ev, c);
  const v = valueAt(c, x, range);
  const lo = state.thresholds[`min_${key}`], hi = state.thresholds[`max_${key}`];
  const loV = lo ?? range[0], hiV = hi ?? range[1];
  const side = Math.abs(v - loV) <= Math.abs(v - hiV) ? "min" : "max";
  state.drag = { key, side, range, canvas: c, value: v };
  ev.preventDefault();
  moveDrag(ev);
}

function moveDrag(ev) {
  const d = state.drag;
  if (!d) return;
  const x = Math.max(PAD.l, Math.min(d.canvas.width - PAD.r, canvasX(ev, d.canvas)));
  d.value = valueAt(d.canvas, x, d.range);
  state.thresholds[`${d.side}_${d.key}`] = d.value;
  // re-decide locally on this metric for immediate feedback; the server's decision follows
  drawHist(d.key);
}

async function endDrag() {
  const d = state.drag;
  if (!d) return;
  state.drag = null;
  const v = Number(d.value.toPrecision(4));
  await saveThresholds({ [`${d.side}_${d.key}`]: v });
}

async function saveThresholds(changes) {
  try {
    const r = await api(`/api/sessions/${state.session}/thresholds`, {
      method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ changes }) });
    state.thresholds = r.thresholds;
    applyDecisions(await api(`/api/sessions/${state.session}/decisions`));
    document.body.dataset.thresholdSaves = (Number(document.body.dataset.thresholdSaves || 0) + 1);
  } catch (e) {
    const t = await api(`/api/sessions/${state.session}/thresholds`);
    state.thresholds = t.thresholds;
  }
  drawAll();
}

// ------------------------------------------------------------------------------------------- exposures
function pickPoint(ev, key) {
  const c = $(`series-${key}`);
  if (!c.dataset.xr) return;
  const xr = c.dataset.xr.split(",").map(Number);
  const best = Math.max(0, Math.min(state.ids.length - 1, Math.round(valueAt(c, canvasX(ev, c), xr)) - 1));
  $("follow").checked = false;
  selectExposure(state.ids[best]);
}

function stepExposure(delta) {
  const i = state.ids.indexOf(state.current);
  const j = Math.max(0, Math.min(state.ids.length - 1, i + delta));
  $("follow").checked = false;
  if (state.ids.length) selectExposure(state.ids[j]);
}

async function selectExposure(eid) {
  if (eid === state.current) return;
  state.current = eid;
  for (const [key] of METRICS) drawSeries(key);
  const base = `/api/sessions/${state.session}/exposures/${eid}`;
  const info = await api(base);
  if (state.current !== eid) return;
  $("exposure-title").textContent = `${info.name} (#${eid})`;
  const lines = [`status: ${info.status}`, `particles: ${info.n_particles ?? "–"}`];
  if (info.decision) lines.push(`decision: ${["rejected", "accepted", "pending"][info.decision.status]}` +
    (info.decision.reasons ? ` (${info.decision.reasons})` : ""));
  for (const [stage, m] of Object.entries(info.stages)) {
    if (!m) continue;
    for (const [k, v] of Object.entries(m)) if (typeof v === "number") lines.push(`${stage}.${k}: ${nice(v)}`);
  }
  $("exposure-info").textContent = lines.join("\n");
  for (const [id, file] of [["micrograph", "micrograph.png"], ["spectrum", "power_spectrum.png"]]) {
    $(id).hidden = !info.has_micrograph;
    if (info.has_micrograph) $(id).src = `${base}/${file}`; else $(id).removeAttribute("src");
  }
  $("mic-caption").textContent = info.has_micrograph ? "micrograph" : "no micrograph file for this exposure";
  drawPicks(await api(`${base}/picks`).catch(() => null));
  drawProfile(await api(`${base}/ctf_profile`).catch(() => null));
}

function drawPicks(p) {
  const svg = $("picks");
  svg.replaceChildren();
  if (!p || !p.width) return;
  svg.setAttribute("viewBox", `0 0 ${p.width} ${p.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const ns = "http://www.w3.org/2000/svg";
  for (let i = 0; i < p.x.length; i++) {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", p.x[i]); c.setAttribute("cy", p.y[i]); c.setAttribute("r", p.radius_px);
    c.setAttribute("fill", "none"); c.setAttribute("stroke", "#3cf"); c.setAttribute("stroke-width", Math.max(2, p.width / 300));
    svg.appendChild(c);
  }
  if (!$("micrograph").hidden) $("mic-caption").textContent = `micrograph with ${p.x.length} picks`;
}

function drawCurve(c, xs, series, yr, xlabel) {
  const ctx = c.getContext("2d"), w = c.width, h = c.height;
  ctx.clearRect(0, 0, w, h);
  const xr = finiteRange(xs);
  if (!xr) return;
  axes(ctx, w, h, xr, yr, xlabel);
  const sx = (w - PAD.l - PAD.r) / (xr[1] - xr[0]), sy = (h - PAD.t - PAD.b) / (yr[1] - yr[0]);
  for (const [ys, colour] of series) {
    ctx.strokeStyle = colour; ctx.lineWidth = 1.5; ctx.beginPath();
    let pen = false;
    ys.forEach((y, i) => {
      if (y === null || xs[i] === null) { pen = false; return; }
      const px = PAD.l + (xs[i] - xr[0]) * sx, py = h - PAD.b - (Math.max(yr[0], Math.min(yr[1], y)) - yr[0]) * sy;
      if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
      pen = true;
    });
    ctx.stroke();
  }
  return { xr, sx };
}

function drawProfile(p) {
  const c = $("ctf-profile");
  if (!p) { c.getContext("2d").clearRect(0, 0, c.width, c.height); return; }
  const skip = Math.max(2, Math.floor(p.k_inv_angstrom.length / 40));
  const ks = p.k_inv_angstrom.slice(skip), sp = p.spectrum.slice(skip), m = p.ctf2.slice(skip);
  const scale = (ys) => {  // each curve to [0, 1] (spectrum and fit come on different scales)
    const fin = ys.filter((v) => v !== null);
    const lo = Math.min(...fin), hi = Math.max(...fin);
    return ys.map((v) => (v === null ? null : (v - lo) / (hi - lo || 1)));
  };
  const r = drawCurve(c, ks, [[scale(sp), "#246"], [scale(m), "#d33"]], [0, 1.05], "spatial frequency (1/Å)");
  if (r && p.fit_resolution_angstrom) {
    const ctx = c.getContext("2d");
    const x = PAD.l + (1 / p.fit_resolution_angstrom - r.xr[0]) * r.sx;
    ctx.strokeStyle = "#2a2"; ctx.setLineDash([3, 3]); ctx.beginPath(); ctx.moveTo(x, PAD.t); ctx.lineTo(x, c.height - PAD.b); ctx.stroke(); ctx.setLineDash([]);
  }
}

// ------------------------------------------------------------------------------------------- 2D classes
async function refreshClasses() { setClasses(await api(`/api/sessions/${state.session}/classes`)); }

function setClasses(data) {
  state.classes = data.classes;
  if (!state.selectionDirty) state.selection = new Set(data.classes.filter((c) => c.selected).map((c) => c.number));
  const box = $("classes");
  box.replaceChildren();
  $("class-note").textContent = data.classes.length ?
    (data.selection.manual ? `selection saved by ${data.selection.by}` : "automatic selection; click to change") : "none yet";
  const sprite = `/api/sessions/${state.session}/classes.png?n=${data.classes.length}&t=${Date.now()}`;
  data.classes.forEach((c, i) => {
    const d = document.createElement("div");
    d.className = "cls" + (state.selection.has(c.number) ? " selected" : "");
    d.dataset.class = c.number;
    const img = document.createElement("div");
    img.className = "img";
    img.style.backgroundImage = `url("${sprite}")`;
    img.style.backgroundSize = `${90 * data.classes.length}px 90px`;
    img.style.backgroundPosition = `-${90 * i}px 0`;
    d.appendChild(img);
    const cap = document.createElement("div");
    const n = c.particles === null ? "–" : Math.round(c.particles);
    cap.textContent = `#${c.number} · ${n} · ${c.resolution_angstrom ? c.resolution_angstrom.toFixed(0) + " Å" : "–"}`;
    cap.title = "class number · particles · estimated resolution";
    d.appendChild(cap);
    d.addEventListener("click", () => {
      if (state.selection.has(c.number)) state.selection.delete(c.number); else state.selection.add(c.number);
      d.classList.toggle("selected");
      state.selectionDirty = true;
      $("save-selection").disabled = false;
      $("selection-status").textContent = "not saved";
    });
    box.appendChild(d);
  });
}

async function saveSelection() {
  const selected = [...state.selection].sort((a, b) => a - b);
  const r = await api(`/api/sessions/${state.session}/classes/selection`, {
    method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ selected }) });
  state.selectionDirty = false;
  $("save-selection").disabled = true;
  $("selection-status").textContent = `saved: ${r.selected.length} classes`;
  $("selection-status").dataset.saved = r.selected.join(",");
  $("class-note").textContent = `selection saved by ${r.by}`;
}

// ------------------------------------------------------------------------------------------- 3D
async function show3D(s) {
  $("panel-3d").hidden = !(s.has_map || s.has_fsc);
  $("map-fig").hidden = !s.has_map;
  $("fsc-fig").hidden = !s.has_fsc;
  if (s.has_map && !$("map-slices").src) $("map-slices").src = `/api/sessions/${state.session}/map/slices.png`;
  if (s.has_fsc && !$("fsc").dataset.drawn) {
    const f = await api(`/api/sessions/${state.session}/fsc`);
    drawCurve($("fsc"), f.resolution_inv_angstrom, [[f.fsc, "#246"], [f.fsc.map(() => 0.143), "#d33"]], [-0.1, 1.05], "1/Å");
    $("fsc").dataset.drawn = "1";
  }
}

start();
