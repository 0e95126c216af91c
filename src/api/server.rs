//! The HTTP server loop: accepts connections on an already bound listener and serves the
//! router over HTTP/1.1 with hyper, with TCP_NODELAY and a header-read timeout against slow
//! clients (which `axum::serve` cannot set).
//!
//! On cancellation it stops accepting, closes at once every connection that has not handed a
//! request to the router yet (a client still sending its first request's headers), and lets
//! the others finish their in-flight requests. hyper's own graceful shutdown counts a
//! connection as busy until its first request is complete, so alone it would wait for a
//! half-sent request until the header-read timeout.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;
use tracing::{debug, warn};

/// How long to wait before accepting again after an accept error (e.g. out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// What the server loop can serve: the API ([`super::Api`]), or a bare `Router` (the
/// benchmarks' baseline).
pub trait Serve:
    Service<Request<Incoming>, Response = Response, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Serve for S where
    S: Service<Request<Incoming>, Response = Response, Error = Infallible, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `router` until `cancel`, then waits for the requests in flight to finish.
pub async fn serve(
    listener: TcpListener,
    router: impl Serve,
    header_read_timeout: Duration,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let (_fixed, header_read_timeout) = watch::channel(header_read_timeout);
    serve_live(listener, router, header_read_timeout, tracker, cancel).await;
}

/// Like [`serve`], but each new connection gets the header-read timeout that
/// `header_read_timeout` holds when it is accepted (a live reload may change it).
pub async fn serve_live(
    listener: TcpListener,
    router: impl Serve,
    header_read_timeout: watch::Receiver<Duration>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new());
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
        http.header_read_timeout(*header_read_timeout.borrow());
        let served = Arc::new(AtomicBool::new(false));
        let service = MarkServed {
            inner: TowerToHyperService::new(router.clone()),
            served: served.clone(),
        };
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = cancel.cancelled() => {
                    // Checked on the task that polls the connection, so no request can reach
                    // the router in between: dropping the connection here cuts off nobody's
                    // request. Once one has, hyper closes the connection as soon as it is idle.
                    if !served.load(Ordering::Relaxed) {
                        debug!("Closing a connection that sent no complete request.");
                        return;
                    }
                    connection.await
                }
            };
            if let Err(err) = result {
                debug!(error = %err, "Connection ended with an error.");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection's service that remembers whether a request ever reached it.
struct MarkServed<S> {
    inner: S,
    served: Arc<AtomicBool>,
}

impl<S, R> hyper::service::Service<R> for MarkServed<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> Self::Future {
        self.served.store(true, Ordering::Relaxed);
        self.inner.call(request)
    }
}
