#!/usr/bin/env bash
# A fleet on one machine: GATEWAYS gateways (20) on loopback publish to one Mosquitto for
# DURATION seconds (60); the broker is stopped for OUTAGE seconds (10) in the middle with
# BROKER_SIGNAL (TERM; KILL for a crash, with autosave every second). A mosquitto_sub with a
# persistent session (QoS 1, -c) is subscribed through it all. At the end each gateway's devices
# stop, its spool drains, and the script reports per gateway: samples spooled (GET /uplink),
# distinct sequence numbers received, missing, duplicates, reconnects.
# Environment: GATEWAYS, DURATION, OUTAGE, BROKER_SIGNAL, INTERVAL_MS (10: each gateway's device
# sends 100 samples/s), OUT (a new directory under /tmp). Needs: cargo, mosquitto,
# mosquitto-clients, curl, python3. Loopback only; every process is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
GATEWAYS="${GATEWAYS:-20}"
DURATION="${DURATION:-60}"
OUTAGE="${OUTAGE:-10}"
BROKER_SIGNAL="${BROKER_SIGNAL:-TERM}"
INTERVAL_MS="${INTERVAL_MS:-10}"
OUT="${OUT:-$(mktemp -d /tmp/fleet.XXXXXX)}"
mkdir -p "$OUT"
for tool in mosquitto mosquitto_sub curl python3; do
    command -v "$tool" >/dev/null || { echo "fleet.sh: $tool is required" >&2; exit 1; }
done
cargo build --release --locked --quiet
bin="$PWD/target/release/telemetryhub"
log() { echo "fleet.sh: $*" >&2; }

pids=()
cleanup() { for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
broker_port="$(free_port)"
cat >"$OUT/mosquitto.conf" <<CONF
listener $broker_port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $OUT/
autosave_interval 1
max_inflight_messages 0
max_queued_messages 0
log_dest file $OUT/mosquitto.log
user root
CONF
start_broker() {
    mosquitto -c "$OUT/mosquitto.conf" & broker=$!
    pids+=("$broker")
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$broker_port") 2>/dev/null && return 0
        sleep 0.05
    done
    log "the broker did not start"; exit 1
}
start_broker
mosquitto_sub -h 127.0.0.1 -p "$broker_port" -t 'telemetryhub/#' -q 1 -c -i fleet-subscriber -v \
    >"$OUT/received.txt" 2>"$OUT/sub.err" &
sub=$!; pids+=("$sub")
sleep 1

ports=()
gw_pids=()
for i in $(seq "$GATEWAYS"); do
    port="$(free_port)"
    ports+=("$port")
    cat >"$OUT/gw$i.toml" <<CONF
[http]
listen = "127.0.0.1:$port"
[log]
level = "warn"
[uplink]
url = "mqtt://127.0.0.1:$broker_port"
gateway_id = "gw$i"
reconnect_initial_ms = 200
reconnect_max_ms = 2000
[spool]
path = "$OUT/spool$i"
[[devices]]
id = "sim0"
sample_interval_ms = $INTERVAL_MS
CONF
    "$bin" --config "$OUT/gw$i.toml" --stats-file "$OUT/gw$i.stats.json" 2>"$OUT/gw$i.log" &
    pids+=("$!"); gw_pids+=("$!")
done
log "$GATEWAYS gateways on broker port $broker_port; running ${DURATION}s with a ${OUTAGE}s outage"
half=$(( (DURATION - OUTAGE) / 2 ))
sleep "$half"
log "stopping the broker (SIG$BROKER_SIGNAL) at ${half}s"
kill "-$BROKER_SIGNAL" "$broker"; wait "$broker" 2>/dev/null || true
sleep "$OUTAGE"
start_broker
log "broker back"
sleep $(( DURATION - OUTAGE - half ))

for port in "${ports[@]}"; do curl -s -o /dev/null -X POST "http://127.0.0.1:$port/stop"; done
log "devices stopped; waiting for every spool to drain"
deadline=$(( $(date +%s) + 120 ))
for i in $(seq "$GATEWAYS"); do
    port="${ports[$((i - 1))]}"
    until curl -s "http://127.0.0.1:$port/uplink" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["pending_samples"] == 0 else 1)'; do
        [ "$(date +%s)" -lt "$deadline" ] || { log "gw$i did not drain"; break; }
        sleep 0.2
    done
    curl -s "http://127.0.0.1:$port/uplink" >"$OUT/gw$i.uplink.json"
done
sleep 2
kill "$sub" 2>/dev/null || true
for pid in "${gw_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
sleep 2

python3 - "$OUT" "$GATEWAYS" <<'PY'
import json, sys, collections
out, n = sys.argv[1], int(sys.argv[2])
seqs = collections.defaultdict(list)
for line in open(f"{out}/received.txt", errors="replace"):
    topic, _, payload = line.partition(" ")
    gw = topic.split("/")[1] if topic.count("/") >= 2 else "?"
    try:
        doc = json.loads(payload)
    except ValueError:
        continue
    seqs[gw].extend(s["seq"] for s in doc["samples"])
total_spooled = total_received = total_missing = total_dups = 0
complete = 0
print(f"{'gateway':<8} {'spooled':>8} {'received':>9} {'missing':>8} {'dups':>6} {'reconnects':>10}  completeness")
for i in range(1, n + 1):
    up = json.load(open(f"{out}/gw{i}.uplink.json"))
    got = seqs.get(f"gw{i}", [])
    distinct = len(set(got))
    spooled = up["spooled"]
    missing = max(spooled - distinct, 0)
    dups = len(got) - distinct
    total_spooled += spooled; total_received += distinct; total_missing += missing; total_dups += dups
    complete += missing == 0
    print(f"gw{i:<6} {spooled:>8} {distinct:>9} {missing:>8} {dups:>6} {up['reconnects']:>10}  {distinct / max(spooled, 1):.4%}")
print(f"fleet: {n} gateways, {total_spooled} samples spooled, {total_received} received, "
      f"{total_missing} missing, {total_dups} duplicates; {complete}/{n} gateways complete")
PY
