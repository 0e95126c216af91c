// HTTP ingest: 16 virtual users posting batches of 1,000 samples (about 61 KB of JSON) to
// POST /samples back to back. 202 means accepted; 429 is the gateway's backpressure (its buffer
// is above the high watermark) and counts as an expected answer, not a failure.
// Thresholds: no failed request (anything but 202/429), p99 under 25 ms.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 k6/ingest.js
//
// DEVICE (a configured device id, default sim0), VUS (default 16) and DURATION (default 30s)
// may be overridden with -e. With API_TOKEN set, requests carry it as a bearer token.
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';

const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const DEVICE = __ENV.DEVICE || 'sim0';
const BATCH = 1000;

const samplesAccepted = new Counter('samples_accepted');
const requestsRefused = new Counter('requests_refused_429');

// Built once per VU, so the load generator measures the gateway, not string building.
const body = JSON.stringify(
  Array.from({ length: BATCH }, (_, i) => ({
    device: DEVICE,
    value: Number((100 + (i % 100) * 0.123457).toFixed(6)),
    unit: 'degC',
    seq: i,
  })),
);
const params = {
  headers: Object.assign(
    { 'Content-Type': 'application/json' },
    __ENV.API_TOKEN ? { Authorization: `Bearer ${__ENV.API_TOKEN}` } : {},
  ),
  responseCallback: http.expectedStatuses(202, 429),
};

export const options = {
  vus: Number(__ENV.VUS || 16),
  duration: __ENV.DURATION || '30s',
  thresholds: {
    http_req_failed: ['rate==0'],
    'http_req_duration{expected_response:true}': ['p(99)<25'],
  },
};

export default function () {
  const res = http.post(`${BASE_URL}/samples`, body, params);
  check(res, { '202 or 429': (r) => r.status === 202 || r.status === 429 });
  if (res.status === 202) {
    samplesAccepted.add(BATCH);
  } else if (res.status === 429) {
    requestsRefused.add(1);
  }
}
