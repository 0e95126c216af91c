//! `telemetryhub bench`: the real pipeline in-process (simulated devices, duplex links, codec,
//! ring buffer, dispatcher, workers), no HTTP, and one JSON line of results.
//!
//! Each device is the embedded simulator, unpaced, behind a gate on its link (`link.rs`) that
//! lets through exactly that device's share of `samples` frames, and with `rate`, each frame no
//! earlier than its time in the run's schedule: frame `k` of the run (counting every device's,
//! dealt round-robin) is due `(k + 1) / rate` seconds after the start, as a line delivers a
//! frame once its last byte is in. So the run offers exactly `samples` samples, at exactly
//! `rate` a second whatever the frames' lengths, and the report's rate is measured over the same
//! window. Unpaced, the simulators write as fast as the links take frames, so the number is the
//! pipeline's ceiling; paced, it measures read→processed latency under a given load.

mod link;
pub mod uplink;

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::link::{BenchLink, Schedule};
use self::uplink::{UplinkMode, UplinkOptions, UplinkReport};
use crate::buffer::OverflowPolicy;
use crate::config::{DeviceSettings, Settings};
use crate::pipeline::Pipeline;

/// How often the harness looks at the ledger while the pipeline runs (the end of the measured
/// window is known to within this).
const PROGRESS_TICK: Duration = Duration::from_millis(2);

/// The shortest read timeout given to a bench device; longer if its frames are further apart.
const MIN_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Samples the devices send in all, shared out between them; the run ends when every one
    /// has left the pipeline (processed, rejected or dropped).
    pub samples: u64,
    /// Simulated devices, each on its own link.
    pub devices: usize,
    /// Total frames per second across devices; `None` runs unpaced.
    pub rate: Option<u64>,
    /// Buffer overflow policy.
    pub policy: OverflowPolicy,
    /// Buffer capacity.
    pub capacity: usize,
    /// Samples per worker batch.
    pub batch_max: usize,
    /// Worker permits; `None` is one per CPU.
    pub workers: Option<usize>,
    /// With the spool and the forwarder to a local Mosquitto; `None`: no uplink.
    pub uplink: Option<UplinkOptions>,
}

/// Why the bench cannot run these options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BenchError {
    /// A count or size that must be at least 1 is 0.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// The uplink part could not be set up (no mosquitto, an unusable spool directory).
    #[error("uplink: {0}")]
    Uplink(String),
}

impl BenchOptions {
    /// Checks every count and size; a rate of 0 frames a second would never send a frame.
    pub fn validate(&self) -> Result<(), BenchError> {
        let counts = [
            ("samples", self.samples),
            ("devices", self.devices as u64),
            ("rate", self.rate.unwrap_or(1)),
            ("capacity", self.capacity as u64),
            ("batch_max", self.batch_max as u64),
            ("workers", self.workers.map_or(1, |w| w as u64)),
        ];
        match counts.into_iter().find(|(_, value)| *value == 0) {
            Some((name, _)) => Err(BenchError::Zero(name)),
            None => Ok(()),
        }
    }
}

/// One run's results.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Samples the devices sent (the `samples` asked for); every one left the pipeline.
    pub samples: u64,
    /// Samples processed: `samples` less the rejected and dropped ones.
    pub processed: u64,
    /// Wall-clock seconds from the start of the run (of its schedule, when paced) until every
    /// sample had left the pipeline.
    pub seconds: f64,
    /// `processed / seconds`.
    pub samples_per_sec: f64,
    /// Samples dropped (all reasons).
    pub dropped: u64,
    /// Samples rejected by the workers.
    pub rejected: u64,
    /// Read→processed latency, median, in milliseconds.
    pub latency_p50_ms: f64,
    /// Read→processed latency, 99th percentile, in milliseconds.
    pub latency_p99_ms: f64,
    /// The overflow policy used.
    pub policy: OverflowPolicy,
    /// Devices used.
    pub devices: usize,
    /// The paced rate asked for, if any.
    pub rate: Option<u64>,
    /// Whether the ledger balanced after the drain.
    pub balanced: bool,
    /// The uplink's part, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uplink: Option<UplinkReport>,
}

/// Runs the pipeline until exactly `samples` have gone through it (with an uplink: until the
/// broker acknowledged every one), then drains it.
pub async fn run(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    options.validate()?;
    let mut settings = bench_settings(options);
    // The uplink's broker, subscriber and spool live as long as the run.
    let mut uplink_parts = None;
    let mut release = None;
    let mut opened = None;
    if let Some(up) = &options.uplink {
        let uplink_error = |e: std::io::Error| BenchError::Uplink(e.to_string());
        let broker = uplink::Broker::start().await.map_err(uplink_error)?;
        let subscriber = uplink::Subscriber::start(broker.port)
            .await
            .map_err(uplink_error)?;
        let tmp = tempfile::tempdir().map_err(uplink_error)?;
        let dir = match &up.spool_dir {
            Some(dir) => {
                let _ = std::fs::remove_dir_all(dir);
                dir.clone()
            }
            None => tmp.path().to_owned(),
        };
        uplink::configure(&mut settings, up, broker.port, &dir);
        let uplink_settings = settings.uplink.as_ref().expect("configured above");
        let mut parts = crate::uplink::open(uplink_settings, &settings.spool)
            .map_err(|e| BenchError::Uplink(e.to_string()))?;
        if up.mode == UplinkMode::Replay {
            release = Some(parts.hold_forwarder());
        }
        opened = Some(parts);
        uplink_parts = Some((broker, subscriber, tmp));
    }
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let pipeline = Pipeline::start_with(
        &settings,
        &tracker,
        &cancel,
        None,
        opened,
        |i, device, cancel| {
            BenchLink::new(
                device.simulator.clone(),
                Schedule::new(start, options, i),
                share(options.samples, options.devices, i),
                &tracker,
                cancel,
            )
        },
    );
    let mut tick = tokio::time::interval(PROGRESS_TICK);
    let spool = pipeline.uplink.as_ref().map(|u| u.spool.clone());
    let ledger = loop {
        tick.tick().await;
        let ledger = pipeline.buffer.ledger();
        let done = ledger.processed + ledger.rejected.total() + ledger.dropped.total();
        // With an uplink, a sample is done once the broker acknowledged it (live) or once it
        // is in the spool (replay, whose forwarder is held back).
        let uplink_done = match (&spool, &release) {
            (None, _) => true,
            (Some(_), Some(_)) => ledger.spool_queue == 0,
            (Some(spool), None) => {
                ledger.spool_queue == 0 && spool.stats().forwarded >= ledger.spooled
            }
        };
        if done >= options.samples && uplink_done {
            break ledger;
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    let quantile_ms = |q| {
        pipeline
            .worker
            .latency_quantile(q)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let (p50, p99) = (quantile_ms(0.5), quantile_ms(0.99));
    let mut uplink_report = None;
    if let (Some(spool), Some(up)) = (&spool, &options.uplink) {
        let mut report = UplinkReport {
            fsync: uplink::fsync_label(up.fsync),
            spooled: ledger.spooled,
            ..UplinkReport::default()
        };
        if let Some(release) = release.take() {
            report.outage_max_rss_mib = uplink::max_rss_mib();
            report.backlog_bytes = Some(spool.stats().bytes);
            let replay = Instant::now();
            let _ = release.send(());
            while spool.stats().pending > 0 {
                tick.tick().await;
            }
            let replay_seconds = replay.elapsed().as_secs_f64();
            report.replay_seconds = Some(replay_seconds);
            report.replay_samples_per_sec = Some(ledger.spooled as f64 / replay_seconds);
        }
        report.forwarded = spool.stats().forwarded;
        if let Some((_, subscriber, _)) = &uplink_parts {
            uplink::verify(subscriber, ledger.spooled, &mut report).await;
        }
        uplink_report = Some(report);
    }
    let drained = pipeline
        .drain(Instant::now() + Duration::from_secs(10))
        .await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    drop(uplink_parts);
    Ok(BenchReport {
        samples: options.samples,
        processed: ledger.processed,
        seconds,
        samples_per_sec: ledger.processed as f64 / seconds,
        dropped: ledger.dropped.total(),
        rejected: ledger.rejected.total(),
        latency_p50_ms: p50,
        latency_p99_ms: p99,
        policy: options.policy,
        devices: options.devices,
        rate: options.rate,
        balanced: drained.balanced(),
        uplink: uplink_report,
    })
}

fn bench_settings(options: &BenchOptions) -> Settings {
    let mut settings = Settings::default();
    settings.buffer.capacity = options.capacity;
    settings.buffer.overflow = options.policy;
    settings.pipeline.batch_max = options.batch_max;
    settings.pipeline.workers = options.workers;
    // A device's frames come `devices / rate` seconds apart; it must not time out in between.
    let gap = options.rate.map_or(Duration::ZERO, |rate| {
        Duration::from_secs_f64(options.devices as f64 / rate as f64)
    });
    let read_timeout = MIN_READ_TIMEOUT.max(gap.saturating_mul(10));
    settings.devices = (0..options.devices)
        .map(|i| {
            let mut device = DeviceSettings::simulated(&format!("bench{i}"));
            device.sample_interval_ms = 0;
            device.read_timeout_ms = Some(read_timeout.as_millis() as u64);
            device.simulator.seed = i as u64 + 1;
            device
        })
        .collect();
    settings
}

/// Device `i`'s share of `samples` frames dealt round-robin to `devices` devices.
fn share(samples: u64, devices: usize, i: usize) -> u64 {
    let (devices, i) = (devices as u64, i as u64);
    samples / devices + u64::from(i < samples % devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small options for the unit tests of the bench and its links.
    pub(super) fn options(samples: u64, devices: usize, rate: Option<u64>) -> BenchOptions {
        BenchOptions {
            samples,
            devices,
            rate,
            policy: OverflowPolicy::Block,
            capacity: 1024,
            batch_max: 64,
            workers: Some(1),
            uplink: None,
        }
    }

    #[test]
    fn the_shares_add_up_to_the_samples() {
        for (samples, devices) in [(2, 5), (10, 3), (7, 7), (1_000_001, 4)] {
            let shares: Vec<u64> = (0..devices).map(|i| share(samples, devices, i)).collect();
            assert_eq!(shares.iter().sum::<u64>(), samples, "{shares:?}");
            assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn zero_counts_and_a_zero_rate_are_refused() {
        assert_eq!(options(1, 1, Some(1)).validate(), Ok(()));
        assert_eq!(options(1, 1, None).validate(), Ok(()));
        let zero_rate = options(1, 1, Some(0)).validate();
        assert_eq!(zero_rate, Err(BenchError::Zero("rate")));
        assert_eq!(
            options(0, 1, None).validate(),
            Err(BenchError::Zero("samples"))
        );
        let mut no_workers = options(1, 1, None);
        no_workers.workers = Some(0);
        assert_eq!(no_workers.validate(), Err(BenchError::Zero("workers")));
    }
}
