// meshd dashboard: polls the admin API's JSON (/stats, /endpoints, /status, /ready) every
// REFRESH_MS and redraws four tables. Served with a Content-Security-Policy that allows
// scripts and styles from this origin only, so no inline code or style anywhere; every
// value (service names and addresses come from discovery) goes in as textContent, never
// as HTML.
"use strict";

const REFRESH_MS = 2000;
const TIMEOUT_MS = 5000;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function ms(v) {
  if (typeof v !== "number") return "-";
  return v >= 10 ? v.toFixed(0) + " ms" : v.toFixed(2) + " ms";
}

function pct(v) {
  return typeof v === "number" ? (v * 100).toFixed(2) + " %" : "-";
}

function rateClass(v) {
  if (typeof v !== "number") return "num";
  return "num " + (v >= 0.99 ? "ok" : v >= 0.9 ? "warn" : "bad");
}

function fill(tableId, rows, columns, empty) {
  const body = document.querySelector("#" + tableId + " tbody");
  if (!rows.length) {
    const tr = el("tr", null, "empty");
    const td = el("td", empty);
    td.colSpan = columns;
    tr.append(td);
    rows = [tr];
  }
  body.replaceChildren(...rows);
}

// One GET of the admin API, abandoned after TIMEOUT_MS; `read` takes the response.
async function get(path, read) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  try {
    return await read(await fetch(path, { cache: "no-store", signal: ctl.signal }));
  } finally {
    clearTimeout(timer);
  }
}

function getJson(path) {
  return get(path, (resp) => {
    if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
    return resp.json();
  });
}

function getReady() {
  return get("/ready", async (resp) => ({ ok: resp.status === 200, text: (await resp.text()).trim() }));
}

function drawHeader(status, ready) {
  const w = status.workers;
  document.getElementById("summary").textContent =
    "v" + status.version + " · generation " + status.generation + " · workers " +
    w.serving + "/" + w.desired + " · up " + Math.round(status.uptime_s) + " s · rows " +
    status.rows.metric.in_use + "/" + status.rows.metric.capacity;
  const badge = document.getElementById("ready");
  badge.textContent = ready.ok ? "ready" : "not ready";
  badge.title = ready.text;
  badge.className = "badge " + (ready.ok ? "ok" : "bad");
}

function drawServices(stats, endpoints) {
  const inflight = {};
  for (const [name, svc] of Object.entries(endpoints.services)) {
    inflight[name] = svc.endpoints.reduce((n, e) => n + (e.in_flight || 0), 0);
  }
  const rows = stats.rows.filter((r) => !r.service.startsWith("_") || r.requests_total > 0);
  fill("services", rows.map((r) => {
    const tr = el("tr", null, "svc-row");
    tr.dataset.service = r.service;
    tr.dataset.listener = r.listener;
    const rps = el("td", r.rps.toFixed(1), "num");
    rps.dataset.field = "rps";
    rps.dataset.value = String(r.rps);
    const flight = r.direction === "outbound" && r.service in inflight ? inflight[r.service] : "-";
    tr.append(el("td", r.service), el("td", r.direction), el("td", r.listener),
      el("td", pct(r.success_rate), rateClass(r.success_rate)), rps,
      el("td", ms(r.latency_ms_p50), "num"), el("td", ms(r.latency_ms_p95), "num"),
      el("td", ms(r.latency_ms_p99), "num"), el("td", flight, "num"),
      el("td", r.requests_total, "num"));
    return tr;
  }), 10, "no requests yet");
}

function drawBalancer(status) {
  fill("balancer", Object.entries(status.services).map(([name, s]) => {
    const tr = el("tr", null, "lb-row");
    tr.dataset.service = name;
    const src = Object.entries(s.sources);
    const bad = src.some(([, st]) => st !== "synced");
    const disc = el("td", src.map(([n, st]) => n + " " + st).join(", "), bad ? "bad" : "ok");
    tr.append(el("td", name), el("td", s.balancer), el("td", s.endpoints, "num"),
      el("td", s.healthy, "num"), el("td", s.ejected, s.ejected ? "num bad" : "num"),
      el("td", s.probing, s.probing ? "num warn" : "num"), el("td", s.failure_accrual, "num"),
      el("td", s.retries, "num"), disc);
    return tr;
  }), 9, "no services watched");
}

function drawEndpoints(endpoints) {
  const rows = [];
  for (const [name, svc] of Object.entries(endpoints.services)) {
    for (const e of svc.endpoints) {
      const tr = el("tr", null, "ep-row");
      tr.dataset.service = name;
      tr.dataset.endpoint = e.address;
      const state = e.state === "healthy" ? "ok" : e.state === "ejected" ? "bad" : "warn";
      tr.append(el("td", name), el("td", e.address), el("td", e.state, state),
        el("td", e.ejected_for_s === null ? "-" : e.ejected_for_s.toFixed(1) + " s", "num"),
        el("td", e.ejections, "num"), el("td", ms(e.ewma_ms), "num"),
        el("td", e.in_flight, "num"), el("td", e.connections === undefined ? "-" : e.connections, "num"),
        el("td", pct(e.success_rate_10s), rateClass(e.success_rate_10s)),
        el("td", typeof e.rps_10s === "number" ? e.rps_10s.toFixed(1) : "-", "num"));
      rows.push(tr);
    }
  }
  fill("endpoints", rows, 10, "no endpoints");
}

function drawErrors(status) {
  fill("errors", status.recent_errors.slice(0, 20).map((e) => {
    const tr = el("tr", null, "err-row");
    tr.append(el("td", e.last.replace("T", " ").replace("Z", "")), el("td", e.kind),
      el("td", e.service || "-"), el("td", e.detail, "detail"), el("td", e.count, "num"));
    return tr;
  }), 5, "none");
}

async function refresh() {
  const updated = document.getElementById("updated");
  try {
    const [stats, endpoints, status, ready] = await Promise.all(
      [getJson("/stats"), getJson("/endpoints"), getJson("/status"), getReady()]);
    drawHeader(status, ready);
    drawServices(stats, endpoints);
    drawBalancer(status);
    drawEndpoints(endpoints);
    drawErrors(status);
    updated.textContent = "updated " + new Date().toLocaleTimeString();
    updated.className = "updated";
  } catch (err) {
    updated.textContent = "admin API unreachable: " + err.message;
    updated.className = "updated bad";
  }
}

async function loop() {
  if (!document.hidden) await refresh();   // a tab in the background asks for nothing
  setTimeout(loop, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", loop);
