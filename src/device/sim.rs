//! The simulated sensor: writes framed telemetry into one end of a `tokio::io::duplex` stream.
//!
//! The gateway's device task reads the other end exactly as it would read a tty. The duplex
//! buffer is 4 KiB, like a UART FIFO, so a gateway that stops reading backs up into the
//! simulator. Values follow `42 + sin(seq / 10)` plus uniform noise; a simulator configured with
//! channels names one in each frame, in turn, each following its own signal (see
//! [`Simulator::channel_signal`]). The link is two-way: the
//! simulator answers `GET_STATUS`, `SET_RATE=<ms>`, `CALIBRATE` and `RESET` with `OK: ...`,
//! `ERROR: ...` or `STATUS: ...` lines between frames. With `baud` set, bytes are paced like a
//! real UART. Faults (corrupted bytes, lost bytes, stalls, disconnects) are injected at
//! configured per-frame rates so every state transition of the device can be reached; with
//! pacing and faults off it is a pure throughput source for benchmarks.

use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Connector;
use super::codec::{encode_channel_frame, encode_frame};
use crate::config::SimulatorSettings;

/// Size of the in-memory link, like a UART's FIFO.
pub const LINK_BUFFER: usize = 4096;

/// With no pacing, frames written per `write_all`, so the simulator is a throughput source.
const UNPACED_BURST: usize = 64;

/// Opens links to a fresh simulated device: each connect spawns one simulator task, starting at
/// the configured interval like a device that was power-cycled (the device task sends it a rate
/// it had acknowledged again).
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

/// What the command reader shares with the frame writer.
struct Control {
    interval_ms: AtomicU64,
    seq: AtomicU32,
    reset: AtomicBool,
}

impl Control {
    /// Restarts the sequence if a `RESET` came in since the last frame.
    fn take_reset(&self, seq: &mut u32) {
        if self.reset.swap(false, Ordering::Relaxed) {
            *seq = 0;
        }
    }
}

/// How far behind schedule the paced line may catch up.
const PACING_SLACK: Duration = Duration::from_millis(20);

/// Longest command line the simulator reads.
const MAX_COMMAND_LEN: usize = 256;

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
        Self::channel_signal(seq, 0)
    }

    /// The value of frame `seq` before noise, when it reports the simulator's channel number
    /// `channel`: `42 + 10 channel + sin(seq / 10 + channel)`, so each channel has its own
    /// level and phase (channel 0 is [`Self::signal`]).
    pub fn channel_signal(seq: u32, channel: usize) -> f64 {
        let channel = channel as f64;
        42.0 + SimulatorSettings::channel_shift(channel as usize)
            + (f64::from(seq) / 10.0 + channel).sin()
    }

    /// Writes frames and answers commands until the link fails, the gateway closes its end,
    /// or a disconnect fault fires.
    pub async fn run<L: AsyncRead + AsyncWrite>(self, link: L) -> std::io::Result<()> {
        let (reader, writer) = tokio::io::split(link);
        let control = Control {
            interval_ms: AtomicU64::new(self.interval.as_millis() as u64),
            seq: AtomicU32::new(0),
            reset: AtomicBool::new(false),
        };
        let (replies_tx, replies) = mpsc::channel(8);
        let unit = self.settings.unit.clone();
        tokio::select! {
            result = self.write_frames(writer, &control, replies) => result,
            // The gateway closed its end: nobody is listening any more.
            () = serve_commands(reader, &control, &unit, replies_tx) => Ok(()),
        }
    }

    async fn write_frames<W: AsyncWrite>(
        mut self,
        writer: WriteHalf<W>,
        control: &Control,
        mut replies: mpsc::Receiver<String>,
    ) -> std::io::Result<()> {
        let mut line = Line {
            writer,
            baud: self.settings.baud,
            free_at: Instant::now(),
            buf: BytesMut::with_capacity(UNPACED_BURST * 48),
        };
        let mut last_tick = Instant::now();
        let mut seq = 0u32;
        let mut burst = 0;
        loop {
            let interval = Duration::from_millis(control.interval_ms.load(Ordering::Relaxed));
            while let Ok(reply) = replies.try_recv() {
                push_line(&mut line.buf, &reply);
            }
            if self.roll(self.settings.disconnect_rate) {
                // The device vanishes; frames it had not sent yet vanish with it.
                return Ok(());
            }
            if self.roll(self.settings.stall_rate) {
                line.flush().await?;
                tokio::time::sleep(Duration::from_millis(self.settings.stall_ms)).await;
                last_tick = Instant::now();
            }
            if interval.is_zero() {
                control.take_reset(&mut seq);
                self.encode(seq, &mut line.buf);
                burst += 1;
                if burst == UNPACED_BURST {
                    line.flush().await?;
                    burst = 0;
                }
            } else {
                line.flush().await?;
                // Answer commands while waiting for the next tick, each as soon as it comes. A
                // new rate applies to the tick being waited for; a late tick sends at once and
                // restarts the schedule (no catch-up burst).
                last_tick = loop {
                    let interval =
                        Duration::from_millis(control.interval_ms.load(Ordering::Relaxed));
                    let next = (last_tick + interval).max(Instant::now());
                    tokio::select! {
                        biased;
                        Some(reply) = replies.recv() => {
                            push_line(&mut line.buf, &reply);
                            line.flush().await?;
                        }
                        () = sleep_until(next) => break next,
                    }
                };
                control.take_reset(&mut seq);
                self.encode(seq, &mut line.buf);
                line.flush().await?;
            }
            seq = seq.wrapping_add(1);
            control.seq.store(seq, Ordering::Relaxed);
        }
    }

    fn encode(&mut self, seq: u32, buf: &mut BytesMut) {
        let noise = self.settings.noise * (self.rng.next_f64() * 2.0 - 1.0);
        let start = buf.len();
        let channels = &self.settings.channels;
        if channels.is_empty() {
            encode_frame(seq, Self::signal(seq) + noise, &self.settings.unit, buf);
        } else {
            let i = seq as usize % channels.len();
            let value = Self::channel_signal(seq, i) + noise;
            encode_channel_frame(seq, value, &self.settings.unit, &channels[i], buf);
        }
        if self.roll(self.settings.corrupt_rate) {
            // Flip a bit inside the checksummed part, so the frame fails its checksum.
            let end = buf.len() - 5;
            let at = start + 1 + (self.rng.next_u64() as usize) % (end - start - 1);
            buf[at] ^= 0x04;
        }
        if self.roll(self.settings.drop_rate) {
            let len = buf.len();
            let at = start + (self.rng.next_u64() as usize) % (len - start);
            buf.copy_within(at + 1.., at);
            buf.truncate(len - 1);
        }
    }

    fn roll(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.next_f64() < rate
    }
}

/// The simulator's side of the wire, paced like a UART when `baud` is set.
struct Line<W> {
    writer: WriteHalf<W>,
    baud: u32,
    /// When the line has finished sending what was last written.
    free_at: Instant,
    buf: BytesMut,
}

impl<W: AsyncWrite> Line<W> {
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.baud > 0 {
            // The timer ticks in milliseconds: a write that started late is made up by the next
            // ones (within PACING_SLACK), so the average rate is the baud rate's.
            let start = self.free_at.max(Instant::now() - PACING_SLACK);
            sleep_until(start).await;
            // 8N1: a start bit, eight data bits and a stop bit per byte.
            let seconds = self.buf.len() as f64 * 10.0 / f64::from(self.baud);
            self.free_at = start + Duration::from_secs_f64(seconds);
        }
        self.writer.write_all(&self.buf).await?;
        self.buf.clear();
        Ok(())
    }
}

fn push_line(buf: &mut BytesMut, line: &str) {
    buf.extend_from_slice(line.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// Reads command lines and queues a reply for each; returns when the gateway closes its end.
async fn serve_commands<R: AsyncRead>(
    reader: ReadHalf<R>,
    control: &Control,
    unit: &str,
    replies: mpsc::Sender<String>,
) {
    let mut lines = FramedRead::new(reader, LinesCodec::new_with_max_length(MAX_COMMAND_LEN));
    while let Some(line) = lines.next().await {
        let reply = match line {
            Ok(line) => answer(line.trim(), control, unit),
            Err(LinesCodecError::MaxLineLengthExceeded) => "ERROR: command too long".to_owned(),
            Err(LinesCodecError::Io(_)) => return,
        };
        if replies.send(reply).await.is_err() {
            return;
        }
    }
}

/// The simulator's answer to one command.
fn answer(command: &str, control: &Control, unit: &str) -> String {
    match command {
        "GET_STATUS" => format!(
            "STATUS: seq={} rate_ms={} unit={unit}",
            control.seq.load(Ordering::Relaxed),
            control.interval_ms.load(Ordering::Relaxed)
        ),
        "CALIBRATE" => "OK: calibrated".to_owned(),
        "RESET" => {
            control.reset.store(true, Ordering::Relaxed);
            control.seq.store(0, Ordering::Relaxed);
            "OK: reset".to_owned()
        }
        _ => match command.strip_prefix("SET_RATE=").map(str::parse::<u64>) {
            Some(Ok(ms)) if (10..=10_000).contains(&ms) => {
                control.interval_ms.store(ms, Ordering::Relaxed);
                format!("OK: rate_ms={ms}")
            }
            Some(_) => {
                "ERROR: SET_RATE takes a whole number of milliseconds from 10 to 10000".to_owned()
            }
            None => "ERROR: unknown command".to_owned(),
        },
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
    use crate::device::codec::{Frame, FrameCodec, InvalidReason, NameTrail};

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
        let mut trail = NameTrail::default();
        for (i, frame) in frames.into_iter().enumerate() {
            let Frame::Sample(s) = frame else {
                panic!("frame {i} invalid: {frame:?}")
            };
            let s = trail
                .resolve(s)
                .expect("the first sample carries its names");
            assert_eq!(s.seq, i as u32);
            assert!(
                (s.value - Simulator::signal(s.seq)).abs() <= 0.0100001,
                "{s:?}"
            );
            assert_eq!(s.unit, "arb.units");
            assert_eq!(
                s.channel, None,
                "no channels configured: the first frame form"
            );
        }
    }

    #[tokio::test]
    async fn a_simulator_with_channels_names_them_in_turn_each_on_its_own_signal() {
        let channels = ["temperature", "humidity", "pressure"]
            .map(String::from)
            .to_vec();
        let sim = Simulator::new(
            SimulatorSettings {
                channels: channels.clone(),
                ..settings()
            },
            Duration::ZERO,
        );
        let frames = frames_from(sim, 8000).await;
        assert!(frames.len() > 100);
        let mut trail = NameTrail::default();
        for (i, frame) in frames.into_iter().enumerate() {
            let Frame::Sample(s) = frame else {
                panic!("frame {i} invalid: {frame:?}")
            };
            let s = trail
                .resolve(s)
                .expect("the first sample carries its names");
            assert_eq!(s.seq, i as u32, "one sequence across channels");
            let ch = i % channels.len();
            assert_eq!(s.channel.as_deref(), Some(channels[ch].as_str()), "{s:?}");
            assert!(
                (s.value - Simulator::channel_signal(s.seq, ch)).abs() <= 0.0100001,
                "{s:?}"
            );
            assert!(
                (s.value - 42.0 - 10.0 * ch as f64).abs() <= 1.0100001,
                "{s:?}"
            );
        }
    }

    #[test]
    fn channel_signals_stay_within_the_band_longest_frame_assumes() {
        for seq in (0..100_000).step_by(7) {
            for ch in 0..16 {
                let v = Simulator::channel_signal(seq, ch) - SimulatorSettings::channel_shift(ch);
                assert!((41.0..=43.0).contains(&v), "{seq} {ch} {v}");
            }
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

    /// Sends `command` and returns the first reply line, skipping data frames.
    async fn ask(link: &mut DuplexStream, command: &str) -> String {
        use tokio::io::AsyncWriteExt;
        link.write_all(format!("{command}\r\n").as_bytes())
            .await
            .unwrap();
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        loop {
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                if let Frame::Reply(reply) = frame {
                    return reply;
                }
            }
            let mut chunk = [0u8; 512];
            let n = link.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the simulator closed the link");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_commands_and_set_rate_changes_the_rate() {
        let (mut link, device_end) = tokio::io::duplex(LINK_BUFFER);
        tokio::spawn(Simulator::new(settings(), Duration::from_millis(100)).run(device_end));
        assert!(
            ask(&mut link, "GET_STATUS")
                .await
                .starts_with("STATUS: seq=")
        );
        assert_eq!(
            ask(&mut link, "SET_RATE=5").await.split(':').next(),
            Some("ERROR")
        );
        assert_eq!(
            ask(&mut link, "SET_RATE=abc").await.split(':').next(),
            Some("ERROR")
        );
        assert_eq!(ask(&mut link, "NOPE").await, "ERROR: unknown command");
        assert_eq!(ask(&mut link, "CALIBRATE").await, "OK: calibrated");
        assert_eq!(ask(&mut link, "SET_RATE=20").await, "OK: rate_ms=20");
        assert!(ask(&mut link, "GET_STATUS").await.contains("rate_ms=20"));
        // Frames now come every 20 ms of (paused) time.
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut stamps = Vec::new();
        while stamps.len() < 6 {
            let mut chunk = [0u8; 512];
            let n = link.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                if matches!(frame, Frame::Sample(_)) {
                    stamps.push(Instant::now());
                }
            }
        }
        let gaps: Vec<_> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps[1..].iter().all(|g| *g == Duration::from_millis(20)),
            "{gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reset_restarts_the_sequence() {
        let (mut link, device_end) = tokio::io::duplex(LINK_BUFFER);
        tokio::spawn(Simulator::new(settings(), Duration::from_millis(10)).run(device_end));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(ask(&mut link, "RESET").await, "OK: reset");
        let status = ask(&mut link, "GET_STATUS").await;
        let seq: u32 = status["STATUS: seq=".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(seq < 5, "{status}");
    }

    #[tokio::test(start_paused = true)]
    async fn baud_pacing_caps_the_byte_rate() {
        let sim = Simulator::new(
            SimulatorSettings {
                baud: 9600,
                ..settings()
            },
            Duration::ZERO,
        );
        let (mut reader, writer) = tokio::io::duplex(LINK_BUFFER);
        tokio::spawn(sim.run(writer));
        let start = Instant::now();
        let mut total = 0;
        let mut chunk = [0u8; 4096];
        while total < 9600 {
            total += reader.read(&mut chunk).await.unwrap();
        }
        // 9600 baud, 8N1: 960 bytes a second, so 9600 bytes take about ten seconds.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(8),
            "{elapsed:?} for {total} bytes"
        );
        assert!(
            elapsed <= Duration::from_secs(12),
            "{elapsed:?} for {total} bytes"
        );
    }

    #[tokio::test]
    async fn drop_rate_one_damages_every_frame() {
        let sim = Simulator::new(
            SimulatorSettings {
                drop_rate: 1.0,
                ..settings()
            },
            Duration::ZERO,
        );
        let frames = frames_from(sim, 4000).await;
        assert!(frames.len() > 50);
        // Losing the `\r` or the `\n` leaves a valid frame; losing any other byte breaks it.
        let valid = frames
            .iter()
            .filter(|f| matches!(f, Frame::Sample(_)))
            .count();
        assert!(
            valid * 5 < frames.len(),
            "{valid} of {} frames valid",
            frames.len()
        );
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
