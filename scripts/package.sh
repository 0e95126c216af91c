#!/usr/bin/env bash
# Builds the Debian package target/debian/telemetryhub_<version>_amd64.deb with cargo-deb
# (Cargo.toml [package.metadata.deb]): a release build (reused if up to date), then the files
# generated from it into target/package-assets, then `cargo deb --no-build`:
#   - the man page and the bash, zsh and fish completions, printed by the built binary itself
#     (`telemetryhub man`, `telemetryhub completions SHELL`), so they come from the very clap
#     definitions that parse its command line;
#   - the packaged config: config/default.toml with the uplink's spool in the service's state
#     directory, /var/lib/telemetryhub/spool (StateDirectory= in the unit).
# Installs cargo-deb if missing. Prints the .deb's path last.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "package: $*" >&2; }

if ! cargo deb --version >/dev/null 2>&1; then
  log "installing cargo-deb"
  cargo install cargo-deb --locked
fi

cargo build --release --locked --bin telemetryhub
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
BIN=$TARGET_DIR/release/telemetryhub

# Where Cargo.toml's assets point (relative to the package, whatever CARGO_TARGET_DIR is).
ASSETS=target/package-assets
rm -rf "$ASSETS"
mkdir -p "$ASSETS"
"$BIN" man | gzip -9n >"$ASSETS/telemetryhub.1.gz"
"$BIN" completions bash >"$ASSETS/telemetryhub.bash"
"$BIN" completions zsh >"$ASSETS/_telemetryhub"
"$BIN" completions fish >"$ASSETS/telemetryhub.fish"

{
  echo "# Installed by the telemetryhub package: a conffile, so your changes survive upgrades."
  echo "# The service (systemctl status telemetryhub) reads it; apply changes with"
  echo "# systemctl reload telemetryhub, check them first with"
  echo "#   telemetryhub validate --config /etc/telemetryhub/telemetryhub.toml"
  echo "#"
  sed -e 's|^path = "data/spool"$|path = "/var/lib/telemetryhub/spool"|' \
    -e 's|^# Directory of the spool files (created if missing).$|# Directory of the spool files (created if missing): in the service'"'"'s state directory.|' \
    config/default.toml
} >"$ASSETS/telemetryhub.toml"
grep -qx 'path = "/var/lib/telemetryhub/spool"' "$ASSETS/telemetryhub.toml" ||
  { log "config/default.toml no longer has the spool path line this script rewrites"; exit 1; }
"$BIN" validate --config "$ASSETS/telemetryhub.toml" >/dev/null

# --no-build: the release binary above (cargo-deb maps target/release to TARGET_DIR itself).
# --strip: the release profile keeps line tables (58 MB); an edge box wants the 10 MB binary.
cargo deb --no-build --strip --locked --output "$TARGET_DIR/debian/" >&2
version=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "telemetryhub"))')
deb=$TARGET_DIR/debian/telemetryhub_${version}_$(dpkg --print-architecture).deb
[ -s "$deb" ] || { log "cargo deb made no $deb"; ls -l "$TARGET_DIR/debian" >&2; exit 1; }
echo "$deb"
