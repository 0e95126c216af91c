#!/usr/bin/env bash
# Physical limits of the disk holding directory $1 (default: the current directory).
# Prints exactly two lines:
#   disk_seq_write_mb_s=N     sequential write, 1 MiB blocks, O_DIRECT (falls back to buffered
#                             where the file system refuses O_DIRECT, e.g. tmpfs), then fdatasync;
#                             MB = 10^6 bytes
#   disk_fdatasync_per_s=N    64 KiB writes appended to a file, each made durable before the
#                             next (O_DSYNC: write + fdatasync), for 5 s
# Bounded to about 15 s (each dd is cut by SIGINT: 8 s and 5 s; the buffered fallback runs only
# where O_DIRECT fails at once). Needs bash, GNU coreutils (dd, timeout, mktemp), awk.
# Cleans up its files, also when interrupted. Exit 1 if a measurement failed.
set -u
dir="${1:-.}"
[ -d "$dir" ] && [ -w "$dir" ] || { echo "disk-limits.sh: $dir is not a writable directory" >&2; exit 1; }
tmp="$(mktemp -d "$dir/.disk-limits.XXXXXX")" || exit 1
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

# dd's statistics line: "N bytes (...) copied, S s, ..." -> "N S"
dd_stats() { awk '/bytes/ && /copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^copied/) { s = $(i + 1) } print $1, s }' | tail -n 1; }

# A run cut by the timeout still prints its statistics (dd reports on SIGINT); only a file system
# that refuses O_DIRECT outright (no statistics at all) gets the buffered run instead.
seq_out="$(timeout -s INT 8 dd if=/dev/zero of="$tmp/seq" bs=1M count=1024 oflag=direct conv=fdatasync 2>&1 | dd_stats)"
rm -f "$tmp/seq"
if [ "${seq_out%% *}" = "" ] || [ "${seq_out%% *}" = 0 ]; then
    seq_out="$(timeout -s INT 8 dd if=/dev/zero of="$tmp/seq" bs=1M count=1024 conv=fdatasync 2>&1 | dd_stats)"
    rm -f "$tmp/seq"
fi
sync_out="$(timeout -s INT 5 dd if=/dev/zero of="$tmp/sync" bs=64k count=1000000 oflag=dsync 2>&1 | dd_stats)"
rm -f "$tmp/sync"

read -r seq_bytes seq_secs <<<"${seq_out:-0 0}"
read -r sync_bytes sync_secs <<<"${sync_out:-0 0}"
awk -v b="$seq_bytes" -v s="$seq_secs" -v sb="$sync_bytes" -v ss="$sync_secs" 'BEGIN {
    ok = 1
    if (s > 0 && b > 0) printf "disk_seq_write_mb_s=%d\n", b / 1e6 / s; else { print "disk_seq_write_mb_s=0"; ok = 0 }
    if (ss > 0 && sb > 0) printf "disk_fdatasync_per_s=%d\n", sb / 65536 / ss; else { print "disk_fdatasync_per_s=0"; ok = 0 }
    exit ok ? 0 : 1
}'
