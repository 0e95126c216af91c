//! Devices: one async task per device reads frames from its link and pushes samples.
//!
//! A [`DeviceTask`] owns a [`Connector`] (how to open the link: the embedded simulator's duplex
//! stream, a tty, a TCP connection), decodes the link's bytes with [`codec::FrameCodec`] (or,
//! for a Modbus device, polls its register map over it, see [`modbus`]), stamps each sample
//! with its receive time, detects sequence gaps and pushes samples into the ring buffer in
//! batches. It runs the [`state`] machine: operator commands arrive over a channel from
//! [`DeviceHandle`]s (the API's only way in), link failures drive the circuit breaker, and every
//! change is published on a `watch` channel so status reads never wait for the task.

pub mod codec;
pub mod modbus;
mod rate;
mod reader;
pub mod serial;
pub mod sim;
pub mod state;
mod task;

pub use self::task::DeviceTask;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use smol_str::SmolStr;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use self::codec::InvalidReason;
use self::modbus::link::{ModbusFailure, ModbusMap, WriteRefused, WriteRequest};
use self::state::{Command, DeviceState, IllegalTransition};
use crate::config::DataType;

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
    /// A Modbus device answered with an exception (illegal address, busy, ...).
    Exception,
    /// A Modbus answer that does not decode (CRC, garbage, mismatched header or function).
    Invalid,
}

impl From<ModbusFailure> for LinkFailure {
    fn from(failure: ModbusFailure) -> Self {
        match failure {
            ModbusFailure::Timeout => Self::Timeout,
            ModbusFailure::Exception(_) => Self::Exception,
            ModbusFailure::Invalid => Self::Invalid,
            ModbusFailure::Closed => Self::Closed,
            ModbusFailure::Io => Self::Io,
        }
    }
}

impl LinkFailure {
    /// Every failure, for metrics.
    pub const ALL: [LinkFailure; 6] = [
        Self::Connect,
        Self::Io,
        Self::Timeout,
        Self::Closed,
        Self::Exception,
        Self::Invalid,
    ];

    /// The label used in metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Io => "io",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::Exception => "exception",
            Self::Invalid => "invalid",
        }
    }
}

/// A device's counters, shared between its task and the API.
#[derive(Debug)]
pub struct DeviceCounters {
    samples_read: AtomicU64,
    frames_invalid: [AtomicU64; 3],
    seq_gaps: AtomicU64,
    link_failures: [AtomicU64; 6],
    /// When the last valid frame arrived (or the link opened), in nanoseconds after `base`.
    last_good_nanos: AtomicU64,
    base: Instant,
    /// The staleness limit in force, in nanoseconds: it follows the device's rate.
    stale_after_nanos: AtomicU64,
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
            stale_after_nanos: AtomicU64::new(u64::MAX),
        }
    }
}

/// A copy of a device's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CountersSnapshot {
    /// Valid samples decoded and handed to the buffer.
    pub samples_read: u64,
    /// Frames skipped, by reason.
    pub frames_invalid: InvalidCounts,
    /// Samples missing according to the device's sequence numbers, across link reconnects (a
    /// backward jump is a restarted counter, not a gap). A stop or reset forgets the last
    /// number: what a stopped device sends is not read, not lost.
    pub seq_gaps: u64,
    /// Link failures, by kind.
    pub link_failures: FailureCounts,
}

/// Invalid frames by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FailureCounts {
    /// Opening the link failed.
    pub connect: u64,
    /// Read errors.
    pub io: u64,
    /// Read timeouts.
    pub timeout: u64,
    /// Link closed by the other end.
    pub closed: u64,
    /// Modbus exception answers.
    pub exception: u64,
    /// Modbus answers that did not decode.
    pub invalid: u64,
}

impl FailureCounts {
    /// The count for one kind.
    pub fn get(&self, failure: LinkFailure) -> u64 {
        match failure {
            LinkFailure::Connect => self.connect,
            LinkFailure::Io => self.io,
            LinkFailure::Timeout => self.timeout,
            LinkFailure::Closed => self.closed,
            LinkFailure::Exception => self.exception,
            LinkFailure::Invalid => self.invalid,
        }
    }
}

impl DeviceCounters {
    fn mark_good(&self, at: Instant) {
        let nanos = at.saturating_duration_since(self.base).as_nanos() as u64;
        self.last_good_nanos.store(nanos, Ordering::Relaxed);
    }

    fn set_stale_after(&self, limit: Duration) {
        let nanos = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
        self.stale_after_nanos.store(nanos, Ordering::Relaxed);
    }

    fn stale_after(&self) -> Duration {
        Duration::from_nanos(self.stale_after_nanos.load(Ordering::Relaxed))
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
        let [connect, io, timeout, closed, exception, invalid] = &self.link_failures;
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
                exception: get(exception),
                invalid: get(invalid),
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
    Write {
        write: WriteRequest,
        data_type: DataType,
        words: Vec<u16>,
        reply: oneshot::Sender<Result<(), WriteError>>,
    },
    Send {
        line: String,
        /// When the caller stops waiting; the command gives up its place in the reply queue then.
        deadline: Instant,
        reply: oneshot::Sender<Result<String, SendError>>,
    },
    /// A live reload removes or replaces the device: close the link (answering `closed` once
    /// it is), read no more, finish handing what was read to the buffer, and end the task.
    Retire { closed: oneshot::Sender<()> },
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
    /// The link failed, or an operator stopped or reset the device, before the device answered.
    #[error("the link closed before the device answered")]
    LinkClosed,
    /// No reply within the command timeout.
    #[error("no reply from the device within {0:?}")]
    Timeout(Duration),
    /// Too many commands are already waiting for this device's replies.
    #[error("device {0} has too many commands waiting for replies")]
    Busy(SmolStr),
    /// The device task has stopped (the gateway is shutting down).
    #[error("device {0} is shutting down")]
    Unavailable(SmolStr),
    /// A Modbus device takes writes, not command lines.
    #[error(
        "device {0} is a Modbus device: send {{\"write\": {{\"table\": ..., \"address\": ..., \"value\": ...}}}}"
    )]
    Unsupported(SmolStr),
}

/// Why a Modbus write did not happen, or what the device said instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The device does not speak Modbus.
    #[error("device {0} is not a Modbus device: send {{\"command\": \"...\"}}")]
    NotModbus(SmolStr),
    /// Refused by the register map, without reaching the device.
    #[error(transparent)]
    Refused(#[from] WriteRefused),
    /// The device has no open link (it is not measuring).
    #[error("device {id} has no open link (state {state})")]
    NotConnected {
        /// The device.
        id: SmolStr,
        /// Its state.
        state: DeviceState,
    },
    /// The device answered with a Modbus exception.
    #[error("the device answered with Modbus exception {code} ({name})")]
    Exception {
        /// The exception code.
        code: u8,
        /// What it means.
        name: String,
    },
    /// No answer within the device's `timeout_ms`.
    #[error("no answer from the device: {0}")]
    Timeout(String),
    /// The link failed (closed, invalid answer, I/O error).
    #[error("the link failed: {0}")]
    Link(String),
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
    channel: SmolStr,
    kind: &'static str,
    requests: mpsc::Sender<Request>,
    status: watch::Receiver<DeviceStatus>,
    counters: Arc<DeviceCounters>,
    command_timeout: Duration,
    /// A Modbus device's register map, to refuse writes without reaching the task.
    modbus: Option<Arc<ModbusMap>>,
}

impl DeviceHandle {
    /// Writes a value to a Modbus device's register that its map marks writable (function 6
    /// or 16, or 5 for a coil), and waits for the device's answer. A write the map does not
    /// allow, or whose value does not fit the register's type, is refused here and never
    /// reaches the device.
    pub async fn write(&self, write: WriteRequest) -> Result<(), WriteError> {
        let Some(map) = &self.modbus else {
            return Err(WriteError::NotModbus(self.id.clone()));
        };
        let (data_type, words) = map.check_write(&write)?;
        let (reply, response) = oneshot::channel();
        let unavailable = || WriteError::Unavailable(self.id.clone());
        let request = Request::Write {
            write,
            data_type,
            words,
            reply,
        };
        // Bounded by the command timeout: the task finishes a running poll before it takes
        // the write. A write the task has taken still happens if the caller gives up.
        let deadline = Instant::now() + self.command_timeout;
        let timeout = || WriteError::Timeout(format!("no reply within {:?}", self.command_timeout));
        match tokio::time::timeout_at(deadline, self.requests.send(request)).await {
            Ok(sent) => sent.map_err(|_| unavailable())?,
            Err(_) => return Err(timeout()),
        }
        match tokio::time::timeout_at(deadline, response).await {
            Ok(answer) => answer.map_err(|_| unavailable())?,
            Err(_) => Err(timeout()),
        }
    }

    /// The device's id.
    pub fn id(&self) -> &SmolStr {
        &self.id
    }

    /// The device's default channel: that of samples whose frames, or `POST /samples` items,
    /// name none.
    pub fn channel(&self) -> &SmolStr {
        &self.channel
    }

    /// The kind of link: `simulated`, `serial`, `modbus_tcp` or `modbus_rtu`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Whether `other` is a handle on the same task (a live reload that restarts a device
    /// gives it a new task, and so a new handle, under the same id).
    pub fn same_task(&self, other: &DeviceHandle) -> bool {
        self.requests.same_channel(&other.requests)
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

    /// Asks the task to end for a live reload, and returns once its link is closed (so a new
    /// task may open the same port): `false` if the task had ended already. The task then
    /// finishes the push in progress, however long a full `block` buffer makes it wait (only
    /// cancellation, at shutdown, cuts it short), and ends; await the task to know it has.
    /// From now on it answers no command: the handle reports it unavailable.
    pub async fn retire(&self) -> bool {
        let (closed, done) = oneshot::channel();
        if self
            .requests
            .send(Request::Retire { closed })
            .await
            .is_err()
        {
            return false;
        }
        done.await.is_ok()
    }

    /// Sends a command line (`GET_STATUS`, `SET_RATE=50`, ...) down the link and waits for the
    /// device's `OK:`/`ERROR:`/`STATUS:` reply, at most the device's command timeout.
    ///
    /// Replies carry no command id, so they are matched to commands in the order the commands
    /// were sent. A command keeps its place until its reply arrives or its command timeout
    /// passes; then it gives up its place, and the next reply goes to the oldest command still
    /// within its timeout. A caller that stops waiting early (a client that hung up) keeps its
    /// place: the device will likely still answer it, and that reply is discarded. So one
    /// unanswered command costs one timeout and nothing after it; but a device that answers
    /// *after* the timeout may have its late reply taken by the next command, which is why
    /// `command_timeout_ms` should exceed the device's slowest answer.
    pub async fn send(&self, line: &str) -> Result<String, SendError> {
        let printable = line.bytes().all(|b| (0x20..0x7f).contains(&b));
        if line.is_empty() || line.len() > MAX_COMMAND_LEN || !printable {
            return Err(SendError::Invalid);
        }
        let deadline = Instant::now() + self.command_timeout;
        let timeout = SendError::Timeout(self.command_timeout);
        let (reply, response) = oneshot::channel();
        let request = Request::Send {
            line: line.to_owned(),
            deadline,
            reply,
        };
        match tokio::time::timeout_at(deadline, self.requests.send(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(SendError::Unavailable(self.id.clone())),
            Err(_) => return Err(timeout),
        }
        match tokio::time::timeout_at(deadline, response).await {
            Ok(Ok(result)) => result,
            // The task answers every command it takes, even when its link closes; a command
            // dropped unanswered means the task itself has ended.
            Ok(Err(_)) => Err(SendError::Unavailable(self.id.clone())),
            Err(_) => Err(timeout),
        }
    }

    /// Whether the device counts as stale: Measuring, yet no valid frame for `stale_after`,
    /// the limit for the rate the device last acknowledged (see [`DeviceTask`]).
    pub fn freshness(&self) -> Freshness {
        let state = self.state();
        let since_good = self.counters.since_good();
        let stale_after = self.counters.stale_after();
        Freshness {
            state,
            since_good,
            stale_after,
            stale: state == DeviceState::Measuring && since_good > stale_after,
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
    /// The limit in force: configured, or derived from the device's current rate.
    pub stale_after: Duration,
    /// Measuring, but silent for longer than `stale_after`.
    pub stale: bool,
}

#[cfg(test)]
mod tests;
