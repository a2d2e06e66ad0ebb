// The operations page: plain JS, no build step (widgets.js: sparklines, relative times, the
// confirm-on-second-click buttons). Every API call sends the key saved in this browser
// (localStorage) as a bearer token; live operations come from the SSE stream, read with
// fetch() so the key can go in a header (EventSource cannot send one). Queues, nodes and
// jobs are polled every POLL_MS; the page keeps each model's queue depth of the last
// DEPTH_SAMPLES polls for its sparkline.
"use strict";

const KEY = "modelbay-api-key";
const POLL_MS = 2000;
const DEPTH_SAMPLES = 90;
const ACTIVE = new Set(["queued", "loading", "running"]);
const $ = (sel) => document.querySelector(sel);
const depths = new Map();   // model → its queue depths, oldest first
let nodeQueues = new Map(); // node id → its entry of /api/queues (pinned jobs waiting)

function headers() {
  const key = localStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, bad = false) { $("#status").textContent = text; $("#status").classList.toggle("bad", bad); }
function setLive(text) { $("#live").textContent = text; }

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "-" : String(text);
  if (cls) td.className = cls;
  return td;
}

function mb(bytes) { return bytes == null ? "?" : (bytes / 1e6).toFixed(1) + " MB"; }
function modelPath(name) { return name.split("/").map(encodeURIComponent).join("/"); }

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (resp.status === 401) { setStatus("this server needs an API key", true); throw new Error("401"); }
  if (!resp.ok) throw new Error(`${path}: ${resp.status}`);
  return resp.json();
}

// An action behind the key: the answer (or the error envelope's code and message) goes to the
// status line, then the tables are read again.
async function act(method, path, what) {
  try {
    const resp = await fetch(path, { method, headers: headers() });
    let text = `${what}: done (${resp.status})`;
    const bad = !resp.ok;
    if (bad) {
      text = `${what}: failed (${resp.status})`;
      try { const e = (await resp.json()).error; text = `${what}: ${e.code}: ${e.message}`; } catch (_) { /* not JSON */ }
    }
    setStatus(text, bad);
  } catch (err) {
    setStatus(`${what}: ${err.message}`, true);
  }
  refreshTables();
}

function cancelJob(id, label = "cancel") { return actionButton(`cancel-job:${id}`, label, () => act("DELETE", `/v1/jobs/${id}`, `cancel job ${id.slice(0, 12)}`)); }
function cancelBatch(id) { return actionButton(`cancel-batch:${id}`, "cancel", () => act("POST", `/v1/batches/${id}/cancel`, `cancel ${id}`)); }
function unloadModel(name) { return actionButton(`unload:${name}`, "unload", () => act("POST", `/v1/models/${modelPath(name)}/unload`, `unload ${name}`)); }

// ---- live operations ---------------------------------------------------------------------

function opDetail(op, unmeasured) {
  if (op.kind === "batch") {
    const rate = op.rate_lps ? ` · ${op.rate_lps} lines/s` : "";
    const eta = op.eta_s != null ? ` · ETA ${duration(op.eta_s)}` : "";
    if (!op.lines_total) return op.phase === "validating" ? "reading the input file" : (op.message || "");
    return `${op.lines_done ?? 0}/${op.lines_total} lines${rate}${eta}`;
  }
  if (!op.bytes_total || unmeasured) return op.message || "";
  const rate = op.rate_bps ? ` · ${(op.rate_bps / 1e6).toFixed(1)} MB/s` : "";
  const eta = op.eta_s != null ? ` · ETA ${duration(op.eta_s)}` : "";
  const file = op.file ? `${op.file_index}/${op.files_total} ${op.file} · ` : "";
  return `${file}${mb(op.bytes_done)} of ${mb(op.bytes_total)}${rate}${eta}`;
}

function opAction(op) {
  if (op.kind === "batch" && ["validating", "in_progress"].includes(op.phase)) return cancelBatch(op.id);
  if (op.kind === "inference" && op.job) return cancelJob(op.job);
  return null;
}

function renderOps(rows) {
  const body = $("#ops tbody");
  const seen = new Set();
  for (const op of rows) {
    seen.add(op.id);
    let tr = body.querySelector(`tr[data-op="${CSS.escape(op.id)}"]`);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.op = op.id;
      for (let i = 0; i < 7; i++) tr.appendChild(document.createElement("td"));
      const bar = document.createElement("progress");
      bar.max = 100;
      tr.children[3].appendChild(bar);
      body.appendChild(tr);
    }
    const [model, kind, node, , detail, started, actions] = tr.children;
    tr.dataset.kind = op.kind || "";
    model.textContent = op.model || "-"; kind.textContent = op.phase || op.kind; node.textContent = op.node || "-";
    const bar = tr.querySelector("progress");
    const unmeasured = op.progress == null;  // no percentage (loading, validating): an indeterminate bar
    if (unmeasured) bar.removeAttribute("value");
    else if (op.bytes_total) { bar.max = op.bytes_total; bar.value = op.bytes_done || 0; }
    else { bar.max = 100; bar.value = op.progress; }
    bar.dataset.progress = unmeasured ? "" : String(op.progress);
    detail.textContent = opDetail(op, unmeasured);
    if (started.dataset.at !== String(Date.parse(op.started_at))) relTime(started, op.started_at);
    const button = opAction(op);
    if (button) actions.replaceChildren(button); else actions.replaceChildren();
  }
  for (const tr of [...body.querySelectorAll("tr")]) if (!seen.has(tr.dataset.op)) tr.remove();
  $("#ops-empty").hidden = rows.length > 0;
}

async function followOperations() {
  for (;;) {
    try {
      const resp = await fetch("/api/operations/stream", { headers: headers() });
      if (!resp.ok) throw new Error(String(resp.status));
      setLive("live");
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
          if (data) renderOps(JSON.parse(data).operations || []);
        }
      }
    } catch (err) {
      setLive(`operations stream: ${err.message}; retrying`);
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ---- queues --------------------------------------------------------------------------------

function numbers(history, field, scale = 1) {
  return history.map((p) => (p[field] == null ? null : p[field] * scale));
}

function sampleDepth(q) {
  const series = depths.get(q.model) || [];
  series.push(q.depth);
  if (series.length > DEPTH_SAMPLES) series.splice(0, series.length - DEPTH_SAMPLES);
  depths.set(q.model, series);
}

function queueRow(q) {
  const series = depths.get(q.model) || [];
  const tr = document.createElement("tr");
  tr.dataset.model = q.model;
  tr.dataset.depth = String(q.depth);
  tr.dataset.holders = String(q.holders.length);
  const waiting = cell(q.depth, "num depth");
  waiting.append(" ", sparkline([series], "jobs waiting"));
  const oldest = relTime(document.createElement("td"), q.oldest_created_at);
  if (q.oldest_job) oldest.title += ` · job ${q.oldest_job}`;
  const chunks = cell(q.chunk_depth ? `${q.chunk_depth}` : "-", "num");
  if (q.chunk_oldest_age_s != null) chunks.title = `the oldest waits for ${duration(q.chunk_oldest_age_s)}`;
  const history = q.history || [];
  const step = history.length > 1 ? history[1].t - history[0].t : 10;
  const t = q.throughput;
  const rate = cell(t && t.jobs_per_s != null ? `${t.jobs_per_s}` : "-", "num rate");
  const latency = cell(t && t.p50_ms != null ? `${Math.round(t.p50_ms)} / ${Math.round(t.p95_ms)} ms` : "-", "num");
  if (history.length) {
    rate.append(" ", sparkline([numbers(history, "jobs", 1 / step)], "jobs/s"));
    latency.append(" ", sparkline([numbers(history, "p50_ms"), numbers(history, "p95_ms")], "p50 / p95 ms"));
  }
  const actions = document.createElement("td");
  if (q.holders.length) actions.appendChild(unloadModel(q.model));
  if (q.oldest_job) actions.appendChild(cancelJob(q.oldest_job, "cancel oldest"));
  tr.append(cell(q.model), waiting, oldest, chunks, rate, latency, cell(q.holders.join(", ") || "none"), actions);
  return tr;
}

function renderQueues(view) {
  view.models.forEach(sampleDepth);
  const busy = (q) => q.depth || q.chunk_depth || q.holders.length || depths.get(q.model)?.some((d) => d > 0);
  const shown = view.models.filter((q) => busy(q) || $("#all-models").checked);
  $("#queues tbody").replaceChildren(...shown.map(queueRow));
  $("#queues-empty").hidden = shown.length > 0;
  nodeQueues = new Map(view.nodes.map((n) => [n.node, n]));
}

// ---- nodes and jobs ------------------------------------------------------------------------

function nodeRow(n) {
  const tr = document.createElement("tr");
  tr.append(cell(n.id + (n.draining ? " (draining)" : "")), cell(`${n.memory_used_mb} / ${n.memory_budget_mb} MB`));
  const models = document.createElement("td");
  for (const m of n.models || []) {
    const span = document.createElement("span");
    span.className = `state-${m.state}`;
    span.textContent = `${m.model}: ${m.state} `;
    models.appendChild(span);
  }
  const pinned = nodeQueues.get(n.id);
  const waiting = cell(pinned ? pinned.depth : "-", "num");
  if (pinned && pinned.oldest_age_s != null) waiting.title = `the oldest waits for ${duration(pinned.oldest_age_s)}`;
  tr.append(models, waiting, relTime(document.createElement("td"), n.last_heartbeat));
  return tr;
}

function jobRow(j) {
  const tr = document.createElement("tr");
  tr.dataset.job = j.id;
  const id = cell(j.id.slice(0, 12));
  id.title = j.id;
  const actions = document.createElement("td");
  if (j.kind === "inference" && ACTIVE.has(j.status)) actions.appendChild(cancelJob(j.id));
  tr.append(id, cell(j.kind), cell(j.model), cell(j.node), cell(j.status, `status status-${j.status}`),
            relTime(document.createElement("td"), j.created_at), actions);
  return tr;
}

async function refreshTables() {
  try {
    const [queues, nodes, jobs] = await Promise.all([getJSON("/api/queues"), getJSON("/v1/nodes"),
                                                     getJSON("/v1/jobs?limit=25")]);
    renderQueues(queues);
    $("#nodes tbody").replaceChildren(...nodes.data.map(nodeRow));
    $("#jobs tbody").replaceChildren(...jobs.data.map(jobRow));
    $("#polled").textContent = "";
    $("#polled").appendChild(relTime(document.createElement("span"), queues.at));
  } catch (err) { /* the status line says why */ }
}

$("#key").value = localStorage.getItem(KEY) || "";
$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem(KEY, $("#key").value.trim());
  setStatus("key saved");
  refreshTables();
});
$("#all-models").addEventListener("change", refreshTables);
refreshTables();
setInterval(refreshTables, POLL_MS);
setInterval(tickTimes, 1000);
followOperations();
