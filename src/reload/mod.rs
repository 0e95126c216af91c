//! Live reload: `SIGHUP` and `POST /-/reload` re-read the configuration and apply it without a
//! restart and without losing a sample.
//!
//! Requests go through a [`ReloadHandle`] (a bounded channel) to one task that runs
//! [`Reloader::reload`] for each in turn, so reloads from a signal and from HTTP at the same
//! moment never interleave. A reload is all or nothing: the new configuration is loaded exactly
//! as at start (defaults, file, environment, flags: [`crate::config::ConfigSource`]) and
//! checked, and everything that can fail is prepared, before anything changes. Then:
//!
//! - **applied live**: the devices (added, removed, changed: see
//!   [`crate::pipeline::DeviceControl::apply`]), calibration and unit ranges (the workers'
//!   next batch), `log.level`, the `[http]` limits, token, hosts and timeouts except
//!   `http.listen`, `buffer.high_watermark`, and the uplink's connection settings (the
//!   forwarder reconnects);
//! - **restart required** ([`RESTART_REQUIRED`]): named in the answer and the log, and kept at
//!   their running values until a restart, while the rest is applied.
//!
//! The API sees only this module's handle and report types; [`Reloader`] does the work and is
//! wired up by [`crate::app`].

mod apply;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use self::apply::{LiveParts, Reloader};
use crate::config::ConfigError;
use crate::pipeline::DeviceChanges;

/// Keys (or whole sections) that a reload cannot change in a running gateway: a new value is
/// reported and waits for a restart.
pub const RESTART_REQUIRED: [&str; 11] = [
    "http.listen",
    "log.format",
    "buffer.capacity",
    "buffer.overflow",
    "pipeline",
    "spool",
    // The whole section, when the file adds or removes it (its keys are live otherwise, but
    // for the four below).
    "uplink",
    "uplink.format",
    "uplink.topic",
    "uplink.gateway_id",
    "uplink.max_batch",
];

/// Reload requests that may wait for the reload task.
const QUEUE: usize = 8;

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `SIGHUP`.
    Signal,
    /// `POST /-/reload`.
    Http,
}

impl Trigger {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "SIGHUP",
            Self::Http => "POST /-/reload",
        }
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// Settings that changed and were applied, as keys or sections (`http`, `log.level`,
    /// `processing.units`, `devices`, `uplink`, ...); empty when the file changed nothing. A
    /// changed setting that could not apply is not here but in `notes` (`log.level` while
    /// `RUST_LOG` is set).
    pub applied: Vec<String>,
    /// Settings that changed but need a restart; they keep their running values until then.
    pub restart_required: Vec<String>,
    /// What happened to each device.
    pub devices: DeviceChanges,
    /// Anything else worth knowing (`RUST_LOG` overriding `log.level`, say).
    pub notes: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration is invalid: the same message `telemetryhub validate` gives.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The configuration is valid but cannot be used (a CA file that holds no certificate).
    #[error(transparent)]
    Uplink(#[from] crate::uplink::UplinkError),
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

struct Request {
    trigger: Trigger,
    reply: oneshot::Sender<Result<ReloadReport, ReloadError>>,
}

/// Asks the reload task for a reload; cheap to clone.
#[derive(Clone)]
pub struct ReloadHandle {
    requests: mpsc::Sender<Request>,
}

/// The receiving end, handed to [`Reloader::run`].
pub struct ReloadRequests {
    requests: mpsc::Receiver<Request>,
}

impl ReloadHandle {
    /// A handle and the requests it sends, for [`Reloader::run`].
    pub fn channel() -> (Self, ReloadRequests) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { requests: tx }, ReloadRequests { requests: rx })
    }

    /// Reloads, after any reload already running or queued, and reports the outcome.
    pub async fn reload(&self, trigger: Trigger) -> Result<ReloadReport, ReloadError> {
        let (reply, outcome) = oneshot::channel();
        self.requests
            .send(Request { trigger, reply })
            .await
            .map_err(|_| ReloadError::ShuttingDown)?;
        outcome.await.map_err(|_| ReloadError::ShuttingDown)?
    }
}
