//! The worker stage: pure processing of sample batches, run on blocking threads.
//!
//! The dispatcher hands each batch to [`Worker::process`] inside `spawn_blocking`. A batch is
//! validated (finite, within the range configured for its unit), calibrated per device
//! (`value * scale + offset`, which must stay finite), folded into rolling statistics per
//! device and [`Series`] (channel, unit and source: a mean across quantities or units means
//! nothing, and HTTP clients can post values a device never sent), and appended to the history
//! behind `GET /samples`. Shared state is locked once per batch, never per sample, and the
//! `telemetryhub_channel_value` gauges are set once per batch and series.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use smol_str::SmolStr;

use crate::config::{DeviceSettings, ProcessingSettings, ValueRange};
use crate::ledger::{BatchOutcome, RejectReason};
use crate::sample::{Labels, ProcessedSample, Sample};
use crate::swap::Swap;

mod histogram;
mod stats;

pub use self::histogram::{LatencyHistogram, LocalHistogram};
use self::stats::{BatchStats, StatsStore};
pub use self::stats::{DeviceStats, MAX_SERIES_PER_DEVICE, RollingStats, Series, SeriesStats};

/// Calibration of one device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Multiplier.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
}

impl Calibration {
    /// No change.
    pub const IDENTITY: Calibration = Calibration {
        scale: 1.0,
        offset: 0.0,
    };

    /// The calibrated value; a finite raw value can still overflow (`1e300 * 1e10`), and JSON
    /// has no infinity to show it with.
    pub fn apply(self, raw: f64) -> Result<f64, RejectReason> {
        let value = raw * self.scale + self.offset;
        if value.is_finite() {
            Ok(value)
        } else {
            Err(RejectReason::CalibrationOverflow)
        }
    }
}

/// Checks a raw value: finite, and within `range` when its unit has one.
pub fn check(value: f64, range: Option<&ValueRange>) -> Result<(), RejectReason> {
    if !value.is_finite() {
        return Err(RejectReason::NonFinite);
    }
    match range {
        Some(r) if value < r.min || value > r.max => Err(RejectReason::OutOfRange),
        _ => Ok(()),
    }
}

/// What the workers check and apply, per unit and per device.
#[derive(Debug, Default)]
struct Tables {
    ranges: HashMap<SmolStr, ValueRange>,
    calibration: HashMap<SmolStr, Calibration>,
}

impl Tables {
    /// The tables for these settings; with `previous`, the calibrations of devices no longer
    /// configured are carried over (see [`Worker::reconfigure`]).
    fn new(
        processing: &ProcessingSettings,
        devices: &[DeviceSettings],
        previous: Option<&Tables>,
    ) -> Self {
        let mut calibration: HashMap<SmolStr, Calibration> =
            previous.map(|p| p.calibration.clone()).unwrap_or_default();
        for d in devices {
            let cal = Calibration {
                scale: d.scale,
                offset: d.offset,
            };
            calibration.insert(SmolStr::new(&d.id), cal);
        }
        Self {
            ranges: processing
                .units
                .iter()
                .map(|(unit, range)| (SmolStr::new(unit), *range))
                .collect(),
            calibration,
        }
    }
}

#[derive(Default)]
struct Shared {
    stats: StatsStore,
    history: VecDeque<ProcessedSample>,
}

/// Adds `kept` (in arrival order) to `history`, keeping the whole history in arrival order
/// although batches finish out of order on several workers, and at most `max` long.
///
/// Both are sorted, so a batch that finished late is merged with the samples of later batches
/// that finished before it, in time linear in their lengths. (Inserting sample by sample moved
/// the whole history for every sample: 38 % of the pipeline's instructions under callgrind.)
fn insert_in_order(
    history: &mut VecDeque<ProcessedSample>,
    kept: Vec<ProcessedSample>,
    max: usize,
) {
    let Some(first) = kept.first() else {
        return;
    };
    let at = history.partition_point(|s| s.order < first.order);
    if at == history.len() {
        history.extend(kept);
    } else {
        let later: Vec<ProcessedSample> = history.drain(at..).collect();
        let mut later = later.into_iter().peekable();
        let mut kept = kept.into_iter().peekable();
        loop {
            let next = match (kept.peek(), later.peek()) {
                (Some(k), Some(l)) if k.order < l.order => kept.next(),
                (Some(_), Some(_)) | (None, Some(_)) => later.next(),
                (Some(_), None) => kept.next(),
                (None, None) => break,
            };
            history.extend(next);
        }
    }
    let excess = history.len().saturating_sub(max);
    history.drain(..excess);
}

/// The value looked up for the last key, so a run of samples with one key costs one map
/// lookup (a SipHash of the key) instead of one per sample.
struct LastLookup<V> {
    last: Option<(SmolStr, V)>,
}

impl<V> Default for LastLookup<V> {
    fn default() -> Self {
        Self { last: None }
    }
}

impl<V: Copy> LastLookup<V> {
    /// The value for `key`: the last one if `key` is the last key, else `lookup(key)`.
    fn get(&mut self, key: &SmolStr, lookup: impl FnOnce(&SmolStr) -> V) -> V {
        match &self.last {
            Some((last, value)) if last == key => *value,
            _ => {
                let value = lookup(key);
                self.last = Some((key.clone(), value));
                value
            }
        }
    }
}

/// Work done so far, for `/status` and `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerTotals {
    /// Batches processed.
    pub batches: u64,
    /// Total time spent processing batches.
    pub busy: Duration,
}

/// The worker stage's shared state and settings. `process` is called from blocking threads.
pub struct Worker {
    /// Unit ranges and calibrations; a live reload replaces them whole, a batch loads them once.
    tables: Swap<Tables>,
    history_len: usize,
    shared: Mutex<Shared>,
    latency: LatencyHistogram,
    batches: AtomicU64,
    busy_nanos: AtomicU64,
}

impl Worker {
    /// A worker stage for these processing settings and devices.
    pub fn new(
        processing: &ProcessingSettings,
        devices: &[DeviceSettings],
        history: usize,
    ) -> Self {
        Self {
            tables: Swap::new(Arc::new(Tables::new(processing, devices, None))),
            history_len: history,
            shared: Mutex::new(Shared::default()),
            latency: LatencyHistogram::default(),
            batches: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
        }
    }

    /// Applies new unit ranges and calibrations (a live reload). Batches that already loaded
    /// the old ones finish with them; the next batch uses the new ones, including for samples
    /// that were queued before the reload.
    ///
    /// A device that is no longer configured keeps its calibration: its samples still queued
    /// are processed as it would have processed them, never with the identity instead.
    pub fn reconfigure(&self, processing: &ProcessingSettings, devices: &[DeviceSettings]) {
        let old = self.tables.load();
        self.tables
            .store(Arc::new(Tables::new(processing, devices, Some(&old))));
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Nothing panics while the lock is held (all computation happens before taking it).
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Processes one batch. CPU-bound: call it from the worker stage, not from async code.
    pub fn process(&self, batch: Vec<Sample>) -> BatchOutcome {
        self.process_into(batch, None)
    }

    /// Like [`Self::process`], also appending every processed sample, in order, to `all` (for
    /// the uplink).
    pub fn process_into(
        &self,
        batch: Vec<Sample>,
        mut all: Option<&mut Vec<ProcessedSample>>,
    ) -> BatchOutcome {
        let started = Instant::now();
        let mut outcome = BatchOutcome::default();
        let mut stats = BatchStats::default();
        let mut latency = LocalHistogram::default();
        let keep_from = batch.len().saturating_sub(self.history_len);
        let mut kept = Vec::with_capacity(batch.len() - keep_from);
        // Batches come in runs of one device and one unit: look each up once per run. A run
        // of samples sharing one `Arc<Labels>` is recognised by pointer, without comparing
        // names.
        let mut ranges = LastLookup::default();
        let mut calibrations = LastLookup::default();
        let mut run: Option<(Arc<Labels>, Option<ValueRange>, Calibration)> = None;
        let tables = self.tables.load();
        // Samples of one read (or one request) share their `received` instant: count them per
        // run and read the clock once, when the batch's samples are all processed.
        let mut arrivals: Vec<(Instant, u64)> = Vec::new();
        for (i, sample) in batch.into_iter().enumerate() {
            let (range, cal) = match &run {
                Some((labels, range, cal)) if Arc::ptr_eq(labels, &sample.labels) => (*range, *cal),
                _ => {
                    let labels = &sample.labels;
                    let range = ranges.get(&labels.unit, |unit| tables.ranges.get(unit).copied());
                    let cal = calibrations.get(&labels.device, |device| {
                        tables
                            .calibration
                            .get(device)
                            .copied()
                            .unwrap_or(Calibration::IDENTITY)
                    });
                    run = Some((labels.clone(), range, cal));
                    (range, cal)
                }
            };
            if let Err(reason) = check(sample.value, range.as_ref()) {
                outcome.rejected.add(reason, 1);
                continue;
            }
            let value = match cal.apply(sample.value) {
                Ok(value) => value,
                Err(reason) => {
                    outcome.rejected.add(reason, 1);
                    continue;
                }
            };
            stats.add(&sample, value);
            match arrivals.last_mut() {
                Some((received, n)) if *received == sample.received => *n += 1,
                _ => arrivals.push((sample.received, 1)),
            }
            outcome.processed += 1;
            // Built only for a place that keeps it: moved there, cloned only when both do.
            let keep = i >= keep_from;
            let all = match all.as_deref_mut() {
                None if !keep => continue,
                all => all,
            };
            let processed = ProcessedSample {
                seq: sample.seq,
                value,
                labels: sample.labels,
                timestamp: sample.timestamp,
                order: sample.order,
            };
            match all {
                Some(all) => {
                    if keep {
                        kept.push(processed.clone());
                    }
                    all.push(processed);
                }
                None => kept.push(processed),
            }
        }
        // Read→processed: from the read that brought a sample to the end of its batch's
        // processing loop (never shorter than the per-sample reading it replaces).
        let processed_at = Instant::now();
        for (received, n) in arrivals {
            latency.record_n(processed_at.saturating_duration_since(received), n);
        }
        self.latency.merge(&latency);
        let last_values = {
            let mut shared = self.lock();
            insert_in_order(&mut shared.history, kept, self.history_len);
            shared.stats.merge(stats)
        };
        for last in &last_values {
            crate::metrics::channel_value(
                &last.device,
                &last.series.channel,
                &last.series.unit,
                last.value,
            );
        }
        let elapsed = started.elapsed();
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.busy_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        crate::metrics::batch_processed(elapsed);
        outcome
    }

    /// The latest processed samples, oldest first, at most `limit`.
    pub fn recent(&self, limit: usize) -> Vec<ProcessedSample> {
        let shared = self.lock();
        let skip = shared.history.len().saturating_sub(limit);
        shared.history.iter().skip(skip).cloned().collect()
    }

    /// How many processed samples the history keeps.
    pub fn history_len(&self) -> usize {
        self.history_len
    }

    /// The most recent processed sample.
    pub fn latest(&self) -> Option<ProcessedSample> {
        self.lock().history.back().cloned()
    }

    /// Statistics of one device, per series; empty if it has processed no samples.
    pub fn stats(&self, device: &str) -> DeviceStats {
        self.lock().stats.device(device)
    }

    /// Forgets a device's statistics (on reset, or for a device a reload adds or restarts).
    pub fn reset_stats(&self, device: &str) {
        self.lock().stats.reset(device);
    }

    /// Forgets the statistics of a device a reload removed. Its samples still queued are
    /// processed (history, uplink, ledger) but make no statistics: an entry for a device that
    /// is not shown would never be freed. [`Self::reset_stats`] undoes it when the device is
    /// added again.
    pub fn remove_stats(&self, device: &str) {
        self.lock().stats.remove(device);
    }

    /// Read-to-processed latency quantile.
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        self.latency.quantile(q)
    }

    /// Batches and busy time so far.
    pub fn totals(&self) -> WorkerTotals {
        WorkerTotals {
            batches: self.batches.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::sample::{DEFAULT_CHANNEL, Labels};

    fn worker(history: usize) -> Worker {
        let settings = Settings::default();
        let mut device = DeviceSettings::simulated("test");
        device.scale = 2.0;
        device.offset = 1.0;
        Worker::new(&settings.processing, &[device], history)
    }

    #[test]
    fn check_rejects_non_finite_and_out_of_range() {
        let range = ValueRange {
            min: 0.0,
            max: 10.0,
        };
        assert_eq!(check(f64::NAN, None), Err(RejectReason::NonFinite));
        assert_eq!(
            check(f64::INFINITY, Some(&range)),
            Err(RejectReason::NonFinite)
        );
        assert_eq!(check(10.5, Some(&range)), Err(RejectReason::OutOfRange));
        assert_eq!(check(-0.1, Some(&range)), Err(RejectReason::OutOfRange));
        assert_eq!(check(10.0, Some(&range)), Ok(()));
        assert_eq!(check(1e300, None), Ok(()));
    }

    #[test]
    fn latency_runs_from_each_read_to_the_end_of_the_batch() {
        let worker = worker(10);
        let now = Instant::now();
        let (old, recent) = (
            now - Duration::from_millis(40),
            now - Duration::from_millis(2),
        );
        // Two reads: 3 samples read 40 ms ago, then 1 read 2 ms ago; a rejected one between.
        let mut batch: Vec<Sample> = (0..5).map(|i| Sample::test(i, 1.0)).collect();
        batch[3].value = f64::NAN;
        for (i, sample) in batch.iter_mut().enumerate() {
            sample.received = if i < 4 { old } else { recent };
        }
        assert_eq!(worker.process(batch).processed, 4);
        // 3 of 4 processed samples are at least 40 ms old; the fourth at least 2 ms.
        let median = worker.latency_quantile(0.5).unwrap();
        let min = worker.latency_quantile(0.0).unwrap();
        assert!(median >= Duration::from_millis(35), "{median:?}");
        assert!(min >= Duration::from_micros(1750), "{min:?}");
        assert!(min < Duration::from_millis(35), "{min:?}");
    }

    #[test]
    fn process_calibrates_counts_and_keeps_history() {
        let worker = worker(3);
        let batch = vec![
            Sample::test(0, 1.0),
            Sample::test(1, f64::NAN),
            Sample::test(2, 5000.0),
            Sample::test(3, 2.0),
            Sample::test(4, 3.0),
            Sample::test(5, 4.0),
        ];
        let outcome = worker.process(batch);
        assert_eq!(outcome.processed, 4);
        assert_eq!(outcome.rejected.non_finite, 1);
        assert_eq!(outcome.rejected.out_of_range, 1);
        let recent = worker.recent(10);
        let values: Vec<f64> = recent.iter().map(|s| s.value).collect();
        assert_eq!(values, [5.0, 7.0, 9.0]);
        let stats = worker.stats("test").stats.unwrap();
        assert_eq!(
            (stats.count, stats.min, stats.max, stats.last),
            (4, 3.0, 9.0, 9.0)
        );
        assert!((stats.mean - 6.0).abs() < 1e-12);
        assert_eq!(worker.latest().unwrap().seq, Some(5));
        assert_eq!(worker.recent(1).len(), 1);
        assert!(worker.latency_quantile(0.99).is_some());
        assert_eq!(worker.totals().batches, 1);
    }

    #[test]
    fn history_is_bounded_across_batches() {
        let worker = worker(5);
        for start in (0..20).step_by(4) {
            worker.process((start..start + 4).map(|i| Sample::test(i, 1.0)).collect());
        }
        let seqs: Vec<_> = worker.recent(100).iter().map(|s| s.seq.unwrap()).collect();
        assert_eq!(seqs, [15, 16, 17, 18, 19]);
    }

    #[test]
    fn the_uplink_gets_every_processed_sample_and_the_history_only_the_last() {
        let worker = worker(2);
        let batch: Vec<_> = [1.0, f64::NAN, 2.0, 3.0, 4.0]
            .into_iter()
            .zip(0..)
            .map(|(value, seq)| Sample::test(seq, value))
            .collect();
        let mut all = Vec::new();
        let outcome = worker.process_into(batch, Some(&mut all));
        assert_eq!(outcome.processed, 4, "{outcome:?}");
        let shown = |samples: &[ProcessedSample]| -> Vec<_> {
            samples.iter().map(|s| (s.seq.unwrap(), s.value)).collect()
        };
        // Calibrated (scale 2, offset 1); the rejected NaN in neither.
        assert_eq!(shown(&all), [(0, 3.0), (2, 5.0), (3, 7.0), (4, 9.0)]);
        assert_eq!(shown(&worker.recent(10)), [(3, 7.0), (4, 9.0)]);
        assert!(all.iter().all(|s| s.labels.device == "test"));
    }

    #[test]
    fn batches_finishing_out_of_order_keep_the_history_in_arrival_order() {
        let worker = worker(6);
        let batch = |range: std::ops::Range<u32>| -> Vec<Sample> {
            range
                .map(|i| Sample {
                    order: u64::from(i),
                    ..Sample::test(i, 1.0)
                })
                .collect()
        };
        worker.process(batch(4..8));
        worker.process(batch(0..4));
        worker.process(batch(8..10));
        let seqs: Vec<_> = worker.recent(100).iter().map(|s| s.seq.unwrap()).collect();
        assert_eq!(seqs, [4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn interleaved_batches_merge_into_one_ordered_history() {
        let sample = |order: u64| ProcessedSample {
            seq: None,
            value: 0.0,
            labels: Labels::new("d", "u", DEFAULT_CHANNEL),
            timestamp: std::time::SystemTime::UNIX_EPOCH,
            order,
        };
        let mut history: VecDeque<_> = [0, 2, 4, 6, 8].map(sample).into();
        insert_in_order(&mut history, [3, 5, 9, 10].map(sample).into(), 8);
        let orders: Vec<_> = history.iter().map(|s| s.order).collect();
        assert_eq!(orders, [2, 3, 4, 5, 6, 8, 9, 10]);
        insert_in_order(&mut history, vec![sample(7)], 8);
        let orders: Vec<_> = history.iter().map(|s| s.order).collect();
        assert_eq!(orders, [3, 4, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn last_lookup_looks_up_once_per_run_of_a_key() {
        let (a, bb) = (SmolStr::new("a"), SmolStr::new("bb"));
        let mut cache = LastLookup::default();
        let mut lookups = Vec::new();
        for key in [&a, &a, &bb, &bb, &bb, &a] {
            let value = cache.get(key, |k| {
                lookups.push(k.clone());
                k.len()
            });
            assert_eq!(value, key.len(), "{key}");
        }
        assert_eq!(lookups, [a.clone(), bb, a]);
    }

    /// A worker reconfigured with `unit` ranged 0 to 1 and one device, `other`, of scale 10.
    fn reconfigured(unit: &str) -> Worker {
        let worker = worker(10);
        let mut processing = Settings::default().processing;
        processing
            .units
            .insert(unit.to_owned(), ValueRange { min: 0.0, max: 1.0 });
        let mut other = DeviceSettings::simulated("other");
        other.scale = 10.0;
        worker.reconfigure(&processing, &[other]);
        worker
    }

    #[test]
    fn runs_of_shared_labels_get_their_own_range_and_calibration() {
        let worker = reconfigured("V");
        let volts = Labels::new("test", "V", DEFAULT_CHANNEL);
        let other_volts = Labels::new("other", "V", DEFAULT_CHANNEL);
        let free = Labels::new("test", "arb.units", DEFAULT_CHANNEL);
        let batch: Vec<_> = [(&volts, 0.5), (&volts, 5.0), (&free, 5.0), (&free, 0.5)]
            .into_iter()
            .chain([(&other_volts, 0.5), (&volts, 0.5), (&other_volts, 2.0)])
            .zip(0..)
            .map(|((labels, value), seq)| Sample {
                labels: labels.clone(),
                ..Sample::test(seq, value)
            })
            .collect();
        let mut all = Vec::new();
        let outcome = worker.process_into(batch, Some(&mut all));
        assert_eq!(outcome.rejected.out_of_range, 2, "{outcome:?}");
        let got: Vec<_> = all.iter().map(|s| (s.seq.unwrap(), s.value)).collect();
        // `test` keeps scale 2, offset 1; `other` has scale 10.
        assert_eq!(got, [(0, 2.0), (2, 11.0), (3, 2.0), (4, 5.0), (5, 2.0)]);
    }

    #[test]
    fn reconfigure_applies_new_ranges_and_calibrations_and_keeps_removed_devices_calibrations() {
        let worker = reconfigured("arb.units");
        let mut from_other = Sample::test(1, 0.5);
        from_other.labels = Labels::new("other", "arb.units", DEFAULT_CHANNEL);
        // "test" is gone from the config but keeps scale 2, offset 1; 5.0 is now out of range.
        let outcome = worker.process(vec![Sample::test(0, 0.5), from_other, Sample::test(2, 5.0)]);
        assert_eq!(outcome.processed, 2, "{outcome:?}");
        assert_eq!(outcome.rejected.out_of_range, 1, "{outcome:?}");
        let values: Vec<f64> = worker.recent(10).iter().map(|s| s.value).collect();
        assert_eq!(values, [2.0, 5.0]);
    }

    #[test]
    fn a_calibration_that_overflows_is_rejected() {
        let settings = Settings::default();
        let mut device = DeviceSettings::simulated("test");
        device.scale = 1e307;
        let worker = Worker::new(&settings.processing, &[device], 10);
        // 100 * 1e307 is beyond f64::MAX; 1e-300 * 1e307 is 1e7.
        let outcome = worker.process(vec![Sample::test(0, 100.0), Sample::test(1, 1e-300)]);
        assert_eq!(outcome.processed, 1, "{outcome:?}");
        assert_eq!(outcome.rejected.calibration_overflow, 1, "{outcome:?}");
        assert_eq!(outcome.rejected.total(), 1, "{outcome:?}");
        let values: Vec<f64> = worker.recent(10).iter().map(|s| s.value).collect();
        assert_eq!(values.len(), 1);
        assert!((values[0] - 1e7).abs() < 1e-6, "{values:?}");
    }
}
