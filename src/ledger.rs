//! Sample accounting: where every sample the gateway accepted is now.
//!
//! The ring buffer keeps one [`Ledger`] under the same lock as its queue, and every stage that
//! moves samples (devices and ingest pushing, the dispatcher popping, workers finishing, shutdown
//! abandoning) updates it in the same critical section. So a snapshot always satisfies
//!
//! ```text
//! read + ingested = processed + rejected + dropped + in_buffer + in_flight
//! ```
//!
//! exactly, at every moment, and nothing is lost without a counter.

use serde::Serialize;

/// Why a sample was dropped before processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The buffer was full and its overflow policy discarded a sample.
    Overflow,
    /// Shutdown's grace period ran out before the sample was processed.
    Shutdown,
    /// The device was stopped while waiting for room in a full `block` buffer.
    Stopped,
    /// The worker batch holding the sample panicked.
    WorkerPanic,
}

impl DropReason {
    /// Every reason, for metrics.
    pub const ALL: [DropReason; 4] = [
        Self::Overflow,
        Self::Shutdown,
        Self::Stopped,
        Self::WorkerPanic,
    ];

    /// The label used in metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Overflow => "overflow",
            Self::Shutdown => "shutdown",
            Self::Stopped => "stopped",
            Self::WorkerPanic => "worker_panic",
        }
    }
}

/// Why a worker refused a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// NaN or infinite.
    NonFinite,
    /// Outside the range configured for its unit.
    OutOfRange,
    /// Finite, but not after the device's calibration (`value * scale + offset` overflowed).
    CalibrationOverflow,
}

impl RejectReason {
    /// Every reason, for metrics.
    pub const ALL: [RejectReason; 3] =
        [Self::NonFinite, Self::OutOfRange, Self::CalibrationOverflow];

    /// The label used in metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NonFinite => "non_finite",
            Self::OutOfRange => "out_of_range",
            Self::CalibrationOverflow => "calibration_overflow",
        }
    }
}

/// Samples dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DropCounts {
    /// See [`DropReason::Overflow`].
    pub overflow: u64,
    /// See [`DropReason::Shutdown`].
    pub shutdown: u64,
    /// See [`DropReason::Stopped`].
    pub stopped: u64,
    /// See [`DropReason::WorkerPanic`].
    pub worker_panic: u64,
}

impl DropCounts {
    /// The count for one reason.
    pub fn get(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::Overflow => self.overflow,
            DropReason::Shutdown => self.shutdown,
            DropReason::Stopped => self.stopped,
            DropReason::WorkerPanic => self.worker_panic,
        }
    }

    fn add(&mut self, reason: DropReason, n: u64) {
        match reason {
            DropReason::Overflow => self.overflow += n,
            DropReason::Shutdown => self.shutdown += n,
            DropReason::Stopped => self.stopped += n,
            DropReason::WorkerPanic => self.worker_panic += n,
        }
    }

    /// All reasons together.
    pub fn total(&self) -> u64 {
        self.overflow + self.shutdown + self.stopped + self.worker_panic
    }
}

/// Samples rejected by workers, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RejectCounts {
    /// See [`RejectReason::NonFinite`].
    pub non_finite: u64,
    /// See [`RejectReason::OutOfRange`].
    pub out_of_range: u64,
    /// See [`RejectReason::CalibrationOverflow`].
    pub calibration_overflow: u64,
}

impl RejectCounts {
    /// The count for one reason.
    pub fn get(&self, reason: RejectReason) -> u64 {
        match reason {
            RejectReason::NonFinite => self.non_finite,
            RejectReason::OutOfRange => self.out_of_range,
            RejectReason::CalibrationOverflow => self.calibration_overflow,
        }
    }

    /// Adds one for `reason`.
    pub fn add(&mut self, reason: RejectReason, n: u64) {
        match reason {
            RejectReason::NonFinite => self.non_finite += n,
            RejectReason::OutOfRange => self.out_of_range += n,
            RejectReason::CalibrationOverflow => self.calibration_overflow += n,
        }
    }

    /// All reasons together.
    pub fn total(&self) -> u64 {
        self.non_finite + self.out_of_range + self.calibration_overflow
    }

    fn merge(&mut self, other: &RejectCounts) {
        self.non_finite += other.non_finite;
        self.out_of_range += other.out_of_range;
        self.calibration_overflow += other.calibration_overflow;
    }
}

/// Where samples come from. Shown in JSON as `link` and `http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
pub enum Source {
    /// Read from a device link.
    #[serde(rename = "link")]
    Device,
    /// Posted over HTTP.
    #[serde(rename = "http")]
    Ingest,
}

/// Every sample's whereabouts. See the module docs for the invariant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Ledger {
    /// Samples read from devices and handed to the buffer.
    pub read: u64,
    /// Samples accepted over HTTP.
    pub ingested: u64,
    /// Samples that entered the queue.
    pub pushed: u64,
    /// Samples taken from the queue by the dispatcher.
    pub popped: u64,
    /// Samples the workers accepted.
    pub processed: u64,
    /// Samples the workers refused, by reason.
    pub rejected: RejectCounts,
    /// Samples dropped, by reason.
    pub dropped: DropCounts,
    /// Samples waiting in the buffer.
    pub in_buffer: u64,
    /// Samples in worker batches.
    pub in_flight: u64,
    /// Worker batches finished (processed or panicked).
    pub batches: u64,
    /// With an uplink: processed samples written to the spool (durable with
    /// `fsync = "always"`) in this run.
    pub spooled: u64,
    /// With an uplink: processed samples on their way to the spool.
    pub spool_queue: u64,
    /// With an uplink: processed samples that never reached the spool (it was closed while
    /// full at shutdown, or a write failed).
    pub unspooled: u64,
}

impl Ledger {
    /// Whether every processed sample is accounted for on its way to the spool (always true
    /// without an uplink, where all three are zero): `processed = spooled + spool_queue +
    /// unspooled`.
    pub fn spool_balanced(&self, uplink: bool) -> bool {
        !uplink || self.processed == self.spooled + self.spool_queue + self.unspooled
    }

    /// Whether every accepted sample is accounted for.
    pub fn balanced(&self) -> bool {
        self.read + self.ingested
            == self.processed
                + self.rejected.total()
                + self.dropped.total()
                + self.in_buffer
                + self.in_flight
    }

    /// Samples that came in, from any source.
    pub fn accepted(&self) -> u64 {
        self.read + self.ingested
    }

    pub(crate) fn arrive(&mut self, source: Source, n: u64) {
        match source {
            Source::Device => self.read += n,
            Source::Ingest => self.ingested += n,
        }
    }

    pub(crate) fn enqueue(&mut self, n: u64) {
        self.pushed += n;
        self.in_buffer += n;
    }

    pub(crate) fn evict(&mut self, n: u64, reason: DropReason) {
        self.in_buffer -= n;
        self.dropped.add(reason, n);
    }

    pub(crate) fn discard(&mut self, n: u64, reason: DropReason) {
        self.dropped.add(reason, n);
    }

    pub(crate) fn dequeue(&mut self, n: u64) {
        self.popped += n;
        self.in_buffer -= n;
        self.in_flight += n;
    }

    pub(crate) fn settle(&mut self, outcome: &BatchOutcome) {
        self.in_flight -= outcome.size();
        self.processed += outcome.processed;
        self.rejected.merge(&outcome.rejected);
        self.batches += 1;
    }

    pub(crate) fn settle_to_spool(&mut self, outcome: &BatchOutcome) {
        self.settle(outcome);
        self.spool_queue += outcome.processed;
    }

    pub(crate) fn spool_settled(&mut self, spooled: u64, unspooled: u64) {
        self.spool_queue -= spooled + unspooled;
        self.spooled += spooled;
        self.unspooled += unspooled;
    }

    pub(crate) fn abort_in_flight(&mut self, n: u64, reason: DropReason) {
        self.in_flight -= n;
        self.dropped.add(reason, n);
        self.batches += 1;
    }
}

/// What a worker did with one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Samples accepted.
    pub processed: u64,
    /// Samples refused, by reason.
    pub rejected: RejectCounts,
}

impl BatchOutcome {
    /// How many samples the batch held.
    pub fn size(&self) -> u64 {
        self.processed + self.rejected.total()
    }
}
