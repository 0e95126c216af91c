//! Rolling statistics of processed values, per device and [`Series`] (channel, unit and
//! source).
//!
//! A worker folds its batch into [`BatchStats`] without a lock, then merges it into the shared
//! [`StatsStore`] once per batch; the API reads one device's [`DeviceStats`] from it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use smol_str::SmolStr;

use crate::ledger::Source;
use crate::sample::{Labels, Sample};

/// Series kept per device. Units come from HTTP clients, which must not grow the gateway's
/// memory without bound: samples of further series are processed, but only counted
/// ([`DeviceStats::untracked_samples`]).
pub const MAX_SERIES_PER_DEVICE: usize = 32;

/// Running statistics of processed values (of one device and series).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RollingStats {
    /// Values seen.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Most recent value.
    pub last: f64,
}

impl RollingStats {
    fn new(value: f64) -> Self {
        Self {
            count: 1,
            min: value,
            max: value,
            mean: value,
            last: value,
        }
    }

    /// Adds one value.
    pub fn update(&mut self, value: f64) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.mean = self.mean_with(value, 1.0 / self.count as f64);
        self.last = value;
    }

    /// Folds in statistics of later values.
    pub fn merge(&mut self, later: &RollingStats) {
        let total = self.count + later.count;
        self.count = total;
        self.min = self.min.min(later.min);
        self.max = self.max.max(later.max);
        self.mean = self.mean_with(later.mean, later.count as f64 / total as f64);
        self.last = later.last;
    }

    /// The mean moved towards `other` by `weight` (0..=1), with `min` and `max` already
    /// covering `other`. `mean + (other - mean) * weight` is the stable form, but `other - mean`
    /// overflows for values of opposite signs beyond `f64::MAX / 2`; the weighted sum then
    /// cannot, being no larger than its largest term. Rounding may still step outside the
    /// values seen, which the clamp undoes: so the mean of finite values is finite. (`max` and
    /// `min` rather than `clamp`, which panics on a NaN bound; this runs under the lock.)
    fn mean_with(&self, other: f64, weight: f64) -> f64 {
        let stable = self.mean + (other - self.mean) * weight;
        let mean = if stable.is_finite() {
            stable
        } else {
            self.mean * (1.0 - weight) + other * weight
        };
        mean.max(self.min).min(self.max)
    }
}

/// Which of a device's samples one set of statistics covers: those of one channel, in one
/// unit, from one source. A mean across quantities or units means nothing, and HTTP clients can
/// post values the device never sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
pub struct Series {
    /// The quantity measured.
    #[schema(value_type = String)]
    pub channel: SmolStr,
    /// Unit token.
    #[schema(value_type = String)]
    pub unit: SmolStr,
    /// The device's link or HTTP ingest.
    pub source: Source,
}

impl Series {
    fn of(sample: &Sample) -> Self {
        Self {
            channel: sample.labels.channel.clone(),
            unit: sample.labels.unit.clone(),
            source: sample.source,
        }
    }
}

/// One series' statistics as the API shows them:
/// `{"channel", "unit", "source", "count", "min", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SeriesStats {
    /// Which samples.
    #[serde(flatten)]
    pub series: Series,
    /// Their statistics.
    #[serde(flatten)]
    pub stats: RollingStats,
}

/// One device's statistics as the API shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DeviceStats {
    /// The statistics of the device's link samples when they are all of one channel and in one
    /// unit, else `None`. The single `stats` object of earlier versions (which mixed units and
    /// sources), kept so its clients keep working.
    pub stats: Option<RollingStats>,
    /// Every series, ordered by channel, then unit, then link before HTTP.
    pub series: Vec<SeriesStats>,
    /// Processed samples in no series, because the device already had
    /// [`MAX_SERIES_PER_DEVICE`] series.
    pub untracked_samples: u64,
}

/// One batch's statistics per device and series, gathered without a lock.
#[derive(Default)]
pub(super) struct BatchStats {
    entries: Vec<(SmolStr, Series, RollingStats)>,
    /// Where each device and series is in `entries`. Batches come in runs of one device,
    /// channel and unit, so this is only consulted when the run changes, and a batch of many units
    /// (HTTP clients choose them) costs a hash per sample, not a scan of every entry.
    index: HashMap<(SmolStr, Series), usize>,
    /// The current run: its samples' shared labels and source, and its entry. A sample with
    /// the same labels (the same `Arc`) needs no comparison of strings.
    last: Option<(Arc<Labels>, Source, usize)>,
}

impl BatchStats {
    /// Folds in one processed sample's calibrated `value`.
    pub(super) fn add(&mut self, sample: &Sample, value: f64) {
        if let Some((labels, source, i)) = &self.last
            && Arc::ptr_eq(labels, &sample.labels)
            && *source == sample.source
        {
            self.entries[*i].2.update(value);
            return;
        }
        let key = (sample.labels.device.clone(), Series::of(sample));
        let i = match self.index.get(&key) {
            Some(&i) => {
                self.entries[i].2.update(value);
                i
            }
            None => {
                let i = self.entries.len();
                self.index.insert(key.clone(), i);
                self.entries.push((key.0, key.1, RollingStats::new(value)));
                i
            }
        };
        self.last = Some((sample.labels.clone(), sample.source, i));
    }
}

/// Every device's statistics; the worker keeps it behind its lock.
#[derive(Default)]
pub(super) struct StatsStore {
    devices: HashMap<SmolStr, DeviceSeries>,
    /// Devices a reload removed: samples of theirs still queued are processed, but make no
    /// statistics again (nobody could see or free them).
    removed: HashSet<SmolStr>,
}

#[derive(Default)]
struct DeviceSeries {
    series: BTreeMap<Series, RollingStats>,
    untracked: u64,
}

/// The last value of one series in one batch, for the `telemetryhub_channel_value` gauge.
pub(super) struct LastValue {
    /// Device id.
    pub device: SmolStr,
    /// The series (its source is not a label).
    pub series: Series,
    /// The last calibrated value of the batch.
    pub value: f64,
}

impl StatsStore {
    /// Merges a batch's statistics. Returns the last value of each series the store keeps
    /// (those within [`MAX_SERIES_PER_DEVICE`]), for the gauges: so they are bounded alike.
    pub(super) fn merge(&mut self, batch: BatchStats) -> Vec<LastValue> {
        let mut kept = Vec::with_capacity(batch.entries.len());
        for (id, series, stats) in batch.entries {
            if !self.removed.is_empty() && self.removed.contains(&id) {
                continue;
            }
            let device = self.devices.entry(id.clone()).or_default();
            if let Some(known) = device.series.get_mut(&series) {
                known.merge(&stats);
            } else if device.series.len() < MAX_SERIES_PER_DEVICE {
                device.series.insert(series.clone(), stats);
            } else {
                device.untracked += stats.count;
                continue;
            }
            kept.push(LastValue {
                device: id,
                series,
                value: stats.last,
            });
        }
        kept
    }

    /// One device's statistics; empty if it has none.
    pub(super) fn device(&self, id: &str) -> DeviceStats {
        let Some(device) = self.devices.get(id) else {
            return DeviceStats::default();
        };
        let mut link = device
            .series
            .iter()
            .filter(|(series, _)| series.source == Source::Device);
        let stats = match (link.next(), link.next()) {
            (Some((_, only)), None) => Some(*only),
            _ => None,
        };
        DeviceStats {
            stats,
            series: device
                .series
                .iter()
                .map(|(series, stats)| SeriesStats {
                    series: series.clone(),
                    stats: *stats,
                })
                .collect(),
            untracked_samples: device.untracked,
        }
    }

    /// Forgets one device's statistics; its next samples count from zero.
    pub(super) fn reset(&mut self, id: &str) {
        self.devices.remove(id);
        self.removed.remove(id);
    }

    /// Forgets a removed device's statistics and keeps none for its samples still queued,
    /// until [`Self::reset`] (the device is added again).
    pub(super) fn remove(&mut self, id: &str) {
        self.devices.remove(id);
        self.removed.insert(SmolStr::new(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::DEFAULT_CHANNEL;

    fn sample(device: &str, unit: &str, source: Source) -> Sample {
        Sample {
            labels: Labels::new(device, unit, DEFAULT_CHANNEL),
            source,
            ..Sample::test(0, 0.0)
        }
    }

    fn on_channel(channel: &str, unit: &str) -> Sample {
        Sample {
            labels: Labels::new("a", unit, channel),
            ..Sample::test(0, 0.0)
        }
    }

    #[test]
    fn samples_sharing_labels_are_still_kept_apart_by_source() {
        let mut batch = BatchStats::default();
        let link = sample("a", "V", Source::Device);
        let posted = Sample {
            source: Source::Ingest,
            ..link.clone()
        };
        for (s, v) in [(&link, 1.0), (&posted, 10.0), (&link, 3.0), (&posted, 20.0)] {
            batch.add(s, v);
        }
        batch.add(&sample("a", "V", Source::Device), 5.0);
        let mut store = StatsStore::default();
        store.merge(batch);
        let means: Vec<_> = store
            .device("a")
            .series
            .iter()
            .map(|s| (s.series.source, s.stats.count, s.stats.mean))
            .collect();
        assert_eq!(
            means,
            [(Source::Device, 3, 3.0), (Source::Ingest, 2, 15.0)],
            "equal labels in another Arc join the same series"
        );
    }

    #[test]
    fn series_are_kept_apart_by_channel() {
        let mut batch = BatchStats::default();
        let (temp, hum) = (on_channel("temp", "degC"), on_channel("hum", "%RH"));
        let temp_f = on_channel("temp", "degF");
        for (s, value) in [(&temp, 20.0), (&hum, 50.0), (&temp, 22.0), (&temp_f, 70.0)] {
            batch.add(s, value);
        }
        let mut store = StatsStore::default();
        let last = store.merge(batch);
        let a = store.device("a");
        let shown: Vec<_> = a
            .series
            .iter()
            .map(|s| {
                (
                    s.series.channel.as_str(),
                    s.series.unit.as_str(),
                    s.stats.count,
                    s.stats.last,
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("hum", "%RH", 1, 50.0),
                ("temp", "degC", 2, 22.0),
                ("temp", "degF", 1, 70.0)
            ]
        );
        assert_eq!(
            store.device("a").stats,
            None,
            "the link reports several channels"
        );
        let gauges: Vec<_> = last
            .iter()
            .map(|l| (l.series.channel.as_str(), l.series.unit.as_str(), l.value))
            .collect();
        assert_eq!(
            gauges,
            [
                ("temp", "degC", 22.0),
                ("hum", "%RH", 50.0),
                ("temp", "degF", 70.0)
            ]
        );
    }

    #[test]
    fn only_kept_series_report_a_last_value() {
        let mut store = StatsStore::default();
        let mut batch = BatchStats::default();
        for channel in 0..MAX_SERIES_PER_DEVICE + 5 {
            batch.add(&on_channel(&format!("c{channel}"), "V"), 1.0);
        }
        assert_eq!(store.merge(batch).len(), MAX_SERIES_PER_DEVICE);
        let mut batch = BatchStats::default();
        batch.add(&on_channel("c0", "V"), 2.0);
        batch.add(&on_channel("another", "V"), 2.0);
        let last = store.merge(batch);
        assert_eq!(last.len(), 1, "the full device admits no new series");
        assert_eq!(
            (last[0].series.channel.as_str(), last[0].value),
            ("c0", 2.0)
        );
        assert_eq!(store.device("a").untracked_samples, 6);
    }

    #[test]
    fn series_are_kept_apart_by_device_unit_and_source() {
        let mut batch = BatchStats::default();
        let link_v = sample("a", "V", Source::Device);
        let http_v = sample("a", "V", Source::Ingest);
        let link_a = sample("a", "A", Source::Device);
        for (s, value) in [
            (&link_v, 1.0),
            (&link_v, 3.0),
            (&http_v, 100.0),
            (&link_a, -1.0),
            (&link_v, 5.0),
            (&sample("b", "V", Source::Device), 7.0),
        ] {
            batch.add(s, value);
        }
        let mut store = StatsStore::default();
        store.merge(batch);
        let a = store.device("a");
        let shown: Vec<_> = a
            .series
            .iter()
            .map(|s| {
                (
                    s.series.unit.as_str(),
                    s.series.source,
                    s.stats.count,
                    s.stats.mean,
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("A", Source::Device, 1, -1.0),
                ("V", Source::Device, 3, 3.0),
                ("V", Source::Ingest, 1, 100.0),
            ]
        );
        assert_eq!(a.stats, None, "the link reports two units");
        assert_eq!(store.device("b").stats.map(|s| s.mean), Some(7.0));
        store.reset("a");
        assert_eq!(store.device("a"), DeviceStats::default());
        assert_eq!(store.device("b").series.len(), 1);
    }

    #[test]
    fn a_device_keeps_a_bounded_number_of_series_and_counts_the_rest() {
        let mut store = StatsStore::default();
        for round in 0..2 {
            let mut batch = BatchStats::default();
            for unit in 0..MAX_SERIES_PER_DEVICE + 10 {
                batch.add(&sample("a", &format!("u{unit}"), Source::Ingest), 1.0);
            }
            store.merge(batch);
            let a = store.device("a");
            assert_eq!(a.series.len(), MAX_SERIES_PER_DEVICE);
            assert_eq!(a.untracked_samples, 10 * (round + 1));
        }
    }

    #[test]
    fn stats_of_values_near_the_f64_limits_stay_finite() {
        let mut stats = RollingStats::new(f64::MAX);
        stats.update(-f64::MAX);
        assert_eq!(stats.mean, 0.0, "{stats:?}");
        stats.update(f64::MAX);
        assert!(stats.mean.is_finite() && stats.mean > 0.0, "{stats:?}");

        let mut a = RollingStats::new(-f64::MAX);
        let mut b = RollingStats::new(f64::MAX);
        b.update(f64::MAX);
        a.merge(&b);
        assert!(a.mean.is_finite(), "{a:?}");
        assert!((a.mean - f64::MAX / 3.0).abs() <= f64::MAX * 1e-12, "{a:?}");

        let mut same = RollingStats::new(f64::MAX);
        (0..5).for_each(|_| same.update(f64::MAX));
        same.merge(&RollingStats::new(f64::MAX));
        assert_eq!(same.mean, f64::MAX, "{same:?}");
    }

    #[test]
    fn merged_stats_equal_sequential_stats() {
        let values = [3.0, -1.0, 4.0, 1.5, 9.0, 2.6];
        let mut seq = RollingStats::new(values[0]);
        values[1..].iter().for_each(|&v| seq.update(v));
        let mut a = RollingStats::new(values[0]);
        values[1..3].iter().for_each(|&v| a.update(v));
        let mut b = RollingStats::new(values[3]);
        values[4..].iter().for_each(|&v| b.update(v));
        a.merge(&b);
        assert_eq!(
            (a.count, a.min, a.max, a.last),
            (seq.count, seq.min, seq.max, seq.last)
        );
        assert!((a.mean - seq.mean).abs() < 1e-12);
    }
}
