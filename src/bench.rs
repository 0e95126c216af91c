//! `telemetryhub bench`: the real pipeline in-process (simulated devices, duplex links, codec,
//! ring buffer, dispatcher, workers), no HTTP, and one JSON line of results.
//!
//! Each device is the embedded simulator, unpaced, behind a [`Gate`] on its link that lets
//! through exactly that device's share of `samples` frames, and with `rate`, each frame no
//! earlier than its time in the run's schedule: frame `k` of the run (counting every device's,
//! dealt round-robin) is due `(k + 1) / rate` seconds after the start, as a line delivers a
//! frame once its last byte is in. So the run offers exactly `samples` samples, at exactly
//! `rate` a second whatever the frames' lengths, and the report's rate is measured over the same
//! window. Unpaced, the simulators write as fast as the links take frames, so the number is the
//! pipeline's ceiling; paced, it measures read→processed latency under a given load.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::buffer::OverflowPolicy;
use crate::config::{DeviceSettings, Settings, SimulatorSettings};
use crate::device::Connector;
use crate::device::sim::{LINK_BUFFER, Simulator};
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
}

/// Why the bench cannot run these options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BenchError {
    /// A count or size that must be at least 1 is 0.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
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
}

/// Runs the pipeline until exactly `samples` have gone through it, then drains it.
pub async fn run(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    options.validate()?;
    let settings = bench_settings(options);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let pipeline = Pipeline::start_with(&settings, &tracker, &cancel, None, |i, device, cancel| {
        BenchLink {
            simulator: device.simulator.clone(),
            schedule: Schedule::new(start, options, i),
            frames: share(options.samples, options.devices, i),
            sent: Arc::new(AtomicU64::new(0)),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
        }
    });
    let mut tick = tokio::time::interval(PROGRESS_TICK);
    let ledger = loop {
        tick.tick().await;
        let ledger = pipeline.buffer.ledger();
        let done = ledger.processed + ledger.rejected.total() + ledger.dropped.total();
        if done >= options.samples {
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
    let drained = pipeline
        .drain(Instant::now() + Duration::from_secs(10))
        .await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
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

/// When one device's frames are due: the run's frame `k` is due `(k + 1) / rate` seconds after
/// `start`, and the device sends frames `first`, `first + step`, `first + 2 step`, ...
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    /// Frames per second over the whole run; `None`: every frame is due at once.
    rate: Option<f64>,
    first: u64,
    step: u64,
}

impl Schedule {
    fn new(start: Instant, options: &BenchOptions, device: usize) -> Self {
        Self {
            start,
            rate: options.rate.map(|r| r as f64),
            first: device as u64,
            step: options.devices as u64,
        }
    }

    /// How many of the device's frames are due at `now`.
    fn due(&self, now: Instant) -> u64 {
        let Some(rate) = self.rate else {
            return u64::MAX;
        };
        // The tiny term keeps a frame due at the very instant `at` computed for it.
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        let run_frames = (elapsed * rate + 1e-6) as u64;
        match run_frames.checked_sub(self.first + 1) {
            Some(after_first) => after_first / self.step + 1,
            None => 0,
        }
    }

    /// When the device's frame `n` (counting from 0) is due.
    fn at(&self, n: u64) -> Instant {
        let rate = self.rate.unwrap_or(f64::INFINITY);
        let run_frame = self.first + n * self.step;
        self.start + Duration::from_secs_f64((run_frame + 1) as f64 / rate)
    }
}

/// Links for one bench device: each connect starts the simulator, unpaced, behind a [`Gate`].
struct BenchLink {
    simulator: SimulatorSettings,
    schedule: Schedule,
    frames: u64,
    /// Frames let through so far, over every session of the link.
    sent: Arc<AtomicU64>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Connector for BenchLink {
    type Io = DuplexStream;

    async fn connect(&mut self) -> io::Result<DuplexStream> {
        let (gateway_end, device_end) = tokio::io::duplex(LINK_BUFFER);
        let gate = Gate {
            link: device_end,
            schedule: self.schedule,
            frames: self.frames,
            sent: self.sent.clone(),
            wake: Box::pin(tokio::time::sleep_until(self.schedule.start)),
        };
        let simulator = Simulator::new(self.simulator.clone(), Duration::ZERO);
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = simulator.run(gate) => {}
            }
        });
        Ok(gateway_end)
    }
}

/// The simulator's end of a bench link: passes whole frames (lines) through only when the
/// schedule says they are due, and no more than the device's share. Once that is sent, writes
/// never complete: the device has nothing more to say, and the bench ends the session.
struct Gate {
    link: DuplexStream,
    schedule: Schedule,
    frames: u64,
    sent: Arc<AtomicU64>,
    wake: Pin<Box<Sleep>>,
}

impl AsyncWrite for Gate {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let sent = this.sent.load(Ordering::Relaxed);
        let due = loop {
            if sent >= this.frames {
                return Poll::Pending;
            }
            let due = this.schedule.due(Instant::now()).min(this.frames);
            if due > sent {
                break due;
            }
            this.wake.as_mut().reset(this.schedule.at(sent));
            ready!(this.wake.as_mut().poll(cx));
        };
        // Up to the end of the last frame that may go now; all of `buf` if it ends sooner.
        let allowed = (due - sent) as usize;
        let len = buf
            .iter()
            .enumerate()
            .filter(|(_, byte)| **byte == b'\n')
            .nth(allowed - 1)
            .map_or(buf.len(), |(at, _)| at + 1);
        let written = ready!(Pin::new(&mut this.link).poll_write(cx, &buf[..len]))?;
        let frames = buf[..written].iter().filter(|byte| **byte == b'\n').count();
        this.sent.fetch_add(frames as u64, Ordering::Relaxed);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.link).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.link).poll_shutdown(cx)
    }
}

impl AsyncRead for Gate {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.link).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(samples: u64, devices: usize, rate: Option<u64>) -> BenchOptions {
        BenchOptions {
            samples,
            devices,
            rate,
            policy: OverflowPolicy::Block,
            capacity: 1024,
            batch_max: 64,
            workers: Some(1),
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
    fn the_schedule_deals_the_runs_frames_round_robin_at_the_rate() {
        let start = Instant::now();
        let at = |seconds: f64| start + Duration::from_secs_f64(seconds);
        // 100 frames a second over 3 devices: device 1 sends the run's frames 1, 4, 7, ...
        let device1 = Schedule::new(start, &options(30, 3, Some(100)), 1);
        assert_eq!(device1.due(at(0.0)), 0);
        assert_eq!(device1.due(at(0.019)), 0);
        assert_eq!(device1.due(at(0.020)), 1);
        assert_eq!(device1.due(at(0.049)), 1);
        assert_eq!(device1.due(at(0.050)), 2);
        assert_eq!(device1.due(at(1.0)), 33);
        for n in 0..50 {
            let when = device1.at(n);
            assert_eq!(device1.due(when), n + 1, "frame {n} is due at {when:?}");
        }
        let unpaced = Schedule::new(start, &options(30, 3, None), 1);
        assert_eq!(unpaced.due(start), u64::MAX);
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

    #[tokio::test(start_paused = true)]
    async fn the_gate_lets_through_whole_frames_when_due_and_no_more_than_the_share() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let start = Instant::now();
        let (mut gateway, device) = tokio::io::duplex(LINK_BUFFER);
        let mut gate = Gate {
            link: device,
            // 10 frames a second, one device: frame n is due at (n + 1) / 10 s.
            schedule: Schedule::new(start, &options(3, 1, Some(10)), 0),
            frames: 3,
            sent: Arc::new(AtomicU64::new(0)),
            wake: Box::pin(tokio::time::sleep_until(start)),
        };
        let writer =
            tokio::spawn(async move { gate.write_all(b"$a\r\n$bb\r\n$ccc\r\n$dddd\r\n").await });
        let mut arrivals = Vec::new();
        let mut received = Vec::new();
        while received.len() < b"$a\r\n$bb\r\n$ccc\r\n".len() {
            let mut chunk = [0u8; 64];
            let n = gateway.read(&mut chunk).await.unwrap();
            received.extend_from_slice(&chunk[..n]);
            arrivals.push((start.elapsed(), n));
        }
        assert_eq!(received, b"$a\r\n$bb\r\n$ccc\r\n");
        let ms = |ms| Duration::from_millis(ms);
        assert_eq!(arrivals, [(ms(100), 4), (ms(200), 5), (ms(300), 6)]);
        // The fourth frame is beyond the share: it never goes.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!writer.is_finished());
        writer.abort();
    }
}
