// Opens tests/clients/browser.html in headless Chromium (Debian's binary, driven by
// playwright-core) and waits until its analytics.js calls are done. Run by
// tests/acceptance/test_browser.py:
//
//   node browser.mjs CHROMIUM PAGE_URL ORIGIN...
//
// Requests to origins other than the given ones (the page's and segflowd's) are aborted,
// so nothing reaches the internet. Prints one JSON line: the page's result
// ({anonymousId} or {error}), the answers the page got from the origins, what was
// blocked and the page's console errors.
import { chromium } from 'playwright-core';

const [executablePath, pageUrl, ...origins] = process.argv.slice(2);
const WAIT_MS = 30000; // for the page's calls, and for each browser step

const browser = await chromium.launch({ executablePath, timeout: WAIT_MS });
const out = { result: null, responses: [], blocked: [], console: [] };
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(WAIT_MS);
  await page.route('**/*', (route) => {
    const url = new URL(route.request().url());
    if (origins.includes(url.origin)) return route.continue();
    out.blocked.push(url.href);
    return route.abort();
  });
  page.on('response', (r) => out.responses.push(
    { method: r.request().method(), url: r.url(), status: r.status() }));
  page.on('requestfailed', (r) => out.console.push(
    `request failed: ${r.method()} ${r.url()}: ${r.failure() && r.failure().errorText}`));
  page.on('console', (m) => { if (m.type() === 'error') out.console.push(m.text()); });
  page.on('pageerror', (e) => out.console.push(String(e)));
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.segflowDone !== null);
  out.result = await page.evaluate(() => window.segflowDone);
} catch (e) {
  out.result = { error: String((e && e.stack) || e) };
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
