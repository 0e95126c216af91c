//! The uplink: processed samples leave the gateway through the [spool](crate::spool) to an
//! MQTT broker, at least once and in order per device.
//!
//! ```text
//! worker batches --> stage (encode messages, append to the spool, group commit)
//!                --> spool (disk) --> forwarder (QoS 1 publish; PUBACK acknowledges) --> broker
//! ```
//!
//! - [`payload`]: topics, payload formats (`json`, `thingsboard`) and the spool envelope.
//! - [`stage`]: the worker side: processed batches in, spool records out, in order.
//! - [`forwarder`]: the MQTT side; it knows records and topics, no devices and no formats.
//!
//! [`open`] prepares everything at start-up (the spool's recovery runs there); the pipeline
//! starts it with [`Uplink::start`] and stops it last, after the workers have drained.

pub mod forwarder;
pub mod payload;
pub mod stage;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use self::forwarder::{Forwarder, ForwarderOptions, UplinkError, UplinkSnapshot, UplinkStatus};
use self::payload::Encoder;
use self::stage::{SpoolStage, StageWriter};
use crate::buffer::RingBuffer;
use crate::config::{SpoolSettings, UplinkSettings};
use crate::spool::{Fsync, OpenReport, Spool, SpoolReader, SpoolWriter};
use crate::swap::Swap;

/// Encoded batches that may wait for the spool writer, per worker.
const STAGE_DEPTH_PER_WORKER: usize = 2;

/// Longest wait at shutdown for the spool writer to finish the batches it was given.
const WRITER_WAIT: Duration = Duration::from_secs(2);

/// Longest wait at shutdown for the forwarder to collect acknowledgements and disconnect.
const FORWARDER_WAIT: Duration = Duration::from_secs(5);

/// Why the uplink could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The spool directory cannot be used.
    #[error("spool.path {path}: {source}")]
    Spool {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The broker settings cannot be used.
    #[error(transparent)]
    Uplink(#[from] UplinkError),
}

/// An uplink ready to start: the spool opened and recovered, the broker settings checked.
pub struct Opened {
    spool: Spool,
    writer: SpoolWriter,
    reader: SpoolReader,
    fsync: Fsync,
    options: ForwarderOptions,
    encoder: Encoder,
    max_batch: u32,
    hold: Option<tokio::sync::oneshot::Receiver<()>>,
    /// What recovery found.
    pub report: OpenReport,
}

impl Opened {
    /// Keeps the forwarder from connecting until the returned sender fires (or is dropped):
    /// for benchmarks that fill the spool first and then measure the replay.
    pub fn hold_forwarder(&mut self) -> tokio::sync::oneshot::Sender<()> {
        let (release, hold) = tokio::sync::oneshot::channel();
        self.hold = Some(hold);
        release
    }
}

/// Opens the spool (recovering whatever is in it) and checks the broker settings.
pub fn open(uplink: &UplinkSettings, spool: &SpoolSettings) -> Result<Opened, OpenError> {
    let options = ForwarderOptions::new(uplink)?;
    let spool_options = spool.options();
    let fsync = spool_options.fsync;
    let (handle, writer, reader, report) =
        Spool::open(spool_options).map_err(|source| OpenError::Spool {
            path: spool.path.display().to_string(),
            source,
        })?;
    info!(
        dir = %spool.path.display(),
        pending = report.stats.pending,
        bytes = report.stats.bytes,
        skipped = report.skipped.len(),
        "Spool opened."
    );
    let encoder = Encoder::new(uplink.format, uplink.gateway(), uplink.topic_template());
    Ok(Opened {
        spool: handle,
        writer,
        reader,
        fsync,
        options,
        encoder,
        max_batch: uplink.max_batch,
        hold: None,
        report,
    })
}

/// Changes the forwarder's connection settings while it runs (a live reload): it finishes the
/// session it is in (waiting briefly for the PUBACKs of what it sent, like at shutdown) and
/// connects again with the new settings at once; the spool resends whatever was not
/// acknowledged.
#[derive(Clone)]
pub struct UplinkControl {
    options: tokio::sync::watch::Sender<ForwarderOptions>,
    broker: Arc<Swap<str>>,
}

impl UplinkControl {
    /// Reconnects with `options`.
    pub fn reconfigure(&self, options: ForwarderOptions) {
        self.broker.store(options.broker().into());
        self.options.send_replace(options);
    }
}

/// The running uplink.
pub struct Uplink {
    handle: UplinkHandle,
    control: UplinkControl,
    writer: StageWriter,
    forwarder: JoinHandle<()>,
    forwarder_cancel: CancellationToken,
}

/// What the API sees of the uplink; cheap to clone.
#[derive(Clone)]
pub struct UplinkHandle {
    /// The spool, for its counters.
    pub spool: Spool,
    /// The stage, for `POST /samples` to wait on.
    pub stage: SpoolStage,
    /// The forwarder's state.
    pub status: Arc<UplinkStatus>,
    /// The broker, as `mqtt://host:port`; a reload may change it.
    pub broker: Arc<Swap<str>>,
}

/// The uplink as `/status` and `GET /uplink` show it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct UplinkView {
    /// Connected to the broker now.
    pub connected: bool,
    /// The broker.
    pub broker: String,
    /// Samples in the spool, not yet acknowledged by the broker.
    pub pending_samples: u64,
    /// Messages in the spool, not yet acknowledged.
    pub pending_records: u64,
    /// Bytes of spool files.
    pub pending_bytes: u64,
    /// Age of the oldest pending message, in seconds.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Samples the broker acknowledged, ever (kept across restarts).
    pub forwarded: u64,
    /// Samples ever written to the spool (kept across restarts).
    pub spooled: u64,
    /// Samples deleted from the spool unsent, by reason, ever.
    pub dropped: SpoolDropped,
    /// Messages published in this run (resends included) and acknowledged.
    pub published: u64,
    /// Messages acknowledged in this run.
    pub acked: u64,
    /// Connections lost or refused in this run.
    pub reconnects: u64,
    /// The last connection error.
    pub last_error: Option<String>,
}

/// Samples deleted from the spool unsent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SpoolDropped {
    /// The spool was full under `when_full = "drop_oldest"`.
    pub spool_full: u64,
    /// Lost to damaged spool files.
    pub spool_corrupt: u64,
}

impl UplinkHandle {
    /// The view `/status` and `GET /uplink` show.
    pub fn view(&self) -> UplinkView {
        let stats = self.spool.stats();
        let status = self.status.snapshot();
        UplinkView {
            connected: status.connected,
            broker: self.broker.load().to_string(),
            pending_samples: stats.pending,
            pending_records: stats.pending_records,
            pending_bytes: stats.bytes,
            oldest_pending_age_seconds: stats
                .oldest_pending_ms
                .map(|ms| crate::spool::age_of(ms).as_secs_f64()),
            forwarded: stats.forwarded,
            spooled: stats.tail,
            dropped: SpoolDropped {
                spool_full: stats.dropped_full,
                spool_corrupt: stats.dropped_corrupt,
            },
            published: status.published,
            acked: status.acked,
            reconnects: status.reconnects,
            last_error: status.last_error,
        }
    }
}

impl Uplink {
    /// Starts the spool writer thread and the forwarder task.
    pub fn start(
        opened: Opened,
        workers: usize,
        buffer: Arc<RingBuffer>,
        tracker: &TaskTracker,
    ) -> std::io::Result<Uplink> {
        let Opened {
            spool,
            writer,
            reader,
            fsync,
            options,
            encoder,
            max_batch,
            hold,
            report: _,
        } = opened;
        let (stage, writer) = SpoolStage::start(
            writer,
            fsync,
            encoder,
            max_batch,
            workers * STAGE_DEPTH_PER_WORKER,
            buffer,
        )?;
        let status = Arc::new(UplinkStatus::default());
        let forwarder_cancel = CancellationToken::new();
        let broker: Arc<Swap<str>> = Arc::new(Swap::new(options.broker().into()));
        let (options_tx, options_rx) = tokio::sync::watch::channel(options.clone());
        let forwarder = Forwarder::new(
            options,
            spool.clone(),
            reader,
            status.clone(),
            forwarder_cancel.clone(),
        )
        .with_updates(options_rx);
        let held = forwarder_cancel.clone();
        let forwarder = tracker.spawn(async move {
            if let Some(hold) = hold {
                tokio::select! {
                    _ = held.cancelled() => return,
                    _ = hold => {}
                }
            }
            forwarder.run().await;
        });
        Ok(Uplink {
            control: UplinkControl {
                options: options_tx,
                broker: broker.clone(),
            },
            handle: UplinkHandle {
                spool,
                stage,
                status,
                broker,
            },
            writer,
            forwarder,
            forwarder_cancel,
        })
    }

    /// The API's handle.
    pub fn handle(&self) -> UplinkHandle {
        self.handle.clone()
    }

    /// The handle a live reload changes the broker settings with.
    pub fn control(&self) -> UplinkControl {
        self.control.clone()
    }

    /// The stage, for the dispatcher.
    pub fn stage(&self) -> SpoolStage {
        self.handle.stage.clone()
    }

    /// Stops, after the workers have drained: the writer finishes what it was given (a spool
    /// full under `block` is closed after a while, and what could not be written is counted as
    /// `unspooled`), the spool is synced, and the forwarder collects the acknowledgements of
    /// what it sent and disconnects. Unsent samples stay in the spool for the next start.
    pub async fn stop(self) {
        let Uplink {
            handle,
            control: _,
            writer,
            forwarder,
            forwarder_cancel,
        } = self;
        handle.stage.close();
        let joined = tokio::task::spawn_blocking(move || writer.join());
        let mut joined = std::pin::pin!(joined);
        let joined = match tokio::time::timeout(WRITER_WAIT, &mut joined).await {
            Ok(joined) => joined,
            Err(_) => {
                warn!("The spool writer is still waiting for room; closing the spool.");
                handle.spool.close();
                joined.await
            }
        };
        let spool_writer = joined.unwrap_or_else(|_| {
            error!("The spool writer could not be joined.");
            None
        });
        forwarder_cancel.cancel();
        if tokio::time::timeout(FORWARDER_WAIT, forwarder)
            .await
            .is_err()
        {
            warn!("The uplink forwarder did not stop in time.");
        }
        // The acknowledgements the forwarder collected after the writer's last sync are stored
        // too: without this last sync the next start sent those samples again.
        if let Some(mut spool_writer) = spool_writer {
            let synced = tokio::task::spawn_blocking(move || spool_writer.sync()).await;
            if let Ok(Err(err)) = synced {
                error!(error = %err, "Cannot sync the spool at stop.");
            }
        }
        handle.spool.close();
    }
}
