// TelemetryHub live page: subscribes to GET /events (a "snapshot" event every 500 ms: the
// /status body plus the processed samples since the previous snapshot), keeps the last minute
// of values and buffer depths, and draws them on two canvases. With an uplink (status.uplink),
// it shows the broker connection and the spool's backlog. The buttons POST to the
// control routes. Every request carries the API token once the user has given it (the page
// itself loads without one). Hand-written, no libraries.
'use strict';
(() => {
  const WINDOW_MS = 60_000;
  const MAX_POINTS_PER_DEVICE = 3_000;
  const PALETTE = ['#2563eb', '#db2777', '#059669', '#d97706', '#7c3aed', '#0891b2', '#dc2626'];
  const TOKEN_KEY = 'telemetryhub.token';

  const $ = (selector) => document.querySelector(selector);
  const series = new Map(); // line key (device and channel) -> {device, label, color, points: [{t, v}]}, oldest first
  const depths = []; // [{t, depth, capacity}], oldest first
  const colors = new Map();
  let previous = null; // the last snapshot's status and arrival time, for rates
  let snapshots = 0;
  let drawPending = false;

  // A token given in the address, as #token=... (which the browser never sends) or ?token=...,
  // is kept for this tab only and removed from the address bar.
  const params = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.slice(1));
  const given = fragment.get('token') ?? params.get('token');
  if (given !== null) {
    sessionStorage.setItem(TOKEN_KEY, given.trim());
    params.delete('token');
    fragment.delete('token');
    const query = params.toString(), hash = fragment.toString();
    const address = location.pathname + (query ? '?' + query : '') + (hash ? '#' + hash : '');
    history.replaceState(null, '', address);
  }

  /** The Authorization header, once the user has given the token. */
  function authorization() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  /** Asks the user for the token after a 401; true if one was entered. */
  function askForToken() {
    const entered = prompt('This gateway needs its API token (http.api_token):');
    if (!entered || !entered.trim()) return false;
    sessionStorage.setItem(TOKEN_KEY, entered.trim());
    return true;
  }

  function h(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key.startsWith('data-') || key === 'class' || key === 'type') node.setAttribute(key, value);
      else node[key] = value;
    }
    node.append(...children);
    return node;
  }

  function colorOf(device) {
    if (!colors.has(device)) colors.set(device, PALETTE[colors.size % PALETTE.length]);
    return colors.get(device);
  }

  function say(text, kind = 'info') {
    const message = $('#message');
    message.textContent = text;
    message.dataset.kind = kind;
  }

  function fmt(value, digits = 3) {
    if (value === null || value === undefined || Number.isNaN(value)) return '–';
    if (typeof value !== 'number') return String(value);
    return Number.isInteger(value) ? value.toLocaleString('en') : value.toFixed(digits);
  }

  function duration(seconds) {
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    return (h ? h + 'h ' : '') + (h || m ? m + 'm ' : '') + s + 's';
  }

  /** An age in seconds: tenths below a minute, then as a duration. */
  function age(seconds) {
    if (seconds === null || seconds === undefined) return '–';
    return seconds < 60 ? `${seconds.toFixed(1)}s` : duration(Math.round(seconds));
  }

  function bytes(n) {
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
  }

  // ---- the event stream ----

  // Read with fetch rather than EventSource, which cannot send an Authorization header: with
  // http.protect_reads set, the stream needs the token like every other read.
  let reconnectMs = 2_000; // the server's `retry:` replaces it

  async function connect() {
    try {
      const headers = { Accept: 'text/event-stream', ...authorization() };
      const response = await fetch('events', { headers, cache: 'no-store' });
      if (response.status === 401) {
        if (askForToken()) return connect();
        setConn('closed', 'needs the API token');
        say('This gateway needs its API token: reload the page to enter it.', 'error');
        return;
      }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      setConn('live', 'live');
      await readEvents(response.body);
    } catch (err) {
      // The gateway went away or restarts; try again below.
    }
    // The stream ends when the gateway shuts down; a restarted gateway is picked up again.
    setConn('reconnecting', 'reconnecting…');
    setTimeout(connect, reconnectMs);
  }

  /** Reads a text/event-stream body until it ends, handling each complete event. */
  async function readEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      // A chunk may hold several events or a part of one; each ends with a blank line.
      const events = (pending + value).split(/\r\n\r\n|\n\n|\r\r/);
      pending = events.pop();
      for (const event of events) onEvent(event);
    }
  }

  function onEvent(text) {
    let name = 'message';
    const data = [];
    for (const line of text.split(/\r\n|\r|\n/)) {
      const colon = line.indexOf(':');
      if (colon === 0) continue; // a comment (keep-alive)
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
      if (field === 'event') name = value;
      else if (field === 'data') data.push(value);
      else if (field === 'retry' && /^\d+$/.test(value)) reconnectMs = Number(value);
    }
    if (name !== 'snapshot' || !data.length) return;
    try {
      onSnapshot(JSON.parse(data.join('\n')));
    } catch (err) {
      // A bug in drawing must not cut the stream; report it as the uncaught error it is.
      setTimeout(() => { throw err; });
    }
  }

  function setConn(state, text) {
    const conn = $('#conn');
    conn.dataset.conn = state;
    conn.textContent = text;
  }

  function onSnapshot({ status, samples }) {
    const now = Date.now();
    for (const sample of samples) {
      // One line per device and channel; samples of older gateways name no channel.
      const channel = sample.channel || 'value';
      const key = `${sample.device}\u0000${channel}`;
      let line = series.get(key);
      if (!line) {
        // A device's first line takes the device's colour (its card's swatch); further
        // channels of the device take colours of their own.
        const first = ![...series.values()].some((l) => l.device === sample.device);
        const color = colorOf(first ? sample.device : key);
        line = { device: sample.device, label: `${sample.device} · ${channel}`, color, points: [] };
        series.set(key, line);
      }
      const points = line.points;
      points.push({ t: Date.parse(sample.timestamp), v: sample.value });
      if (points.length > MAX_POINTS_PER_DEVICE) points.splice(0, points.length - MAX_POINTS_PER_DEVICE);
    }
    for (const { points } of series.values()) {
      const newest = points.length ? points[points.length - 1].t : 0;
      const keepFrom = points.findIndex((p) => p.t >= newest - WINDOW_MS);
      if (keepFrom > 0) points.splice(0, keepFrom);
    }
    depths.push({ t: now, depth: status.metrics.queue_depth, capacity: status.metrics.queue_capacity });
    while (depths.length && depths[0].t < now - WINDOW_MS) depths.shift();

    renderHeader(status);
    renderUplink(status.uplink);
    renderDevices(status.devices);
    renderCounters(status, now);
    previous = { status, at: now };
    snapshots += 1;
    document.body.dataset.snapshots = String(snapshots);
    scheduleDraw();
  }

  // ---- devices, header and counters ----

  function renderHeader(status) {
    const overall = $('#overall');
    overall.textContent = status.state;
    overall.dataset.state = status.state;
    $('#meta').textContent = `v${status.version} · up ${duration(status.uptime_seconds)}`;
  }

  /** The uplink's connection and backlog; hidden when the gateway has no uplink. */
  function renderUplink(uplink) {
    const section = $('#uplink');
    section.hidden = !uplink;
    if (!uplink) {
      delete section.dataset.connected;
      return;
    }
    section.dataset.connected = String(uplink.connected);
    const state = section.querySelector('[data-field="state"]');
    state.dataset.conn = uplink.connected ? 'live' : 'reconnecting';
    const fields = {
      state: uplink.connected ? 'connected' : 'disconnected',
      broker: uplink.broker,
      pending: `${fmt(uplink.pending_samples)} samples`,
      oldest: age(uplink.oldest_pending_age_seconds),
      forwarded: `${fmt(uplink.forwarded)} samples`,
      // Bytes of spool files: acknowledged records stay until their segment is deleted.
      spool: bytes(uplink.pending_bytes),
      // The last error matters while disconnected; once connected it is history.
      error: !uplink.connected && uplink.last_error ? uplink.last_error : '',
    };
    for (const [key, text] of Object.entries(fields)) section.querySelector(`[data-field="${key}"]`).textContent = text;
  }

  function renderDevices(devices) {
    const container = $('#devices');
    const seen = new Set();
    for (const device of devices) {
      seen.add(device.id);
      let card = container.querySelector(`.device[data-id="${CSS.escape(device.id)}"]`);
      if (!card) container.append((card = deviceCard(device.id, device.kind)));
      card.dataset.state = device.state;
      const state = card.querySelector('.state');
      state.textContent = device.state;
      state.dataset.state = device.state;
      const invalid = device.frames_invalid;
      const failures = Object.values(device.link_failures).reduce((a, b) => a + b, 0);
      const stats = device.stats;
      // Several channels (or units) on the link: no single figure, but each channel's last value.
      const perChannel = (device.series || [])
        .filter((s) => s.source === 'link')
        .map((s) => `${s.channel} ${fmt(s.last)} ${s.unit}`)
        .join(' · ');
      const fields = {
        last: stats ? fmt(stats.last) : perChannel || '–',
        mean: stats ? fmt(stats.mean) : '–',
        range: stats ? `${fmt(stats.min)} … ${fmt(stats.max)}` : '–',
        read: fmt(device.samples_read),
        invalid: `${fmt(invalid.checksum + invalid.syntax + invalid.too_long)} ` +
          `(checksum ${invalid.checksum}, syntax ${invalid.syntax}, too long ${invalid.too_long})`,
        gaps: fmt(device.seq_gaps),
        failures: `${fmt(failures)} (${device.consecutive_failures} in a row)`,
        error: device.last_error || '–',
      };
      for (const [key, text] of Object.entries(fields)) card.querySelector(`[data-field="${key}"]`).textContent = text;
      card.querySelector('[data-action="start"]').disabled = device.state !== 'Idle';
      card.querySelector('[data-action="stop"]').disabled = !['Measuring', 'Error'].includes(device.state);
      card.querySelector('[data-action="reset"]').disabled = device.state === 'Measuring';
    }
    for (const card of container.querySelectorAll('.device')) {
      if (!seen.has(card.dataset.id)) card.remove();
    }
  }

  function deviceCard(id, kind) {
    const rows = [
      ['last', 'Last value'], ['mean', 'Mean'], ['range', 'Min … max'], ['read', 'Samples read'],
      ['invalid', 'Invalid frames'], ['gaps', 'Sequence gaps'], ['failures', 'Link failures'],
      ['error', 'Last error'],
    ];
    const list = h('dl');
    for (const [key, label] of rows) list.append(h('dt', {}, label), h('dd', { 'data-field': key }, '–'));
    const button = (action, label) =>
      h('button', { type: 'button', 'data-action': action, 'data-device': id }, label);
    return h('article', { class: 'device', 'data-id': id },
      h('header', {},
        h('h2', {}, h('i', { class: 'swatch', style: `background:${colorOf(id)}` }), id, ' ',
          h('small', {}, kind)),
        h('span', { class: 'state' }, '–')),
      list,
      h('div', { class: 'actions' }, button('start', 'Start'), button('stop', 'Stop'), button('reset', 'Reset')));
  }

  function renderCounters(status, now) {
    const m = status.metrics;
    let rate = '–';
    if (previous && now > previous.at) {
      const delta = m.samples_processed - previous.status.metrics.samples_processed;
      rate = fmt(Math.max(0, delta) / ((now - previous.at) / 1000), 1);
    }
    const rows = [
      ['Samples processed', fmt(m.samples_processed)],
      ['Processed per second', rate],
      ['Samples dropped', fmt(m.samples_dropped)],
      ['Buffer depth / capacity', `${fmt(m.queue_depth)} / ${fmt(m.queue_capacity)}`],
      ['Worker batches', fmt(m.pool_jobs_processed)],
      ['Batches queued', fmt(m.pool_jobs_queued)],
      ['Worker permits', fmt(m.pool_num_threads)],
    ];
    const body = $('#counters tbody');
    if (body.rows.length !== rows.length) {
      body.replaceChildren(...rows.map(([label]) => h('tr', {}, h('th', {}, label), h('td'))));
    }
    rows.forEach(([, value], i) => { body.rows[i].cells[1].textContent = value; });
  }

  // ---- controls ----

  async function post(path, retried = false) {
    const response = await fetch(path, { method: 'POST', headers: authorization() });
    if (response.status === 401 && !retried && askForToken()) return post(path, true);
    const body = await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, body };
  }

  document.addEventListener('click', async (event) => {
    const button = event.target.closest('button[data-action]');
    if (!button) return;
    const { action, device } = button.dataset;
    const path = device ? `devices/${encodeURIComponent(device)}/${action}` : action;
    button.disabled = true;
    try {
      const { ok, status, body } = await post(path);
      const who = device || 'all devices';
      if (ok) say(`${action}: ${who} → ${body.state}`);
      else say(`${action} ${who}: ${body.error || 'HTTP ' + status}`, 'error');
    } catch (err) {
      say(`${action}: ${err.message}`, 'error');
    } finally {
      // The next snapshot (within 500 ms) sets every button from the real state.
      if (!device) button.disabled = false;
    }
  });

  // ---- charts ----

  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      drawValues();
      drawBuffer();
    });
  }

  /** Sizes the canvas for the device pixel ratio; returns its context and CSS size. */
  function prepare(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width, height = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    return { ctx, width, height };
  }

  /** A round step and bounds covering [min, max] in about `count` steps. */
  function niceScale(min, max, count = 4) {
    if (!Number.isFinite(min) || !Number.isFinite(max)) [min, max] = [0, 1];
    if (min === max) [min, max] = [min - 1, max + 1];
    const raw = (max - min) / count;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
    return { lo: Math.floor(min / step) * step, hi: Math.ceil(max / step) * step, step };
  }

  /** Axes, grid and labels; returns a projection from (t, v) to pixels. */
  function frame(ctx, width, height, t0, t1, scale) {
    const left = 56, right = 10, top = 8, bottom = 22;
    const { lo: v0, hi: v1, step } = scale;
    const style = getComputedStyle(document.documentElement);
    ctx.font = '11px system-ui, sans-serif';
    ctx.lineWidth = 1;
    ctx.fillStyle = style.getPropertyValue('--muted').trim();
    ctx.strokeStyle = style.getPropertyValue('--line').trim();
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'right';
    const x = (t) => left + ((t - t0) / (t1 - t0)) * (width - left - right);
    const y = (v) => top + (1 - (v - v0) / (v1 - v0)) * (height - top - bottom);
    const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
    for (let v = v0; v <= v1 + step / 2; v += step) {
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y(v)) + 0.5);
      ctx.lineTo(width - right, Math.round(y(v)) + 0.5);
      ctx.stroke();
      ctx.fillText(v.toFixed(decimals + (step / 10 ** -decimals % 1 ? 1 : 0)), left - 6, y(v));
    }
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    for (const secondsAgo of [60, 45, 30, 15, 0]) {
      ctx.fillText(secondsAgo ? `−${secondsAgo}s` : 'now', x(t1 - secondsAgo * 1000), height - bottom + 6);
    }
    return { x, y, left, right, top, bottom };
  }

  function drawValues() {
    const canvas = $('#chart-values');
    const { ctx, width, height } = prepare(canvas);
    let newest = -Infinity, min = Infinity, max = -Infinity, count = 0;
    for (const { points } of series.values()) {
      for (const p of points) {
        newest = Math.max(newest, p.t);
        min = Math.min(min, p.v);
        max = Math.max(max, p.v);
      }
      count += points.length;
    }
    canvas.dataset.points = String(count);
    const t1 = Number.isFinite(newest) ? newest : Date.now();
    const { x, y } = frame(ctx, width, height, t1 - WINDOW_MS, t1, niceScale(min, max));
    const legend = $('#legend');
    legend.replaceChildren();
    for (const { label, color, points } of series.values()) {
      legend.append(h('span', {}, h('i', { class: 'swatch', style: `background:${color}` }), label));
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      points.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.v)) : ctx.moveTo(x(p.t), y(p.v))));
      ctx.stroke();
    }
    if (!count) {
      ctx.textAlign = 'center';
      ctx.fillText('waiting for samples…', width / 2, height / 2);
    }
  }

  function drawBuffer() {
    const canvas = $('#chart-buffer');
    const { ctx, width, height } = prepare(canvas);
    canvas.dataset.points = String(depths.length);
    const now = depths.length ? depths[depths.length - 1].t : Date.now();
    const capacity = depths.reduce((a, d) => Math.max(a, d.capacity), 1);
    const { x, y } = frame(ctx, width, height, now - WINDOW_MS, now, niceScale(0, capacity));
    const accent = getComputedStyle(document.documentElement).getPropertyValue('--accent').trim();
    if (depths.length) {
      ctx.beginPath();
      ctx.moveTo(x(depths[0].t), y(0));
      for (const d of depths) ctx.lineTo(x(d.t), y(d.depth));
      ctx.lineTo(x(depths[depths.length - 1].t), y(0));
      ctx.closePath();
      ctx.globalAlpha = 0.25;
      ctx.fillStyle = accent;
      ctx.fill();
      ctx.globalAlpha = 1;
      ctx.strokeStyle = accent;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      depths.forEach((d, i) => (i ? ctx.lineTo(x(d.t), y(d.depth)) : ctx.moveTo(x(d.t), y(d.depth))));
      ctx.stroke();
    }
    ctx.setLineDash([5, 4]);
    ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue('--muted').trim();
    ctx.beginPath();
    ctx.moveTo(x(now - WINDOW_MS), y(capacity));
    ctx.lineTo(x(now), y(capacity));
    ctx.stroke();
    ctx.setLineDash([]);
  }

  window.addEventListener('resize', scheduleDraw);
  connect();
})();
