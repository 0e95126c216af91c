#!/usr/bin/env bash
# Bounded soak test of the release binary, on 127.0.0.1 only.
#
# For SOAK_SECONDS (default 60) it runs the gateway with three faulty simulators (corrupted
# and lost bytes, stalls longer than the read timeout, disconnects; one unpaced, one paced,
# one that keeps tripping its circuit breaker) while
#   - wrk drives GET load over the read routes,
#   - wrk drives POST /samples ingest beyond what the buffer takes (429 backpressure),
#   - a Python client churns device control (stop/start, reset after a tripped breaker), sends
#     bad requests that must get their 4xx, and holds slow-header connections that the
#     header-read timeout must close.
# Then it asserts: the process still answers; no panic in its log; resident memory at the end
# within 10 % of the value after warm-up; every client saw only the answers it may get; and on
# SIGTERM it exits 0 with a stats file whose accounting is exact (read + ingested = processed
# + rejected + dropped by reason, nothing left in the buffer or in flight).
#
# Every load generator is bounded in time and connections. Exit status 0 means every check
# passed. Environment: SOAK_SECONDS, SOAK_KEEP=1 keeps the work directory, CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

SOAK_SECONDS="${SOAK_SECONDS:-60}"
if ! [[ "$SOAK_SECONDS" =~ ^[0-9]+$ ]] || [ "$SOAK_SECONDS" -lt 10 ]; then
  echo "soak.sh: SOAK_SECONDS must be a whole number of seconds, at least 10" >&2
  exit 2
fi
GRACE_MS=3000
INGEST_BATCH=1000
INGEST_CONNECTIONS=4
GET_CONNECTIONS=16

say() { echo "soak.sh: $*" >&2; }
fail() {
  say "FAILED: $*"
  exit 1
}

# Tools: wrk from Debian; Python 3 (standard library only) is on every machine of this kind.
if ! command -v wrk >/dev/null 2>&1; then
  say "installing wrk"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
fi
command -v python3 >/dev/null 2>&1 || fail "python3 is needed"

say "building the release binary"
cargo build --release --locked --bin telemetryhub
BIN="${CARGO_TARGET_DIR:-target}/release/telemetryhub"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/telemetryhub-soak.XXXXXX")"
GATEWAY_PID=""
SAMPLER_PID=""
cleanup() {
  for pid in $SAMPLER_PID $GATEWAY_PID; do
    kill "$pid" 2>/dev/null || true
  done
  if [ "${SOAK_KEEP:-0}" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"

cat >"$WORK/soak.toml" <<EOF
[http]
max_concurrent_requests = 64
request_timeout_ms = 5000
header_read_timeout_ms = 2000

[buffer]
capacity = 4000
overflow = "drop_oldest"
high_watermark = 0.5

[pipeline]
batch_max = 512
workers = 2
history = 1000
shutdown_grace_ms = $GRACE_MS

# Unpaced, with every fault: a throughput source that keeps failing and reconnecting.
[[devices]]
id = "fast0"
sample_interval_ms = 0
read_timeout_ms = 1000
failure_threshold = 1000
backoff_initial_ms = 10
backoff_max_ms = 200
[devices.simulator]
seed = 1
corrupt_rate = 0.02
drop_rate = 0.01
stall_rate = 0.00001
stall_ms = 1200
disconnect_rate = 0.0001

# Paced, faults at a high rate: stalls beyond the read timeout trip its breaker now and then.
[[devices]]
id = "paced1"
sample_interval_ms = 2
read_timeout_ms = 500
failure_threshold = 5
backoff_initial_ms = 20
backoff_max_ms = 500
[devices.simulator]
seed = 2
corrupt_rate = 0.2
drop_rate = 0.1
stall_rate = 0.01
stall_ms = 600
disconnect_rate = 0.01

# Drops the link on every other frame: its breaker trips to SafeState again and again, and
# the soak's control client resets and restarts it each time.
[[devices]]
id = "flaky2"
sample_interval_ms = 5
read_timeout_ms = 500
failure_threshold = 3
backoff_initial_ms = 10
backoff_max_ms = 50
[devices.simulator]
seed = 3
disconnect_rate = 0.5
EOF

say "starting the gateway on 127.0.0.1:$PORT for ${SOAK_SECONDS}s of load"
env -u RUST_LOG "$BIN" --config "$WORK/soak.toml" --listen "127.0.0.1:$PORT" \
  --stats-file "$WORK/stats.json" >/dev/null 2>"$WORK/gateway.log" &
GATEWAY_PID=$!

http_code() { # METHOD PATH -> status code, or 000
  python3 - "$1" "$BASE$2" <<'PY'
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[2], method=sys.argv[1])
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
}

for _ in $(seq 1 100); do
  [ "$(http_code GET /healthz)" = 200 ] && break
  kill -0 "$GATEWAY_PID" 2>/dev/null || fail "the gateway exited at start: $(tail -n 20 "$WORK/gateway.log")"
  sleep 0.1
done
[ "$(http_code GET /healthz)" = 200 ] || fail "the gateway did not answer /healthz"

# Resident memory and threads, once a second: "elapsed_s rss_kb threads".
(
  start=$SECONDS
  while kill -0 "$GATEWAY_PID" 2>/dev/null; do
    sample=$(awk '/^VmRSS:/ {r=$2} /^Threads:/ {t=$2} END {if (r) print r, t}' \
      "/proc/$GATEWAY_PID/status" 2>/dev/null || true)
    [ -n "$sample" ] && echo "$((SECONDS - start)) $sample" >>"$WORK/rss.txt"
    sleep 1
  done
) &
SAMPLER_PID=$!

cat >"$WORK/get.lua" <<'EOF'
local paths = {"/status", "/metrics", "/samples?limit=100", "/devices", "/devices/fast0",
               "/devices/paced1"}
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
EOF
python3 - "$INGEST_BATCH" >"$WORK/ingest.lua" <<'PY'
import json, sys
n = int(sys.argv[1])
body = json.dumps([{"device": "fast0", "value": float(i % 50), "unit": "V"} for i in range(n)])
print("wrk.method = \"POST\"")
print("wrk.path = \"/samples\"")
print("wrk.headers[\"Content-Type\"] = \"application/json\"")
print("wrk.body = " + json.dumps(body))
print("""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) accepted = 0; backpressure = 0; other = 0 end
function response(status, headers, body)
  if status == 202 then accepted = accepted + 1
  elseif status == 429 then backpressure = backpressure + 1
  else other = other + 1 end
end
function done(summary, latency, requests)
  local a, b, o = 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("accepted"); b = b + t:get("backpressure"); o = o + t:get("other")
  end
  io.write(string.format("INGEST accepted=%d backpressure=%d other=%d\\n", a, b, o))
end
""")
PY

wrk -t1 -c"$GET_CONNECTIONS" -d"${SOAK_SECONDS}s" --timeout 5s -s "$WORK/get.lua" "$BASE" \
  >"$WORK/wrk-get.txt" 2>&1 &
WRK_GET=$!
wrk -t1 -c"$INGEST_CONNECTIONS" -d"${SOAK_SECONDS}s" --timeout 5s -s "$WORK/ingest.lua" "$BASE" \
  >"$WORK/wrk-ingest.txt" 2>&1 &
WRK_INGEST=$!

# Control churn, bad requests and slow clients, for the same time.
python3 - "$PORT" "$SOAK_SECONDS" >"$WORK/client.json" 2>"$WORK/client.log" <<'PY' &
import http.client, json, socket, sys, time

port, seconds = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + seconds
counts = {"control": 0, "bad_requests": 0, "unexpected": [], "resets": 0,
          "slow_opened": 0, "slow_closed": 0, "slow_not_closed": 0}

def request(method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, r.getheader("Content-Type", ""), data
    finally:
        conn.close()

JSON = {"Content-Type": "application/json"}
BAD = [
    ("POST", "/samples", b'[{"device":', JSON, 400),
    ("POST", "/samples", b'[{"device":"nope","value":1,"unit":"V"}]', JSON, 400),
    ("POST", "/samples", b'[{"device":"fast0","value":1e999,"unit":"V"}]', JSON, 400),
    ("POST", "/samples", b"\xff\xfe", JSON, 400),
    ("POST", "/samples", b"[]", {"Content-Type": "text/plain"}, 415),
    ("GET", "/samples?limit=-1", None, {}, 400),
    ("GET", "/devices/..%2F..%2Fetc", None, {}, 404),
    ("POST", "/devices/nope/start", None, {}, 404),
    ("DELETE", "/devices/fast0", None, {}, 405),
]

slow = []  # (socket, opened_at)
def open_slow():
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /status HTTP/1.1\r\nHost: soak\r\nX-Slow: ")
    s.setblocking(False)
    slow.append((s, time.monotonic()))
    counts["slow_opened"] += 1

def reap_slow(final=False):
    for item in list(slow):
        s, opened = item
        try:
            data = s.recv(1024)
            closed = data == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        if closed:
            counts["slow_closed"] += 1
            slow.remove(item); s.close()
        elif time.monotonic() - opened > 6 or final:
            # header_read_timeout_ms is 2000: a slow client must be gone well before 6 s.
            counts["slow_not_closed"] += 1
            slow.remove(item); s.close()

i = 0
while time.monotonic() < deadline - 1:
    i += 1
    method, path, body, headers, want = BAD[i % len(BAD)]
    status, ctype, data = request(method, path, body, headers)
    counts["bad_requests"] += 1
    # Under backpressure POST /samples answers 429 before it parses the body.
    allowed = (want, 429) if path == "/samples" else (want,)
    if status not in allowed or not ctype.startswith("application/json") or b'"error"' not in data:
        counts["unexpected"].append(f"{method} {path}: {status} {ctype} {data[:80]!r}")
    if i % 10 == 0:
        for path in ("/devices/paced1/stop", "/devices/paced1/start"):
            status, _, data = request("POST", path)
            counts["control"] += 1
            if status not in (200, 409):
                counts["unexpected"].append(f"POST {path}: {status} {data[:80]!r}")
        for device in ("paced1", "flaky2"):
            status, _, data = request("GET", f"/devices/{device}")
            if status != 200:
                counts["unexpected"].append(f"GET /devices/{device}: {status} {data[:80]!r}")
            elif json.loads(data)["state"] == "SafeState":
                # The breaker tripped: reset, then start; both must work.
                counts["resets"] += 1
                for fix in (f"/devices/{device}/reset", f"/devices/{device}/start"):
                    status, _, data = request("POST", fix)
                    if status != 200:
                        counts["unexpected"].append(f"POST {fix}: {status} {data[:80]!r}")
    if len(slow) < 20:
        open_slow()
    reap_slow()
    time.sleep(0.05)
time.sleep(2.5)
reap_slow(final=True)
counts["unexpected_count"] = len(counts["unexpected"])
counts["unexpected"] = counts["unexpected"][:20]
print(json.dumps(counts))
PY
CLIENT=$!

# Wait for the load, checking the gateway stays up.
load_failed=""
for pid in $WRK_GET $WRK_INGEST $CLIENT; do
  wait "$pid" || load_failed="$load_failed $pid"
done
kill -0 "$GATEWAY_PID" 2>/dev/null || fail "the gateway died under load: $(tail -n 30 "$WORK/gateway.log")"
[ -z "$load_failed" ] || fail "a load generator failed (pids$load_failed); see $WORK"

# Still answering after the load.
health=$(http_code GET /healthz)
status=$(http_code GET /status)
[ "$health" = 200 ] && [ "$status" = 200 ] || fail "not answering after the load: /healthz $health, /status $status"
sleep 1

say "sending SIGTERM"
term_at=$(date +%s%N)
kill -TERM "$GATEWAY_PID"
exit_code=0
waited=0
while kill -0 "$GATEWAY_PID" 2>/dev/null; do
  sleep 0.05
  waited=$((waited + 1))
  [ "$waited" -lt $(((GRACE_MS / 1000 + 15) * 20)) ] || fail "no exit within the grace period + 15 s"
done
wait "$GATEWAY_PID" || exit_code=$?
exit_ms=$((($(date +%s%N) - term_at) / 1000000))
GATEWAY_PID=""
kill "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=""

# Every check, in Python for exact integer arithmetic; prints the report.
python3 - "$WORK" "$SOAK_SECONDS" "$exit_code" "$exit_ms" "$INGEST_BATCH" "$INGEST_CONNECTIONS" <<'PY'
import json, re, sys

work, seconds, exit_code, exit_ms, batch, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
failures = []
def check(ok, what):
    if not ok:
        failures.append(what)

log = open(f"{work}/gateway.log", errors="replace").read()
check(exit_code == 0, f"exit code {exit_code}")
check("panicked" not in log, "a panic in the gateway log")
check("Shutdown complete." in log, "no 'Shutdown complete.' line")

stats = json.load(open(f"{work}/stats.json"))
accepted = stats["read"] + stats["ingested"]
settled = (stats["processed"] + sum(stats["rejected"].values()) + sum(stats["dropped"].values())
           + stats["in_buffer"] + stats["in_flight"])
check(accepted == settled, f"accounting: read+ingested {accepted} != settled {settled}")
check(stats["balanced"] is True, "balanced is not true")
check(stats["in_buffer"] == 0 and stats["in_flight"] == 0, "samples left in the buffer or in flight")

rss = [tuple(map(int, l.split()[:2])) for l in open(f"{work}/rss.txt") if l.strip()]
threads = max(int(l.split()[2]) for l in open(f"{work}/rss.txt") if len(l.split()) > 2)
# Warm-up: the buffer, the history and the metrics fill, and the allocator takes on the
# blocking pool's threads (idle ones retire after 10 s). At least 15 s, at most half the run.
warmup = min(max(15, seconds // 4), seconds // 2)
warm = [kb for t, kb in rss if t >= warmup]
check(len(warm) >= 3, f"too few memory samples: {rss}")
base, end, peak = (warm[0], warm[-1], max(warm)) if warm else (0, 0, 0)
growth = (end - base) / base if base else 0.0
check(end <= base * 1.10, f"resident memory grew {growth:+.1%} ({base} kB -> {end} kB)")

def wrk(path):
    text = open(path).read()
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", text) or [0, 0])[1])
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = sum(map(int, errors.groups())) if errors else 0
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)
    return requests, non2xx, errors, rate, text

get_n, get_non2xx, get_err, get_rate, _ = wrk(f"{work}/wrk-get.txt")
ing_n, _, ing_err, ing_rate, ing_text = wrk(f"{work}/wrk-ingest.txt")
m = re.search(r"INGEST accepted=(\d+) backpressure=(\d+) other=(\d+)", ing_text)
ing_ok, ing_429, ing_other = map(int, m.groups())
check(get_non2xx == 0, f"{get_non2xx} GET answers were not 2xx")
check(get_err == 0 and ing_err == 0, f"socket errors: GET {get_err}, ingest {ing_err}")
check(ing_other == 0, f"{ing_other} ingest answers were neither 202 nor 429")
check(ing_429 > 0, "ingest never met backpressure (429): no overload happened")
# wrk stops with up to one request per connection in flight: the server may have accepted
# those without wrk counting them.
lo, hi = ing_ok * batch, (ing_ok + conns) * batch
check(lo <= stats["ingested"] <= hi, f"ingested {stats['ingested']} not in [{lo}, {hi}]")

client = json.load(open(f"{work}/client.json"))
check(client["unexpected_count"] == 0, f"unexpected answers: {client['unexpected']}")
check(client["slow_not_closed"] == 0, f"{client['slow_not_closed']} slow clients were not cut off")
check(client["slow_closed"] > 0, "no slow client was cut off")
check(client["resets"] > 0, "no breaker tripped: the fault injection did not reach SafeState")

dropped = ", ".join(f"{k}={v}" for k, v in stats["dropped"].items())
print(f"soak: {seconds}s; exit {exit_code} after SIGTERM in {exit_ms} ms")
print(f"soak: RSS after {warmup}s warm-up {base} kB, end {end} kB ({growth:+.1%}), peak {peak} kB; at most {threads} threads")
print(f"soak: GET {get_n} requests ({get_rate}/s), non-2xx {get_non2xx}, socket errors {get_err}")
print(f"soak: ingest {ing_n} requests ({ing_rate}/s): 202 {ing_ok}, 429 {ing_429}, other {ing_other}, socket errors {ing_err}")
print(f"soak: client: {client['bad_requests']} bad requests, {client['control']} control, {client['resets']} breaker resets, slow clients cut off {client['slow_closed']}/{client['slow_opened']}")
print(f"soak: ledger read={stats['read']} ingested={stats['ingested']} processed={stats['processed']} rejected={sum(stats['rejected'].values())} dropped[{dropped}] -> {accepted} = {settled}")
if failures:
    for f in failures:
        print(f"soak: FAILED: {f}", file=sys.stderr)
    sys.exit(1)
print("soak: PASSED")
PY
