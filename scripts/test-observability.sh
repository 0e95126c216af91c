#!/usr/bin/env bash
# Observability and packaging checks, for real, on a machine without Docker (CI's). The gateway
# run on this machine has an uplink to a Mosquitto started here on a free loopback port, so
# its uplink and spool metrics are live too.
#   1. metrics-lint       `promtool check metrics` on a live /metrics finds nothing
#   2. uplink             that gateway's samples reach the broker: a mosquitto_sub on
#                         telemetryhub/# gets JSON messages with samples; /uplink says connected
#   3. prometheus-config  `promtool check config config/prometheus.yml` passes
#   4. compose-schema     docker-compose.yml validates against the compose specification
#   5. prometheus-scrape  a real Prometheus scrapes a running gateway: up == 1 and
#                         telemetryhub_samples_processed_total grows
#   6. dashboard-queries  every PromQL expression in the Grafana dashboard returns data there
#                         (the Uplink row's included)
#   7. live-page          GET / in headless Chromium: device state, updating charts, Start works,
#                         the uplink shown connected with its backlog (screenshot in the
#                         artifacts directory)
#   8. gateway-sigterm    the gateway drains on SIGTERM, exits 0, logs "Shutdown complete."
#   9. base-images        scripts/container-images.sh makes the base images locally (Debian,
#                         Rust, Prometheus and Mosquitto stand-ins)
#  10. container          the unchanged Dockerfile builds; the container runs as non-root, its
#                         HEALTHCHECK turns healthy, /status answers on the published port, the
#                         spool directory belongs to the gateway's user, and `podman stop`
#                         (SIGTERM to PID 1) ends it cleanly with the summary logged
#  11. compose            the unchanged docker-compose.yml comes up (telemetryhub + mosquitto +
#                         prometheus; Grafana has no image here); Prometheus, in its container,
#                         scrapes the gateway by service name (up == 1 through Prometheus's
#                         published port); a mosquitto_sub inside the mosquitto container gets the
#                         gateway's samples on telemetryhub/#, and the spool is on its volume
# Installs what it needs (apt-get, pip, npm). A check that cannot be done fails; none is skipped.
# Containers, processes and temporary files are removed on exit, failure included. Everything
# binds and targets 127.0.0.1 (and podman's own container network).
#
# Env: OBS_ARTIFACTS (default target/observability/artifacts); UPDATE_DOCS_SCREENSHOT=1 also
# writes docs/screenshot-live.png; TELEMETRYHUB_BIN uses that gateway binary for the checks on
# this machine instead of a release build.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
REPO=$PWD
STARTED=$SECONDS

STATE=$REPO/target/observability
ART=${OBS_ARTIFACTS:-$STATE/artifacts}
mkdir -p "$STATE" "$ART"
RUN=$(mktemp -d "$STATE/run.XXXXXX")
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$STATE/containers.conf}
export NO_PROXY=127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY} no_proxy=127.0.0.1,localhost${no_proxy:+,$no_proxy}

CONTAINER=telemetryhub-obs-$$
PROJECT=telemetryhubobs$$
IMAGE=telemetryhub:latest
GATEWAY_PID=
PROM_PID=
BROKER_PID=
COMPOSE_UP=
# The gateway id of the gateway run here, in its uplink topics.
GATEWAY_ID=observability
# podman without systemd complains about healthcheck timers on every run; keep that out of sight.
PODMAN_LOG=$ART/podman.log
: >"$PODMAN_LOG"

log() { printf '\n== %s\n' "$*"; }
die() { echo "test-observability: $*" >&2; exit 1; }

compose() {
  podman-compose -p "$PROJECT" -f "$REPO/docker-compose.yml" "$@"
}

cleanup() {
  local rc=$?
  set +e
  [ -n "$GATEWAY_PID" ] && kill "$GATEWAY_PID" 2>/dev/null
  [ -n "$PROM_PID" ] && kill "$PROM_PID" 2>/dev/null && wait "$PROM_PID" 2>/dev/null
  [ -n "$BROKER_PID" ] && kill "$BROKER_PID" 2>/dev/null && wait "$BROKER_PID" 2>/dev/null
  if command -v podman >/dev/null 2>&1; then
    podman rm -f -v -t 0 "$CONTAINER" >/dev/null 2>&1
    if [ -n "$COMPOSE_UP" ]; then
      compose logs >"$ART/compose.log" 2>&1
      compose down -v -t 5 >/dev/null 2>&1
      # Whatever this podman-compose leaves behind: containers, the data volume, the network.
      podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman rm -f -v -t 0 >/dev/null 2>&1
      for volume in prometheus-data spool mosquitto-data; do
        podman volume rm -f "${PROJECT}_$volume" >/dev/null 2>&1
      done
      podman network rm -f "${PROJECT}_default" >/dev/null 2>&1
    fi
  fi
  rm -rf "$RUN"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free TCP port on 127.0.0.1 (it may be taken again before use; unlikely here).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Polls CMD until it succeeds, at most SECONDS seconds.
wait_for() {
  local seconds=$1
  shift
  local end=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.5
  done
}

# ---- tools ----
log "tools"
need_cmd() { command -v "$1" >/dev/null 2>&1; }
missing=()
need_cmd promtool || missing+=(prometheus)
need_cmd prometheus || missing+=(prometheus)
need_cmd podman || missing+=(podman)
need_cmd runc || missing+=(runc)
need_cmd podman-compose || missing+=(podman-compose)
need_cmd debootstrap || missing+=(debootstrap)
need_cmd chromium || missing+=(chromium)
need_cmd curl || missing+=(curl)
need_cmd node || missing+=(nodejs)
need_cmd npm || missing+=(npm)
need_cmd python3 || missing+=(python3)
need_cmd mosquitto || missing+=(mosquitto)
need_cmd mosquitto_sub || missing+=(mosquitto-clients)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  # With recommends: podman's bring netavark and aardvark-dns (service names resolve), and
  # chromium's bring fonts for the screenshot.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
if ! need_cmd check-jsonschema; then
  echo "installing check-jsonschema"
  python3 -m pip install --quiet --disable-pip-version-check check-jsonschema
  hash -r
  command -v pyenv >/dev/null 2>&1 && pyenv rehash
fi
need_cmd check-jsonschema || die "check-jsonschema is not on PATH after installing it"
(cd tests/observability && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
echo "prometheus $(prometheus --version 2>&1 | awk 'NR == 1 { print $3 }'), $(podman --version)," \
  "$(chromium --version 2>/dev/null | head -1), node $(node --version)," \
  "$(mosquitto -h 2>/dev/null | head -1)"

if [ -n "${TELEMETRYHUB_BIN:-}" ]; then
  # A binary built already (e.g. target/debug/telemetryhub after scripts/test.sh).
  BIN=$(realpath "$TELEMETRYHUB_BIN")
  [ -x "$BIN" ] || die "TELEMETRYHUB_BIN=$TELEMETRYHUB_BIN is not an executable"
else
  log "release build"
  cargo build --release --locked
  BIN=$CARGO_TARGET_DIR/release/telemetryhub
fi

# ---- the checks ----
PASSED=()
FAILED=()
# Runs one check function in a subshell with errexit on, recording the outcome.
check() {
  local name=$1 rc
  log "check: $name"
  set +e
  (
    set -e
    "check_$name"
  )
  rc=$?
  set -e
  if [ $rc -eq 0 ]; then
    PASSED+=("$name")
    echo "PASS $name"
  else
    FAILED+=("$name")
    echo "FAIL $name"
  fi
}

# A Mosquitto on a free loopback port, for the gateway's uplink; nothing is kept on disk.
start_broker() {
  BROKER_PORT=$(free_port)
  BROKER=mqtt://127.0.0.1:$BROKER_PORT
  mkdir -p "$RUN/mosquitto"
  printf '%s\n' "listener $BROKER_PORT 127.0.0.1" 'allow_anonymous true' 'persistence false' \
    'log_dest stderr' >"$RUN/mosquitto/mosquitto.conf"
  mosquitto -c "$RUN/mosquitto/mosquitto.conf" >"$ART/mosquitto.log" 2>&1 &
  BROKER_PID=$!
  # $SYS/broker/version is retained from the broker's start: an answer means it is serving.
  wait_for 10 mosquitto_sub -h 127.0.0.1 -p "$BROKER_PORT" -t '$SYS/broker/version' -C 1 -W 2 ||
    die "Mosquitto did not come up; see $ART/mosquitto.log"
  echo "mosquitto on $BROKER (pid $BROKER_PID)"
}

# Checks a file of `mosquitto_sub -v` lines (topic, a space, the payload): at least one, each
# an uplink message of gateway GATEWAY_ID in the json format, with a non-empty samples array.
check_uplink_messages() { # FILE GATEWAY_ID
  python3 - "$1" "$2" <<'EOF'
import json, pathlib, sys
path, gateway = sys.argv[1:]
lines = [l for l in pathlib.Path(path).read_text().splitlines() if l.strip()]
assert lines, "no message received"
samples = 0
for line in lines:
    topic, _, payload = line.partition(" ")
    message = json.loads(payload)
    assert message["gateway"] == gateway, message
    assert topic == f"telemetryhub/{gateway}/{message['device']}", (topic, message)
    assert isinstance(message["samples"], list) and message["samples"], message
    for sample in message["samples"]:
        assert set(sample) >= {"seq", "value", "unit", "timestamp"}, sample
    samples += len(message["samples"])
print(f"{len(lines)} messages, {samples} samples, e.g. {topic}: {payload[:120]}")
EOF
}

start_gateway() {
  GATEWAY_PORT=$(free_port)
  GATEWAY=http://127.0.0.1:$GATEWAY_PORT
  # A watcher subshell keeps the gateway's exit status for the SIGTERM check.
  (
    TELEMETRYHUB__UPLINK__URL=$BROKER TELEMETRYHUB__UPLINK__GATEWAY_ID=$GATEWAY_ID \
      TELEMETRYHUB__SPOOL__PATH=$RUN/spool \
      "$BIN" --listen "127.0.0.1:$GATEWAY_PORT" >"$ART/gateway.log" 2>&1 &
    echo $! >"$RUN/gateway.pid"
    rc=0
    wait $! || rc=$?
    echo "$rc" >"$RUN/gateway.rc"
  ) &
  wait_for 5 test -s "$RUN/gateway.pid" || die "the gateway did not start"
  GATEWAY_PID=$(cat "$RUN/gateway.pid")
  wait_for 20 curl -fsS "$GATEWAY/healthz" || die "the gateway did not come up; see $ART/gateway.log"
  echo "gateway on $GATEWAY (pid $GATEWAY_PID), uplink to $BROKER"
}

check_metrics_lint() {
  # Traffic first, so the HTTP families (by route and status) are in the exposition too.
  for path in / /status /uplink /samples?limit=5 /devices /devices/sim0 /healthz /readyz /nope; do
    curl -s -o /dev/null "$GATEWAY$path"
  done
  curl -s -o /dev/null -X POST "$GATEWAY/start"
  curl -s -o /dev/null --max-time 1 "$GATEWAY/events" || true
  curl -fsS "$GATEWAY/metrics" >"$ART/metrics.txt"
  curl -fsS "$GATEWAY/metrics" >"$ART/metrics.txt"
  grep -q '^telemetryhub_http_requests_total{' "$ART/metrics.txt"
  local findings
  findings=$(promtool check metrics <"$ART/metrics.txt" 2>&1) || { echo "$findings"; return 1; }
  [ -z "$findings" ] || { echo "promtool findings:"; echo "$findings"; return 1; }
  # Help text on every family.
  local families helps
  families=$(grep -c '^# TYPE ' "$ART/metrics.txt")
  helps=$(grep -c '^# HELP [^ ]* [^ ]' "$ART/metrics.txt")
  [ "$families" -eq "$helps" ] || { echo "$families families but $helps with help text"; return 1; }
  echo "promtool: no findings in $families metric families, each with help text"
}

check_uplink() {
  local view
  # Bounded twice: -W ends the wait for messages, timeout the process whatever happens.
  timeout 30 mosquitto_sub -h 127.0.0.1 -p "$BROKER_PORT" -t 'telemetryhub/#' -v -C 5 -W 20 \
    >"$ART/uplink-messages.txt"
  check_uplink_messages "$ART/uplink-messages.txt" "$GATEWAY_ID"
  view=$(curl -fsS "$GATEWAY/uplink")
  echo "GET /uplink: $view"
  python3 -c 'import json, sys; u = json.loads(sys.argv[1]); assert u["connected"] and u["broker"] == sys.argv[2] and u["forwarded"] > 0, u' \
    "$view" "$BROKER"
  curl -fsS "$GATEWAY/metrics" | grep -x 'telemetryhub_uplink_connected 1'
}

check_prometheus_config() {
  promtool check config config/prometheus.yml
}

check_compose_schema() {
  check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
  # The provisioning files and the dashboard are well-formed, and agree on the datasource.
  python3 - <<'EOF'
import json, pathlib, re
datasource = pathlib.Path("config/grafana/provisioning/datasources/prometheus.yml").read_text()
uid = re.search(r"^\s*uid:\s*(\S+)", datasource, re.M).group(1)
dashboard = json.loads(pathlib.Path("config/grafana/dashboards/telemetryhub.json").read_text())
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
bad = [p["title"] for p in panels(dashboard["panels"])
       if p.get("datasource", {}).get("uid") not in (None, uid)]
assert not bad, f"panels not on datasource {uid}: {bad}"
print(f"grafana: dashboard {dashboard['uid']!r} uses datasource {uid!r} throughout")
EOF
}

start_prometheus() {
  PROM_PORT=$(free_port)
  PROM=http://127.0.0.1:$PROM_PORT
  # The compose configuration, aimed at this gateway and scraping every second to be quick.
  sed -e "s/telemetryhub:8080/127.0.0.1:$GATEWAY_PORT/" \
    -e 's/scrape_interval: 5s/scrape_interval: 1s/' -e 's/scrape_timeout: 4s/scrape_timeout: 1s/' \
    config/prometheus.yml >"$RUN/prometheus.yml"
  grep -q "127.0.0.1:$GATEWAY_PORT" "$RUN/prometheus.yml"
  prometheus --config.file="$RUN/prometheus.yml" --storage.tsdb.path="$RUN/prometheus-data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$ART/prometheus.log" 2>&1 &
  PROM_PID=$!
  wait_for 30 curl -fsS "$PROM/-/ready" || die "Prometheus did not come up; see $ART/prometheus.log"
  echo "prometheus on $PROM (pid $PROM_PID)"
}

check_prometheus_scrape() {
  node tests/observability/prometheus.mjs scrape "$PROM" "127.0.0.1:$GATEWAY_PORT"
}

check_dashboard_queries() {
  node tests/observability/prometheus.mjs dashboard "$PROM" config/grafana/dashboards/telemetryhub.json 15s
}

check_live_page() {
  node tests/observability/live-page.mjs "$GATEWAY" "$ART/live-page.png" sim0 "$BROKER"
  if [ "${UPDATE_DOCS_SCREENSHOT:-0}" = 1 ]; then
    mkdir -p docs && cp "$ART/live-page.png" docs/screenshot-live.png
    echo "updated docs/screenshot-live.png"
  fi
}

check_gateway_sigterm() {
  kill -TERM "$GATEWAY_PID"
  wait_for 20 test -s "$RUN/gateway.rc" || { echo "still running 20 s after SIGTERM"; return 1; }
  local rc
  rc=$(cat "$RUN/gateway.rc")
  [ "$rc" -eq 0 ] || { echo "exit status $rc"; return 1; }
  grep 'Shutdown complete.' "$ART/gateway.log"
}

check_base_images() {
  scripts/container-images.sh >/dev/null
}

# The build context: the repository as it is (tracked and new files), plus `cargo vendor` output
# and the .cargo/config.toml it prints, because containers here cannot reach crates.io.
make_context() {
  local ctx=$RUN/context
  mkdir -p "$ctx/.cargo"
  tar -C "$REPO" --exclude=./target --exclude=./.git --exclude=node_modules -c . | tar -C "$ctx" -x
  (cd "$ctx" && cargo vendor --locked --versioned-dirs vendor >.cargo/config.toml 2>"$RUN/vendor.log") ||
    { cat "$RUN/vendor.log"; return 1; }
  cmp -s "$REPO/Dockerfile" "$ctx/Dockerfile"
  echo "$ctx"
}

check_container() {
  podman image exists rust:1.95-bookworm || { echo "no base images (see base-images)"; return 1; }
  local ctx started previous port status user pid1 health elapsed code spool
  ctx=$(make_context)
  echo "building $IMAGE from $ctx (unchanged Dockerfile, vendored crates, no network)"
  started=$SECONDS
  previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
  # --format docker keeps the HEALTHCHECK (OCI drops it); --layers=false keeps no intermediate
  # images (the Dockerfile's cache mount still keeps compiled crates between builds).
  podman build --format docker --layers=false --network none -f "$ctx/Dockerfile" -t "$IMAGE" \
    "$ctx" >"$ART/image-build.log" 2>&1 || { tail -30 "$ART/image-build.log"; return 1; }
  echo "image built in $((SECONDS - started)) s"
  if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true # the image this build replaced, unless in use
  fi
  [ "$(podman image inspect --format '{{.Config.Healthcheck}}' "$IMAGE")" != "<nil>" ] ||
    { echo "the image has no HEALTHCHECK"; return 1; }

  port=$(free_port)
  podman run -d --name "$CONTAINER" -p "127.0.0.1:$port:8080" "$IMAGE" >/dev/null 2>>"$PODMAN_LOG"
  wait_for 30 curl -fsS "http://127.0.0.1:$port/healthz" ||
    { podman logs "$CONTAINER" | tail -20; return 1; }

  user=$(podman inspect --format '{{.Config.User}}' "$CONTAINER")
  pid1=$(podman exec "$CONTAINER" cat /proc/1/status | awk '/^Uid:/ { print $2 }')
  [ -n "$pid1" ] && [ "$pid1" != 0 ] || { echo "PID 1 runs as uid '$pid1'"; return 1; }
  [ "$(podman exec "$CONTAINER" cat /proc/1/comm)" = telemetryhub ] ||
    { echo "PID 1 is not the gateway"; return 1; }
  echo "runs as user $user: PID 1 is telemetryhub with uid $pid1"

  # No systemd timers here: run the HEALTHCHECK the way the engine would, until healthy.
  wait_for 30 podman healthcheck run "$CONTAINER" || { echo "HEALTHCHECK never passed"; return 1; }
  health=$(podman inspect --format '{{.State.Health.Status}}' "$CONTAINER")
  [ "$health" = healthy ] || { echo "health status: $health"; return 1; }
  echo "HEALTHCHECK: $health"

  status=$(curl -fsS "http://127.0.0.1:$port/status")
  echo "$status" | python3 -c 'import json, sys; s = json.load(sys.stdin); assert s["devices"], s; print("GET /status through 127.0.0.1:'"$port"': state", s["state"])'

  # The spool directory is the gateway's, so a named volume mounted there (which takes the
  # directory's owner from the image) is writable by it.
  spool=$(podman exec "$CONTAINER" stat -c '%u:%g %a' /var/lib/telemetryhub/spool)
  [ "$spool" = "10001:10001 750" ] || { echo "/var/lib/telemetryhub/spool: $spool"; return 1; }
  echo "spool directory: uid:gid mode $spool"

  started=$SECONDS
  podman stop -t 10 "$CONTAINER" >/dev/null 2>>"$PODMAN_LOG"
  elapsed=$((SECONDS - started))
  podman logs "$CONTAINER" >"$ART/container.log" 2>&1
  code=$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")
  echo "podman stop took ${elapsed} s; exit code $code"
  [ "$elapsed" -lt 10 ] || { echo "not stopped by SIGTERM (killed after the timeout)"; return 1; }
  [ "$code" = 0 ] || return 1
  grep 'signal="SIGTERM"' "$ART/container.log"
  grep 'Shutdown complete.' "$ART/container.log"
  podman rm -v "$CONTAINER" >/dev/null 2>>"$PODMAN_LOG"
}

check_compose() {
  podman image exists "$IMAGE" || { echo "no $IMAGE image (see container)"; return 1; }
  podman image exists prom/prometheus:v3.5.0 || { echo "no Prometheus image (see base-images)"; return 1; }
  podman image exists eclipse-mosquitto:2 || { echo "no Mosquitto image (see base-images)"; return 1; }
  export PUBLISH_ADDRESS=127.0.0.1 TELEMETRYHUB_PORT PROMETHEUS_PORT GRAFANA_PORT
  TELEMETRYHUB_PORT=$(free_port)
  PROMETHEUS_PORT=$(free_port)
  GRAFANA_PORT=$(free_port)
  echo "grafana: not started (no Grafana image or package here); telemetryhub, mosquitto and" \
    "prometheus are"
  # `up --abort-on-container-exit` hangs in this podman-compose: start detached, then poll.
  compose up -d --no-build mosquitto telemetryhub prometheus >"$ART/compose-up.log" 2>&1 ||
    { tail -30 "$ART/compose-up.log"; return 1; }
  wait_for 60 curl -fsS "http://127.0.0.1:$TELEMETRYHUB_PORT/status" ||
    { echo "the gateway is not answering on its published port"; return 1; }
  echo "gateway answers on 127.0.0.1:$TELEMETRYHUB_PORT"
  # Prometheus, in its container, scrapes the gateway by its service name.
  PROM_DEADLINE_MS=90000 node tests/observability/prometheus.mjs scrape \
    "http://127.0.0.1:$PROMETHEUS_PORT" telemetryhub:8080
  # The compose file's own health checks (what `depends_on: condition: service_healthy` waits
  # for), run the way the engine would.
  local service name
  for service in telemetryhub mosquitto prometheus; do
    name=$(compose_container "$service")
    [ -n "$name" ] || { echo "no running $service container"; return 1; }
    wait_for 30 podman healthcheck run "$name" || { echo "$service: health check failing"; return 1; }
    echo "compose $service ($name): healthy"
  done
  compose_uplink
}

# The running container of compose service SERVICE.
compose_container() {
  podman ps --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1
}

# The gateway publishes to the mosquitto service, by name, on the compose network: what the
# README's `docker compose exec mosquitto mosquitto_sub -t 'telemetryhub/#' -v` shows.
compose_uplink() {
  local gateway_id broker gateway view spool
  gateway_id=$(awk '$1 == "TELEMETRYHUB__UPLINK__GATEWAY_ID:" { print $2 }' docker-compose.yml)
  [ -n "$gateway_id" ] || { echo "docker-compose.yml sets no uplink gateway id"; return 1; }
  broker=$(compose_container mosquitto)
  gateway=$(compose_container telemetryhub)
  timeout 60 podman exec "$broker" mosquitto_sub -t 'telemetryhub/#' -v -C 5 -W 45 \
    >"$ART/compose-uplink-messages.txt" 2>>"$PODMAN_LOG"
  echo -n "mosquitto_sub in the mosquitto container: "
  check_uplink_messages "$ART/compose-uplink-messages.txt" "$gateway_id"
  view=$(curl -fsS "http://127.0.0.1:$TELEMETRYHUB_PORT/uplink")
  echo "GET /uplink through 127.0.0.1:$TELEMETRYHUB_PORT: $view"
  python3 -c 'import json, sys; u = json.loads(sys.argv[1]); assert u["connected"] and u["broker"] == "mqtt://mosquitto:1883" and u["forwarded"] > 0, u' \
    "$view"
  # The spool is on the named volume, the gateway's user owns it, and it holds the spool files.
  spool=$(podman exec "$gateway" sh -c 'stat -c "%u:%g" /var/lib/telemetryhub/spool && ls -A /var/lib/telemetryhub/spool | wc -l')
  podman inspect --format '{{range .Mounts}}{{.Name}} {{.Destination}}{{"\n"}}{{end}}' "$gateway" |
    grep -x "${PROJECT}_spool /var/lib/telemetryhub/spool" ||
    { echo "no spool volume on /var/lib/telemetryhub/spool"; return 1; }
  [ "$(echo "$spool" | head -1)" = 10001:10001 ] && [ "$(echo "$spool" | tail -1)" -gt 0 ] ||
    { echo "spool volume: $spool"; return 1; }
  echo "spool volume: owned by 10001:10001, $(echo "$spool" | tail -1) files"
}

start_broker
start_gateway
check metrics_lint
check uplink
check prometheus_config
check compose_schema
start_prometheus
check prometheus_scrape
check dashboard_queries
check live_page
check gateway_sigterm
GATEWAY_PID=
kill "$PROM_PID" && wait "$PROM_PID" || true
PROM_PID=
kill "$BROKER_PID" && wait "$BROKER_PID" || true
BROKER_PID=
check base_images
check container
COMPOSE_UP=1
check compose

log "summary ($((SECONDS - STARTED)) s; artifacts in $ART)"
for name in "${PASSED[@]}"; do echo "  pass  $name"; done
for name in "${FAILED[@]+"${FAILED[@]}"}"; do echo "  FAIL  $name"; done
echo "test-observability: ${#PASSED[@]} passed, ${#FAILED[@]} failed"
[ ${#FAILED[@]} -eq 0 ]
