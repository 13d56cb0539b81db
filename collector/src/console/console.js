// Tidemark's web console: the collector's API (docs/pipeline.md) as pages.
// Everything shown is set with textContent (never HTML from the API).
"use strict";

const $ = (id) => document.getElementById(id);
let resolution = "1s";
let timer = null;
// Read the page shown again now.
let refresh = () => {};
// The disk page's disk (null: the overview).
let current = null;
// Points, drills and policy are asked of the target: every EXTRAS_MS, and
// at once after an action.
const EXTRAS_MS = 10000;
let extrasAt = 0;
let extrasBusy = false;
let extrasAgain = false;
// What each section shows (JSON): a refresh that changes nothing leaves it
// alone, so focus and open <details> stay where they are.
let shown = {};
const openDrills = new Set();
let newestDrill = 0;
// An action (tag, drill, failover) is running.
let busy = false;
// The disk whose failover runs: the target stops serving it meanwhile, so
// its points and drills are not asked for.
let failingOver = null;
// The disk page's recovery points as last read (the failover's choices).
let lastPoints = [];
const TOKEN_KEY = "tidemark.token";
const POINT_ROWS = 15;
const KINDS = { crash: "crash", app: "application", tag: "tag" };
const SVG = "http://www.w3.org/2000/svg";

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

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// An operator action: the token as a bearer, the API's error message (and
// status) as the error.
async function send(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = $("token").value.trim();
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    throw new Error(((data && data.error && data.error.message) || r.statusText || "failed") + " (HTTP " + r.status + ")");
  }
  return { status: r.status, body: data };
}

// Whether `data` differs from what section `key` shows (and note it).
function changed(key, data) {
  const s = JSON.stringify(data);
  if (shown[key] === s) return false;
  shown[key] = s;
  return true;
}

function age(v) { return v ? duration(v.age_s) + " ago" : "never"; }

function resultClass(r) {
  if (r === "passed") return "ok";
  if (r === "failed") return "critical";
  if (r === "error") return "warning";
  return "";
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = String(text);
  return e;
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
  $("collector").textContent = "site " + c.site + ": " + st.disks.length + " disk(s), " + c.agents_connected + " agent(s) connected, spool " +
    bytes(c.spool_bytes) + " of " + bytes(c.spool_cap_bytes) + ", " + c.security;
}

// A disk's newest recovery point, for the disks table.
function pointCell(d) {
  const p = d.last_point;
  const td = el("td", p ? duration(p.age_s) + " ago" : "-", p ? "" : "muted");
  if (p) td.title = "seq " + p.seq + ", " + p.kind + (p.tag ? " \"" + p.tag + "\"" : "") + ", " + p.time;
  return td;
}

// A disk's last verified point, for the disks table.
function verifiedCell(d) {
  const lv = d.last_verified, ld = d.last_drill;
  const failed = ld && ld.result === "failed";
  const td = el("td", age(lv) + (failed ? " (last drill failed)" : ""), failed ? "critical" : lv ? "" : "muted");
  if (lv) td.title = "seq " + lv.seq + ", point of " + lv.point_time + ", drill " + lv.drill_id;
  return td;
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
      num(bytes(d.write_rate_bps) + "/s"), num(d.applied_seq), pointCell(d), verifiedCell(d), d.agent_connected ? "connected" : "away",
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
    ["Wire / payload", d.wire_ratio === null ? "-" : d.wire_ratio.toFixed(2)],
    ["Last verified", d.last_verified ? age(d.last_verified) + " (seq " + d.last_verified.seq + ", point of " + d.last_verified.point_time + ")" : "never"],
    ["Last drill", d.last_drill ? d.last_drill.result + " at " + d.last_drill.started + " (seq " + d.last_drill.seq + ")" : "none"],
    ["Target refusal", d.target_refusal], ["Fenced", d.fenced ? d.fenced.reason : null]]) {
    if (v === null || v === undefined) continue;
    facts.appendChild(el("dt", k)); facts.appendChild(el("dd", v, k === "Fenced" || k === "Target refusal" ? "critical" : ""));
  }
  $("chart-h").textContent = resolution === "1s" ? "RPO over the last hour" : "RPO over the last 7 days";
  chart(h.samples);
  fillAlerts($("disk-alerts"), al.alerts.filter((a) => a.disk_id === d.disk_id));
  fillEvents($("disk-events").tBodies[0], ev.events, false);
  if (d.target_connected && failingOver !== id) extras(id, false);
  else targetAway(id, failingOver === id ? "a failover of this disk runs" : d.fenced || failedOver(d) ? "the disk is failed over"
    : "the target is not connected");
}

// Points and drills are the target's: while it does not serve the disk,
// they are not asked for (what was read stays, said to be older).
function targetAway(id, why) {
  if (current !== id) return;
  for (const [t, what] of [["points", "recovery points"], ["drills", "drills"]]) {
    $(t + "-note").textContent = $(t).tBodies[0].rows.length
      ? "Not read from the target now (" + why + "): the " + what + " below were read earlier."
      : "The " + what + " cannot be read now: " + why + ".";
  }
}

// The recovery points as a line over their time span: crash points as
// ticks, application points as dots, tags as diamonds, drilled points
// ringed (green passed, red failed).
function timeline(pts) {
  const s = $("timeline");
  s.replaceChildren();
  const W = 800, pad = 14, mid = 42;
  if (!pts.length) {
    s.appendChild(svg("text", { x: pad, y: mid }, "No recovery points yet."));
    $("timeline-caption").textContent = "";
    return;
  }
  const t0 = pts[0].time_ns / 1e9, t1 = Math.max(pts[pts.length - 1].time_ns / 1e9, t0 + 1);
  const x = (p) => pad + (W - 2 * pad) * (p.time_ns / 1e9 - t0) / (t1 - t0);
  s.appendChild(svg("line", { x1: pad, y1: mid, x2: W - pad, y2: mid, class: "axis" }));
  const order = { crash: 0, app: 1, tag: 2 };
  const drawn = pts.slice().sort((a, b) => (order[a.kind] || 0) - (order[b.kind] || 0) || (a.verified ? 1 : 0) - (b.verified ? 1 : 0));
  let lastLabel = -1e9;
  for (const p of drawn) {
    const cx = x(p).toFixed(1);
    const g = svg("g", { class: "pt " + p.kind + (p.verified ? " " + p.verified : "") + (p.latest ? " latest" : "") });
    g.appendChild(svg("title", {}, "seq " + p.seq + ", " + (KINDS[p.kind] || p.kind) + (p.tag ? " \"" + p.tag + "\"" : "") +
      ", " + p.time + (p.verified ? ", drill " + p.verified : "") + (p.latest ? ", the replica now" : "")));
    if (p.verified) g.appendChild(svg("circle", { cx, cy: mid, r: 10, class: "ring" }));
    if (p.kind === "tag") g.appendChild(svg("path", { d: "M" + cx + " " + (mid - 8) + " l6 8 l-6 8 l-6 -8 z" }));
    else if (p.kind === "app") g.appendChild(svg("circle", { cx, cy: mid, r: 5 }));
    else g.appendChild(svg("line", { x1: cx, y1: mid - 7, x2: cx, y2: mid + 7 }));
    s.appendChild(g);
  }
  // Tag names above their diamonds, where there is room.
  for (const p of pts) {
    if (p.kind !== "tag" || !p.tag || x(p) - lastLabel < 110) continue;
    lastLabel = x(p);
    const anchor = x(p) < 90 ? "start" : x(p) > W - 90 ? "end" : "middle";
    s.appendChild(svg("text", { x: x(p).toFixed(1), y: mid - 16, "text-anchor": anchor, class: "tag-label" },
      p.tag.length > 24 ? p.tag.slice(0, 23) + "…" : p.tag));
  }
  s.appendChild(svg("text", { x: pad, y: 82 }, pts[0].time));
  s.appendChild(svg("text", { x: W - pad, y: 82, "text-anchor": "end" }, pts[pts.length - 1].time));
  const tags = pts.filter((p) => p.kind === "tag").length;
  const verified = pts.filter((p) => p.verified === "passed").length;
  $("timeline-caption").textContent = pts.length + " point(s) over " + duration(t1 - t0) + ", " + tags + " tag(s), " +
    verified + " verified by a drill.";
}

function fillPoints(pts) {
  const tbody = $("points").tBodies[0];
  tbody.replaceChildren();
  const newest = pts.slice(-POINT_ROWS).reverse();
  for (const p of newest) {
    tbody.appendChild(row([p.time, num(p.seq), (KINDS[p.kind] || p.kind) + (p.latest ? " (replica now)" : ""),
      p.tag === null || p.tag === undefined ? "" : p.tag, el("td", p.verified || "-", resultClass(p.verified))]));
  }
  $("points-caption").textContent = pts.length ? "The newest " + newest.length + " of " + pts.length + " point(s), newest first." : "";
  timeline(pts);
}

function fillDrills(drills) {
  const tbody = $("drills").tBodies[0];
  tbody.replaceChildren();
  for (const d of drills) {
    const summary = el("td", null, "msg");
    summary.appendChild(el("span", d.summary));
    if (d.output) {
      const det = el("details");
      det.open = openDrills.has(d.id);
      det.addEventListener("toggle", () => { if (det.open) openDrills.add(d.id); else openDrills.delete(d.id); });
      det.appendChild(el("summary", "Checker output of drill " + d.id));
      const pre = el("pre", d.output);
      pre.tabIndex = 0;
      det.appendChild(pre);
      summary.appendChild(det);
    }
    tbody.appendChild(row([d.started, num(d.seq || "-"), el("td", d.result, resultClass(d.result)),
      num(duration(d.duration_ms / 1000)), d.trigger, summary]));
  }
}

function fillPolicy(p) {
  const dl = $("policy");
  dl.replaceChildren();
  const known = (v, f) => (v === null || v === undefined ? "unknown" : f(v));
  const source = { target: "the target, now", stored: "this collector (the target is away)", unknown: "nowhere (the target is away)" };
  for (const [k, v] of [
    ["RPO", duration(p.rpo_s) + " (warning past it, critical past " + duration(2 * p.rpo_s) + ")"],
    ["Drill interval", p.drill_interval_s ? "every " + duration(p.drill_interval_s) : "no schedule"],
    ["Verified point at most", p.verified_max_age_s === null ? "no limit" : duration(p.verified_max_age_s) + " old"],
    ["Retention window", known(p.retention_window_s, duration)],
    ["Retention cap", p.retention_max_bytes ? bytes(p.retention_max_bytes) : p.retention_source === "unknown" ? "unknown" : "none"],
    ["When full", known(p.on_full, String)],
    ["Point interval", known(p.point_interval_ms, (ms) => duration(ms / 1000))],
    ["Retention from", source[p.retention_source] || p.retention_source]]) {
    dl.appendChild(el("dt", k)); dl.appendChild(el("dd", v));
  }
}

function showPoints(id, v) {
  if (current !== id) return;
  lastPoints = v.points;
  $("points-note").textContent = v.points.length ? "" : "No recovery points yet.";
  $("points").hidden = !v.points.length;
  if (changed("points", v.points)) fillPoints(v.points);
}

function showDrills(id, v) {
  if (current !== id) return;
  newestDrill = v.drills.length ? v.drills[0].id : 0;
  $("drills-note").textContent = v.drills.length ? "" : "No drill yet.";
  $("drills").hidden = !v.drills.length;
  if (changed("drills", v.drills)) fillDrills(v.drills);
}

// Points, drills and policy (from the target): each section says why it
// cannot be read, without hiding the rest of the page.
async function extras(id, force) {
  if (extrasBusy) {
    // A read under way may predate what is to be seen: another after it.
    if (force) extrasAgain = true;
    return;
  }
  if (!force && Date.now() - extrasAt < EXTRAS_MS) return;
  extrasBusy = true;
  extrasAgain = false;
  const q = "/api/v1/disks/" + encodeURIComponent(id);
  try {
    const [pts, drs, pol] = await Promise.allSettled([get(q + "/points?limit=500"), get(q + "/drills?limit=20"), get(q + "/policy")]);
    if (current !== id) return;
    extrasAt = Date.now();
    if (pts.status === "fulfilled") showPoints(id, pts.value);
    else $("points-note").textContent = "Cannot read the recovery points: " + pts.reason.message;
    if (drs.status === "fulfilled") showDrills(id, drs.value);
    else $("drills-note").textContent = "Cannot read the drills: " + drs.reason.message;
    if (pol.status === "fulfilled") { if (changed("policy", pol.value)) fillPolicy(pol.value); }
    else { shown.policy = null; $("policy").replaceChildren(el("dt", "Policy"), el("dd", "cannot be read: " + pol.reason.message)); }
  } finally {
    extrasBusy = false;
  }
  if (extrasAgain && current === id) await extras(id, true);
}

// The action's outcome, in the status line (read out by screen readers).
function say(text, cls) {
  const s = $("action-status");
  s.textContent = text;
  s.className = cls || "";
}

function setBusy(on) {
  busy = on;
  for (const b of ["act-tag", "act-drill", "act-failover"]) $(b).setAttribute("aria-disabled", String(on));
}

// After a tag: the points, until the tag's point is there (the target
// applies it after the writes before it).
async function waitForTag(id, name) {
  const until = Date.now() + 120000;
  while (Date.now() < until && current === id) {
    let v;
    try { v = await get("/api/v1/disks/" + encodeURIComponent(id) + "/points?limit=500"); } catch (e) { v = null; }
    if (v) {
      showPoints(id, v);
      const p = v.points.find((p) => p.kind === "tag" && p.tag === name);
      if (p) return p;
    }
    await sleep(1000);
  }
  return null;
}

async function takeTag(id, name, app) {
  setBusy(true);
  say("Taking tag \"" + name + "\" of disk " + id + "…");
  try {
    const r = await send("POST", "/api/v1/disks/" + encodeURIComponent(id) + "/tags", { name, app_consistent: app });
    say("Tag \"" + name + "\" taken at seq " + r.body.seq + "; waiting for its recovery point at the target…");
    const p = await waitForTag(id, name);
    if (p) {
      say("Tag \"" + name + "\" is recovery point seq " + p.seq + " (" + p.time + ").", "ok");
      refresh();
    }
    else if (current === id) say("Tag \"" + name + "\" was taken at seq " + r.body.seq + "; its point is not at the target yet (the table shows it when it is).", "warning");
  } catch (e) {
    say("Tag \"" + name + "\" not taken: " + e.message, "critical");
  } finally {
    setBusy(false);
  }
}

function drillSaid(d) {
  say("Drill " + d.id + " of seq " + d.seq + " " + d.result + " in " + duration(d.duration_ms / 1000) + ": " + d.summary,
    resultClass(d.result));
}

async function runDrill(id) {
  setBusy(true);
  const before = newestDrill;
  say("Drill of disk " + id + " running: the target checks its newest recovery point…");
  const q = "/api/v1/disks/" + encodeURIComponent(id);
  try {
    const r = await send("POST", q + "/drills");
    if (r.status === 202) {
      say(r.body.message + ".");
      const until = Date.now() + 600000;
      while (Date.now() < until && current === id) {
        await sleep(3000);
        let v;
        try { v = await get(q + "/drills?limit=20"); } catch (e) { continue; }
        showDrills(id, v);
        if (v.drills.length && v.drills[0].id > before) { drillSaid(v.drills[0]); break; }
      }
    } else {
      drillSaid(r.body);
    }
    if (current === id) {
      refresh();
      await extras(id, true);
    }
  } catch (e) {
    say("Drill not run: " + e.message, "critical");
  } finally {
    setBusy(false);
  }
}

// Whether the disk is failed over (its target refuses it as such, or its
// generation was fenced by the failover): what the target said, or null.
// "being failed over" is a failover still running.
function failedOver(d) {
  const fenced = (d.fenced && d.fenced.reason) || "";
  const refusal = d.target_refusal || "";
  if (fenced.includes("failed over")) return fenced;
  if (refusal.includes("failed over") && !refusal.includes("being failed over")) return refusal;
  return null;
}

// A failover image's name ("" if good): as the target takes it.
function imageNameProblem(name) {
  if (!name) return "Name the image file.";
  if (name.length > 100) return "At most 100 characters.";
  if (!/^[A-Za-z0-9._-]+$/.test(name)) return "Only A-Z a-z 0-9 . _ - (a file name, no folder).";
  if (name.startsWith(".")) return "Not starting with a dot.";
  if (name.endsWith(".log")) return "Not ending in .log (the tool's log is NAME.log).";
  return "";
}

const EXT = { raw: ".raw", "vmdk-flat": ".vmdk", "vmdk-sparse": ".vmdk", "vmdk-stream": ".vmdk" };

function defaultImageName(id, format) {
  const disk = id.replace(/[^A-Za-z0-9._-]/g, "_").replace(/^\.+/, "").slice(0, 60) || "disk";
  return disk + "-failover-" + new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-") + EXT[format];
}

// The points offered: latest, latest-app and the disk's tags (newest first).
function fillFailoverPoints() {
  const list = $("fo-points");
  list.replaceChildren();
  const offer = (value, label) => { const o = el("option", label); o.value = value; list.appendChild(o); };
  offer("latest", "the newest point, after draining what the collector and the agent hold");
  offer("latest-app", "the newest application-consistent point");
  const seen = new Set();
  for (const p of lastPoints.slice().reverse()) {
    if (p.kind !== "tag" || !p.tag || seen.has(p.tag)) continue;
    seen.add(p.tag);
    offer("tag:" + p.tag, "tag of seq " + p.seq + ", " + p.time + (p.verified ? ", drill " + p.verified : ""));
  }
}

// The guard: the failover button is enabled once the disk id is typed.
function failoverGuard() {
  $("confirm-ok").disabled = pending === "failover" && $("fo-confirm").value !== current;
}

async function failover(id, at, name, format) {
  setBusy(true);
  failingOver = id;
  const q = "/api/v1/disks/" + encodeURIComponent(id);
  say("Failover of disk " + id + " to " + at + ": asking the target…");
  try {
    const r = await send("POST", q + "/failover", { at, name, format });
    const where = "the image is at " + r.body.output + " (log: " + r.body.log + ") on the target's host";
    say("Failover of disk " + id + " to " + at + " started: " + where + "; waiting for the target to record it…");
    const until = Date.now() + 6 * 3600 * 1000;
    let done = null;
    while (Date.now() < until && current === id) {
      await sleep(2000);
      let d;
      try { d = await get(q); } catch (e) { continue; }
      done = failedOver(d);
      if (done) break;
      if ((d.target_refusal || "").includes("being failed over")) {
        say("Failover of disk " + id + " to " + at + " running: the target writes the image (" + where + ") and applies nothing meanwhile…");
      }
    }
    if (done) {
      say("Failover of disk " + id + " done: " + where + ". Replication to this disk has stopped for good. The target says: " + done, "ok");
    } else if (current === id) {
      say("Failover of disk " + id + " to " + at + " is not recorded yet: " + where + "; its log says how it goes.", "warning");
    }
    if (current === id) refresh();
  } catch (e) {
    say("Failover of disk " + id + " not started: " + e.message, "critical");
  } finally {
    failingOver = null;
    setBusy(false);
  }
}

// The confirmation dialog: Enter confirms, Escape (or Cancel) does nothing.
let pending = null;
let opener = null;

function defaultTagName() {
  return "console-" + new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
}

function confirmAction(kind) {
  if (!current) return;
  if (busy) { say("An action is still running; wait for its result."); return; }
  if (!$("token").value.trim()) {
    say("Enter an operator token first: actions need one.", "warning");
    $("token").focus();
    return;
  }
  const tag = kind === "tag", fo = kind === "failover";
  pending = kind;
  opener = document.activeElement;
  $("confirm-h").textContent = tag ? "Take a tag of disk " + current + "?" : fo ? "Fail over disk " + current + "?"
    : "Run a drill of disk " + current + "?";
  $("confirm-text").textContent = tag
    ? "The agent journals a named recovery point at the disk's current write position; it appears in the points once the target has applied it."
    : fo ? "The target writes the disk's image at the chosen recovery point into a file on the target's host (not here, not on the source)."
    : "The target opens the newest recovery point read-only and checks its filesystems; the replica is not changed. This can take a few minutes.";
  $("tag-fields").hidden = !tag;
  $("tag-name").required = tag;
  $("failover-fields").hidden = !fo;
  for (const f of ["fo-point", "fo-name", "fo-confirm"]) $(f).required = fo;
  $("confirm").classList.toggle("destructive", fo);
  $("confirm-ok").textContent = tag ? "Take tag" : fo ? "Fail over " + current : "Run drill";
  $("confirm-ok").disabled = false;
  say("");
  if (fo) {
    $("failover-danger").textContent = "This cannot be undone. Once the failover is recorded, the target refuses disk " + current +
      ": replication to it stops for good, its source is fenced (its agent is refused), and the disk is protected again only " +
      "by protecting the failed-over copy (docs/failback.md).";
    fillFailoverPoints();
    $("fo-point").value = "latest";
    $("fo-format").value = "raw";
    $("fo-name").value = defaultImageName(current, "raw");
    $("fo-name").setCustomValidity("");
    $("fo-confirm").value = "";
    $("fo-confirm-label").textContent = "Type the disk id (" + current + ") to confirm";
    failoverGuard();
  }
  $("confirm").showModal();
  if (fo) {
    $("fo-point").focus();
    $("fo-point").select();
  } else if (tag) {
    $("tag-name").value = defaultTagName();
    $("tag-app").checked = false;
    $("tag-name").focus();
    $("tag-name").select();
  } else {
    $("confirm-ok").focus();
  }
}

function route() {
  const m = location.hash.match(/^#disk\/(.+)$/);
  $("overview").hidden = !!m;
  $("disk").hidden = !m;
  const id = m ? decodeURIComponent(m[1]) : null;
  if (id !== current) {
    current = id;
    shown = {};
    extrasAt = 0;
    newestDrill = 0;
    lastPoints = [];
    openDrills.clear();
    for (const t of ["points", "drills"]) $(t).tBodies[0].replaceChildren();
    for (const t of ["timeline", "policy", "disk-facts"]) $(t).replaceChildren();
    for (const t of ["points-note", "drills-note", "timeline-caption", "points-caption", "action-status"]) $(t).textContent = "";
  }
  const load = m ? () => diskPage(decodeURIComponent(m[1])) : overview;
  const run = () => load().catch((e) => { $("collector").textContent = "Cannot read the API: " + e.message; });
  if (timer) clearInterval(timer);
  refresh = run;
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
const token = $("token");
try { token.value = sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { token.value = ""; }
token.addEventListener("input", () => {
  try {
    if (token.value) sessionStorage.setItem(TOKEN_KEY, token.value); else sessionStorage.removeItem(TOKEN_KEY);
  } catch (e) { /* no storage: the token lasts as long as the page */ }
});
$("token-form").addEventListener("submit", (e) => e.preventDefault());
$("act-tag").addEventListener("click", () => confirmAction("tag"));
$("act-drill").addEventListener("click", () => confirmAction("drill"));
$("act-failover").addEventListener("click", () => confirmAction("failover"));
$("fo-confirm").addEventListener("input", failoverGuard);
$("fo-name").addEventListener("input", () => $("fo-name").setCustomValidity(imageNameProblem($("fo-name").value.trim())));
// A new format: the default name's extension follows it.
let lastFormat = "raw";
$("fo-format").addEventListener("focus", () => { lastFormat = $("fo-format").value; });
$("fo-format").addEventListener("change", () => {
  const f = $("fo-format").value, n = $("fo-name");
  if (n.value.endsWith(EXT[lastFormat])) n.value = n.value.slice(0, -EXT[lastFormat].length) + EXT[f];
  lastFormat = f;
});
$("confirm-cancel").addEventListener("click", () => $("confirm").close());
$("confirm-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const kind = pending, id = current;
  if (kind === "failover") {
    // The guard again (a button can be enabled by other means than typing).
    if ($("fo-confirm").value !== id) { failoverGuard(); $("fo-confirm").focus(); return; }
    const problem = imageNameProblem($("fo-name").value.trim());
    if (problem) { $("fo-name").setCustomValidity(problem); $("fo-name").reportValidity(); return; }
  }
  const name = $("tag-name").value.trim(), app = $("tag-app").checked;
  const fo = { at: $("fo-point").value.trim(), name: $("fo-name").value.trim(), format: $("fo-format").value };
  pending = null;
  $("confirm").close();
  if (kind === "tag") takeTag(id, name, app);
  else if (kind === "failover") failover(id, fo.at, fo.name, fo.format);
  else if (kind === "drill") runDrill(id);
});
$("confirm").addEventListener("close", () => {
  if (pending) say("Cancelled: nothing was done.");
  pending = null;
  if (opener && opener.isConnected) opener.focus();
  opener = null;
});
window.addEventListener("hashchange", route);
route();
