// The operations page's rendering and actions against answers the script gives itself (no
// server: every request is answered by page.route), in headless Debian chromium:
//   node page_mocked.mjs SCREENSHOT_PATH
// A running batch row shows lines done/total, lines/s and its ETA and is cancelled from the page
// (POST /v1/batches/{id}/cancel, with the key); a batch still validating has no percentage and
// an animated indeterminate bar; the queues table draws the throughput history as inline SVG
// sparklines; relative times carry the exact time in their title and move on by themselves; an
// action's error envelope reaches the status line. Prints one JSON line of what it saw.
import { chromium } from "playwright-core";

const [screenshot] = process.argv.slice(2);
const KEY = "mocked-key";
const now = Date.now();
const iso = (ago) => new Date(now - ago * 1000).toISOString();
const history = Array.from({ length: 12 }, (_, i) => ({ t: now / 1000 - 120 + i * 10, jobs: i, p50_ms: 40 + i, p95_ms: 90 + 2 * i }));
const answers = {
  "/api/queues": { at: iso(0), nodes: [{ node: "n1", draining: false, depth: 2, oldest_job: null, oldest_age_s: 7 }],
    models: [{ model: "org/echo", depth: 3, oldest_job: "a".repeat(32), oldest_created_at: iso(75), oldest_age_s: 75,
               chunk_depth: 4, chunk_oldest_age_s: 30, holders: ["n1"], history,
               throughput: { jobs_per_s: 1.1, p50_ms: 51, p95_ms: 112 } }] },
  "/v1/nodes": { object: "list", data: [{ id: "n1", memory_used_mb: 1, memory_budget_mb: 10, last_heartbeat: iso(1),
                                          models: [{ model: "org/echo", node: "n1", state: "ready" }] }] },
  "/v1/jobs": { object: "list", data: [] },
};
const ops = { operations: [
  { id: "batch_run", kind: "batch", model: "org/echo", job: "batch_run", phase: "in_progress", progress: 40,
    lines_done: 40, lines_total: 100, rate_lps: 3.5, eta_s: 17, started_at: iso(12), live: false },
  { id: "batch_new", kind: "batch", model: "org/echo", job: "batch_new", phase: "validating", progress: null,
    lines_done: 0, lines_total: 0, started_at: iso(2), live: false },
] };
const calls = [];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
});
const result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1300, height: 700 } });
  await page.route("**/*", async (route) => {
    const req = route.request();
    const path = new URL(req.url()).pathname;
    if (path === "/") return route.fulfill({ path: "../../web/static/index.html" });
    if (path.startsWith("/ui/")) return route.fulfill({ path: `../../web/static/${path.slice(4)}` });
    if (path === "/api/operations/stream") {
      return route.fulfill({ contentType: "text/event-stream", body: `event: snapshot\ndata: ${JSON.stringify(ops)}\n\n` });
    }
    if (req.method() !== "GET") {
      calls.push({ method: req.method(), path, auth: req.headers().authorization || null });
      if (path.includes("/unload")) {
        return route.fulfill({ status: 503, json: { error: { type: "server_error", code: "store_unavailable", message: "try later" } } });
      }
      return route.fulfill({ status: 200, json: { id: "batch_run", object: "batch", status: "cancelling" } });
    }
    if (answers[path]) return route.fulfill({ json: answers[path] });
    return route.fulfill({ status: 404, json: { error: { code: "not_found", message: path } } });
  });
  await page.goto("http://modelbay.test/");
  await page.fill("#key", KEY);
  await page.click("#save-key");
  const run = page.locator('#ops tr[data-op="batch_run"]');
  await run.waitFor({ timeout: 10000 });
  await page.locator('#queues tr[data-model="org/echo"]').waitFor({ timeout: 10000 });
  result.batch_text = await run.innerText();
  result.validating = await page.locator('#ops tr[data-op="batch_new"] progress').evaluate(
    (el) => ({ indeterminate: el.matches(":indeterminate"), animation: getComputedStyle(el).animationName }));
  const started = run.locator("td.rel");
  result.started_title = await started.getAttribute("title");
  result.started_text = await started.textContent();
  const row = page.locator('#queues tr[data-model="org/echo"]');
  result.queue_text = await row.innerText();
  result.sparklines = await row.locator("svg.spark").evaluateAll((svgs) => svgs.map((s) => ({
    lines: s.querySelectorAll("polyline").length, values: JSON.parse(s.dataset.values), title: s.querySelector("title").textContent })));
  result.oldest_title = await row.locator("td.rel").getAttribute("title");
  const cancel = run.locator('button[data-action="cancel-batch:batch_run"]');
  await cancel.click();
  result.after_one_click = calls.length;
  await cancel.click();
  await page.waitForFunction(() => document.querySelector("#status").textContent.includes("batch_run"), null, { timeout: 10000 });
  result.cancel_status = await page.locator("#status").textContent();
  const unload = row.locator('button[data-action="unload:org/echo"]');
  await unload.click();
  await unload.click();
  await page.waitForFunction(() => document.querySelector("#status").textContent.includes("unload"), null, { timeout: 10000 });
  result.unload_status = await page.locator("#status").textContent();
  await page.waitForFunction((before) => document.querySelector('#ops tr[data-op="batch_run"] td.rel').textContent !== before,
                             result.started_text, { timeout: 5000 });
  result.ticked = true;
  await page.screenshot({ path: screenshot, fullPage: true });
  result.calls = calls;
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
