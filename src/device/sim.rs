//! The simulated sensor: writes framed telemetry into one end of a `tokio::io::duplex` stream.
//!
//! The gateway's device task reads the other end exactly as it would read a tty. The duplex
//! buffer is 4 KiB, like a UART FIFO, so a gateway that stops reading backs up into the
//! simulator. Values follow `42 + sin(seq / 10)` plus uniform noise. Faults (corrupted bytes,
//! stalls, disconnects) are injected at configured per-frame rates so every state transition of
//! the device can be reached.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Connector;
use super::codec::encode_frame;
use crate::config::SimulatorSettings;

/// Size of the in-memory link, like a UART's FIFO.
pub const LINK_BUFFER: usize = 4096;

/// With no pacing, frames written per `write_all`, so the simulator is a throughput source.
const UNPACED_BURST: usize = 64;

/// Opens links to a fresh simulated device: each connect spawns one simulator task.
pub struct SimConnector {
    settings: SimulatorSettings,
    interval: Duration,
    tracker: TaskTracker,
    cancel: CancellationToken,
    rng: SplitMix64,
}

impl SimConnector {
    /// A connector whose simulators send one frame per `interval` (zero: unpaced).
    pub fn new(
        settings: SimulatorSettings,
        interval: Duration,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let rng = SplitMix64::new(settings.seed);
        Self {
            settings,
            interval,
            tracker,
            cancel,
            rng,
        }
    }
}

impl Connector for SimConnector {
    type Io = DuplexStream;

    async fn connect(&mut self) -> std::io::Result<DuplexStream> {
        let (gateway_end, device_end) = tokio::io::duplex(LINK_BUFFER);
        let sim = Simulator {
            settings: self.settings.clone(),
            interval: self.interval,
            rng: SplitMix64::new(self.rng.next_u64()),
        };
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                // Ends on a write error: the gateway dropped its end of the link.
                _ = sim.run(device_end) => {}
            }
        });
        Ok(gateway_end)
    }
}

/// One simulated device session.
pub struct Simulator {
    settings: SimulatorSettings,
    interval: Duration,
    rng: SplitMix64,
}

impl Simulator {
    /// A simulator with its own random stream.
    pub fn new(settings: SimulatorSettings, interval: Duration) -> Self {
        let rng = SplitMix64::new(settings.seed);
        Self {
            settings,
            interval,
            rng,
        }
    }

    /// The value of frame `seq` before noise.
    pub fn signal(seq: u32) -> f64 {
        42.0 + (f64::from(seq) / 10.0).sin()
    }

    /// Writes frames until the link fails or a disconnect fault fires.
    pub async fn run<W: AsyncWrite + Unpin>(mut self, mut link: W) -> std::io::Result<()> {
        let mut buf = BytesMut::with_capacity(UNPACED_BURST * 48);
        let mut next = Instant::now();
        let burst = if self.interval.is_zero() {
            UNPACED_BURST
        } else {
            1
        };
        for seq in 0u32.. {
            if self.roll(self.settings.disconnect_rate) {
                // The device vanishes; frames it had not sent yet vanish with it.
                return Ok(());
            }
            if self.roll(self.settings.stall_rate) {
                link.write_all(&buf).await?;
                buf.clear();
                tokio::time::sleep(Duration::from_millis(self.settings.stall_ms)).await;
                next = Instant::now();
            }
            self.encode(seq, &mut buf);
            if (seq as usize + 1) % burst == 0 {
                if !self.interval.is_zero() {
                    next += self.interval;
                    sleep_until(next).await;
                }
                link.write_all(&buf).await?;
                buf.clear();
            }
        }
        Ok(())
    }

    fn encode(&mut self, seq: u32, buf: &mut BytesMut) {
        let noise = self.settings.noise * (self.rng.next_f64() * 2.0 - 1.0);
        let start = buf.len();
        encode_frame(seq, Self::signal(seq) + noise, &self.settings.unit, buf);
        if self.roll(self.settings.corrupt_rate) {
            // Flip a bit inside the checksummed part, so the frame fails its checksum.
            let end = buf.len() - 5;
            let at = start + 1 + (self.rng.next_u64() as usize) % (end - start - 1);
            buf[at] ^= 0x04;
        }
    }

    fn roll(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.next_f64() < rate
    }
}

/// A tiny, fast, seedable random number generator (SplitMix64); plenty for noise and faults.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`; 0 seeds from the clock.
    pub fn new(seed: u64) -> Self {
        let seed = if seed == 0 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9E37_79B9_7F4A_7C15)
        } else {
            seed
        };
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio::io::AsyncReadExt;
    use tokio_util::codec::Decoder;

    use super::*;
    use crate::device::codec::{Frame, FrameCodec, InvalidReason};

    fn settings() -> SimulatorSettings {
        SimulatorSettings {
            seed: 7,
            ..SimulatorSettings::default()
        }
    }

    async fn frames_from(sim: Simulator, bytes: usize) -> Vec<Frame> {
        let (mut reader, writer) = tokio::io::duplex(LINK_BUFFER);
        let task = tokio::spawn(sim.run(writer));
        let mut raw = vec![0; bytes];
        let mut got = 0;
        while got < bytes {
            let n = reader.read(&mut raw[got..]).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        drop(reader);
        let _ = task.await;
        let mut buf = BytesMut::from(&raw[..got]);
        let mut codec = FrameCodec::default();
        let mut frames = Vec::new();
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            frames.push(f);
        }
        frames
    }

    #[tokio::test]
    async fn unpaced_frames_are_valid_sequential_and_follow_the_signal() {
        let frames = frames_from(Simulator::new(settings(), Duration::ZERO), 8000).await;
        assert!(frames.len() > 100);
        for (i, frame) in frames.iter().enumerate() {
            let Frame::Sample(s) = frame else {
                panic!("frame {i} invalid: {frame:?}")
            };
            assert_eq!(s.seq, i as u32);
            assert!(
                (s.value - Simulator::signal(s.seq)).abs() <= 0.0100001,
                "{s:?}"
            );
            assert_eq!(s.unit, "arb.units");
        }
    }

    #[tokio::test]
    async fn corrupt_rate_one_corrupts_every_frame() {
        let sim = Simulator::new(
            SimulatorSettings {
                corrupt_rate: 1.0,
                ..settings()
            },
            Duration::ZERO,
        );
        let frames = frames_from(sim, 4000).await;
        assert!(frames.len() > 50);
        assert!(
            frames
                .iter()
                .all(|f| *f == Frame::Invalid(InvalidReason::Checksum)),
            "{frames:?}"
        );
    }

    #[tokio::test]
    async fn disconnect_rate_one_closes_at_once() {
        let sim = Simulator::new(
            SimulatorSettings {
                disconnect_rate: 1.0,
                ..settings()
            },
            Duration::ZERO,
        );
        assert_eq!(frames_from(sim, 100).await, vec![]);
    }

    #[tokio::test(start_paused = true)]
    async fn paced_frames_arrive_once_per_interval() {
        let (mut reader, writer) = tokio::io::duplex(LINK_BUFFER);
        let sim = Simulator::new(settings(), Duration::from_millis(100));
        tokio::spawn(sim.run(writer));
        let start = Instant::now();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let _ = reader.read(&mut buf).await.unwrap();
        }
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = SplitMix64::new(1);
        let mut b = SplitMix64::new(1);
        for _ in 0..1000 {
            let x = a.next_f64();
            assert_eq!(x, b.next_f64());
            assert!((0.0..1.0).contains(&x));
        }
    }
}
