#!/usr/bin/env bash
# The project's one test command (README, and CI through .ci/run): installs any tool the tests
# need that is missing, then runs every test. A missing tool is installed or the run fails;
# no test is skipped for want of one.
set -euo pipefail
cd "$(dirname "$0")/.."

need_cmd() { command -v "$1" >/dev/null 2>&1; }

# Debian packages the tests drive: socat makes the pty pairs of the serial-device tests;
# mosquitto is the real MQTT broker the uplink tests start on a free loopback port
# (mosquitto_passwd, from the same package, makes their password file).
missing=()
need_cmd socat || missing+=(socat)
need_cmd mosquitto || missing+=(mosquitto)
need_cmd mosquitto_sub || missing+=(mosquitto-clients)
# openssl makes the private CA and broker certificate of the mqtts:// test.
need_cmd openssl || missing+=(openssl)
# systemd-analyze verifies the packaged unit file; it checks the unit's man: page with man.
need_cmd systemd-analyze || missing+=(systemd)
need_cmd man || missing+=(man-db)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# Python tools the OpenAPI test runs against a live gateway (tests/api/openapi.rs), pinned:
# openapi-spec-validator checks the document, Schemathesis fuzzes every route with it.
SCHEMATHESIS_VERSION=4.32.5
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0
python_tools=()
schemathesis --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION" ||
  python_tools+=("schemathesis==$SCHEMATHESIS_VERSION")
python3 -m pip show openapi-spec-validator 2>/dev/null | grep -q "^Version: $OPENAPI_SPEC_VALIDATOR_VERSION" ||
  python_tools+=("openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION")
if [ ${#python_tools[@]} -gt 0 ]; then
  echo "test.sh: installing ${python_tools[*]}" >&2
  python3 -m pip install --quiet "${python_tools[@]}"
fi

# pymodbus (PyPI, pinned): the Modbus server of the cross-implementation test
# (tests/modbus/pymodbus_server.py, started by tests/api/modbus_pymodbus.rs).
PYMODBUS_VERSION=3.11.4
if ! python3 -c 'import pymodbus' >/dev/null 2>&1; then
  echo "test.sh: installing pymodbus==$PYMODBUS_VERSION" >&2
  need_cmd python3 || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip; }
  python3 -m pip install -q "pymodbus==$PYMODBUS_VERSION" \
    || python3 -m pip install -q --break-system-packages "pymodbus==$PYMODBUS_VERSION"
  python3 -c 'import pymodbus'
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test.sh: installing cargo-nextest" >&2
  cargo install cargo-nextest --locked
fi

# Unit and integration tests; nextest runs each test in its own process.
cargo nextest run --all-targets --no-fail-fast
# Doc tests (nextest does not run them).
cargo test --doc --quiet
