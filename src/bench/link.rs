//! The bench's device links: the embedded simulator, unpaced, behind a [`Gate`] that lets
//! through exactly the device's share of the run's frames, each no earlier than its time in
//! the run's [`Schedule`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::BenchOptions;
use crate::config::SimulatorSettings;
use crate::device::Connector;
use crate::device::sim::{LINK_BUFFER, Simulator};

/// When one device's frames are due: the run's frame `k` is due `(k + 1) / rate` seconds after
/// `start`, and the device sends frames `first`, `first + step`, `first + 2 step`, ...
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    start: Instant,
    /// Frames per second over the whole run; `None`: every frame is due at once.
    rate: Option<f64>,
    first: u64,
    step: u64,
}

impl Schedule {
    pub(super) fn new(start: Instant, options: &BenchOptions, device: usize) -> Self {
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
pub(super) struct BenchLink {
    simulator: SimulatorSettings,
    schedule: Schedule,
    frames: u64,
    /// Frames let through so far, over every session of the link.
    sent: Arc<AtomicU64>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl BenchLink {
    /// Links sending `frames` frames in all, on `schedule`, until `cancel`.
    pub(super) fn new(
        simulator: SimulatorSettings,
        schedule: Schedule,
        frames: u64,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Self {
        Self {
            simulator,
            schedule,
            frames,
            sent: Arc::new(AtomicU64::new(0)),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
        }
    }
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
        // Unpaced, `allowed` is never below the newlines `buf` can hold: no scan needed.
        let allowed = (due - sent) as usize;
        let len = if allowed >= buf.len() {
            buf.len()
        } else {
            memchr::memchr_iter(b'\n', buf)
                .nth(allowed - 1)
                .map_or(buf.len(), |at| at + 1)
        };
        let written = ready!(Pin::new(&mut this.link).poll_write(cx, &buf[..len]))?;
        let frames = memchr::memchr_iter(b'\n', &buf[..written]).count();
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
    use super::super::tests::options;
    use super::*;

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
