#!/usr/bin/env bash
# Makes local stand-ins for the base images that Dockerfile and docker-compose.yml name, for a
# machine with podman but no reachable image registry (CI here). Names are read from those two
# files, so the stand-ins always match what they ask for:
#   - the Debian runtime image (debian:bookworm-slim): `debootstrap --variant=minbase bookworm`;
#   - the Rust build image (rust:1.95-bookworm): the same plus gcc, libc6-dev and
#     ca-certificates, and this machine's stable Rust toolchain (no docs) under /usr/local/rustup
#     and /usr/local/cargo, with the official image's RUSTUP_HOME, CARGO_HOME and PATH;
#   - Prometheus (prom/prometheus:...): the Debian image plus the files of Debian's
#     `prometheus` package (and busybox's wget, which the official image has), with the official
#     image's entrypoint, default flags, user, working directory and port;
#   - Mosquitto (eclipse-mosquitto:...): `debootstrap --variant=minbase bookworm` with Debian's
#     `mosquitto` and `mosquitto-clients` packages, laid out like the official image: the
#     mosquitto user as uid/gid 1883, /mosquitto/{config,data,log}, an entrypoint that gives
#     /mosquitto to that user when started as root, and `mosquitto -c
#     /mosquitto/config/mosquitto.conf` as the command (Mosquitto then drops to its user).
# Grafana has no Debian package, so it gets no stand-in (the compose test leaves it out).
#
# Idempotent: an image that already exists is kept (FORCE=1 remakes them). Needs root,
# debootstrap and podman; installs debootstrap if missing. Prints CONTAINERS_CONF's path last.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STATE=${OBS_STATE_DIR:-$PWD/target/observability}
mkdir -p "$STATE"

log() { echo "container-images: $*" >&2; }

# podman on this machine needs runc, cgroupfs and smaller default ulimits than its defaults.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$STATE/containers.conf}
if [ ! -s "$CONTAINERS_CONF" ]; then
  cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
fi

missing=()
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v podman >/dev/null 2>&1 || missing+=(podman runc)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The names, from the files that use them.
mapfile -t from_lines < <(awk 'toupper($1) == "FROM" { print $2 }' Dockerfile)
RUST_IMAGE=${from_lines[0]:?Dockerfile has no build stage}
DEBIAN_IMAGE=${from_lines[${#from_lines[@]} - 1]}
PROM_IMAGE=$(awk '$1 == "image:" && $2 ~ /prometheus/ { print $2; exit }' docker-compose.yml)
[ -n "$PROM_IMAGE" ] || { log "docker-compose.yml names no prometheus image"; exit 1; }
MOSQUITTO_IMAGE=$(awk '$1 == "image:" && $2 ~ /mosquitto/ { print $2; exit }' docker-compose.yml)
[ -n "$MOSQUITTO_IMAGE" ] || { log "docker-compose.yml names no mosquitto image"; exit 1; }
case "$RUST_IMAGE" in rust:*) ;; *) log "the build stage is not a rust image: $RUST_IMAGE"; exit 1 ;; esac
case "$DEBIAN_IMAGE" in debian:*) ;; *) log "the runtime stage is not a debian image: $DEBIAN_IMAGE"; exit 1 ;; esac

need() { [ "${FORCE:-0}" = 1 ] || ! podman image exists "$1"; }

WORK=$(mktemp -d "$STATE/images.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Strips what a container image does not need from a debootstrapped root.
slim_root() {
  local root=$1
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
  # debootstrap copies the host's resolver and hostname; a container gets its own.
  : >"$root/etc/resolv.conf"
  rm -f "$root/etc/hostname"
}

bootstrap() { # ROOT [EXTRA_PACKAGES]
  local root=$1 include=${2:-}
  log "debootstrap $SUITE ${include:+(+$include)} into $root"
  debootstrap --variant=minbase ${include:+--include="$include"} "$SUITE" "$root" "$MIRROR" \
    >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; return 1; }
  slim_root "$root"
}

import() { # ROOT NAME [--change ...]
  local root=$1 name=$2
  shift 2
  log "importing $name"
  tar --numeric-owner -C "$root" -c . | podman import "$@" - "$name" >/dev/null
}

pids=()
if need "$DEBIAN_IMAGE"; then
  bootstrap "$WORK/debian" &
  pids+=($!)
fi
if need "$RUST_IMAGE"; then
  bootstrap "$WORK/rust" gcc,libc6-dev,ca-certificates &
  pids+=($!)
fi
if need "$MOSQUITTO_IMAGE"; then
  bootstrap "$WORK/mosquitto" mosquitto,mosquitto-clients &
  pids+=($!)
fi
for pid in "${pids[@]}"; do wait "$pid"; done

if need "$DEBIAN_IMAGE"; then
  import "$WORK/debian" "$DEBIAN_IMAGE" --change 'CMD ["bash"]'
fi

if need "$RUST_IMAGE"; then
  # The stable toolchain this machine has: binaries and libraries, no docs (share/).
  rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
  cargo_home=${CARGO_HOME:-$HOME/.cargo}
  toolchain=$(rustup toolchain list | awk '/^stable-/ { print $1; exit }')
  [ -n "$toolchain" ] || { log "no stable Rust toolchain on this machine"; exit 1; }
  version=$(rustc +stable --version | awk '{ print $2 }')
  case "$RUST_IMAGE" in
    rust:"${version%.*}"-* | rust:"$version"-*) ;;
    *) log "$RUST_IMAGE asks for another Rust than this machine's $version"; exit 1 ;;
  esac
  root=$WORK/rust
  dest=$root/usr/local/rustup/toolchains/$toolchain
  mkdir -p "$dest" "$root/usr/local/cargo/bin"
  for dir in bin lib; do
    cp -a "$rustup_home/toolchains/$toolchain/$dir" "$dest/"
  done
  rm -f "$dest"/bin/rust-gdb* "$dest"/bin/rust-lldb
  printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\nauto_self_update = "disable"\n' \
    "$toolchain" >"$root/usr/local/rustup/settings.toml"
  # rustup's proxies, as in the official image.
  cp "$cargo_home/bin/rustup" "$root/usr/local/cargo/bin/rustup"
  for proxy in cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt; do
    ln -s rustup "$root/usr/local/cargo/bin/$proxy"
  done
  import "$root" "$RUST_IMAGE" \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "ENV RUST_VERSION=$version" \
    --change 'CMD ["bash"]'
fi

if need "$PROM_IMAGE"; then
  # Debian's package files (not installed with dpkg: its web-UI dependencies are not needed),
  # merged into /usr like the image's own files.
  mkdir -p "$WORK/debs" "$WORK/prom/rootfs"
  (cd "$WORK/debs" && apt-get download -q -o APT::Sandbox::User=root prometheus busybox >/dev/null) ||
    { apt-get update -qq && (cd "$WORK/debs" && apt-get download -q -o APT::Sandbox::User=root prometheus busybox >/dev/null); }
  for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$WORK/prom/rootfs"; done
  rootfs=$WORK/prom/rootfs
  for dir in bin sbin lib; do
    if [ -d "$rootfs/$dir" ]; then
      mkdir -p "$rootfs/usr/$dir"
      cp -a "$rootfs/$dir/." "$rootfs/usr/$dir/"
      rm -rf "${rootfs:?}/$dir"
    fi
  done
  rm -rf "$rootfs/usr/share/doc" "$rootfs/usr/share/man" "$rootfs/usr/lib/systemd" "$rootfs/etc/init.d"
  ln -s busybox "$rootfs/usr/bin/wget"
  mkdir -p "$rootfs/prometheus"
  cat >"$WORK/prom/Containerfile" <<EOF
FROM $DEBIAN_IMAGE
COPY rootfs/ /
RUN chown -R nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
VOLUME ["/prometheus"]
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
  log "building $PROM_IMAGE"
  podman build --quiet --layers=false --network none --format docker -t "$PROM_IMAGE" "$WORK/prom" >/dev/null
fi

if need "$MOSQUITTO_IMAGE"; then
  root=$WORK/mosquitto
  # The official image's ids (a volume then works with either image); the package's postinst
  # made the user and group with other system ids.
  chroot "$root" groupmod -g 1883 mosquitto
  chroot "$root" usermod -u 1883 -g 1883 mosquitto
  mkdir -p "$root/mosquitto/config" "$root/mosquitto/data" "$root/mosquitto/log"
  # As in the official image, no listener by default: Mosquitto 2 then listens on loopback
  # only. docker-compose.yml mounts config/mosquitto.conf over this file.
  echo '# Default configuration (local-only mode): mount your own over this file.' \
    >"$root/mosquitto/config/mosquitto.conf"
  cat >"$root/docker-entrypoint.sh" <<'ENTRYPOINT'
#!/bin/sh
# Started as root: /mosquitto (a fresh volume, a mounted directory) goes to the mosquitto
# user, which Mosquitto drops to. A read-only mount (the config file) stays as it is.
set -e
if [ "$(id -u)" = 0 ] && [ -d /mosquitto ]; then
  chown -R mosquitto:mosquitto /mosquitto 2>/dev/null || true
fi
exec "$@"
ENTRYPOINT
  chmod 0755 "$root/docker-entrypoint.sh"
  chroot "$root" chown -R mosquitto:mosquitto /mosquitto /var/lib/mosquitto /var/log/mosquitto
  import "$root" "$MOSQUITTO_IMAGE" \
    --change 'VOLUME ["/mosquitto/data", "/mosquitto/log"]' \
    --change 'EXPOSE 1883' \
    --change 'ENTRYPOINT ["/docker-entrypoint.sh"]' \
    --change 'CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]'
fi

log "ready: $RUST_IMAGE, $DEBIAN_IMAGE, $PROM_IMAGE, $MOSQUITTO_IMAGE"
echo "$CONTAINERS_CONF"
