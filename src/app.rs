//! Builds every stage and wires them together on one `TaskTracker` and one root
//! `CancellationToken`, then runs until a shutdown signal and drains.
//!
//! Data flows one way: device tasks → ring buffer → dispatcher → worker stage; the API reads
//! the stages through their handles. Shutdown stops the sources first and lets everything
//! downstream drain, with a deadline: readiness turns 503, devices stop, the buffer closes and
//! drains into the workers within `shutdown_grace_ms` (what is left then is counted as dropped
//! for `shutdown`), and finally the HTTP server finishes in-flight requests. A second signal
//! ([`App::run_until_or_stopped`]) cuts all of that short; the summary still balances.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::config::{ConfigSource, Settings};
use crate::dispatch::ProcessFn;
use crate::ledger::Ledger;
use crate::notify::Notifier;
use crate::pipeline::Pipeline;
use crate::reload::{LiveParts, ReloadHandle, ReloadRequests, Reloader};
use crate::swap::Swap;
use crate::telemetry::LogControl;

/// How often the metrics recorder drains histogram samples when nobody scrapes.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Longest wait for in-flight HTTP requests and worker batches once the grace period is over.
const FINAL_WAIT: Duration = Duration::from_secs(2);

/// Why the app could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The uplink's spool or broker settings cannot be used.
    #[error(transparent)]
    Uplink(#[from] crate::uplink::OpenError),
}

/// What happened to every sample, reported once at shutdown.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The final accounting.
    #[serde(flatten)]
    pub ledger: Ledger,
    /// Samples still in worker batches when the gateway stopped waiting for them; they are
    /// counted in `dropped.shutdown` (as is anything still queued then), so `in_buffer` and
    /// `in_flight` are 0.
    pub abandoned_in_flight: u64,
    /// Whether the accounting balances.
    pub balanced: bool,
    /// Whether a second signal cut the drain short.
    pub stopped_early: bool,
    /// How long the pipeline took to drain: from stopping the devices until the buffer was
    /// empty and every worker batch had finished (or the grace period ran out, or a second
    /// signal cut the drain short).
    pub drain_seconds: f64,
    /// How long the whole shutdown took, from the signal until this summary: the drain, then
    /// the wait for HTTP requests in flight and for the remaining tasks.
    pub shutdown_seconds: f64,
}

/// A built, bound gateway, ready to run.
pub struct App {
    settings: Settings,
    listener: TcpListener,
    local_addr: SocketAddr,
    process: Option<ProcessFn>,
    uplink: Option<crate::uplink::Opened>,
    notifier: Notifier,
    reload: Option<ReloadSetup>,
}

/// What live reload needs before the stages exist.
struct ReloadSetup {
    source: ConfigSource,
    log: Option<LogControl>,
    handle: ReloadHandle,
    requests: ReloadRequests,
}

impl App {
    /// Binds the listen address and prepares the stages: with an uplink, the spool is opened
    /// and recovered here. Nothing runs until [`Self::run_until`].
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        let uplink = match &settings.uplink {
            Some(uplink) => Some(crate::uplink::open(uplink, &settings.spool)?),
            None => None,
        };
        let addr = settings.http.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| AppError::Bind { addr, source })?;
        Ok(Self {
            settings,
            listener,
            local_addr,
            process: None,
            uplink,
            notifier: Notifier::default(),
            reload: None,
        })
    }

    /// Enables live reload (`SIGHUP` through [`Self::reload_handle`], and `POST /-/reload`):
    /// `source` is read again on each reload, and `log` changes the log level. Without it,
    /// `POST /-/reload` answers 503.
    pub fn with_reload(mut self, source: ConfigSource, log: Option<LogControl>) -> Self {
        let (handle, requests) = ReloadHandle::channel();
        self.reload = Some(ReloadSetup {
            source,
            log,
            handle,
            requests,
        });
        self
    }

    /// The handle a signal handler asks for reloads with, once [`Self::with_reload`] enabled
    /// them. Reloads wait until the gateway runs.
    pub fn reload_handle(&self) -> Option<ReloadHandle> {
        self.reload.as_ref().map(|r| r.handle.clone())
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the worker's processing function; for fault-injection tests.
    pub fn with_process(mut self, process: ProcessFn) -> Self {
        self.process = Some(process);
        self
    }

    /// Notifies the service manager through `notifier` (see [`crate::notify`]): READY=1 once
    /// the stages and the server have started, watchdog pings while running, STOPPING=1 when
    /// the drain starts.
    pub fn with_notifier(mut self, notifier: Notifier) -> Self {
        self.notifier = notifier;
        self
    }

    /// Runs every stage until `signal` completes, then shuts down in order and reports.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Summary {
        self.run_until_or_stopped(signal, std::future::pending())
            .await
    }

    /// Like [`Self::run_until`], but when `stop_now` completes during the shutdown (an
    /// operator's second signal), the drain is cut short: the buffer is emptied, HTTP and the
    /// remaining tasks are not waited for, and every sample still queued or in a worker batch is
    /// counted as dropped for `shutdown`.
    pub async fn run_until_or_stopped(
        self,
        signal: impl Future<Output = ()>,
        stop_now: impl Future<Output = ()>,
    ) -> Summary {
        let running = self.start();
        signal.await;
        running.shut_down(stop_now).await
    }

    /// Starts every stage and the HTTP server.
    fn start(self) -> Running {
        let Self {
            settings,
            listener,
            local_addr,
            process,
            uplink,
            notifier,
            reload,
        } = self;
        let started = Instant::now();
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let http_cancel = CancellationToken::new();
        let prometheus = crate::metrics::install();

        let pipeline = Pipeline::start(&settings, &tracker, &cancel, process, uplink);

        let upkeep = prometheus.clone();
        let upkeep_cancel = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP);
            loop {
                tokio::select! {
                    _ = upkeep_cancel.cancelled() => break,
                    _ = tick.tick() => upkeep.run_upkeep(),
                }
            }
        });

        let workers = pipeline.workers;
        let state = AppState {
            devices: pipeline.devices.clone(),
            devices_settled: pipeline.devices_settled(),
            buffer: pipeline.buffer.clone(),
            worker: pipeline.worker.clone(),
            pool: pipeline.pool.clone(),
            workers,
            prometheus,
            shutdown: cancel.clone(),
            started,
            uplink: pipeline.uplink.clone(),
            ingest: Arc::new(Swap::new(Arc::new(api::IngestLimits::new(&settings)))),
            reload: reload.as_ref().map(|r| r.handle.clone()),
        };
        let guard = Arc::new(Swap::new(Arc::new(api::Guard::new(&settings.http))));
        let (header_read_timeout, header_read_timeout_rx) =
            watch::channel(settings.http.header_read_timeout());
        if let Some(ReloadSetup {
            source,
            log,
            handle: _,
            requests,
        }) = reload
        {
            let parts = LiveParts {
                guard: guard.clone(),
                ingest: state.ingest.clone(),
                header_read_timeout,
                worker: pipeline.worker.clone(),
                devices: pipeline.device_control(),
                log,
                uplink: pipeline.uplink_control(),
                notifier: notifier.clone(),
                tracker: tracker.clone(),
            };
            let reloader = Reloader::new(source, settings.clone(), parts, cancel.clone());
            tracker.spawn(reloader.run(requests, cancel.clone()));
        }
        let router = api::router(state, guard);
        let server = tracker.spawn(api::serve_live(
            listener,
            router,
            header_read_timeout_rx,
            tracker.clone(),
            http_cancel.clone(),
        ));
        info!(
            addr = %local_addr,
            devices = settings.devices.len(),
            workers,
            capacity = settings.buffer.capacity,
            overflow = %settings.buffer.overflow,
            "TelemetryHub listening."
        );
        // The listener was bound in `build` and the devices' tasks are spawned: ready. The
        // watchdog's liveness check goes through the buffer lock (see `crate::notify`).
        notifier.ready();
        let buffer = pipeline.buffer.clone();
        notifier.spawn_watchdog(&tracker, http_cancel.clone(), move || {
            let _snapshot = buffer.ledger();
        });
        Running {
            grace: settings.pipeline.shutdown_grace(),
            pipeline,
            server,
            tracker,
            cancel,
            http_cancel,
            notifier,
        }
    }
}

/// The stages and the server, running.
struct Running {
    grace: Duration,
    pipeline: Pipeline,
    server: JoinHandle<()>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    http_cancel: CancellationToken,
    notifier: Notifier,
}

impl Running {
    /// Shuts down in order, or at once when `stop_now` completes first, and reports.
    async fn shut_down(self, stop_now: impl Future<Output = ()>) -> Summary {
        let Self {
            grace,
            pipeline,
            server,
            tracker,
            cancel,
            http_cancel,
            notifier,
        } = self;
        notifier.stopping();
        info!(
            grace_ms = grace.as_millis() as u64,
            "Shutdown requested; draining."
        );
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + grace;
        let buffer = pipeline.buffer.clone();
        let mut stop_now = std::pin::pin!(stop_now);

        // Sources first: readiness turns 503, devices stop, the buffer drains into the workers
        // within the grace period. Then the HTTP server finishes in-flight requests.
        cancel.cancel();
        let drained = tokio::select! {
            _ = pipeline.drain(deadline) => true,
            () = &mut stop_now => false,
        };
        let drain_seconds = started.elapsed().as_secs_f64();
        http_cancel.cancel();
        tracker.close();
        let finished = drained
            && tokio::select! {
                () = wait_for_the_rest(server, &tracker, deadline) => true,
                () = &mut stop_now => false,
            };
        if !finished {
            // Whatever the drain did not get to is lost with the process: count it now.
            buffer.close();
            let abandoned = buffer.abandon();
            warn!(
                abandoned,
                "Drain cut short; queued samples counted as dropped."
            );
        }
        summarise(buffer.ledger(), !finished, drain_seconds, started)
    }
}

/// Waits for the HTTP server's requests in flight and then for every other task, each no
/// longer than the grace period allows (and at least [`FINAL_WAIT`]).
async fn wait_for_the_rest(
    server: JoinHandle<()>,
    tracker: &TaskTracker,
    deadline: tokio::time::Instant,
) {
    let http_deadline = deadline.max(tokio::time::Instant::now() + FINAL_WAIT);
    if tokio::time::timeout_at(http_deadline, server)
        .await
        .is_err()
    {
        warn!("HTTP connections still open after the grace period; closing them.");
    }
    let _ = tokio::time::timeout(FINAL_WAIT, tracker.wait()).await;
}

/// The final accounting: samples still queued or in worker batches now are lost with the
/// process, so they are counted as dropped for `shutdown`, and the ledger still balances.
fn summarise(
    mut ledger: Ledger,
    stopped_early: bool,
    drain_seconds: f64,
    shutdown_started: Instant,
) -> Summary {
    let abandoned_in_flight = ledger.in_flight;
    ledger.dropped.shutdown += ledger.in_buffer + ledger.in_flight;
    ledger.in_buffer = 0;
    ledger.in_flight = 0;
    let summary = Summary {
        ledger,
        abandoned_in_flight,
        balanced: ledger.balanced(),
        stopped_early,
        drain_seconds,
        shutdown_seconds: shutdown_started.elapsed().as_secs_f64(),
    };
    info!(
        read = ledger.read,
        ingested = ledger.ingested,
        processed = ledger.processed,
        rejected = ledger.rejected.total(),
        dropped_overflow = ledger.dropped.overflow,
        dropped_shutdown = ledger.dropped.shutdown,
        dropped_stopped = ledger.dropped.stopped,
        dropped_worker_panic = ledger.dropped.worker_panic,
        abandoned_in_flight,
        balanced = summary.balanced,
        stopped_early,
        drain_seconds,
        shutdown_seconds = summary.shutdown_seconds,
        "Shutdown complete."
    );
    summary
}
