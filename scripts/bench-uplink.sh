#!/usr/bin/env bash
# The uplink's numbers behind docs/PERFORMANCE.md (the spool and the forwarder to a real local
# Mosquitto, every sequence number checked at a subscriber), side by side in one run:
#   1. the disk's own limits (scripts/disk-limits.sh: sequential MB/s, 64 KiB fdatasync/s);
#   2. RUNS rounds, alternating: the pipeline without the uplink, with it (fsync every 100 ms),
#      and with fsync = "always" (each `telemetryhub bench --samples SAMPLES`, unpaced);
#   3. RUNS rounds of a replay: REPLAY_SAMPLES spooled with the forwarder held back, then drained;
#   4. once: an outage of OUTAGE_SECONDS at 100,000 samples/s (replay mode paced), reporting the
#      resident memory's high-water mark while the backlog grew.
# Prints the medians, the ratios to the pipeline without the uplink and to the disk's limits.
# Environment: RUNS (3), SAMPLES (3000000), REPLAY_SAMPLES (10000000), OUTAGE_SECONDS (60),
# OUT (a new directory under /tmp). Needs: cargo, mosquitto, python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
SAMPLES="${SAMPLES:-3000000}"
REPLAY_SAMPLES="${REPLAY_SAMPLES:-10000000}"
OUTAGE_SECONDS="${OUTAGE_SECONDS:-60}"
OUT="${OUT:-$(mktemp -d /tmp/bench-uplink.XXXXXX)}"
mkdir -p "$OUT"
command -v mosquitto >/dev/null || { echo "bench-uplink.sh: mosquitto is required (apt-get install mosquitto)" >&2; exit 1; }
cargo build --release --locked --quiet
bin=target/release/telemetryhub
spool_dir="$(mktemp -d "$PWD/target/bench-spool.XXXXXX")"
trap 'rm -rf "$spool_dir"' EXIT

echo "bench-uplink: disk limits of $(df --output=source "$spool_dir" | tail -1)" >&2
# A measurement cut short reads 0: try again once, and carry on either way.
scripts/disk-limits.sh "$spool_dir" >"$OUT/disk.txt" || scripts/disk-limits.sh "$spool_dir" >"$OUT/disk.txt" || true
cat "$OUT/disk.txt" >&2

run() { # label, args...
    local label="$1"; shift
    timeout 600 "$bin" bench --samples "$SAMPLES" "$@" --spool-dir "$spool_dir/s" 2>>"$OUT/stderr.log" \
        | sed "s/^/$label /" | tee -a "$OUT/runs.txt" >&2
}
for round in $(seq "$RUNS"); do
    echo "bench-uplink: round $round (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    run off
    run fsync100 --uplink live --fsync 100
    run always --uplink live --fsync always
    timeout 900 "$bin" bench --samples "$REPLAY_SAMPLES" --uplink replay --fsync 100 --spool-dir "$spool_dir/r" \
        2>>"$OUT/stderr.log" | sed "s/^/replay /" | tee -a "$OUT/runs.txt" >&2
done
rate=100000
timeout 900 "$bin" bench --samples $((rate * OUTAGE_SECONDS)) --rate "$rate" --uplink replay --fsync 100 \
    --spool-dir "$spool_dir/o" 2>>"$OUT/stderr.log" | sed "s/^/outage /" | tee -a "$OUT/runs.txt" >&2

python3 - "$OUT/runs.txt" "$OUT/disk.txt" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, doc = line.split(" ", 1)
    runs.setdefault(label, []).append(json.loads(doc))
disk = dict(l.strip().split("=") for l in open(sys.argv[2]) if "=" in l)
med = lambda xs: statistics.median(xs)
off = med([r["samples_per_sec"] for r in runs["off"]])
print(f"disk: {disk.get('disk_seq_write_mb_s', '?')} MB/s sequential, {disk.get('disk_fdatasync_per_s', '?')} fdatasync/s (64 KiB)")
print(f"pipeline without uplink: {off:,.0f} samples/s (median of {len(runs['off'])})")
bytes_per_sample = med([r["uplink"]["backlog_bytes"] / r["uplink"]["spooled"] for r in runs["replay"]])
for label in ("fsync100", "always"):
    rs = runs[label]
    rate = med([r["samples_per_sec"] for r in rs])
    missing = sum(r["uplink"]["missing"] for r in rs)
    dups = sum(r["uplink"]["duplicates"] for r in rs)
    mbs = rate * bytes_per_sample / 1e6
    print(f"uplink live, fsync {rs[0]['uplink']['fsync']}: {rate:,.0f} samples/s end to end "
          f"({rate / off:.0%} of the pipeline without it); {mbs:.0f} MB/s to the spool "
          f"({mbs / max(float(disk.get('disk_seq_write_mb_s', 0)), 1):.1%} of the disk's sequential rate); "
          f"missing {missing}, duplicates {dups}")
rs = runs["replay"]
fill = med([r["samples_per_sec"] for r in rs])
print(f"pipeline with the spool (fsync 100, forwarder held: the replay's fill): {fill:,.0f} samples/s, "
      f"{fill / off:.0%} of the pipeline without it")
rate = med([r["uplink"]["replay_samples_per_sec"] for r in rs])
print(f"replay of {rs[0]['uplink']['spooled']:,} samples ({rs[0]['uplink']['backlog_bytes'] / 1e6:,.0f} MB): "
      f"{rate:,.0f} samples/s, {rate * bytes_per_sample / 1e6:,.0f} MB/s; missing "
      f"{sum(r['uplink']['missing'] for r in rs)}, duplicates {sum(r['uplink']['duplicates'] for r in rs)}")
o = runs["outage"][0]
print(f"outage of {o['samples'] / 100000:.0f} s at 100,000 samples/s: resident memory high-water "
      f"{o['uplink']['outage_max_rss_mib']:.1f} MiB, backlog {o['uplink']['backlog_bytes'] / 1e6:,.0f} MB; "
      f"then drained at {o['uplink']['replay_samples_per_sec']:,.0f} samples/s, missing {o['uplink']['missing']}")
PY
