-- wrk script for POST /samples (docs/PERFORMANCE.md): every request posts the same fixed body,
-- a JSON array of 1,000 samples (about 61 KB), and the run ends with one JSON line counting
-- 202 (accepted), 429 (backpressure) and any other status, and accepted samples per second.
--
--   wrk -t2 -c16 -d30s --latency -s k6/ingest.lua http://127.0.0.1:18080/samples
--
-- DEVICE (environment) must be a configured device id; default sim0.

local device = os.getenv("DEVICE") or "sim0"
local batch = 1000

local items = {}
for i = 0, batch - 1 do
  items[#items + 1] = string.format(
    '{"device":"%s","value":%.6f,"unit":"degC","seq":%d}',
    device, 100 + (i % 100) * 0.123457, i)
end
local body = "[" .. table.concat(items, ",") .. "]"

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  accepted, refused, other = 0, 0, 0
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
  elseif status == 429 then
    refused = refused + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local a, r, o = 0, 0, 0
  for _, thread in ipairs(threads) do
    a = a + thread:get("accepted")
    r = r + thread:get("refused")
    o = o + thread:get("other")
  end
  local seconds = summary.duration / 1e6
  io.write(string.format(
    'INGEST {"body_bytes":%d,"batch":%d,"requests":%d,"accepted":%d,"refused_429":%d,' ..
    '"other_status":%d,"socket_errors":%d,"seconds":%.3f,"accepted_samples_per_sec":%.0f,' ..
    '"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f}\n',
    #body, batch, summary.requests, a, r, o,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    seconds, a * batch / seconds,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
