// Opens the operations page in headless Debian chromium (playwright-core), saves the API key
// through the page's form, prints {"ready": true}, then reads one JSON line on stdin:
//   {"model": NAME, "depth": N, "cancel": JOB_ID}
// and watches the model's row in the queues table: its depth rising to N and falling to 0
// (a screenshot is saved while it is highest), while it cancels JOB_ID from the jobs table
// (two clicks: the button acts on the second) and waits for the row to say "cancelled".
// Once the queue is empty and the model has a holder it unloads the model from its row and
// waits for "none" holders, then for the jobs/s sparkline to draw the jobs that ran.
//   node queue_ops.mjs URL KEY SCREENSHOT_PATH
// Prints one JSON line: the depths seen, whether the queue rose and fell, the cancel's and
// the unload's outcome, the status line, the created time's title, the depth sparkline's
// values. Exit 1 on a timeout.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [url, key, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
});
const result = { depths: [], rose: false, fell: false, cancelled: false, unloaded: false, statuses: [] };

async function twice(page, selector) {
  const button = page.locator(selector).first();
  await button.click({ timeout: 20000 });
  await page.locator(`${selector}.armed`).first().waitFor({ timeout: 5000 });
  await button.click({ timeout: 20000 });
}

try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.goto(url);
  await page.fill("#key", key);
  await page.click("#save-key");
  console.log(JSON.stringify({ ready: true }));
  const line = await new Promise((resolve) => createInterface({ input: process.stdin }).once("line", resolve));
  const { model, depth, cancel } = JSON.parse(line);
  const row = `#queues tr[data-model="${model}"]`;
  const jobButton = `#jobs tr[data-job="${cancel}"] button[data-action="cancel-job:${cancel}"]`;
  const deadline = Date.now() + 120000;
  let asked = false;
  while (Date.now() < deadline && !(result.fell && result.cancelled)) {
    const seen = await page.evaluate((sel) => {
      const tr = document.querySelector(sel);
      return tr === null ? null : Number(tr.dataset.depth);
    }, row);
    if (seen !== null && result.depths[result.depths.length - 1] !== seen) result.depths.push(seen);
    if (seen === depth && !result.rose) {
      result.rose = true;
      await page.screenshot({ path: screenshot, fullPage: true });
    }
    if (result.rose && seen === 0) result.fell = true;
    if (!asked && (await page.locator(jobButton).count()) > 0) {
      asked = true;
      await twice(page, jobButton);
      result.statuses.push(await page.locator("#status").textContent());
    }
    if (asked && !result.cancelled) {
      const status = await page.locator(`#jobs tr[data-job="${cancel}"] td.status`).textContent().catch(() => "");
      result.cancelled = status === "cancelled";
      if (result.cancelled) result.created_title = await page.locator(`#jobs tr[data-job="${cancel}"] td.rel`).getAttribute("title");
    }
    await page.waitForTimeout(200);
  }
  result.spark = JSON.parse((await page.locator(`${row} td.depth svg`).getAttribute("data-values")) || "[]");
  if (result.fell) {
    await page.locator(`${row}[data-holders="1"]`).waitFor({ timeout: 30000 });
    await twice(page, `${row} button[data-action="unload:${model}"]`);
    await page.locator(`${row}[data-holders="0"]`).waitFor({ timeout: 60000 });
    result.unloaded = true;
    result.statuses.push(await page.locator("#status").textContent());
    // The holder's heartbeat reports the jobs it ran: the jobs/s sparkline draws them.
    await page.waitForFunction((sel) => {
      const svg = document.querySelector(`${sel} td.rate svg`);
      return svg !== null && JSON.parse(svg.dataset.values).some((v) => v > 0);
    }, row, { timeout: 30000 });
    result.rate_spark = JSON.parse(await page.locator(`${row} td.rate svg`).getAttribute("data-values"));
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
process.exit(result.rose && result.fell && result.cancelled && result.unloaded ? 0 : 1);
