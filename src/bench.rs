//! `telemetryhub bench`: the real pipeline in-process (simulated devices, duplex links, codec,
//! ring buffer, dispatcher, workers), no HTTP, and one JSON line of results.
//!
//! Unpaced, the simulators write as fast as the links take frames, so the number is the
//! pipeline's ceiling. With `--rate`, each simulator is paced like a UART at the baud rate that
//! carries that many frames a second, to measure read→processed latency under a given load.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::buffer::OverflowPolicy;
use crate::config::{DeviceSettings, Settings};
use crate::device::codec::encode_frame;
use crate::pipeline::Pipeline;

/// How often the harness looks at the ledger while the pipeline runs.
const PROGRESS_TICK: Duration = Duration::from_millis(2);

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Stop after this many samples have left the pipeline (processed, rejected or dropped).
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
}

/// One run's results.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Samples processed.
    pub samples: u64,
    /// Wall-clock seconds from start until `samples` had left the pipeline.
    pub seconds: f64,
    /// `samples / seconds`.
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
}

/// Runs the pipeline until `samples` have gone through it, then drains it.
pub async fn run(options: &BenchOptions) -> BenchReport {
    let settings = bench_settings(options);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let pipeline = Pipeline::start(&settings, &tracker, &cancel, None);
    let mut tick = tokio::time::interval(PROGRESS_TICK);
    let ledger = loop {
        tick.tick().await;
        let ledger = pipeline.buffer.ledger();
        let done = ledger.processed + ledger.rejected.total() + ledger.dropped.total();
        if done >= options.samples {
            break ledger;
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let quantile_ms = |q| {
        pipeline
            .worker
            .latency_quantile(q)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let (p50, p99) = (quantile_ms(0.5), quantile_ms(0.99));
    let drained = pipeline
        .drain(tokio::time::Instant::now() + Duration::from_secs(10))
        .await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    BenchReport {
        samples: ledger.processed,
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
    }
}

fn bench_settings(options: &BenchOptions) -> Settings {
    let mut settings = Settings::default();
    settings.buffer.capacity = options.capacity;
    settings.buffer.overflow = options.policy;
    settings.pipeline.batch_max = options.batch_max;
    settings.pipeline.workers = options.workers;
    settings.devices = (0..options.devices)
        .map(|i| {
            let mut device = DeviceSettings::simulated(&format!("bench{i}"));
            device.sample_interval_ms = 0;
            device.read_timeout_ms = Some(60_000);
            device.simulator.seed = i as u64 + 1;
            if let Some(rate) = options.rate {
                let per_device = rate.div_ceil(options.devices as u64);
                // A UART carrying `per_device` frames a second: 10 bits a byte (8N1).
                let bits = per_device * frame_len() as u64 * 10;
                device.simulator.baud = u32::try_from(bits).unwrap_or(u32::MAX);
            }
            device
        })
        .collect();
    settings
}

/// Bytes in a typical frame of the simulator.
fn frame_len() -> usize {
    let mut buf = BytesMut::new();
    encode_frame(1_000_000, 42.5, "arb.units", &mut buf);
    buf.len()
}
