// The seed's load test: 100 virtual users calling GET /status back to back.
// Threshold: not one failed request.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 k6/status.js
//
// DURATION (default 30s) and VUS (default 100) may be overridden with -e.
import http from 'k6/http';
import { check } from 'k6';

const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8080';

export const options = {
  vus: Number(__ENV.VUS || 100),
  duration: __ENV.DURATION || '30s',
  thresholds: {
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
  },
};

export default function () {
  const res = http.get(`${BASE_URL}/status`);
  check(res, {
    'status is 200': (r) => r.status === 200,
    'body has metrics': (r) => r.body && r.body.includes('"metrics"'),
  });
}
