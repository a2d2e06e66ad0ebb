// The operations page: plain JS, no build step. Every API call sends the key saved in this
// browser (localStorage) as a bearer token; live operations come from the SSE stream, read
// with fetch() so the key can go in a header (EventSource cannot send one).
"use strict";

const KEY = "modelbay-api-key";
const $ = (sel) => document.querySelector(sel);

function headers() {
  const key = localStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text) { $("#status").textContent = text; }

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "-" : String(text);
  if (cls) td.className = cls;
  return td;
}

function mb(bytes) { return bytes == null ? "?" : (bytes / 1e6).toFixed(1) + " MB"; }

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (resp.status === 401) { setStatus("this server needs an API key"); throw new Error("401"); }
  if (!resp.ok) throw new Error(`${path}: ${resp.status}`);
  return resp.json();
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
      for (let i = 0; i < 5; i++) tr.appendChild(document.createElement("td"));
      const bar = document.createElement("progress");
      bar.max = 100;
      tr.children[3].appendChild(bar);
      body.appendChild(tr);
    }
    const [model, kind, node, , detail] = tr.children;
    model.textContent = op.model; kind.textContent = op.phase || op.kind; node.textContent = op.node || "-";
    const bar = tr.querySelector("progress");
    const unmeasured = op.progress == null;  // loading: no percentage, an indeterminate bar
    if (unmeasured) bar.removeAttribute("value");
    else if (op.bytes_total) { bar.max = op.bytes_total; bar.value = op.bytes_done || 0; }
    else { bar.max = 100; bar.value = op.progress; }
    bar.dataset.progress = unmeasured ? "" : String(op.progress);
    const rate = op.rate_bps ? ` · ${(op.rate_bps / 1e6).toFixed(1)} MB/s` : "";
    const eta = op.eta_s != null ? ` · ETA ${Math.round(op.eta_s)}s` : "";
    const file = op.file ? `${op.file_index}/${op.files_total} ${op.file} · ` : "";
    detail.textContent = op.bytes_total && !unmeasured ? `${file}${mb(op.bytes_done)} of ${mb(op.bytes_total)}${rate}${eta}`
                                        : (op.message || "");
  }
  for (const tr of [...body.querySelectorAll("tr")]) if (!seen.has(tr.dataset.op)) tr.remove();
  $("#ops-empty").hidden = rows.length > 0;
}

async function followOperations() {
  for (;;) {
    try {
      const resp = await fetch("/api/operations/stream", { headers: headers() });
      if (!resp.ok) throw new Error(String(resp.status));
      setStatus("live");
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
      setStatus(`operations stream: ${err.message}; retrying`);
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function refreshTables() {
  try {
    const nodes = await getJSON("/v1/nodes");
    const nbody = $("#nodes tbody");
    nbody.replaceChildren(...nodes.data.map((n) => {
      const tr = document.createElement("tr");
      tr.append(cell(n.id + (n.draining ? " (draining)" : "")),
                cell(`${n.memory_used_mb} / ${n.memory_budget_mb} MB`));
      const models = document.createElement("td");
      for (const m of n.models || []) {
        const span = document.createElement("span");
        span.className = `state-${m.state}`;
        span.textContent = `${m.model}: ${m.state} `;
        models.appendChild(span);
      }
      tr.append(models, cell(n.last_heartbeat));
      return tr;
    }));
    const jobs = await getJSON("/v1/jobs?limit=25");
    $("#jobs tbody").replaceChildren(...jobs.data.map((j) => {
      const tr = document.createElement("tr");
      tr.append(cell(j.id.slice(0, 12)), cell(j.kind), cell(j.model), cell(j.node),
                cell(j.status, `status-${j.status}`), cell(j.created_at));
      return tr;
    }));
  } catch (err) { /* the status line says why */ }
}

$("#key").value = localStorage.getItem(KEY) || "";
$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem(KEY, $("#key").value.trim());
  setStatus("key saved");
  refreshTables();
});
refreshTables();
setInterval(refreshTables, 2000);
followOperations();
