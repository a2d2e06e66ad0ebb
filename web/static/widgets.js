// Small widgets of the operations page, no library: inline SVG sparklines, relative times that
// show the exact time on hover, durations, and buttons that act only on a second click.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

// An inline SVG chart of one or more series (arrays of numbers; null counts as zero), all
// scaled to their common maximum; the lines get the classes s0, s1, … The title says what it
// shows and the last values; data-values holds the first series (the browser test reads it).
function sparkline(series, label, width = 90, height = 18) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  const lists = series.map((values) => values.map((v) => (typeof v === "number" && isFinite(v) ? v : 0)));
  const top = Math.max(0, ...lists.flat());
  const lasts = series.map((values) => (values.length ? round(values[values.length - 1]) : "-"));
  const title = document.createElementNS(SVG, "title");
  title.textContent = `${label}: ${lasts.join(" / ")} now, max ${round(top)} (${(series[0] || []).length} samples)`;
  svg.appendChild(title);
  svg.dataset.values = JSON.stringify(lists[0] || []);
  const y = (v) => (top > 0 ? height - 1 - (v / top) * (height - 2) : height - 1);
  lists.forEach((nums, k) => {
    if (nums.length === 0) return;
    const step = nums.length > 1 ? (width - 2) / (nums.length - 1) : 0;
    const points = nums.map((v, i) => `${(1 + i * step).toFixed(1)},${y(v).toFixed(1)}`);
    if (nums.length === 1) points.push(`${width - 1},${y(nums[0]).toFixed(1)}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("class", `s${k}`);
    svg.appendChild(line);
  });
  return svg;
}

function round(v) { return v == null ? "-" : Math.round(v * 100) / 100; }

// "12 s ago", "3 min ago", "2 h ago", "in 5 s" for ISO 8601 or epoch seconds.
function ago(when, now = Date.now()) {
  const t = toMillis(when);
  if (t == null) return "-";
  const s = Math.round((now - t) / 1000);
  const a = Math.abs(s);
  const text = a < 60 ? `${a} s` : a < 3600 ? `${Math.floor(a / 60)} min` : a < 86400 ? `${Math.floor(a / 3600)} h`
                                                                                    : `${Math.floor(a / 86400)} d`;
  return s >= 0 ? `${text} ago` : `in ${text}`;
}

function toMillis(when) {
  if (when == null || when === "") return null;
  const t = typeof when === "number" ? when * 1000 : Date.parse(when);
  return isNaN(t) ? null : t;
}

// Show `when` relative in `el`, the exact time (UTC and local) in its title; tickTimes() keeps
// every such element current.
function relTime(el, when) {
  const t = toMillis(when);
  el.classList.add("rel");
  if (t == null) { delete el.dataset.at; el.textContent = "-"; el.removeAttribute("title"); return el; }
  el.dataset.at = String(t);
  const exact = new Date(t);
  el.title = `${exact.toISOString()} (${exact.toLocaleString()})`;
  el.textContent = ago(t / 1000);
  return el;
}

function tickTimes() {
  const now = Date.now();
  for (const el of document.querySelectorAll(".rel[data-at]")) el.textContent = ago(Number(el.dataset.at) / 1000, now);
}

// Seconds as "45 s", "3 min 05 s", "2 h 10 min".
function duration(s) {
  if (s == null || !isFinite(s)) return "-";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

// Buttons that need a second click within ARM_MS: the armed state lives here, keyed by the
// action, so a table re-rendered between the two clicks keeps it.
const ARM_MS = 4000;
const armed = new Map();

function actionButton(id, label, run) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "action";
  button.dataset.action = id;
  const until = armed.get(id);
  const isArmed = until !== undefined && until > Date.now();
  button.textContent = isArmed ? `${label}? confirm` : label;
  if (isArmed) button.classList.add("armed");
  button.addEventListener("click", () => {
    const deadline = armed.get(id);
    if (deadline !== undefined && deadline > Date.now()) {
      armed.delete(id);
      button.disabled = true;
      run();
      return;
    }
    armed.set(id, Date.now() + ARM_MS);
    button.textContent = `${label}? confirm`;
    button.classList.add("armed");
    setTimeout(() => {
      if ((armed.get(id) || 0) <= Date.now()) {
        armed.delete(id);
        button.textContent = label;
        button.classList.remove("armed");
      }
    }, ARM_MS + 50);
  });
  return button;
}
