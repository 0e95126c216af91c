//! The HTTP ceiling of our own stack, for `docs/PERFORMANCE.md`: an axum server that answers
//! every `GET /status` with a fixed JSON body, served by the gateway's own connection loop
//! (`telemetryhub::api::serve`: hyper HTTP/1.1, TCP_NODELAY, a header-read timeout, one task
//! per connection on the multi-threaded runtime) but with no middleware, no state and no
//! serialisation. Load-test numbers for the gateway are reported as a ratio to this server,
//! measured in the same run, so a noisy machine cancels out.
//!
//! ```text
//! cargo run --release --example baseline -- [--listen 127.0.0.1:18081] [--body-file status.json]
//! ```
//!
//! `--body-file` should hold a real `/status` response (scripts/bench.sh saves one), so both
//! servers write the same number of bytes; without it a built-in body of typical size is used.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The gateway's default `header_read_timeout_ms`.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A `/status` body of the gateway with its default single simulated device, used when no
/// `--body-file` is given.
const DEFAULT_BODY: &str = r#"{"state":"Measuring","latest_sample":{"seq":1234,"value":42.123456,"unit":"arb.units","device":"sim0","timestamp":"2026-01-01T00:00:00.000Z"},"metrics":{"samples_processed":1234,"samples_dropped":0,"pool_jobs_processed":1234,"pool_jobs_queued":0,"pool_num_threads":2,"queue_depth":0,"queue_capacity":100000},"devices":[{"id":"sim0","kind":"simulated","state":"Measuring","consecutive_failures":0,"last_error":null,"samples_read":1234,"frames_invalid":{"checksum":0,"syntax":0,"too_long":0},"seq_gaps":0,"link_failures":{"connect":0,"io":0,"timeout":0,"closed":0},"stats":{"count":1234,"min":41.0,"max":43.0,"mean":42.0,"last":42.1}}],"uptime_seconds":12,"version":"0.1.0"}"#;

struct Options {
    listen: SocketAddr,
    body: Bytes,
}

fn parse_args() -> Result<Options, String> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 18081));
    let mut body = Bytes::from_static(DEFAULT_BODY.as_bytes());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => {
                listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?;
            }
            "--body-file" => {
                let path = value()?;
                let bytes = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
                body = Bytes::from(bytes);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !listen.ip().is_loopback() {
        return Err("the baseline server listens on loopback only".to_owned());
    }
    Ok(Options { listen, body })
}

#[tokio::main]
async fn main() {
    let options = match parse_args() {
        Ok(options) => options,
        Err(err) => {
            eprintln!("baseline: {err}");
            std::process::exit(2);
        }
    };
    let body = options.body;
    let len = body.len();
    let router = Router::new().route(
        "/status",
        get(move || {
            let body = body.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body,
                )
                    .into_response()
            }
        }),
    );
    let listener = TcpListener::bind(options.listen)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {}: {e}", options.listen));
    eprintln!(
        "baseline: listening on {} ({len}-byte body)",
        options.listen
    );
    // The gateway's own connection loop, so the two servers differ only in what runs per
    // request. Never cancelled: the server runs until the process is killed.
    telemetryhub::api::serve(
        listener,
        router,
        HEADER_READ_TIMEOUT,
        TaskTracker::new(),
        CancellationToken::new(),
    )
    .await;
}
