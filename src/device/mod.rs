//! Devices: one async task per device reads frames from its link and pushes samples.
//!
//! A [`DeviceTask`] owns a [`Connector`] (how to open the link: the embedded simulator's duplex
//! stream, later a tty), decodes the link's bytes with [`codec::FrameCodec`], stamps each sample
//! with its receive time, detects sequence gaps and pushes samples into the ring buffer in
//! batches. It runs the [`state`] machine: operator commands arrive over a channel from
//! [`DeviceHandle`]s (the API's only way in), link failures drive the circuit breaker, and every
//! change is published on a `watch` channel so status reads never wait for the task.

pub mod codec;
pub mod serial;
pub mod sim;
pub mod state;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::stream::ReadyChunks;
use serde::Serialize;
use smol_str::SmolStr;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::codec::{Frame, FrameCodec, InvalidReason};
use self::state::{Breaker, Command, DeviceState, IllegalTransition};
use crate::buffer::RingBuffer;
use crate::config::DeviceSettings;
use crate::ledger::{DropReason, Source};
use crate::sample::Sample;

/// Most frames decoded into one push to the buffer.
const CHUNK_MAX: usize = 256;

/// Opens a device's link. Called again after every failure, so a link that went away (a
/// simulator that disconnected, a USB adapter that was unplugged) is reopened with backoff.
pub trait Connector: Send + 'static {
    /// The byte stream: a duplex stream, a serial port, a test double.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Opens the link.
    fn connect(&mut self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

/// Why the link failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFailure {
    /// Opening the link failed.
    Connect,
    /// A read returned an I/O error.
    Io,
    /// No valid frame arrived within the read timeout.
    Timeout,
    /// The other end closed the link.
    Closed,
}

impl LinkFailure {
    /// Every failure, for metrics.
    pub const ALL: [LinkFailure; 4] = [Self::Connect, Self::Io, Self::Timeout, Self::Closed];

    /// The label used in metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Io => "io",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
        }
    }
}

/// A device's counters, shared between its task and the API.
#[derive(Debug)]
pub struct DeviceCounters {
    samples_read: AtomicU64,
    frames_invalid: [AtomicU64; 3],
    seq_gaps: AtomicU64,
    link_failures: [AtomicU64; 4],
    /// When the last valid frame arrived (or the link opened), in nanoseconds after `base`.
    last_good_nanos: AtomicU64,
    base: Instant,
}

impl Default for DeviceCounters {
    fn default() -> Self {
        Self {
            samples_read: AtomicU64::new(0),
            frames_invalid: Default::default(),
            seq_gaps: AtomicU64::new(0),
            link_failures: Default::default(),
            last_good_nanos: AtomicU64::new(0),
            base: Instant::now(),
        }
    }
}

/// A copy of a device's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CountersSnapshot {
    /// Valid samples decoded and handed to the buffer.
    pub samples_read: u64,
    /// Frames skipped, by reason.
    pub frames_invalid: InvalidCounts,
    /// Samples missing according to the device's sequence numbers.
    pub seq_gaps: u64,
    /// Link failures, by kind.
    pub link_failures: FailureCounts,
}

/// Invalid frames by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InvalidCounts {
    /// Checksum mismatches.
    pub checksum: u64,
    /// Malformed frames and garbage runs.
    pub syntax: u64,
    /// Over-long lines.
    pub too_long: u64,
}

impl InvalidCounts {
    /// All reasons together.
    pub fn total(&self) -> u64 {
        self.checksum + self.syntax + self.too_long
    }

    /// The count for one reason.
    pub fn get(&self, reason: InvalidReason) -> u64 {
        match reason {
            InvalidReason::Checksum => self.checksum,
            InvalidReason::Syntax => self.syntax,
            InvalidReason::TooLong => self.too_long,
        }
    }
}

/// Link failures by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FailureCounts {
    /// Opening the link failed.
    pub connect: u64,
    /// Read errors.
    pub io: u64,
    /// Read timeouts.
    pub timeout: u64,
    /// Link closed by the other end.
    pub closed: u64,
}

impl FailureCounts {
    /// The count for one kind.
    pub fn get(&self, failure: LinkFailure) -> u64 {
        match failure {
            LinkFailure::Connect => self.connect,
            LinkFailure::Io => self.io,
            LinkFailure::Timeout => self.timeout,
            LinkFailure::Closed => self.closed,
        }
    }
}

impl DeviceCounters {
    fn mark_good(&self, at: Instant) {
        let nanos = at.saturating_duration_since(self.base).as_nanos() as u64;
        self.last_good_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Time since the last valid frame, or since the link opened if none came yet.
    fn since_good(&self) -> Duration {
        let at = self.base + Duration::from_nanos(self.last_good_nanos.load(Ordering::Relaxed));
        Instant::now().saturating_duration_since(at)
    }

    /// A consistent-enough copy (each counter is read once).
    pub fn snapshot(&self) -> CountersSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let [checksum, syntax, too_long] = &self.frames_invalid;
        let [connect, io, timeout, closed] = &self.link_failures;
        CountersSnapshot {
            samples_read: get(&self.samples_read),
            frames_invalid: InvalidCounts {
                checksum: get(checksum),
                syntax: get(syntax),
                too_long: get(too_long),
            },
            seq_gaps: get(&self.seq_gaps),
            link_failures: FailureCounts {
                connect: get(connect),
                io: get(io),
                timeout: get(timeout),
                closed: get(closed),
            },
        }
    }
}

/// What the device task publishes after every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceStatus {
    /// The current state.
    pub state: DeviceState,
    /// Failures since the last good frame.
    pub consecutive_failures: u32,
    /// The last link failure, if any since the last start or reset.
    pub last_error: Option<String>,
}

enum Request {
    Control {
        command: Command,
        reply: oneshot::Sender<Result<DeviceState, IllegalTransition>>,
    },
    Send {
        line: String,
        reply: oneshot::Sender<Result<String, SendError>>,
    },
}

/// Longest command line sent to a device.
pub const MAX_COMMAND_LEN: usize = 64;

/// Why a device command got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Not a single line of printable ASCII, or too long.
    #[error("a command is 1 to {MAX_COMMAND_LEN} printable ASCII characters on one line")]
    Invalid,
    /// The device has no open link (it is not measuring).
    #[error("device {id} has no open link (state {state})")]
    NotConnected {
        /// The device.
        id: SmolStr,
        /// Its state.
        state: DeviceState,
    },
    /// Writing the command failed.
    #[error("writing the command failed: {0}")]
    Io(String),
    /// The link closed before the device answered.
    #[error("the link closed before the device answered")]
    LinkClosed,
    /// No reply within the command timeout.
    #[error("no reply from the device within {0:?}")]
    Timeout(Duration),
    /// The device task has stopped (the gateway is shutting down).
    #[error("device {0} is shutting down")]
    Unavailable(SmolStr),
}

/// Why a command did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The state machine refused it.
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// The device task has stopped (the gateway is shutting down).
    #[error("device {0} is shutting down")]
    Unavailable(SmolStr),
}

/// The API's handle on one device: send commands, read status and counters.
#[derive(Clone)]
pub struct DeviceHandle {
    id: SmolStr,
    kind: &'static str,
    requests: mpsc::Sender<Request>,
    status: watch::Receiver<DeviceStatus>,
    counters: Arc<DeviceCounters>,
    stale_after: Duration,
    command_timeout: Duration,
}

impl DeviceHandle {
    /// The device's id.
    pub fn id(&self) -> &SmolStr {
        &self.id
    }

    /// The kind of link, `simulated` or `serial`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The latest published status.
    pub fn status(&self) -> DeviceStatus {
        self.status.borrow().clone()
    }

    /// The current state.
    pub fn state(&self) -> DeviceState {
        self.status.borrow().state
    }

    /// The device's counters.
    pub fn counters(&self) -> CountersSnapshot {
        self.counters.snapshot()
    }

    /// Sends an operator command and waits for the resulting state.
    pub async fn command(&self, command: Command) -> Result<DeviceState, CommandError> {
        let (reply, response) = oneshot::channel();
        let unavailable = || CommandError::Unavailable(self.id.clone());
        self.requests
            .send(Request::Control { command, reply })
            .await
            .map_err(|_| unavailable())?;
        Ok(response.await.map_err(|_| unavailable())??)
    }

    /// Sends a command line (`GET_STATUS`, `SET_RATE=50`, ...) down the link and waits for the
    /// device's `OK:`/`ERROR:`/`STATUS:` reply, at most the device's command timeout.
    pub async fn send(&self, line: &str) -> Result<String, SendError> {
        let printable = line.bytes().all(|b| (0x20..0x7f).contains(&b));
        if line.is_empty() || line.len() > MAX_COMMAND_LEN || !printable {
            return Err(SendError::Invalid);
        }
        let (reply, response) = oneshot::channel();
        let request = Request::Send {
            line: line.to_owned(),
            reply,
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| SendError::Unavailable(self.id.clone()))?;
        match tokio::time::timeout(self.command_timeout, response).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(SendError::LinkClosed),
            Err(_) => Err(SendError::Timeout(self.command_timeout)),
        }
    }

    /// Whether the device counts as stale: Measuring, yet no valid frame for `stale_after`.
    pub fn freshness(&self) -> Freshness {
        let state = self.state();
        let since_good = self.counters.since_good();
        Freshness {
            state,
            since_good,
            stale_after: self.stale_after,
            stale: state == DeviceState::Measuring && since_good > self.stale_after,
        }
    }

    /// Waits until the device's state satisfies `pred`; for tests and shutdown.
    pub async fn wait_for(&self, mut pred: impl FnMut(&DeviceStatus) -> bool) -> DeviceStatus {
        let mut status = self.status.clone();
        match status.wait_for(|s| pred(s)).await {
            Ok(s) => s.clone(),
            Err(_) => self.status(),
        }
    }
}

/// A device's data freshness, for readiness checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// The device's state.
    pub state: DeviceState,
    /// Time since the last valid frame (or since the link opened).
    pub since_good: Duration,
    /// The configured limit.
    pub stale_after: Duration,
    /// Measuring, but silent for longer than `stale_after`.
    pub stale: bool,
}

/// Timing and limits of one device, from its settings.
#[derive(Debug, Clone)]
struct Timing {
    read_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    max_frame_len: usize,
    command_timeout: Duration,
}

enum LinkEvent<Io> {
    Connected(Io),
    ConnectFailed(std::io::Error),
    Frames(Vec<std::io::Result<Frame>>),
    Ended,
    TimedOut,
}

/// An open link: decoded frames in, command lines out, and who waits for which reply.
struct Link<Io: AsyncRead> {
    frames: ReadyChunks<FramedRead<ReadHalf<Io>, FrameCodec>>,
    writer: WriteHalf<Io>,
    /// Callers waiting for replies, in the order their commands were sent.
    waiting: VecDeque<oneshot::Sender<Result<String, SendError>>>,
}

/// The task that runs one device.
pub struct DeviceTask<C: Connector> {
    id: SmolStr,
    timing: Timing,
    autostart: bool,
    connector: C,
    buffer: Arc<RingBuffer>,
    requests: mpsc::Receiver<Request>,
    status: watch::Sender<DeviceStatus>,
    counters: Arc<DeviceCounters>,
    cancel: CancellationToken,
    state: DeviceState,
    breaker: Breaker,
    last_error: Option<String>,
    link: Option<Link<C::Io>>,
    retry_at: Instant,
    last_good: Instant,
    last_seq: Option<u32>,
}

impl<C: Connector> DeviceTask<C> {
    /// A device task and the handle that controls it. Nothing runs until [`Self::run`].
    pub fn new(
        settings: &DeviceSettings,
        kind: &'static str,
        connector: C,
        buffer: Arc<RingBuffer>,
        cancel: CancellationToken,
    ) -> (Self, DeviceHandle) {
        let id = SmolStr::new(&settings.id);
        let (requests_tx, requests) = mpsc::channel(16);
        let (status, status_rx) = watch::channel(DeviceStatus::default());
        let counters = Arc::new(DeviceCounters::default());
        let handle = DeviceHandle {
            id: id.clone(),
            kind,
            requests: requests_tx,
            status: status_rx,
            counters: counters.clone(),
            stale_after: settings.stale_after(),
            command_timeout: Duration::from_millis(settings.command_timeout_ms),
        };
        let task = Self {
            id,
            timing: Timing {
                read_timeout: Duration::from_millis(settings.read_timeout_ms),
                backoff_initial: Duration::from_millis(settings.backoff_initial_ms),
                backoff_max: Duration::from_millis(settings.backoff_max_ms),
                max_frame_len: settings.max_frame_len,
                command_timeout: Duration::from_millis(settings.command_timeout_ms),
            },
            autostart: settings.autostart,
            connector,
            buffer,
            requests,
            status,
            counters,
            cancel,
            state: DeviceState::Idle,
            breaker: Breaker::new(settings.failure_threshold),
            last_error: None,
            link: None,
            retry_at: Instant::now(),
            last_good: Instant::now(),
            last_seq: None,
        };
        (task, handle)
    }

    /// Runs until cancelled or until every handle is dropped.
    pub async fn run(mut self) {
        crate::metrics::device_state(&self.id, self.state);
        if self.autostart {
            self.apply(Command::Start).ok();
        }
        loop {
            let active = self.state.is_active();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                request = self.requests.recv() => match request {
                    Some(request) => self.handle(request).await,
                    None => break,
                },
                event = next_event(&mut self.link, &mut self.connector, self.retry_at, self.last_good + self.timing.read_timeout), if active => {
                    self.on_event(event).await;
                }
            }
        }
        self.link = None;
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Control { command, reply } => {
                let _ = reply.send(self.apply(command));
            }
            Request::Send { line, reply } => self.send(line, reply).await,
        }
    }

    fn apply(&mut self, command: Command) -> Result<DeviceState, IllegalTransition> {
        let next = state::on_command(self.state, command)?;
        if matches!(command, Command::Stop | Command::Reset) {
            self.link = None;
            self.breaker.clear();
            self.last_error = None;
        }
        if self.state == DeviceState::Idle && next == DeviceState::Measuring {
            self.retry_at = Instant::now();
            self.last_error = None;
        }
        info!(device = %self.id, command = command.as_str(), "Device command accepted.");
        self.set_state(next);
        Ok(next)
    }

    async fn on_event(&mut self, event: LinkEvent<C::Io>) {
        match event {
            LinkEvent::Connected(io) => {
                let (reader, writer) = tokio::io::split(io);
                let codec = FrameCodec::new(self.timing.max_frame_len);
                self.link = Some(Link {
                    frames: FramedRead::new(reader, codec).ready_chunks(CHUNK_MAX),
                    writer,
                    waiting: VecDeque::new(),
                });
                self.last_good = Instant::now();
                self.counters.mark_good(self.last_good);
                self.last_seq = None;
                info!(device = %self.id, "Device link opened.");
            }
            LinkEvent::ConnectFailed(err) => self.fail(LinkFailure::Connect, &err.to_string()),
            LinkEvent::Frames(frames) => self.on_frames(frames).await,
            LinkEvent::Ended => self.fail(LinkFailure::Closed, "link closed by the device"),
            LinkEvent::TimedOut => self.fail(
                LinkFailure::Timeout,
                &format!("no valid frame for {:?}", self.timing.read_timeout),
            ),
        }
    }

    async fn on_frames(&mut self, frames: Vec<std::io::Result<Frame>>) {
        // Frames of one chunk arrived together: one timestamp serves them all.
        let (timestamp, received) = (SystemTime::now(), std::time::Instant::now());
        let mut samples = VecDeque::with_capacity(frames.len());
        let mut invalid = [0u64; 3];
        let mut gaps = 0u64;
        let mut error = None;
        for frame in frames {
            match frame {
                Ok(Frame::Sample(raw)) => {
                    gaps += seq_gap(self.last_seq, raw.seq);
                    self.last_seq = Some(raw.seq);
                    samples.push_back(Sample {
                        device: self.id.clone(),
                        seq: Some(raw.seq),
                        value: raw.value,
                        unit: raw.unit,
                        timestamp,
                        received,
                        order: 0,
                    });
                }
                Ok(Frame::Invalid(reason)) => invalid[reason.index()] += 1,
                Ok(Frame::Reply(text)) => self.deliver_reply(text),
                Err(err) => {
                    error = Some(err);
                    break;
                }
            }
        }
        for (counter, n) in self.counters.frames_invalid.iter().zip(invalid) {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        if gaps > 0 {
            self.counters.seq_gaps.fetch_add(gaps, Ordering::Relaxed);
        }
        if !samples.is_empty() {
            self.last_good = Instant::now();
            self.counters.mark_good(self.last_good);
            let next = self.breaker.on_success(self.state);
            self.set_state(next);
            self.push(samples).await;
        }
        if let Some(err) = error {
            self.fail(LinkFailure::Io, &err.to_string());
        }
    }

    fn deliver_reply(&mut self, text: String) {
        let waiter = self.link.as_mut().and_then(|link| link.waiting.pop_front());
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(Ok(text));
            }
            None => debug!(device = %self.id, reply = %text, "Unsolicited reply from the device."),
        }
    }

    async fn send(&mut self, line: String, reply: oneshot::Sender<Result<String, SendError>>) {
        let Some(link) = self.link.as_mut() else {
            let _ = reply.send(Err(SendError::NotConnected {
                id: self.id.clone(),
                state: self.state,
            }));
            return;
        };
        let mut bytes = line.into_bytes();
        bytes.extend_from_slice(b"\r\n");
        let write = async {
            link.writer.write_all(&bytes).await?;
            link.writer.flush().await
        };
        match tokio::time::timeout(self.timing.command_timeout, write).await {
            Ok(Ok(())) => link.waiting.push_back(reply),
            Ok(Err(err)) => {
                let _ = reply.send(Err(SendError::Io(err.to_string())));
                self.fail(LinkFailure::Io, &err.to_string());
            }
            Err(_) => {
                let _ = reply.send(Err(SendError::Timeout(self.timing.command_timeout)));
            }
        }
    }

    /// Hands samples to the buffer. With `Block` this may wait for room; commands are still
    /// served meanwhile, and a stop (or shutdown) drops what is left, counted with a reason.
    async fn push(&mut self, mut samples: VecDeque<Sample>) {
        // Counted as read before the push, so the device never shows fewer than the ledger.
        self.counters
            .samples_read
            .fetch_add(samples.len() as u64, Ordering::Relaxed);
        let buffer = self.buffer.clone();
        let mut abandoned = None;
        {
            let mut push = pin!(buffer.push(Source::Device, &mut samples));
            loop {
                tokio::select! {
                    // A push that does not have to wait always completes, even during shutdown.
                    biased;
                    () = &mut push => break,
                    () = self.cancel.cancelled() => {
                        abandoned = Some(DropReason::Shutdown);
                        break;
                    }
                    request = self.requests.recv() => {
                        let Some(request) = request else {
                            abandoned = Some(DropReason::Shutdown);
                            break;
                        };
                        self.handle(request).await;
                        if !self.state.is_active() {
                            abandoned = Some(DropReason::Stopped);
                            break;
                        }
                    }
                }
            }
        }
        if let Some(reason) = abandoned {
            self.buffer
                .discard(Source::Device, samples.len() as u64, reason);
        }
    }

    fn fail(&mut self, failure: LinkFailure, message: &str) {
        self.link = None;
        self.counters.link_failures[failure as usize].fetch_add(1, Ordering::Relaxed);
        let next = self.breaker.on_failure(self.state);
        let failures = self.breaker.failures();
        let delay = state::backoff(
            failures,
            self.timing.backoff_initial,
            self.timing.backoff_max,
        );
        self.retry_at = Instant::now() + delay;
        self.last_error = Some(format!("{}: {message}", failure.as_str()));
        warn!(
            device = %self.id,
            failure = failure.as_str(),
            error = message,
            failures,
            retry_in_ms = delay.as_millis() as u64,
            "Device link failed."
        );
        self.set_state(next);
    }

    fn set_state(&mut self, next: DeviceState) {
        let previous = self.state;
        self.state = next;
        if previous != next {
            info!(device = %self.id, from = %previous, to = %next, "Device state changed.");
            crate::metrics::device_state(&self.id, next);
            if next == DeviceState::SafeState {
                warn!(device = %self.id, failures = self.breaker.failures(), "Circuit breaker tripped; reset the device to resume.");
            }
        }
        let status = DeviceStatus {
            state: next,
            consecutive_failures: self.breaker.failures(),
            last_error: self.last_error.clone(),
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

/// Waits for the next thing to happen on the link: (re)connection when it is closed, else the
/// next chunk of frames, bounded by the deadline for a valid frame.
async fn next_event<C: Connector>(
    link: &mut Option<Link<C::Io>>,
    connector: &mut C,
    retry_at: Instant,
    deadline: Instant,
) -> LinkEvent<C::Io> {
    match link {
        None => {
            tokio::time::sleep_until(retry_at).await;
            match connector.connect().await {
                Ok(io) => LinkEvent::Connected(io),
                Err(err) => LinkEvent::ConnectFailed(err),
            }
        }
        Some(link) => match tokio::time::timeout_at(deadline, link.frames.next()).await {
            Ok(Some(frames)) => LinkEvent::Frames(frames),
            Ok(None) => LinkEvent::Ended,
            Err(_) => LinkEvent::TimedOut,
        },
    }
}

/// Samples missing between `last` and `seq`. A backwards jump (the device restarted its
/// counter) is not a gap.
fn seq_gap(last: Option<u32>, seq: u32) -> u64 {
    let Some(last) = last else { return 0 };
    let missing = seq.wrapping_sub(last.wrapping_add(1));
    if missing < u32::MAX / 2 {
        u64::from(missing)
    } else {
        0
    }
}

#[cfg(test)]
mod tests;
