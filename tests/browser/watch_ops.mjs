// Opens the operations page in headless Debian chromium (playwright-core), saves the API
// key through the page's own form, then watches the progress bar of one operation:
//   node watch_ops.mjs URL KEY OP_ID SCREENSHOT_PATH
// With OP_ID "-" it prints {"ready": true} once the key is saved and reads the id from stdin
// (one line), so the operation can start after the page is up: a slow browser start on a
// loaded machine cannot miss it.
// Prints one JSON line: the bar's values as they were sampled (every 100 ms while the row
// exists; an indeterminate bar has no value), the samples taken while the row's phase was
// "loading" (is the bar indeterminate, its animation's name), whether the row appeared and
// left, and the rows' texts. Exit 1 on a timeout.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [url, key, opArg, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
});
const result = { values: [], loading: [], appeared: false, left: false, saved: false, texts: [] };
try {
  const page = await browser.newPage();
  await page.goto(url);
  await page.fill("#key", key);
  await page.click("#save-key");
  result.saved = (await page.evaluate(() => localStorage.getItem("modelbay-api-key"))) === key;
  let opId = opArg;
  if (opArg === "-") {
    console.log(JSON.stringify({ ready: true }));
    opId = (await new Promise((resolve) => createInterface({ input: process.stdin }).once("line", resolve))).trim();
  }
  const selector = `#ops tr[data-op="${opId}"]`;
  await page.locator(selector).waitFor({ state: "attached", timeout: 30000 });
  result.appeared = true;
  let shot = false;
  const deadline = Date.now() + 60000;
  while (Date.now() < deadline) {
    // One snapshot of the row in the page itself: a locator call would wait (30 s) for a row
    // that left between two calls, and phase, bar and text must come from the same render.
    const row = await page.evaluate((sel) => {
      const tr = document.querySelector(sel);
      if (tr === null) return null;
      const el = tr.querySelector("progress");
      const indeterminate = el.matches(":indeterminate");
      return {
        value: indeterminate ? null : el.value,
        indeterminate,
        animation: getComputedStyle(el).animationName,
        phase: tr.children[1].textContent,
        text: tr.innerText,
      };
    }, selector);
    if (row === null) { result.left = true; break; }
    const { text, ...bar } = row;
    if (bar.value !== null) result.values.push(bar.value);
    if (bar.phase === "loading") result.loading.push(bar);
    if (text && !result.texts.includes(text)) result.texts.push(text);
    if (!shot && result.values.length > 5 && bar.value > 0) {
      await page.screenshot({ path: screenshot, fullPage: true });
      shot = true;
    }
    await page.waitForTimeout(100);
  }
  result.jobs = await page.locator("#jobs tbody tr").count();
  result.nodes = await page.locator("#nodes tbody tr").count();
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
process.exit(result.left ? 0 : 1);
