//! A lock-free latency histogram with log-linear buckets, for read→processed latency
//! quantiles (`latency_p99_ms`, `telemetryhub bench`). Workers count a batch locally and merge
//! it once per batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency histogram with log-linear buckets (8 per power of two), in nanoseconds.
/// Relative error of a quantile is under 1/8; recording is lock-free.
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
}

const SUB_BUCKETS: u32 = 8;
const HISTOGRAM_BUCKETS: usize = (64 * SUB_BUCKETS) as usize;

fn bucket_of(nanos: u64) -> usize {
    if nanos < u64::from(SUB_BUCKETS) {
        return nanos as usize;
    }
    let magnitude = 63 - nanos.leading_zeros();
    let sub = (nanos >> (magnitude - 3)) & u64::from(SUB_BUCKETS - 1);
    ((magnitude - 2) * SUB_BUCKETS) as usize + sub as usize
}

fn bucket_upper(bucket: usize) -> u64 {
    let bucket = bucket as u32;
    if bucket < SUB_BUCKETS {
        return u64::from(bucket);
    }
    let magnitude = bucket / SUB_BUCKETS + 2;
    let sub = u64::from(bucket % SUB_BUCKETS);
    let base = 1u64 << magnitude;
    (base + ((sub + 1) << (magnitude - 3))).saturating_sub(1)
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..HISTOGRAM_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LatencyHistogram {
    /// Adds counts collected locally by [`LocalHistogram`].
    pub fn merge(&self, local: &LocalHistogram) {
        for &(bucket, n) in &local.counts {
            self.buckets[bucket].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The value below which `q` (0..=1) of recorded latencies fall; `None` if empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_nanos(bucket_upper(bucket)));
            }
        }
        None
    }
}

/// Per-batch histogram counts, merged into the shared one once per batch.
#[derive(Default)]
pub struct LocalHistogram {
    counts: Vec<(usize, u64)>,
}

impl LocalHistogram {
    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        self.record_n(latency, 1);
    }

    /// Counts `n` samples of the same latency (samples read together and processed together).
    pub fn record_n(&mut self, latency: Duration, n: u64) {
        let bucket = bucket_of(latency.as_nanos().min(u128::from(u64::MAX)) as u64);
        match self.counts.iter_mut().find(|(b, _)| *b == bucket) {
            Some((_, count)) => *count += n,
            None => self.counts.push((bucket, n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_bound_values_within_an_eighth() {
        for nanos in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            100,
            1_000,
            123_456,
            5_000_000_000,
            u64::MAX / 3,
        ] {
            let bucket = bucket_of(nanos);
            let upper = bucket_upper(bucket);
            assert!(upper >= nanos, "{nanos}: bucket {bucket} upper {upper}");
            assert!(upper - nanos <= nanos / 8 + 1, "{nanos}: upper {upper}");
            assert!(bucket < HISTOGRAM_BUCKETS);
        }
    }

    #[test]
    fn histogram_quantiles() {
        let histogram = LatencyHistogram::default();
        let mut local = LocalHistogram::default();
        for micros in 1..=100 {
            local.record(Duration::from_micros(micros));
        }
        histogram.merge(&local);
        let p50 = histogram.quantile(0.5).unwrap();
        let p99 = histogram.quantile(0.99).unwrap();
        assert!(
            p50 >= Duration::from_micros(50) && p50 <= Duration::from_micros(57),
            "{p50:?}"
        );
        assert!(
            p99 >= Duration::from_micros(99) && p99 <= Duration::from_micros(112),
            "{p99:?}"
        );
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }
}
