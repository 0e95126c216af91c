# TelemetryHub container image.
#
#   docker build -t telemetryhub .
#   docker run --rm -p 127.0.0.1:8080:8080 telemetryhub
#
# The gateway runs as PID 1 (exec form), so `docker stop` (SIGTERM) reaches it directly: it
# drains the buffer (pipeline.shutdown_grace_ms, 10 s by default) and logs "Shutdown complete."
# Configuration: /etc/telemetryhub/telemetryhub.toml (config/default.toml), overridden by
# TELEMETRYHUB__SECTION__KEY variables; e.g. set TELEMETRYHUB__HTTP__API_TOKEN when the port is
# reachable from other hosts.
# With an uplink (TELEMETRYHUB__UPLINK__URL=mqtt://broker:1883), the spool is
# /var/lib/telemetryhub/spool: mount a volume there so that unsent samples survive the container
# (a new named volume takes the directory's owner, the gateway's user, from the image).

# ---- build: the release binary ----
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache mount keeps compiled dependencies between builds (BuildKit and podman/buildah).
RUN --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
 && install -D -m 0755 target/release/telemetryhub /out/telemetryhub

# ---- runtime: slim Debian, non-root ----
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 telemetryhub \
 && useradd --system --uid 10001 --gid telemetryhub --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin telemetryhub \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/telemetryhub /var/lib/telemetryhub/spool
COPY --from=build /out/telemetryhub /usr/local/bin/telemetryhub
COPY config/default.toml /etc/telemetryhub/telemetryhub.toml
ENV TELEMETRYHUB_CONFIG=/etc/telemetryhub/telemetryhub.toml \
    TELEMETRYHUB__HTTP__LISTEN=0.0.0.0:8080 \
    TELEMETRYHUB__SPOOL__PATH=/var/lib/telemetryhub/spool
# Numeric, so that platforms can check it is not root without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
# The binary probes itself: the image needs no curl or wget.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["telemetryhub", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["telemetryhub"]
