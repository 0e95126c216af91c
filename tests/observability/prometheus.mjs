// Checks a real Prometheus that scrapes TelemetryHub, through its HTTP query API.
//
//   node prometheus.mjs scrape    PROM_URL [INSTANCE]  up == 1 (for INSTANCE, if given) and a
//                                                      growing telemetryhub_samples_processed_total
//   node prometheus.mjs dashboard PROM_URL DASHBOARD_JSON WINDOW
//                                 every PromQL expression in the Grafana dashboard returns at least
//                                 one finite value ($__rate_interval and friends become WINDOW)
//
// Prints one line per finding; exits 1 if any check fails. Every wait has a deadline.
import { readFileSync } from 'node:fs';

const [mode, base, ...rest] = process.argv.slice(2);
const DEADLINE_MS = Number(process.env.PROM_DEADLINE_MS || 60_000);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function query(expr) {
  const url = new URL('/api/v1/query', base);
  url.searchParams.set('query', expr);
  const response = await fetch(url, { signal: AbortSignal.timeout(5_000) });
  const body = await response.json();
  if (body.status !== 'success') throw new Error(`${expr}: ${body.errorType}: ${body.error}`);
  return body.data.result;
}

/** Polls `probe` until it returns a truthy value; throws with `what` at the deadline. */
async function waitFor(what, probe, deadlineMs = DEADLINE_MS) {
  const end = Date.now() + deadlineMs;
  let last;
  while (Date.now() < end) {
    try {
      const value = await probe();
      if (value) return value;
    } catch (err) {
      last = err;
    }
    await sleep(500);
  }
  throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ''}`);
}

async function scrape(instance) {
  const selector = instance ? `up{job="telemetryhub",instance="${instance}"}` : 'up{job="telemetryhub"}';
  const up = await waitFor(`${selector} == 1`, async () => {
    const result = await query(selector);
    return result.length > 0 && result.every((r) => r.value[1] === '1') && result;
  });
  console.log(`ok: ${up.map((r) => `up{instance="${r.metric.instance}"} = ${r.value[1]}`).join(', ')}`);
  const processed = async () => {
    const result = await query('telemetryhub_samples_processed_total{job="telemetryhub"}');
    return result.length ? Number(result[0].value[1]) : NaN;
  };
  const first = await waitFor('telemetryhub_samples_processed_total', async () => {
    const v = await processed();
    return Number.isFinite(v) ? { v } : null;
  });
  const later = await waitFor('telemetryhub_samples_processed_total to grow', async () => {
    const v = await processed();
    return v > first.v ? { v } : null;
  });
  console.log(`ok: telemetryhub_samples_processed_total grew from ${first.v} to ${later.v}`);
}

/** Every `expr` in the dashboard, with the panel it belongs to. */
function expressions(dashboard) {
  const found = [];
  const walk = (panels = []) => {
    for (const panel of panels) {
      for (const target of panel.targets || []) {
        if (target.expr) found.push({ panel: panel.title, expr: target.expr, legend: target.legendFormat });
      }
      walk(panel.panels);
    }
  };
  walk(dashboard.panels);
  return found;
}

async function dashboardCheck(path, window) {
  const dashboard = JSON.parse(readFileSync(path, 'utf8'));
  const exprs = expressions(dashboard);
  if (exprs.length === 0) throw new Error(`${path} has no PromQL expressions`);
  const unknown = exprs.filter((e) => /\$(?!__rate_interval|__interval|__range)/.test(e.expr));
  if (unknown.length) throw new Error(`dashboard variables the test cannot fill: ${unknown.map((e) => e.expr).join('; ')}`);
  let failed = 0;
  for (const { panel, expr } of exprs) {
    const concrete = expr.replaceAll(/\$__(rate_interval|interval|range)/g, window);
    try {
      const result = await waitFor(`data for ${concrete}`, async () => {
        const r = await query(concrete);
        return r.some((s) => Number.isFinite(Number(s.value[1]))) && r;
      }, 20_000);
      console.log(`ok: [${panel}] ${expr} -> ${result.length} series`);
    } catch (err) {
      failed += 1;
      console.log(`FAIL: [${panel}] ${expr}: ${err.message}`);
    }
  }
  if (failed) throw new Error(`${failed} of ${exprs.length} dashboard expressions returned no data`);
  console.log(`ok: all ${exprs.length} dashboard expressions return data`);
}

try {
  if (mode === 'scrape') await scrape(rest[0]);
  else if (mode === 'dashboard') await dashboardCheck(rest[0], rest[1] || '15s');
  else throw new Error(`unknown mode ${mode}; use scrape or dashboard`);
} catch (err) {
  console.log(`FAIL: ${err.message}`);
  process.exit(1);
}
