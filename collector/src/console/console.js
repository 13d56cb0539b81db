// Tidemark's web console: the collector's API (docs/pipeline.md) as pages.
// Everything shown is set with textContent (never HTML from the API).
"use strict";

const $ = (id) => document.getElementById(id);
let resolution = "1s";
let timer = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function num(text) { return el("td", text, "num"); }

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

async function get(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" } });
  const body = await r.json();
  if (!r.ok) throw new Error((body.error && body.error.message) || ("HTTP " + r.status));
  return body;
}

function health(alerts, disk) {
  const mine = alerts.filter((a) => a.disk_id === disk);
  if (mine.some((a) => a.severity === "critical")) return ["critical", "critical"];
  if (mine.some((a) => a.severity === "warning")) return ["warning", "warning"];
  return ["ok", "ok"];
}

function fillEvents(tbody, events, withDisk) {
  tbody.replaceChildren();
  for (const e of events.slice().reverse()) {
    const cells = [e.time];
    if (withDisk) cells.push(e.disk_id || "-");
    cells.push(e.kind, el("td", e.severity, e.severity === "info" ? "" : e.severity));
    cells.push(el("td", e.message + (e.who ? " (by " + e.who + ")" : ""), "msg"));
    tbody.appendChild(row(cells));
  }
}

function fillAlerts(ul, alerts) {
  ul.replaceChildren();
  if (!alerts.length) { ul.appendChild(el("li", "None.", "ok")); return; }
  for (const a of alerts) {
    ul.appendChild(el("li", a.severity + ": " + (a.disk_id ? a.disk_id + ": " : "") + a.alert + ": " + a.message + " (since " + a.since + ")", a.severity));
  }
}

function summary(st) {
  const c = st.collector;
  $("collector").textContent = st.disks.length + " disk(s), " + c.agents_connected + " agent(s) connected, spool " +
    bytes(c.spool_bytes) + " of " + bytes(c.spool_cap_bytes) + ", " + c.security;
}

async function overview() {
  const [st, al, ev] = await Promise.all([get("/api/v1/status"), get("/api/v1/alerts"), get("/api/v1/events?limit=50")]);
  summary(st);
  const tbody = $("disks").tBodies[0];
  tbody.replaceChildren();
  for (const d of st.disks) {
    const link = el("a", d.disk_id);
    link.href = "#disk/" + encodeURIComponent(d.disk_id);
    const name = el("td"); name.appendChild(link);
    const [h, cls] = health(al.alerts, d.disk_id);
    tbody.appendChild(row([name, el("td", h, cls), d.mode, num(duration(d.lag_s)), num(bytes(d.lag_bytes)),
      num(bytes(d.write_rate_bps) + "/s"), num(d.applied_seq), d.agent_connected ? "connected" : "away",
      d.target_connected ? "connected" : "away"]));
  }
  if (!st.disks.length) tbody.appendChild(row([el("td", "No disk is protected yet.")]));
  fillAlerts($("alerts"), al.alerts);
  fillEvents($("events").tBodies[0], ev.events, true);
}

function chart(samples) {
  const svg = $("chart");
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const W = 800, H = 220, pad = 30;
  if (!samples.length) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 20); t.setAttribute("y", 30); t.textContent = "No samples yet.";
    svg.appendChild(t);
    $("chart-caption").textContent = "";
    return;
  }
  const t0 = samples[0].t, t1 = Math.max(samples[samples.length - 1].t, t0 + 1);
  const top = Math.max(1, ...samples.map((s) => s.lag_s)) * 1.1;
  const x = (t) => pad + (W - 2 * pad) * (t - t0) / (t1 - t0);
  const y = (v) => H - pad - (H - 2 * pad) * v / top;
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", samples.map((s) => x(s.t).toFixed(1) + "," + y(s.lag_s).toFixed(1)).join(" "));
  svg.appendChild(line);
  for (const [v, label] of [[0, "0"], [top / 1.1, duration(top / 1.1)]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 2); t.setAttribute("y", y(v) + 4); t.textContent = label;
    svg.appendChild(t);
  }
  const worst = Math.max(...samples.map((s) => s.lag_s));
  $("chart-caption").textContent = samples.length + " samples from " + new Date(t0 * 1000).toISOString() +
    " to " + new Date(t1 * 1000).toISOString() + "; worst RPO " + duration(worst) + ", now " +
    duration(samples[samples.length - 1].lag_s) + ".";
}

async function diskPage(id) {
  const q = encodeURIComponent(id);
  const [st, d, h, al, ev] = await Promise.all([get("/api/v1/status"), get("/api/v1/disks/" + q),
    get("/api/v1/disks/" + q + "/history?resolution=" + resolution), get("/api/v1/alerts"),
    get("/api/v1/events?limit=100&disk=" + q)]);
  summary(st);
  $("disk-h").textContent = "Disk " + d.disk_id;
  const facts = $("disk-facts");
  facts.replaceChildren();
  const [hl] = health(al.alerts, d.disk_id);
  for (const [k, v] of [["Health", hl], ["Mode", d.mode], ["RPO now", duration(d.lag_s)], ["Backlog", bytes(d.lag_bytes)],
    ["Writes", bytes(d.write_rate_bps) + "/s"], ["Source seq", d.source_seq], ["Applied seq", d.applied_seq],
    ["Target state", d.target_state], ["Agent", d.agent_connected ? "connected" : "away"],
    ["Target link", d.target_connected ? "connected" : "away"], ["Spool", bytes(d.spool_bytes)],
    ["Wire / payload", d.wire_ratio === null ? "-" : d.wire_ratio.toFixed(2)]]) {
    facts.appendChild(el("dt", k)); facts.appendChild(el("dd", v));
  }
  $("chart-h").textContent = resolution === "1s" ? "RPO over the last hour" : "RPO over the last 7 days";
  chart(h.samples);
  fillAlerts($("disk-alerts"), al.alerts.filter((a) => a.disk_id === d.disk_id));
  fillEvents($("disk-events").tBodies[0], ev.events, false);
}

function route() {
  const m = location.hash.match(/^#disk\/(.+)$/);
  $("overview").hidden = !!m;
  $("disk").hidden = !m;
  const load = m ? () => diskPage(decodeURIComponent(m[1])) : overview;
  const run = () => load().catch((e) => { $("collector").textContent = "Cannot read the API: " + e.message; });
  if (timer) clearInterval(timer);
  run();
  timer = setInterval(run, 2000);
}

for (const r of ["1s", "1m"]) {
  $("res-" + r).addEventListener("click", () => {
    resolution = r;
    $("res-1s").setAttribute("aria-pressed", String(r === "1s"));
    $("res-1m").setAttribute("aria-pressed", String(r === "1m"));
    route();
  });
}
window.addEventListener("hashchange", route);
route();
