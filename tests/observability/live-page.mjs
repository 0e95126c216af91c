// Loads TelemetryHub's live page (GET /) in headless Chromium and checks what a person would:
// the device state is shown, the charts update from the event stream, the uplink is shown
// (connected to BROKER, with its backlog) or, without BROKER, not shown at all, and the
// device's Stop and Start buttons change its state. Saves a screenshot. Fails on any page
// error, console error or request to another origin.
//
//   node live-page.mjs BASE_URL SCREENSHOT.png [DEVICE] [BROKER]
//
// BROKER is the gateway's uplink broker as GET /uplink names it (mqtt://host:port).
// Env: CHROMIUM (default /usr/bin/chromium); LIVE_SETTLE_MS, how long to let the charts fill
// before the screenshot (default 3000).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [base, screenshot, deviceId = 'sim0', broker = ''] = process.argv.slice(2);
if (!base || !screenshot) {
  console.log('usage: node live-page.mjs BASE_URL SCREENSHOT.png [DEVICE] [BROKER]');
  process.exit(2);
}
const origin = new URL(base).origin;
const settle = Number(process.env.LIVE_SETTLE_MS || 3_000);
const TIMEOUT = 15_000;

const profile = mkdtempSync(join(tmpdir(), 'telemetryhub-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1280, height: 940 },
  colorScheme: 'light',
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--no-proxy-server',
  ],
});

const problems = [];
let failed = 0;
const ok = (what) => console.log(`ok: ${what}`);
const fail = (what) => { failed += 1; console.log(`FAIL: ${what}`); };

try {
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT);
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => { if (msg.type() === 'error') problems.push(`console error: ${msg.text()}`); });
  page.on('request', (req) => {
    const url = req.url();
    if (!url.startsWith(origin) && !url.startsWith('data:')) problems.push(`request to another origin: ${url}`);
  });

  const response = await page.goto(new URL('/', base).href);
  if (response.status() !== 200) throw new Error(`GET / answered ${response.status()}`);
  ok('GET / answers 200 with the page');

  const card = page.locator(`.device[data-id="${deviceId}"]`);
  const state = card.locator('.state');
  await page.waitForFunction(() => Number(document.body.dataset.snapshots) >= 2);
  await card.waitFor();
  const shown = (await state.textContent()).trim();
  if (!['Idle', 'Measuring', 'Error', 'SafeState'].includes(shown)) throw new Error(`device state shows "${shown}"`);
  ok(`device ${deviceId} shows its state: ${shown}`);
  if (shown !== 'Measuring') {
    await card.locator('[data-action="start"]').click();
    await page.waitForFunction((id) => document.querySelector(`.device[data-id="${id}"]`)?.dataset.state === 'Measuring', deviceId);
  }

  // The charts update: more points, and different pixels, a second later.
  const chartState = () => page.evaluate(() => ({
    values: Number(document.querySelector('#chart-values').dataset.points),
    buffer: Number(document.querySelector('#chart-buffer').dataset.points),
    pixels: document.querySelector('#chart-values').toDataURL(),
  }));
  await page.waitForFunction(() => Number(document.querySelector('#chart-values').dataset.points) > 0);
  const before = await chartState();
  await page.waitForTimeout(1_500);
  const after = await chartState();
  if (after.values > before.values && after.buffer > before.buffer && after.pixels !== before.pixels) {
    ok(`charts update (values ${before.values} -> ${after.values} points, buffer ${before.buffer} -> ${after.buffer})`);
  } else {
    fail(`charts did not update: ${JSON.stringify({ before: { ...before, pixels: undefined }, after: { ...after, pixels: undefined } })}`);
  }
  const counters = await page.locator('#counters').textContent();
  if (/Samples processed\s*[1-9]/.test(counters)) ok('counters show processed samples');
  else fail(`counters show no processed samples: ${counters}`);

  const uplink = page.locator('#uplink');
  if (broker) {
    // Connected to the broker the API names, with a backlog and samples forwarded.
    await page.waitForFunction(() => document.querySelector('#uplink').dataset.connected === 'true');
    const field = async (name) => (await uplink.locator(`[data-field="${name}"]`).textContent()).trim();
    const shown = {
      visible: await uplink.isVisible(),
      state: await field('state'),
      broker: await field('broker'),
      pending: await field('pending'),
      oldest: await field('oldest'),
      forwarded: await field('forwarded'),
      spool: await field('spool'),
    };
    const api = await (await fetch(new URL('/uplink', base))).json();
    if (shown.visible && shown.state === 'connected' && shown.broker === broker && api.broker === broker &&
        /^[\d,]+ samples$/.test(shown.pending) && /^(–|[\d.]+s|\d)/.test(shown.oldest) &&
        /^[1-9][\d,]* samples$/.test(shown.forwarded) && /^[\d.]+ (B|KiB|MiB|GiB|TiB)$/.test(shown.spool)) {
      ok(`uplink shown: ${shown.state} to ${shown.broker}, backlog ${shown.pending}, oldest ${shown.oldest}, ` +
        `forwarded ${shown.forwarded}, spool files ${shown.spool}`);
    } else {
      fail(`uplink not shown as expected (broker ${broker}): ${JSON.stringify(shown)}`);
    }
  } else if (await uplink.isVisible()) {
    fail(`an uplink is shown for a gateway without one: ${(await uplink.textContent()).trim()}`);
  } else {
    ok('no uplink shown (none configured)');
  }

  await page.waitForTimeout(Math.max(0, settle - 1_500));
  await page.screenshot({ path: screenshot, fullPage: true });
  ok(`screenshot saved: ${screenshot}`);

  // Stop, then Start, with the page's own buttons; the state shown follows the device's.
  const api = async () => (await (await fetch(new URL(`/devices/${deviceId}`, base))).json()).state;
  await card.locator('[data-action="stop"]').click();
  await page.waitForFunction((id) => document.querySelector(`.device[data-id="${id}"]`)?.dataset.state === 'Idle', deviceId);
  const stopped = await api();
  if (stopped === 'Idle') ok('Stop button: the device is Idle (page and API agree)');
  else fail(`after Stop the API says ${stopped}`);
  const start = card.locator('[data-action="start"]');
  if (await start.isDisabled()) fail('Start is disabled while Idle');
  await start.click();
  await page.waitForFunction((id) => document.querySelector(`.device[data-id="${id}"]`)?.dataset.state === 'Measuring', deviceId);
  const started = await api();
  if (started === 'Measuring') ok('Start button: the device is Measuring again (page and API agree)');
  else fail(`after Start the API says ${started}`);
  const message = (await page.locator('#message').textContent()).trim();
  if (/start: .* Measuring/.test(message)) ok(`the page confirms: "${message}"`);
  else fail(`no confirmation message after Start: "${message}"`);
} catch (err) {
  fail(err.message.split('\n')[0]);
} finally {
  for (const problem of problems) fail(problem);
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
