//! Tests of the device task through its public surface only: [`DeviceTask::new`],
//! [`DeviceTask::run`] and [`DeviceHandle`].
//!
//! A [`ScriptedConnector`] hands the task, in order, the links and open failures a test scripted
//! through its [`Script`]; the test keeps the device's end of every link to write frames or
//! garbage into it, or drops it to close the link. Samples come out of a real [`RingBuffer`].
//! Time is paused, so timeouts and backoff are instant and exact, and every wait is on a
//! condition (a status, samples in the buffer, a recorded connect) bounded by [`DEADLINE`].

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::codec::{encode_channel_frame, encode_frame};
use super::*;
use crate::buffer::{OverflowPolicy, RingBuffer};
use crate::config::DeviceSettings;
use crate::ledger::Ledger;
use crate::sample::{DEFAULT_CHANNEL, Sample};

/// Upper bound on every wait, in virtual time: far beyond any timer a test sets, so reaching it
/// means the awaited condition never came.
const DEADLINE: Duration = Duration::from_secs(600);

/// Most outcomes a test scripts ahead of the task.
const SCRIPT_LEN: usize = 64;

/// The test's side of a [`ScriptedConnector`]: what it will hand out, and when it did.
struct Script {
    outcomes: mpsc::Sender<io::Result<DuplexStream>>,
    connects: watch::Receiver<Vec<Instant>>,
}

/// Hands out the scripted outcomes in order. With nothing scripted, an open waits until the
/// test scripts one, so the task never sees a link the test did not plan.
struct ScriptedConnector {
    outcomes: mpsc::Receiver<io::Result<DuplexStream>>,
    connects: watch::Sender<Vec<Instant>>,
}

fn scripted() -> (Script, ScriptedConnector) {
    let (outcomes_tx, outcomes) = mpsc::channel(SCRIPT_LEN);
    let (connects, connects_rx) = watch::channel(Vec::new());
    let script = Script {
        outcomes: outcomes_tx,
        connects: connects_rx,
    };
    (script, ScriptedConnector { outcomes, connects })
}

impl Connector for ScriptedConnector {
    type Io = DuplexStream;

    async fn connect(&mut self) -> io::Result<DuplexStream> {
        let Some(outcome) = self.outcomes.recv().await else {
            // The test dropped its script: no link will ever open.
            return std::future::pending().await;
        };
        self.connects.send_modify(|c| c.push(Instant::now()));
        outcome
    }
}

impl Script {
    /// Scripts a working link; returns the device's end of it.
    fn link(&self) -> DuplexStream {
        let (gateway, device) = tokio::io::duplex(4096);
        self.push(Ok(gateway));
        device
    }

    /// Scripts an open that fails.
    fn fail(&self) {
        self.push(Err(io::Error::new(io::ErrorKind::NotFound, "no such port")));
    }

    fn push(&self, outcome: io::Result<DuplexStream>) {
        self.outcomes
            .try_send(outcome)
            .expect("tests script fewer than SCRIPT_LEN outcomes ahead");
    }

    /// Outcomes scripted but not handed out yet.
    fn remaining(&self) -> usize {
        self.outcomes.max_capacity() - self.outcomes.capacity()
    }

    /// When each outcome was handed out, oldest first.
    fn connects(&self) -> Vec<Instant> {
        self.connects.borrow().clone()
    }

    /// Waits until `n` outcomes have been handed out; returns when each was.
    async fn wait_connects(&self, n: usize) -> Vec<Instant> {
        let mut connects = self.connects.clone();
        let what = format!("connect #{n}");
        within(&what, async move {
            connects
                .wait_for(|c| c.len() >= n)
                .await
                .map(|c| c.clone())
                .unwrap_or_else(|_| panic!("the device task ended before connect #{n}"))
        })
        .await
    }
}

/// A running device task and what the test needs to drive and observe it.
struct Device {
    handle: DeviceHandle,
    buffer: Arc<RingBuffer>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Device {
    fn spawn(settings: &DeviceSettings, buffer: RingBuffer, connector: impl Connector) -> Self {
        let buffer = Arc::new(buffer);
        let cancel = CancellationToken::new();
        let (task, handle) = DeviceTask::new(
            settings,
            "simulated",
            connector,
            buffer.clone(),
            cancel.clone(),
        );
        let task = tokio::spawn(task.run());
        Self {
            handle,
            buffer,
            cancel,
            task,
        }
    }

    async fn command(&self, command: Command) -> Result<DeviceState, CommandError> {
        within(command.as_str(), self.handle.command(command)).await
    }

    /// Waits for a status that satisfies `pred`, and checks it does (the task may have ended).
    async fn wait_for(
        &self,
        what: &str,
        mut pred: impl FnMut(&DeviceStatus) -> bool,
    ) -> DeviceStatus {
        let status = within(what, self.handle.wait_for(&mut pred)).await;
        assert!(
            pred(&status),
            "the device task ended before {what}: {status:?}"
        );
        status
    }

    async fn wait_state(&self, state: DeviceState) -> DeviceStatus {
        self.wait_for(state.as_str(), |s| s.state == state).await
    }

    /// Pops exactly `n` samples, waiting for them, and checks that no more are queued.
    async fn samples(&self, n: usize) -> Vec<Sample> {
        let mut got = Vec::new();
        within(&format!("{n} samples"), async {
            while got.len() < n {
                let batch = self.buffer.pop(n - got.len()).await;
                got.extend(batch.expect("tests never close the buffer"));
            }
        })
        .await;
        assert!(self.buffer.is_empty(), "more samples than the {n} expected");
        got
    }

    /// Pops `n` samples, waiting for them; more may be queued.
    async fn take(&self, n: usize) -> Vec<Sample> {
        let mut got = Vec::new();
        within(&format!("{n} samples"), async {
            while got.len() < n {
                let batch = self.buffer.pop(n - got.len()).await;
                got.extend(batch.expect("tests never close the buffer"));
            }
        })
        .await;
        got
    }

    /// Sends a command and returns the device's reply, which must come.
    async fn ask(&self, line: &str) -> String {
        within(line, self.handle.send(line))
            .await
            .unwrap_or_else(|err| panic!("{line}: {err}"))
    }

    /// Cancels the task, waits for `run()` to end and returns the buffer's final accounting.
    async fn shutdown(&mut self) -> Ledger {
        self.cancel.cancel();
        within("run() to end", &mut self.task)
            .await
            .expect("run() does not panic");
        self.buffer.ledger()
    }
}

/// Default settings for these tests: a long read timeout, so that only the tests about
/// timeouts ever see one.
fn settings() -> DeviceSettings {
    DeviceSettings {
        read_timeout_ms: Some(3_600_000),
        failure_threshold: 5,
        backoff_initial_ms: 100,
        backoff_max_ms: 1_000,
        ..DeviceSettings::simulated("dev")
    }
}

fn idle_settings() -> DeviceSettings {
    DeviceSettings {
        autostart: false,
        ..settings()
    }
}

/// A device on a scripted link that connected and read one frame (sequence 1): Measuring.
/// Returns the script (for later links), the device's end of the link, and the device.
async fn measuring_device(settings: &DeviceSettings) -> (Script, DuplexStream, Device) {
    let (script, connector) = scripted();
    let mut peer = script.link();
    let dev = Device::spawn(settings, roomy_buffer(), connector);
    script.wait_connects(1).await;
    send(&mut peer, &frames([1])).await;
    dev.samples(1).await;
    (script, peer, dev)
}

fn roomy_buffer() -> RingBuffer {
    RingBuffer::new(1024, OverflowPolicy::DropOldest)
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Lets `duration` of virtual time pass. The paused clock only advances once every task is
/// idle, so afterwards the device task has done all it could without the test acting; used to
/// show that something does *not* happen, or that the task is stuck waiting.
async fn idle_for(duration: Duration) {
    tokio::time::sleep(duration).await;
}

fn frame(seq: u32, value: f64, unit: &str) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame(seq, value, unit, &mut buf);
    buf
}

fn frames(seqs: impl IntoIterator<Item = u32>) -> BytesMut {
    let mut buf = BytesMut::new();
    for seq in seqs {
        encode_frame(seq, f64::from(seq), "V", &mut buf);
    }
    buf
}

/// A well-formed frame whose checksum does not match (one digit of its sequence flipped).
fn corrupted(seq: u32) -> BytesMut {
    let mut buf = frame(seq, 1.0, "V");
    buf[4] ^= 0x01;
    buf
}

async fn send(peer: &mut DuplexStream, bytes: &[u8]) {
    within("a write to the link", peer.write_all(bytes))
        .await
        .expect("the gateway keeps the link open");
}

/// Checks the gateway dropped its end: reads see the end of the stream, writes fail.
async fn assert_closed(peer: &mut DuplexStream) {
    let mut buf = [0u8; 16];
    let n = within("the gateway to close the link", peer.read(&mut buf))
        .await
        .expect("reading a duplex stream cannot fail");
    assert_eq!(n, 0, "the gateway never writes to the link");
    let err = peer.write_all(b"$").await.expect_err("the link is closed");
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
}

fn seqs(samples: &[Sample]) -> Vec<u32> {
    samples
        .iter()
        .map(|s| s.seq.expect("device samples carry a seq"))
        .collect()
}

fn measuring() -> DeviceStatus {
    DeviceStatus {
        state: DeviceState::Measuring,
        consecutive_failures: 0,
        last_error: None,
    }
}

fn illegal(result: Result<DeviceState, CommandError>) -> IllegalTransition {
    match result {
        Err(CommandError::Illegal(refused)) => refused,
        other => panic!("expected an illegal transition, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn without_autostart_the_device_stays_idle_and_never_connects() {
    let (script, connector) = scripted();
    let _peer = script.link();
    let dev = Device::spawn(&idle_settings(), roomy_buffer(), connector);

    idle_for(Duration::from_secs(60)).await;

    assert_eq!(dev.handle.status(), DeviceStatus::default());
    assert_eq!(dev.handle.state(), DeviceState::Idle);
    assert!(script.connects().is_empty());
    assert_eq!(script.remaining(), 1, "the scripted link was not taken");
    assert_eq!(dev.handle.counters(), CountersSnapshot::default());
    assert!(dev.buffer.is_empty());
}

#[tokio::test(start_paused = true)]
async fn start_connects_and_frames_become_samples_in_the_buffer() {
    let (script, connector) = scripted();
    let mut peer = script.link();
    let dev = Device::spawn(&idle_settings(), roomy_buffer(), connector);

    assert_eq!(
        dev.command(Command::Start).await.unwrap(),
        DeviceState::Measuring
    );
    script.wait_connects(1).await;
    let mut bytes = frame(1, 21.5, "degC");
    bytes.extend_from_slice(&frame(2, -3.25, "V"));
    bytes.extend_from_slice(&frame(3, 0.0, "arb.units"));
    send(&mut peer, &bytes).await;

    let samples = dev.samples(3).await;
    let got: Vec<_> = samples
        .iter()
        .map(|s| {
            (
                s.labels.device.as_str(),
                s.seq,
                s.value,
                s.labels.unit.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("dev", Some(1), 21.5, "degC"),
            ("dev", Some(2), -3.25, "V"),
            ("dev", Some(3), 0.0, "arb.units"),
        ]
    );
    assert_eq!(
        dev.handle.counters(),
        CountersSnapshot {
            samples_read: 3,
            ..Default::default()
        }
    );
    assert_eq!(dev.buffer.ledger().read, 3);
    assert_eq!(dev.handle.status(), measuring());
}

#[tokio::test(start_paused = true)]
async fn each_frame_gets_its_own_unit_and_channel_and_equal_ones_share_labels() {
    // A default channel of its own, so a frame naming `value` is not a frame naming none.
    let settings = DeviceSettings {
        channel: "level".to_owned(),
        ..settings()
    };
    let (_script, mut peer, dev) = measuring_device(&settings).await;
    // (unit, channel named by the frame): runs, switches, the default channel named
    // explicitly, `value` named, and returns to earlier label sets.
    let sent = [
        ("degC", None),
        ("degC", None),
        ("degC", Some("temp")),
        ("degC", Some("temp")),
        ("degC", Some("humidity")),
        ("degC", None),
        ("degC", Some("level")),
        ("degC", None),
        ("degC", Some(DEFAULT_CHANNEL)),
        ("degC", None),
        ("V", None),
        ("V", Some("temp")),
        ("degC", Some("temp")),
    ];
    let mut bytes = BytesMut::new();
    for (seq, (unit, channel)) in (2..).zip(sent) {
        match channel {
            Some(channel) => encode_channel_frame(seq, 1.0, unit, channel, &mut bytes),
            None => encode_frame(seq, 1.0, unit, &mut bytes),
        }
    }
    send(&mut peer, &bytes).await;
    let samples = dev.take(sent.len()).await;
    let got: Vec<_> = samples.iter().map(|s| s.labels.names()).collect();
    let want: Vec<_> = sent
        .iter()
        .map(|(unit, channel)| ("dev", *unit, channel.unwrap_or("level")))
        .collect();
    assert_eq!(got, want);
    let shared = |a: usize, b: usize| Arc::ptr_eq(&samples[a].labels, &samples[b].labels);
    for (a, b) in [(0, 1), (2, 3), (0, 5), (0, 6), (0, 7), (0, 9), (2, 12)] {
        assert!(shared(a, b), "samples {a} and {b} share their labels");
    }
    for (a, b) in [(0, 2), (3, 4), (7, 8), (8, 9), (9, 10), (10, 11), (11, 12)] {
        assert!(!shared(a, b), "samples {a} and {b} have different labels");
    }
}

#[tokio::test(start_paused = true)]
async fn labels_follow_the_names_across_reads_and_reconnects() {
    let (script, mut first, dev) = measuring_device(&settings()).await;
    // One unit in later reads: the codec named it with the first frame only, and the later
    // reads' samples still arrive with its labels, none counted invalid.
    send(&mut first, &frames([2])).await;
    send(&mut first, &frames([3])).await;
    let later = dev.samples(2).await;
    assert_eq!(seqs(&later), [2, 3]);
    for sample in &later {
        assert_eq!(sample.labels.names(), ("dev", "V", DEFAULT_CHANNEL));
    }

    // A new link: its first frame, the same unit as the last link's, and then changes.
    let mut second = script.link();
    drop(first);
    script.wait_connects(2).await;
    let mut bytes = frames([4]);
    encode_channel_frame(5, 5.0, "mV", "rail", &mut bytes);
    bytes.extend_from_slice(&frame(6, 6.0, "mV"));
    bytes.extend_from_slice(&frames([7]));
    send(&mut second, &bytes).await;
    let samples = dev.samples(4).await;
    let names: Vec<_> = samples.iter().map(|s| s.labels.names()).collect();
    assert_eq!(
        names,
        [
            ("dev", "V", DEFAULT_CHANNEL),
            ("dev", "mV", "rail"),
            ("dev", "mV", DEFAULT_CHANNEL),
            ("dev", "V", DEFAULT_CHANNEL),
        ]
    );
    assert_eq!(seqs(&samples), [4, 5, 6, 7]);
    assert_eq!(
        dev.handle.counters().frames_invalid,
        InvalidCounts::default()
    );
}

#[tokio::test(start_paused = true)]
async fn stop_drops_the_link_and_start_opens_a_new_one() {
    let (script, mut first, dev) = measuring_device(&settings()).await;

    assert_eq!(dev.command(Command::Stop).await.unwrap(), DeviceState::Idle);
    assert_closed(&mut first).await;
    assert_eq!(dev.handle.status(), DeviceStatus::default());

    // Idle: a link is available, but the device does not want it.
    let mut second = script.link();
    idle_for(Duration::from_secs(60)).await;
    assert_eq!(script.connects().len(), 1);

    assert_eq!(
        dev.command(Command::Start).await.unwrap(),
        DeviceState::Measuring
    );
    script.wait_connects(2).await;
    send(&mut second, &frames([7])).await;
    assert_eq!(seqs(&dev.samples(1).await), [7]);
    assert_eq!(
        dev.handle.counters(),
        CountersSnapshot {
            samples_read: 2,
            ..Default::default()
        },
        "a stop is not a link failure"
    );
}

#[tokio::test(start_paused = true)]
async fn fifty_stop_start_cycles_each_open_a_fresh_link() {
    let (script, connector) = scripted();
    let dev = Device::spawn(&idle_settings(), roomy_buffer(), connector);

    for cycle in 0..50u32 {
        let mut peer = script.link();
        assert_eq!(
            dev.command(Command::Start).await.unwrap(),
            DeviceState::Measuring,
            "cycle {cycle}"
        );
        script.wait_connects(cycle as usize + 1).await;
        // Each link's numbering starts far from the last one: a new link is not a gap.
        send(&mut peer, &frames([cycle * 10])).await;
        assert_eq!(seqs(&dev.samples(1).await), [cycle * 10], "cycle {cycle}");
        assert_eq!(
            dev.command(Command::Stop).await.unwrap(),
            DeviceState::Idle,
            "cycle {cycle}"
        );
        assert_closed(&mut peer).await;
    }

    assert_eq!(script.connects().len(), 50);
    assert_eq!(
        dev.handle.counters(),
        CountersSnapshot {
            samples_read: 50,
            ..Default::default()
        }
    );
    assert_eq!(dev.handle.status(), DeviceStatus::default());
}

#[tokio::test(start_paused = true)]
async fn eof_is_an_error_and_a_good_frame_after_the_backoff_recovers() {
    let (script, first, dev) = measuring_device(&settings()).await;

    let mut second = script.link();
    drop(first);
    let failed_at = Instant::now();
    let status = dev.wait_state(DeviceState::Error).await;
    assert_eq!(status.consecutive_failures, 1);
    let error = status.last_error.expect("a failure is reported");
    assert!(error.starts_with("closed"), "{error}");
    assert_eq!(
        dev.handle.counters().link_failures,
        FailureCounts {
            closed: 1,
            ..Default::default()
        }
    );
    // Start while retrying changes nothing, and in particular does not skip the backoff.
    assert_eq!(
        dev.command(Command::Start).await.unwrap(),
        DeviceState::Error
    );

    let reopened_at = script.wait_connects(2).await[1];
    let waited = reopened_at - failed_at;
    assert!(
        waited >= ms(100) && waited < ms(200),
        "reopened after {waited:?}"
    );
    // Reopening alone is not recovery; a good frame is.
    assert_eq!(dev.handle.state(), DeviceState::Error);
    send(&mut second, &frames([2])).await;
    let status = dev.wait_state(DeviceState::Measuring).await;
    assert_eq!(status.consecutive_failures, 0);
    assert_eq!(seqs(&dev.samples(1).await), [2]);
}

#[tokio::test(start_paused = true)]
async fn silence_past_the_read_timeout_is_an_error() {
    let settings = DeviceSettings {
        read_timeout_ms: Some(500),
        ..settings()
    };
    let (script, connector) = scripted();
    let mut peer = script.link();
    let dev = Device::spawn(&settings, roomy_buffer(), connector);
    let connected_at = script.wait_connects(1).await[0];

    // A good frame restarts the clock: the timeout counts from it, not from the connect.
    idle_for(ms(300)).await;
    send(&mut peer, &frames([1])).await;
    dev.samples(1).await;
    let last_good = Instant::now();
    assert_eq!(last_good - connected_at, ms(300));

    let status = dev.wait_state(DeviceState::Error).await;
    let silent = Instant::now() - last_good;
    assert!(
        silent >= ms(500) && silent < ms(600),
        "timed out after {silent:?}"
    );
    assert_eq!(status.consecutive_failures, 1);
    let error = status.last_error.expect("a failure is reported");
    assert!(error.starts_with("timeout"), "{error}");
    assert_eq!(
        dev.handle.counters().link_failures,
        FailureCounts {
            timeout: 1,
            ..Default::default()
        }
    );
    assert_closed(&mut peer).await;
}

#[tokio::test(start_paused = true)]
async fn a_link_sending_only_invalid_frames_times_out() {
    let settings = DeviceSettings {
        read_timeout_ms: Some(500),
        ..settings()
    };
    let (script, connector) = scripted();
    let mut peer = script.link();
    let dev = Device::spawn(&settings, roomy_buffer(), connector);
    let connected_at = script.wait_connects(1).await[0];

    // Every 100 ms a run of garbage and a frame with a bad checksum, until the link closes.
    let writer = tokio::spawn(async move {
        let mut round = BytesMut::from(&b"noise\r\n"[..]);
        round.extend_from_slice(&corrupted(1));
        let mut rounds = 0u32;
        while peer.write_all(&round).await.is_ok() {
            rounds += 1;
            tokio::time::sleep(ms(100)).await;
        }
        rounds
    });

    let status = dev.wait_state(DeviceState::Error).await;
    let elapsed = Instant::now() - connected_at;
    assert!(
        elapsed >= ms(500) && elapsed < ms(600),
        "timed out after {elapsed:?}"
    );
    assert_eq!(status.consecutive_failures, 1);
    let counters = dev.handle.counters();
    assert_eq!(
        counters.link_failures,
        FailureCounts {
            timeout: 1,
            ..Default::default()
        }
    );
    assert_eq!(counters.samples_read, 0);
    let invalid = counters.frames_invalid;
    assert!(invalid.checksum >= 5, "{invalid:?}");
    assert_eq!(invalid.syntax, invalid.checksum, "{invalid:?}");
    assert_eq!(invalid.too_long, 0);
    let rounds = within("the writer to see the link close", writer)
        .await
        .unwrap();
    assert!(rounds >= 5, "{rounds}");
}

#[tokio::test(start_paused = true)]
async fn repeated_connect_errors_trip_the_breaker_until_reset() {
    let settings = DeviceSettings {
        failure_threshold: 3,
        ..settings()
    };
    let (script, connector) = scripted();
    for _ in 0..3 {
        script.fail();
    }
    let dev = Device::spawn(&settings, roomy_buffer(), connector);

    let status = dev.wait_state(DeviceState::SafeState).await;
    assert_eq!(status.consecutive_failures, 3);
    let error = status.last_error.expect("a failure is reported");
    assert!(
        error.starts_with("connect") && error.contains("no such port"),
        "{error}"
    );
    assert_eq!(script.connects().len(), 3);
    assert_eq!(
        dev.handle.counters().link_failures,
        FailureCounts {
            connect: 3,
            ..Default::default()
        }
    );

    // Tripped: the device stops trying, even with a link to be had.
    let mut peer = script.link();
    idle_for(Duration::from_secs(60)).await;
    assert_eq!(script.connects().len(), 3);
    assert_eq!(script.remaining(), 1);

    assert_eq!(
        illegal(dev.command(Command::Start).await),
        IllegalTransition {
            from: DeviceState::SafeState,
            command: Command::Start
        }
    );
    assert_eq!(dev.handle.state(), DeviceState::SafeState);

    assert_eq!(
        dev.command(Command::Reset).await.unwrap(),
        DeviceState::Idle
    );
    assert_eq!(dev.handle.status(), DeviceStatus::default());
    assert_eq!(
        dev.command(Command::Start).await.unwrap(),
        DeviceState::Measuring
    );
    script.wait_connects(4).await;
    send(&mut peer, &frames([1])).await;
    assert_eq!(seqs(&dev.samples(1).await), [1]);
    assert_eq!(dev.handle.status(), measuring());
}

#[tokio::test(start_paused = true)]
async fn reconnect_delays_double_up_to_the_cap() {
    let settings = DeviceSettings {
        failure_threshold: 10,
        backoff_initial_ms: 100,
        backoff_max_ms: 1_000,
        ..settings()
    };
    let (script, connector) = scripted();
    for _ in 0..8 {
        script.fail();
    }
    let started = Instant::now();
    let dev = Device::spawn(&settings, roomy_buffer(), connector);

    let connects = script.wait_connects(8).await;
    assert_eq!(connects[0], started, "the first open is immediate");
    // Each open fails at once, so each gap is the delay after the previous failure.
    let gaps: Vec<Duration> = connects.windows(2).map(|w| w[1] - w[0]).collect();
    let expected = [100, 200, 400, 800, 1000, 1000, 1000].map(ms);
    for (n, (gap, delay)) in gaps.iter().zip(expected).enumerate() {
        assert!(
            *gap >= delay && *gap < delay + ms(10),
            "retry {}: {gap:?}, expected {delay:?} ({gaps:?})",
            n + 1
        );
    }
    let status = dev.handle.status();
    assert_eq!(
        (status.state, status.consecutive_failures),
        (DeviceState::Error, 8)
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_frames_are_counted_by_reason_and_change_nothing() {
    let (script, connector) = scripted();
    let mut peer = script.link();
    let dev = Device::spawn(&settings(), roomy_buffer(), connector);
    script.wait_connects(1).await;

    let mut bytes = frames([1]);
    bytes.extend_from_slice(&corrupted(2));
    bytes.extend_from_slice(b"garbage\r\n");
    bytes.extend_from_slice(b"$TH,2,");
    bytes.extend_from_slice(&[b'9'; 300]);
    bytes.extend_from_slice(b",V*00\r\n");
    bytes.extend_from_slice(&frames([2]));
    send(&mut peer, &bytes).await;

    assert_eq!(seqs(&dev.samples(2).await), [1, 2]);
    assert_eq!(
        dev.handle.counters(),
        CountersSnapshot {
            samples_read: 2,
            frames_invalid: InvalidCounts {
                checksum: 1,
                syntax: 1,
                too_long: 1,
            },
            ..Default::default()
        }
    );
    assert_eq!(dev.handle.status(), measuring());
}

#[tokio::test(start_paused = true)]
async fn frames_sent_just_before_the_link_closes_are_all_kept_and_a_cut_frame_counted() {
    let (script, connector) = scripted();
    let mut peer = script.link();
    let dev = Device::spawn(&settings(), roomy_buffer(), connector);
    script.wait_connects(1).await;

    // Many frames, a frame cut short, and the end of the link, all at once: the last read's
    // frames and the link's end arrive together.
    let mut bytes = frames(1..=300);
    bytes.extend_from_slice(b"$TH,301,42.5");
    send(&mut peer, &bytes).await;
    drop(peer);

    dev.wait_state(DeviceState::Error).await;
    assert_eq!(seqs(&dev.samples(300).await), (1..=300).collect::<Vec<_>>());
    let counters = dev.handle.counters();
    assert_eq!(counters.samples_read, 300);
    assert_eq!(
        counters.frames_invalid,
        InvalidCounts {
            syntax: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        counters.link_failures,
        FailureCounts {
            closed: 1,
            ..Default::default()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn sequence_gaps_count_missing_samples_but_not_backward_jumps() {
    let (script, connector) = scripted();
    let mut peer = script.link();
    let dev = Device::spawn(&settings(), roomy_buffer(), connector);
    script.wait_connects(1).await;

    send(&mut peer, &frames([1, 2, 5])).await;
    assert_eq!(seqs(&dev.samples(3).await), [1, 2, 5]);
    assert_eq!(dev.handle.counters().seq_gaps, 2);

    // Backwards (a restarted counter), onwards from there, a repeat: no gaps.
    send(&mut peer, &frames([3, 4, 4])).await;
    assert_eq!(seqs(&dev.samples(3).await), [3, 4, 4]);
    assert_eq!(dev.handle.counters().seq_gaps, 2);

    // Counting resumes from the new position: 5 and 6 are missing.
    send(&mut peer, &frames([7])).await;
    dev.samples(1).await;
    assert_eq!(dev.handle.counters().seq_gaps, 4);
    assert_eq!(dev.handle.status(), measuring());
}

#[tokio::test(start_paused = true)]
async fn cancel_ends_run_and_closes_the_link() {
    let (script, connector) = scripted();
    let mut peer = script.link();
    let mut dev = Device::spawn(&settings(), roomy_buffer(), connector);
    script.wait_connects(1).await;
    send(&mut peer, &frames([1, 2])).await;
    dev.samples(2).await;

    let cancelled_at = Instant::now();
    let ledger = dev.shutdown().await;
    assert_eq!(Instant::now(), cancelled_at, "run() ends without waiting");
    assert_closed(&mut peer).await;
    assert!(ledger.balanced(), "{ledger:?}");
    assert!(matches!(
        dev.command(Command::Start).await,
        Err(CommandError::Unavailable(id)) if id == "dev"
    ));
}

#[tokio::test(start_paused = true)]
async fn cancel_while_blocked_on_a_full_buffer_counts_held_samples_as_shutdown() {
    let (script, connector) = scripted();
    let mut peer = script.link();
    let buffer = RingBuffer::new(2, OverflowPolicy::Block);
    let mut dev = Device::spawn(&settings(), buffer, connector);
    script.wait_connects(1).await;
    send(&mut peer, &frames(1..=5)).await;

    // Two samples fit; the task holds the other three, waiting for room.
    idle_for(ms(1)).await;
    assert_eq!(dev.buffer.len(), 2);
    assert!(!dev.task.is_finished());

    let cancelled_at = Instant::now();
    let ledger = dev.shutdown().await;
    assert_eq!(Instant::now(), cancelled_at, "run() ends without waiting");
    assert_eq!(ledger.read, 5);
    assert_eq!(ledger.in_buffer, 2);
    assert_eq!(ledger.dropped.shutdown, 3);
    assert!(ledger.balanced(), "{ledger:?}");
    assert_eq!(dev.handle.counters().samples_read, 5);
    assert_closed(&mut peer).await;
}

#[tokio::test(start_paused = true)]
async fn stop_is_served_while_blocked_on_a_full_buffer() {
    let (script, connector) = scripted();
    let mut peer = script.link();
    let buffer = RingBuffer::new(2, OverflowPolicy::Block);
    let dev = Device::spawn(&settings(), buffer, connector);
    script.wait_connects(1).await;
    send(&mut peer, &frames(1..=5)).await;
    idle_for(ms(1)).await;
    assert_eq!(
        dev.buffer.len(),
        2,
        "the task is blocked on the full buffer"
    );

    // Nothing drains the buffer; an operator's stop must still take effect.
    let stop = tokio::time::timeout(Duration::from_secs(30), dev.handle.command(Command::Stop));
    let stopped = stop
        .await
        .expect("stop is answered while the buffer stays full");
    assert_eq!(stopped.unwrap(), DeviceState::Idle);
    assert_closed(&mut peer).await;
    let ledger = dev.buffer.ledger();
    assert_eq!(
        (ledger.read, ledger.in_buffer, ledger.dropped.stopped),
        (5, 2, 3)
    );
    assert!(ledger.balanced(), "{ledger:?}");
}

#[tokio::test(start_paused = true)]
async fn reset_while_measuring_is_refused_and_changes_nothing() {
    let (script, mut peer, dev) = measuring_device(&settings()).await;

    let refused = illegal(dev.command(Command::Reset).await);
    assert_eq!(
        refused,
        IllegalTransition {
            from: DeviceState::Measuring,
            command: Command::Reset
        }
    );
    assert!(refused.to_string().contains("stop it first"), "{refused}");
    assert_eq!(dev.handle.status(), measuring());

    // The link is untouched: frames keep flowing on it.
    send(&mut peer, &frames([2])).await;
    assert_eq!(seqs(&dev.samples(1).await), [2]);
    assert_eq!(script.connects().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn stop_while_waiting_to_reconnect_abandons_the_retry() {
    let (script, connector) = scripted();
    let first = script.link();
    let dev = Device::spawn(&settings(), roomy_buffer(), connector);
    script.wait_connects(1).await;
    let _second = script.link();
    drop(first);
    dev.wait_state(DeviceState::Error).await;

    assert_eq!(dev.command(Command::Stop).await.unwrap(), DeviceState::Idle);
    assert_eq!(dev.handle.status(), DeviceStatus::default());
    idle_for(Duration::from_secs(60)).await;
    assert_eq!(script.connects().len(), 1);
    assert_eq!(script.remaining(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_ends_run() {
    let (_script, connector) = scripted();
    let Device { handle, task, .. } = Device::spawn(&settings(), roomy_buffer(), connector);
    let other = handle.clone();
    drop(handle);
    idle_for(ms(1)).await;
    assert!(!task.is_finished(), "one handle is left");
    drop(other);
    within("run() to end", task)
        .await
        .expect("run() does not panic");
}

/// Reads one command line the gateway wrote to the link, without its line end.
async fn read_command(peer: &mut DuplexStream) -> String {
    let mut line = Vec::new();
    within("a command on the link", async {
        loop {
            let mut byte = [0u8; 1];
            let n = peer
                .read(&mut byte)
                .await
                .expect("reading a duplex stream cannot fail");
            assert!(n > 0, "the gateway closed the link");
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
    })
    .await;
    let line = String::from_utf8(line).expect("commands are ASCII");
    line.trim_end_matches('\r').to_owned()
}

/// Sends `line` through the handle on a task of its own, so the test can play the device.
fn ask(dev: &Device, line: &'static str) -> JoinHandle<Result<String, SendError>> {
    let handle = dev.handle.clone();
    tokio::spawn(async move { handle.send(line).await })
}

async fn answer_of(
    what: &str,
    pending: JoinHandle<Result<String, SendError>>,
) -> Result<String, SendError> {
    within(what, pending).await.expect("send() does not panic")
}

#[tokio::test(start_paused = true)]
async fn a_command_that_is_never_answered_does_not_shift_later_replies() {
    let settings = DeviceSettings {
        command_timeout_ms: 500,
        ..settings()
    };
    let (_script, mut peer, dev) = measuring_device(&settings).await;

    let one = ask(&dev, "ONE");
    assert_eq!(read_command(&mut peer).await, "ONE");
    send(&mut peer, b"OK: one\r\n").await;
    assert_eq!(answer_of("ONE", one).await, Ok("OK: one".to_owned()));

    // The device ignores TWO.
    let two = ask(&dev, "TWO");
    assert_eq!(read_command(&mut peer).await, "TWO");
    assert_eq!(
        answer_of("TWO", two).await,
        Err(SendError::Timeout(ms(500)))
    );

    // Every later command gets its own reply.
    for (command, reply) in [("THREE", "OK: three"), ("FOUR", "STATUS: four")] {
        let pending = ask(&dev, command);
        assert_eq!(read_command(&mut peer).await, command);
        send(&mut peer, format!("{reply}\r\n").as_bytes()).await;
        assert_eq!(answer_of(command, pending).await, Ok(reply.to_owned()));
    }
    assert_eq!(dev.handle.status(), measuring());
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_hangs_up_keeps_its_place_so_replies_do_not_shift() {
    let (_script, mut peer, dev) = measuring_device(&settings()).await;

    // A's caller hangs up (an HTTP client that disconnected) before the device answers it.
    let a = ask(&dev, "A");
    assert_eq!(read_command(&mut peer).await, "A");
    a.abort();
    let b = ask(&dev, "B");
    assert_eq!(read_command(&mut peer).await, "B");
    send(&mut peer, b"OK: a\r\nOK: b\r\n").await;
    assert_eq!(answer_of("B", b).await, Ok("OK: b".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn a_reply_after_the_timeout_is_dropped_or_taken_by_the_next_command() {
    let settings = DeviceSettings {
        command_timeout_ms: 500,
        ..settings()
    };
    let (_script, mut peer, dev) = measuring_device(&settings).await;

    // Nobody waits when the late reply comes: it is dropped.
    let slow = ask(&dev, "SLOW");
    assert_eq!(read_command(&mut peer).await, "SLOW");
    assert_eq!(
        answer_of("SLOW", slow).await,
        Err(SendError::Timeout(ms(500)))
    );
    send(&mut peer, b"OK: slow\r\n").await;
    let next = ask(&dev, "NEXT");
    assert_eq!(read_command(&mut peer).await, "NEXT");
    send(&mut peer, b"OK: next\r\n").await;
    assert_eq!(answer_of("NEXT", next).await, Ok("OK: next".to_owned()));

    // The documented limit: a late reply that comes while another command waits is taken by
    // it (replies carry no id), and that command's own reply then finds nobody.
    let slow = ask(&dev, "SLOW");
    assert_eq!(read_command(&mut peer).await, "SLOW");
    assert!(answer_of("SLOW", slow).await.is_err());
    let next = ask(&dev, "NEXT");
    assert_eq!(read_command(&mut peer).await, "NEXT");
    send(&mut peer, b"OK: slow\r\nOK: next\r\n").await;
    assert_eq!(answer_of("NEXT", next).await, Ok("OK: slow".to_owned()));
    let last = ask(&dev, "LAST");
    assert_eq!(read_command(&mut peer).await, "LAST");
    send(&mut peer, b"OK: last\r\n").await;
    assert_eq!(answer_of("LAST", last).await, Ok("OK: last".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn commands_waiting_for_replies_are_bounded() {
    let (_script, mut peer, dev) = measuring_device(&settings()).await;

    let mut pending = Vec::new();
    for _ in 0..32 {
        pending.push(ask(&dev, "GET_STATUS"));
        assert_eq!(read_command(&mut peer).await, "GET_STATUS");
    }
    let refused = ask(&dev, "GET_STATUS");
    assert_eq!(
        answer_of("the 33rd command", refused).await,
        Err(SendError::Busy("dev".into()))
    );
    // Replies free the places again, oldest first.
    send(&mut peer, b"STATUS: 0\r\n").await;
    assert_eq!(
        answer_of("the first command", pending.remove(0)).await,
        Ok("STATUS: 0".to_owned())
    );
    let admitted = ask(&dev, "GET_STATUS");
    assert_eq!(read_command(&mut peer).await, "GET_STATUS");
    drop(admitted);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_command_learns_why_its_link_went_away() {
    let (script, mut first, mut dev) = measuring_device(&settings()).await;

    // The device closes the link.
    let pending = ask(&dev, "A");
    assert_eq!(read_command(&mut first).await, "A");
    let mut second = script.link();
    drop(first);
    assert_eq!(answer_of("A", pending).await, Err(SendError::LinkClosed));

    // An operator stops the device.
    script.wait_connects(2).await;
    send(&mut second, &frames([2])).await;
    dev.samples(1).await;
    let pending = ask(&dev, "B");
    assert_eq!(read_command(&mut second).await, "B");
    dev.command(Command::Stop).await.unwrap();
    assert_eq!(answer_of("B", pending).await, Err(SendError::LinkClosed));

    // The gateway shuts down.
    let mut third = script.link();
    dev.command(Command::Start).await.unwrap();
    script.wait_connects(3).await;
    send(&mut third, &frames([3])).await;
    dev.samples(1).await;
    let pending = ask(&dev, "C");
    assert_eq!(read_command(&mut third).await, "C");
    dev.shutdown().await;
    assert_eq!(
        answer_of("C", pending).await,
        Err(SendError::Unavailable("dev".into()))
    );
    assert_eq!(
        dev.handle.send("D").await,
        Err(SendError::Unavailable("dev".into()))
    );
}

#[tokio::test(start_paused = true)]
async fn sequence_gaps_count_across_a_reconnect_until_a_stop_or_reset() {
    let settings = DeviceSettings {
        read_timeout_ms: Some(500),
        ..settings()
    };
    let (script, connector) = scripted();
    let mut first = script.link();
    let dev = Device::spawn(&settings, roomy_buffer(), connector);
    script.wait_connects(1).await;
    send(&mut first, &frames(100_000..=100_010)).await;
    dev.samples(11).await;

    // The link goes silent and times out; the same device comes back further on.
    let mut second = script.link();
    dev.wait_state(DeviceState::Error).await;
    script.wait_connects(2).await;
    send(&mut second, &frames([100_100])).await;
    dev.samples(1).await;
    assert_eq!(dev.handle.counters().seq_gaps, 89);
    assert_eq!(dev.handle.counters().link_failures.timeout, 1);

    // A backward jump is a restarted counter, not a gap, across a reconnect too.
    let mut third = script.link();
    drop(second);
    script.wait_connects(3).await;
    send(&mut third, &frames([5, 6])).await;
    dev.samples(2).await;
    assert_eq!(dev.handle.counters().seq_gaps, 89);

    // A stop forgets the position: what the device sent while stopped was not lost.
    for (command, seq) in [(Command::Stop, 1_000), (Command::Reset, 5_000)] {
        dev.command(Command::Stop).await.unwrap();
        dev.command(command).await.unwrap();
        let mut next = script.link();
        dev.command(Command::Start).await.unwrap();
        send(&mut next, &frames([seq])).await;
        dev.samples(1).await;
        assert_eq!(dev.handle.counters().seq_gaps, 89, "after {command:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn stop_acknowledges_a_tripped_breaker_and_leaves_the_device_idle() {
    let settings = DeviceSettings {
        failure_threshold: 2,
        ..idle_settings()
    };
    let (script, connector) = scripted();
    script.fail();
    script.fail();
    let dev = Device::spawn(&settings, roomy_buffer(), connector);
    dev.command(Command::Start).await.unwrap();
    dev.wait_state(DeviceState::SafeState).await;

    assert_eq!(dev.command(Command::Stop).await.unwrap(), DeviceState::Idle);
    assert_eq!(dev.handle.status(), DeviceStatus::default());
    // Idle like any stopped device: no retries, and a start opens the link afresh.
    let mut peer = script.link();
    idle_for(Duration::from_secs(60)).await;
    assert_eq!(script.connects().len(), 2);
    dev.command(Command::Start).await.unwrap();
    script.wait_connects(3).await;
    send(&mut peer, &frames([1])).await;
    dev.samples(1).await;
    assert_eq!(dev.handle.status(), measuring());
}

/// A device on the embedded simulator, sending every 100 ms: a 1 s read timeout and a 500 ms
/// staleness limit, both derived from that interval.
fn sim_settings() -> DeviceSettings {
    let mut settings = DeviceSettings::simulated("dev");
    settings.simulator.seed = 7;
    settings
}

fn sim_connector(settings: &DeviceSettings) -> sim::SimConnector {
    sim::SimConnector::new(
        settings.simulator.clone(),
        settings.interval(),
        tokio_util::task::TaskTracker::new(),
        CancellationToken::new(),
    )
}

/// The rate the simulator reports in its `GET_STATUS` reply.
async fn simulator_rate(dev: &Device) -> String {
    let status = dev.ask("GET_STATUS").await;
    status
        .split(' ')
        .find_map(|field| field.strip_prefix("rate_ms="))
        .unwrap_or_else(|| panic!("no rate in {status}"))
        .to_owned()
}

#[tokio::test(start_paused = true)]
async fn an_acknowledged_rate_change_moves_the_read_timeout() {
    let settings = sim_settings();
    let dev = Device::spawn(&settings, roomy_buffer(), sim_connector(&settings));
    dev.take(1).await;

    assert_eq!(dev.ask("SET_RATE=2000").await, "OK: rate_ms=2000");
    // Three frames 2 s apart: far past the 1 s read timeout that 100 ms implied.
    dev.take(4).await;
    assert_eq!(
        dev.handle.counters().link_failures,
        FailureCounts::default()
    );
    assert_eq!(dev.handle.status(), measuring());
    assert_eq!(simulator_rate(&dev).await, "2000");
}

#[tokio::test(start_paused = true)]
async fn an_acknowledged_rate_change_moves_the_staleness_limit() {
    let settings = sim_settings();
    let dev = Device::spawn(&settings, roomy_buffer(), sim_connector(&settings));
    dev.take(1).await;
    assert_eq!(dev.handle.freshness().stale_after, ms(500));

    assert_eq!(dev.ask("SET_RATE=700").await, "OK: rate_ms=700");
    // Right after a frame at the new rate, 650 ms of silence is normal, not stale.
    dev.take(2).await;
    idle_for(ms(650)).await;
    let freshness = dev.handle.freshness();
    assert_eq!(freshness.stale_after, ms(3_500));
    assert!(
        freshness.since_good >= ms(650) && !freshness.stale,
        "{freshness:?}"
    );

    // A refused rate changes nothing; going back restores the derived limits.
    assert!(dev.ask("SET_RATE=5").await.starts_with("ERROR:"));
    assert_eq!(dev.handle.freshness().stale_after, ms(3_500));
    assert_eq!(dev.ask("SET_RATE=100").await, "OK: rate_ms=100");
    assert_eq!(dev.handle.freshness().stale_after, ms(500));
}

#[tokio::test(start_paused = true)]
async fn an_acknowledged_rate_survives_stop_and_start() {
    let settings = sim_settings();
    let dev = Device::spawn(&settings, roomy_buffer(), sim_connector(&settings));
    dev.take(1).await;
    assert_eq!(dev.ask("SET_RATE=2000").await, "OK: rate_ms=2000");

    for command in [Command::Stop, Command::Reset, Command::Start] {
        dev.command(command).await.unwrap();
    }
    dev.take(1).await;
    assert_eq!(simulator_rate(&dev).await, "2000");
    assert_eq!(dev.handle.freshness().stale_after, ms(10_000));
    dev.take(3).await;
    assert_eq!(
        dev.handle.counters().link_failures,
        FailureCounts::default()
    );
}

#[tokio::test(start_paused = true)]
async fn an_acknowledged_rate_is_sent_again_after_every_reconnect() {
    let (script, mut first, dev) = measuring_device(&settings()).await;
    let set = ask(&dev, "SET_RATE=2000");
    assert_eq!(read_command(&mut first).await, "SET_RATE=2000");
    send(&mut first, b"OK: rate_ms=2000\r\n").await;
    assert_eq!(
        answer_of("SET_RATE", set).await,
        Ok("OK: rate_ms=2000".to_owned())
    );
    assert_eq!(dev.handle.freshness().stale_after, ms(10_000));

    // The link fails and reopens: the device may have lost the rate, so it is sent again.
    let mut second = script.link();
    drop(first);
    assert_eq!(read_command(&mut second).await, "SET_RATE=2000");
    send(&mut second, b"OK: rate_ms=2000\r\n").await;
    // Its reply went to the gateway, not to the next caller.
    let status = ask(&dev, "GET_STATUS");
    assert_eq!(read_command(&mut second).await, "GET_STATUS");
    send(&mut second, b"STATUS: rate_ms=2000\r\n").await;
    assert_eq!(
        answer_of("GET_STATUS", status).await,
        Ok("STATUS: rate_ms=2000".to_owned())
    );

    // After a stop and start too; a device that refuses it is back at the configured rate.
    let mut third = script.link();
    dev.command(Command::Stop).await.unwrap();
    dev.command(Command::Start).await.unwrap();
    assert_eq!(read_command(&mut third).await, "SET_RATE=2000");
    send(&mut third, b"ERROR: not now\r\n").await;
    send(&mut third, &frames([2])).await;
    dev.samples(1).await;
    assert_eq!(dev.handle.freshness().stale_after, ms(500));
}

#[tokio::test(start_paused = true)]
async fn a_slower_rate_overrides_explicit_limits_it_could_not_meet() {
    let settings = DeviceSettings {
        read_timeout_ms: Some(500),
        stale_after_ms: Some(300),
        ..sim_settings()
    };
    let dev = Device::spawn(&settings, roomy_buffer(), sim_connector(&settings));
    dev.take(1).await;
    assert_eq!(dev.handle.freshness().stale_after, ms(300));

    // 200 ms: the 500 ms timeout still allows it; 300 ms of staleness does not.
    assert_eq!(dev.ask("SET_RATE=200").await, "OK: rate_ms=200");
    assert_eq!(dev.handle.freshness().stale_after, ms(1_000));
    dev.take(5).await;
    // 2000 ms: neither does; three intervals and five intervals it is.
    assert_eq!(dev.ask("SET_RATE=2000").await, "OK: rate_ms=2000");
    assert_eq!(dev.handle.freshness().stale_after, ms(10_000));
    dev.take(4).await;
    assert_eq!(
        dev.handle.counters().link_failures,
        FailureCounts::default()
    );
}
