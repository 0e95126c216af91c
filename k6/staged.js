// The original repository's load test: ramp 0 -> 50 VUs over 30 s, hold 50 for 1 min,
// ramp to 100 over 30 s, hold 100 for 1 min, ramp down to 0 over 30 s (4 min in all).
// Every iteration calls GET /status, every 10th also GET /metrics (Prometheus text).
// Devices are started in setup (POST /start) and stopped in teardown (POST /stop).
// Thresholds: p95 under 100 ms and under 1 % failed requests.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 k6/staged.js
//
// SLEEP (seconds between iterations of one VU, default 0.1) may be overridden with -e.
// With API_TOKEN set, the POSTs carry it as a bearer token.
import http from 'k6/http';
import { check, sleep } from 'k6';

const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const SLEEP = Number(__ENV.SLEEP || 0.1);
const AUTH = __ENV.API_TOKEN ? { Authorization: `Bearer ${__ENV.API_TOKEN}` } : {};

export const options = {
  stages: [
    { duration: '30s', target: 50 },
    { duration: '1m', target: 50 },
    { duration: '30s', target: 100 },
    { duration: '1m', target: 100 },
    { duration: '30s', target: 0 },
  ],
  thresholds: {
    http_req_duration: ['p(95)<100'],
    http_req_failed: ['rate<0.01'],
  },
};

export function setup() {
  const res = http.post(`${BASE_URL}/start`, null, { headers: AUTH });
  check(res, { 'start accepted': (r) => r.status === 200 });
}

export default function () {
  const res = http.get(`${BASE_URL}/status`);
  check(res, { 'status is 200': (r) => r.status === 200 });
  if (__ITER % 10 === 0) {
    const m = http.get(`${BASE_URL}/metrics`);
    check(m, {
      'metrics is 200': (r) => r.status === 200,
      'metrics is Prometheus text': (r) => r.body && r.body.includes('# TYPE'),
    });
  }
  sleep(SLEEP);
}

export function teardown() {
  const res = http.post(`${BASE_URL}/stop`, null, { headers: AUTH });
  check(res, { 'stop accepted': (r) => r.status === 200 });
}
