//! `[buffer]`, `[pipeline]` and `[processing]`: the data path from the ring buffer through the
//! dispatcher to the workers, and what the workers accept.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, MAX_MS, check_range};
use crate::buffer::OverflowPolicy;

/// The ring buffer between devices and workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferSettings {
    /// Maximum number of samples held, 1 to 10 000 000.
    #[serde(default = "default_capacity")]
    pub capacity: usize,
    /// What happens to a sample that arrives when the buffer is full.
    #[serde(default)]
    pub overflow: OverflowPolicy,
    /// Fraction of capacity at which `POST /samples` is refused with 429 (backpressure): above
    /// 0, at most 1.
    #[serde(default = "default_high_watermark")]
    pub high_watermark: f64,
}

impl Default for BufferSettings {
    fn default() -> Self {
        Self {
            capacity: default_capacity(),
            overflow: OverflowPolicy::default(),
            high_watermark: default_high_watermark(),
        }
    }
}

/// The largest buffer capacity. Memory is not reserved up front, but a full buffer of this
/// many samples already takes about a gigabyte.
const MAX_CAPACITY: usize = 10_000_000;

impl BufferSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_range("buffer.capacity", self.capacity, 1..=MAX_CAPACITY)?;
        if !(self.high_watermark > 0.0 && self.high_watermark <= 1.0) {
            return Err(ConfigError::invalid(
                "buffer.high_watermark",
                format!(
                    "must be a fraction of capacity above 0 and at most 1, got {}",
                    self.high_watermark
                ),
            ));
        }
        Ok(())
    }

    /// The depth at which HTTP ingest is refused.
    pub fn high_watermark_samples(&self) -> usize {
        ((self.capacity as f64 * self.high_watermark).ceil() as usize).clamp(1, self.capacity)
    }
}

fn default_high_watermark() -> f64 {
    0.8
}

fn default_capacity() -> usize {
    1000
}

/// The dispatcher and the worker stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Most samples handed to one worker batch, 1 to 1 000 000.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Batches processed at once (semaphore permits), 1 to 1024; unset means the number of
    /// CPUs (at most 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Processed samples kept for `GET /samples`, 1 to 1 000 000.
    #[serde(default = "default_history")]
    pub history: usize,
    /// How long shutdown may take to drain the buffer before the rest is counted as dropped,
    /// 0 to 3 600 000 ms (one hour).
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            batch_max: default_batch_max(),
            workers: None,
            history: default_history(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
        }
    }
}

/// Most worker permits: far more blocking threads than any edge box has cores, and far below
/// tokio's `Semaphore::MAX_PERMITS`, which panics.
const MAX_WORKERS: usize = 1024;
/// Most samples in one batch, and most kept for `GET /samples`.
const MAX_BATCH: usize = 1_000_000;

impl PipelineSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_range("pipeline.batch_max", self.batch_max, 1..=MAX_BATCH)?;
        if let Some(workers) = self.workers {
            check_range("pipeline.workers", workers, 1..=MAX_WORKERS)?;
        }
        check_range("pipeline.history", self.history, 1..=MAX_BATCH)?;
        check_range(
            "pipeline.shutdown_grace_ms",
            self.shutdown_grace_ms,
            0..=MAX_MS,
        )
    }

    /// The number of worker permits, resolving "unset" to the number of CPUs.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(NonZeroUsize::get)
                .unwrap_or(1)
                .min(MAX_WORKERS)
        })
    }

    /// The shutdown drain deadline.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

fn default_batch_max() -> usize {
    4096
}
fn default_history() -> usize {
    1000
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}

/// What the workers do to each sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingSettings {
    /// Accepted range of raw values, per unit (1 to 16 of `A-Z a-z 0-9 . _ / % -`, as samples
    /// carry them). Units not listed only need a finite value.
    #[serde(default = "default_units")]
    pub units: BTreeMap<String, ValueRange>,
}

impl Default for ProcessingSettings {
    fn default() -> Self {
        Self {
            units: default_units(),
        }
    }
}

fn default_units() -> BTreeMap<String, ValueRange> {
    BTreeMap::from([(
        "arb.units".to_owned(),
        ValueRange {
            min: -1000.0,
            max: 1000.0,
        },
    )])
}

impl ProcessingSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (unit, range) in &self.units {
            if !crate::device::codec::valid_unit(unit.as_bytes()) {
                return Err(ConfigError::invalid(
                    format!("processing.units.{unit}"),
                    "no sample can carry this unit (units are 1-16 characters of A-Z, a-z, \
                     0-9, '.', '_', '/', '%' or '-'), so the range would never apply",
                ));
            }
            if !(range.min.is_finite() && range.max.is_finite() && range.min <= range.max) {
                return Err(ConfigError::invalid(
                    format!("processing.units.{unit}"),
                    "needs finite min <= max",
                ));
            }
        }
        Ok(())
    }
}

/// An inclusive range of accepted values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueRange {
    /// Smallest accepted value: finite, at most `max`.
    pub min: f64,
    /// Largest accepted value: finite.
    pub max: f64,
}
