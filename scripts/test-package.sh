#!/usr/bin/env bash
# The Debian package, for real: scripts/package.sh builds target/debian/telemetryhub_<version>_
# <arch>.deb with cargo-deb, and a clean Debian container (the local stand-in for the runtime
# image the Dockerfile names, made by scripts/container-images.sh; no registry, no network in
# the container) installs it with `dpkg -i` and checks that:
#   - `telemetryhub --version` prints the version and commit of the build it came from, and
#     `telemetryhub validate` accepts the installed /etc/telemetryhub/telemetryhub.toml;
#   - that file is a conffile (dpkg-query), 0640 root:telemetryhub (it may hold secrets), and
#     a local change to it survives a reinstall, which keeps those permissions;
#   - the unit file, man page and bash/zsh/fish completions are where systemd, man and the
#     shells look (the bash one passes `bash -n`, the man page renders);
#   - the postinst made the system user telemetryhub, in group dialout, with no login shell;
#   - the gateway runs as that user with the installed config from the state directory (as
#     the unit runs it) until /healthz answers, and drains and exits 0 on SIGTERM;
#   - `dpkg --purge` removes it all, the conffile and the state directory included.
# Reuses the release build and the container images when they are up to date. Installs
# cargo-deb, podman and debootstrap if missing (through package.sh and container-images.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
STARTED=$SECONDS

log() { echo "test-package: $*" >&2; }

export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/target/observability/containers.conf}
scripts/container-images.sh >/dev/null
IMAGE=$(awk 'toupper($1) == "FROM" { image = $2 } END { print image }' Dockerfile)
podman image exists "$IMAGE" || { log "no $IMAGE image"; exit 1; }

deb=$(scripts/package.sh)
log "built $deb ($(du -h "$deb" | cut -f1)) in $((SECONDS - STARTED)) s"
expected_version=$("$(dirname "$deb")/../release/telemetryhub" --version)

started=$SECONDS
# The checks, run as root in the container; they stop at the first failure (set -e) and say
# which one.
podman run --rm --network none -v "$deb:/tmp/telemetryhub.deb:ro" \
  -e EXPECTED_VERSION="$expected_version" "$IMAGE" bash -euo pipefail -c '
step() { echo "container: $*"; }
conf=/etc/telemetryhub/telemetryhub.toml

step "dpkg -i"
dpkg -i /tmp/telemetryhub.deb >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; exit 1; }

step "telemetryhub --version: $(telemetryhub --version)"
[ "$(telemetryhub --version)" = "$EXPECTED_VERSION" ]
telemetryhub validate --config "$conf"

step "the conffile"
dpkg-query -W -f="\${Conffiles}\n" telemetryhub | grep -E "^ $conf [0-9a-f]{32}$"
grep -qx "path = \"/var/lib/telemetryhub/spool\"" "$conf"
[ "$(stat -c "%a %U %G" "$conf")" = "640 root telemetryhub" ] ||
  { echo "conffile permissions: $(stat -c "%a %U %G" "$conf")"; exit 1; }

step "the unit, man page and completions"
for f in /usr/lib/systemd/system/telemetryhub.service /usr/share/man/man1/telemetryhub.1.gz \
  /usr/share/bash-completion/completions/telemetryhub /usr/share/zsh/vendor-completions/_telemetryhub \
  /usr/share/fish/vendor_completions.d/telemetryhub.fish; do
  dpkg -S "$f" | grep -q "^telemetryhub: " && [ -s "$f" ] || { echo "missing: $f"; exit 1; }
done
grep -qx "Type=notify" /usr/lib/systemd/system/telemetryhub.service
grep -qx "ExecStart=/usr/bin/telemetryhub --config $conf" /usr/lib/systemd/system/telemetryhub.service
bash -n /usr/share/bash-completion/completions/telemetryhub
bash -c "source /usr/share/bash-completion/completions/telemetryhub && complete -p telemetryhub" | grep -q _telemetryhub
zcat /usr/share/man/man1/telemetryhub.1.gz | grep -q "^\.TH telemetryhub 1"
for sub in validate completions man healthcheck simulate bench; do
  zcat /usr/share/man/man1/telemetryhub.1.gz | grep -q "telemetryhub\\\\-$sub" || { echo "man page lacks $sub"; exit 1; }
  grep -q "$sub" /usr/share/zsh/vendor-completions/_telemetryhub
  grep -q "$sub" /usr/share/fish/vendor_completions.d/telemetryhub.fish
done

step "the system user: $(id telemetryhub)"
id -nG telemetryhub | tr " " "\n" | grep -qx dialout
[ "$(getent passwd telemetryhub | cut -d: -f7)" = /usr/sbin/nologin ]
[ "$(id -u telemetryhub)" -lt 1000 ]

step "the gateway as that user, from the state directory (what StateDirectory= makes)"
install -d -o telemetryhub -g telemetryhub -m 0750 /var/lib/telemetryhub
cd /var/lib/telemetryhub
# setpriv execs the gateway itself (runuser would stay in between), with the user'"'"'s groups.
setpriv --reuid=telemetryhub --regid=telemetryhub --init-groups \
  telemetryhub --config "$conf" 2>/tmp/gateway.log &
pid=$!
for _ in $(seq 100); do
  telemetryhub healthcheck --url http://127.0.0.1:8080/healthz --timeout-ms 500 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { cat /tmp/gateway.log; exit 1; }
  sleep 0.1
done
telemetryhub healthcheck --url http://127.0.0.1:8080/readyz --timeout-ms 2000 || { cat /tmp/gateway.log; exit 1; }
[ "$(stat -c %U /proc/$pid)" = telemetryhub ] || { echo "not running as telemetryhub"; exit 1; }
grep "^Groups:" /proc/$pid/status | tr "\t " "\n\n" | grep -qx "$(getent group dialout | cut -d: -f3)" ||
  { echo "not in group dialout: $(grep ^Groups: /proc/$pid/status)"; exit 1; }
kill -TERM "$pid"
rc=0; wait "$pid" || rc=$?
[ "$rc" = 0 ] || { echo "exit status $rc"; cat /tmp/gateway.log; exit 1; }
grep -q "overflow=drop_oldest" /tmp/gateway.log
grep -q "Shutdown complete." /tmp/gateway.log
cd /

step "a local change to the conffile survives a reinstall"
echo "# local change" >>"$conf"
dpkg -i --force-confold /tmp/telemetryhub.deb >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; exit 1; }
grep -qx "# local change" "$conf"
[ "$(stat -c "%a %U %G" "$conf")" = "640 root telemetryhub" ] ||
  { echo "conffile permissions after reinstall: $(stat -c "%a %U %G" "$conf")"; exit 1; }

step "dpkg --purge"
dpkg --purge telemetryhub >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; exit 1; }
for f in /usr/bin/telemetryhub "$conf" /usr/lib/systemd/system/telemetryhub.service /var/lib/telemetryhub; do
  [ ! -e "$f" ] || { echo "left after purge: $f"; exit 1; }
done
step "all checks passed"
'
log "container checks took $((SECONDS - started)) s; total $((SECONDS - STARTED)) s"
