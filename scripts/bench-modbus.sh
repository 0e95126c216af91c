#!/usr/bin/env bash
# Modbus benchmarks (benches/modbus.rs): TCP block reads/s from one device, CPU of 100 devices
# at 10 Hz, RTU polls/s against the line rate at a paced 115 200 baud; medians of
# MODBUS_BENCH_RUNS runs (default 5). MODBUS_BENCH=tcp,fleet,rtu picks some.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench modbus
