//! The HTTP server loop: accepts connections on an already bound listener and serves the
//! router over HTTP/1.1 with hyper, with TCP_NODELAY and a header-read timeout against slow
//! clients (which `axum::serve` cannot set). On cancellation it stops accepting and lets
//! open connections finish their in-flight requests.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// How long to wait before accepting again after an accept error (e.g. out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves `router` until `cancel`, then waits for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    warn!(error = %err, "Cannot accept a connection.");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Small JSON answers must not wait for Nagle's algorithm (the C++ original's 40 ms).
        if let Err(err) = stream.set_nodelay(true) {
            debug!(error = %err, "Cannot set TCP_NODELAY.");
        }
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tracker.spawn(async move {
            if let Err(err) = connection.await {
                debug!(error = %err, "Connection ended with an error.");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
