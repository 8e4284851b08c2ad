// fer-edge web page: polls /api/state (1 s) and /api/events (2 s); every value is set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

const pct = (v) => (v == null ? "–" : `${Math.round(v * 100)}%`);
const ms = (v) => (v == null ? "–" : v.toFixed(1));
const clock = (epoch) => new Date(epoch * 1000).toLocaleTimeString();

function duration(s) {
  if (s == null) return "–";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function kv(dl, rows) {
  dl.replaceChildren(...rows.flatMap(([k, v, cls]) => [el("dt", {}, k), el("dd", cls ? { class: cls } : {}, v)]));
}

function renderFaces(faces) {
  $("faces-count").textContent = String(faces.length);
  if (!faces.length) {
    $("faces").replaceChildren(el("p", { class: "muted" }, "nobody in view"));
    return;
  }
  $("faces").replaceChildren(...faces.map((f) => {
    const scores = Object.entries(f.scores || {}).sort((a, b) => b[1] - a[1]);
    const bars = el("div", { class: "bars" });
    for (const [label, v] of scores) {
      const top = label === f.emotion ? "top" : "";
      bars.append(el("span", { class: top }, label),
                  el("div", { class: "bar" }, el("span", { style: `width:${(v * 100).toFixed(1)}%` })),
                  el("span", { class: `num ${top}` }, pct(v)));
    }
    return el("div", { class: "face", "data-face-id": f.face_id, "data-emotion": f.emotion || "" },
      el("div", { class: "face-head" }, el("span", {}, `face ${f.face_id}`),
         el("span", { class: "emotion" }, f.emotion ? `${f.emotion} ${pct(f.confidence)}` : "…")),
      bars);
  }));
}

function renderStats(state) {
  const s = state.stats;
  $("device").textContent = state.device_id;
  document.title = `fer-edge ${state.device_id}`;
  const h = $("health");
  h.textContent = state.health.ok ? "running" : state.health.reason;
  h.className = `badge ${state.health.ok ? "ok" : "bad"}`;
  h.title = state.health.reason;
  if (!s) return;
  kv($("pipeline"), [
    ["fps", s.fps.toFixed(1)], ["frames", s.frames.toLocaleString()], ["faces in view", s.faces_in_view],
    ["events", `${s.events.produced} (new ${s.events.new}, update ${s.events.update}, end ${s.events.end})`],
    ["uptime", duration(s.uptime_s)], ["detector", s.detector], ["backend", s.backend],
  ]);
  $("latency").tBodies[0].replaceChildren(...Object.entries(s.latency_ms).map(([stage, v]) =>
    el("tr", {}, el("td", {}, stage), el("td", { class: "num" }, ms(v.p50_ms)), el("td", { class: "num" }, ms(v.p95_ms)))));
  const src = s.source, mq = s.mqtt, up = state.update;
  const rows = [
    ["source", `${src.name}: ${src.connected ? "up" : "DOWN"}`, src.connected ? "up" : "down"],
    ["source reconnects", `${src.reconnects}, ${src.dropped_frames} frames dropped`],
    ["mqtt", mq ? (mq.connected ? "connected" : "DISCONNECTED") : "off", mq && !mq.connected ? "down" : (mq ? "up" : "")],
  ];
  if (mq) rows.push(["mqtt queue", `${mq.buffered} buffered, ${mq.dropped} dropped, ${mq.sent} sent, ${mq.reconnects} reconnects`]);
  if (s.model) rows.push(["model", `${s.model.version} (${s.model.sha256.slice(0, 12)})`]);
  if (up) {
    let u = up.state;
    if (up.probation) u += ` ${up.probation.frames}/${up.probation.of} frames`;
    if (up.result) u += `; last ${up.action || "request"}: ${up.result}${up.error ? ` (${up.error})` : ""}`;
    rows.push(["model update", u]);
  }
  if (s.cpu_temp_c != null) rows.push(["CPU", `${s.cpu_temp_c} °C`]);
  const errs = Object.entries(s.errors || {});
  if (errs.length) rows.push(["errors", errs.map(([k, v]) => `${k} ${v}`).join(", "), "down"]);
  rows.push(["access", state.auth ? "password required" : "no password"]);
  kv($("status"), rows);
  $("source").textContent = `${state.source.kind}, rotate ${state.source.rotate}°, flip ${state.source.flip}`;
}

function renderEvents(events) {
  $("events-empty").hidden = events.length > 0;
  $("events").tBodies[0].replaceChildren(...events.slice().reverse().map((e) =>
    el("tr", { "data-type": e.type, "data-face-id": e.face_id },
      el("td", {}, clock(e.epoch)), el("td", { class: `type-${e.type}` }, e.type), el("td", {}, e.face_id),
      el("td", {}, e.type === "end" && e.summary ? `${e.emotion} (mostly ${e.summary.dominant})` : e.emotion),
      el("td", { class: "num" }, pct(e.confidence)), el("td", { class: "num" }, duration(e.duration_s)))));
}

let previewOn = false;
let previewFps = 5;

function startPreview() {
  const img = $("preview");
  img.hidden = false;
  $("preview-off").hidden = true;
  const next = () => { img.src = `api/preview.jpg?t=${Date.now()}`; };
  img.onload = () => setTimeout(next, 1000 / previewFps);
  img.onerror = () => setTimeout(next, 2000);
  next();
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store", credentials: "same-origin" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function pollState() {
  try {
    const state = await getJSON("api/state");
    renderStats(state);
    renderFaces(state.faces);
    if (state.preview.enabled && !previewOn) {
      previewOn = true;
      previewFps = Math.max(0.1, state.preview.fps);
      startPreview();
    } else if (!state.preview.enabled) {
      $("preview-off").hidden = false;
    }
    $("updated").textContent = `· updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    const h = $("health");
    h.textContent = "no answer from the device";
    h.className = "badge bad";
  }
  setTimeout(pollState, 1000);
}

async function pollEvents() {
  try {
    renderEvents(await getJSON("api/events?limit=30"));
  } catch (err) { /* shown by the state poll */ }
  setTimeout(pollEvents, 2000);
}

pollState();
pollEvents();
