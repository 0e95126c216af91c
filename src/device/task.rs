//! The device task: owns one link, reads and decodes it, runs the state machine, and pushes
//! samples into the ring buffer; commands reach it from [`DeviceHandle`]s over a channel.
//!
//! The task follows the device's rate. When the device answers `SET_RATE=<ms>` with `OK:`,
//! that interval replaces the configured one for the read timeout and the staleness limit (see
//! [`super::rate`]), and the task remembers it: after every reconnect (a link failure, or a stop
//! and start) it sends `SET_RATE=<ms>` again, since a device that lost power or was replugged
//! may have lost it. A device that refuses it (`ERROR:`) is taken to be back at the configured
//! rate. Only a new task (a gateway restart, a config change) starts from the configured rate.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use smol_str::SmolStr;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::codec::{Frame, FrameCodec, InvalidReason, SampleNames};
use super::modbus::link::{ModbusFailure, ModbusLink, ModbusMap, Outcome, WriteRequest};
use super::rate::{limits_for, requested_rate};
use super::reader::{Chunk, End, FrameReader};
use super::state::{self, Breaker, Command, DeviceState, IllegalTransition};
use super::{
    Connector, DeviceCounters, DeviceHandle, DeviceStatus, LinkFailure, Request, SendError,
    WriteError as ModbusWriteError,
};
use crate::buffer::RingBuffer;
use crate::config::{DataType, DeviceSettings};
use crate::ledger::{DropReason, Source};
use crate::sample::{LabelCache, Labels, Sample};

/// Most frames decoded into one push to the buffer.
const CHUNK_MAX: usize = 256;

/// Why a link that the device closed failed.
const CLOSED_BY_DEVICE: &str = "link closed by the device";

/// Most commands waiting for replies on one link; more are refused as [`SendError::Busy`].
const MAX_WAITING: usize = 32;

/// Timing and limits of one device, from its settings.
#[derive(Debug, Clone)]
struct Timing {
    /// The configured interval, in force until the device acknowledges another.
    configured_interval: Duration,
    explicit_read_timeout: Option<Duration>,
    explicit_stale_after: Option<Duration>,
    /// The read timeout for the rate in force.
    read_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    max_frame_len: usize,
    command_timeout: Duration,
}

enum LinkEvent<Io> {
    Connected(Io),
    ConnectFailed(std::io::Error),
    Frames(Chunk),
    /// A Modbus poll is due. The task runs it to its end outside the `select!`: a request
    /// abandoned halfway would leave its answer on the line for the next one.
    PollDue,
    Ended,
    TimedOut,
}

/// An open link, by the protocol the device speaks on it: the codec is per kind, the task
/// and its state machine are shared.
enum Open<Io: AsyncRead> {
    /// `$TH` frames in, command lines out.
    Frames(Link<Io>),
    /// Modbus requests out, register blocks in.
    Modbus(ModbusLink),
}

/// An open frame link: decoded frames in, command lines out, and who waits for which reply.
struct Link<Io: AsyncRead> {
    frames: FrameReader<ReadHalf<Io>>,
    writer: WriteHalf<Io>,
    /// Commands waiting for replies, in the order they were sent. Replies carry no command id,
    /// so the next reply belongs to the oldest command whose deadline has not passed; see
    /// [`Link::take_waiting`].
    waiting: VecDeque<Pending>,
}

/// A command written to the link, waiting for the device's reply.
struct Pending {
    /// The caller; `None` for the task's own commands (a rate sent again after a reconnect).
    reply: Option<oneshot::Sender<Result<String, SendError>>>,
    /// The end of the command timeout: past it, the command gives up its place in the queue.
    deadline: Instant,
    /// For `SET_RATE=<ms>`: the interval the device sends at once it answers `OK:`.
    rate: Option<Duration>,
}

/// Why a command line could not be written.
enum WriteError {
    Io(std::io::Error),
    /// The command's deadline passed first.
    Deadline,
}

impl<Io: AsyncRead + AsyncWrite> Link<Io> {
    /// Drops the commands whose deadline has passed: the device had its time to answer them,
    /// and their callers have been told it timed out.
    fn expire_waiting(&mut self, now: Instant) {
        while self.waiting.front().is_some_and(|p| p.deadline <= now) {
            self.waiting.pop_front();
        }
    }

    /// The command a reply arriving now answers: the oldest one still within its deadline. A
    /// command whose caller stopped waiting early keeps its place (the device is likely to
    /// answer it still), so its reply cannot shift onto the commands after it.
    fn take_waiting(&mut self, now: Instant) -> Option<Pending> {
        self.expire_waiting(now);
        self.waiting.pop_front()
    }

    /// Writes one command line, by `deadline`.
    async fn write_line(&mut self, line: &str, deadline: Instant) -> Result<(), WriteError> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        let write = async {
            self.writer.write_all(&bytes).await?;
            self.writer.flush().await
        };
        match tokio::time::timeout_at(deadline, write).await {
            Ok(result) => result.map_err(WriteError::Io),
            Err(_) => Err(WriteError::Deadline),
        }
    }
}

/// The task that runs one device.
pub struct DeviceTask<C: Connector> {
    id: SmolStr,
    /// The channel of samples whose frames name none.
    channel: SmolStr,
    /// The labels its samples share.
    labels: LabelCache,
    /// The labels of the link's samples since its codec last handed out names (a codec does
    /// once per change of unit or channel, and for its first sample).
    frame_labels: Option<Arc<Labels>>,
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
    link: Option<Open<C::Io>>,
    /// The register map, for a Modbus device: its link speaks Modbus instead of frames.
    modbus: Option<Arc<ModbusMap>>,
    retry_at: Instant,
    last_good: Instant,
    /// The last sequence number read, kept across reconnects; forgotten on stop and reset.
    last_seq: Option<u32>,
    /// The interval the device last acknowledged with `SET_RATE`, if it ever did; sent again
    /// after every reconnect.
    rate: Option<Duration>,
    /// Set by [`Request::Retire`]: the link is closed, commands are refused, and the task ends
    /// once the push in progress is done.
    retiring: bool,
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
        let channel = SmolStr::new(&settings.channel);
        let (requests_tx, requests) = mpsc::channel(16);
        let (status, status_rx) = watch::channel(DeviceStatus::default());
        let counters = Arc::new(DeviceCounters::default());
        let explicit_read_timeout = settings.read_timeout_ms.map(Duration::from_millis);
        let explicit_stale_after = settings.stale_after_ms.map(Duration::from_millis);
        let initial = limits_for(
            settings.interval(),
            explicit_read_timeout,
            explicit_stale_after,
        );
        counters.set_stale_after(initial.stale_after);
        let handle = DeviceHandle {
            id: id.clone(),
            channel: channel.clone(),
            kind,
            requests: requests_tx,
            status: status_rx,
            counters: counters.clone(),
            command_timeout: Duration::from_millis(settings.command_timeout_ms),
            modbus: ModbusMap::for_device(settings),
        };
        let task = Self {
            id,
            channel,
            labels: LabelCache::default(),
            frame_labels: None,
            timing: Timing {
                configured_interval: settings.interval(),
                explicit_read_timeout,
                explicit_stale_after,
                read_timeout: initial.read_timeout,
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
            modbus: handle.modbus.clone(),
            retry_at: Instant::now(),
            last_good: Instant::now(),
            last_seq: None,
            rate: None,
            retiring: false,
        };
        if initial.overridden {
            task.warn_overridden(settings.interval());
        }
        (task, handle)
    }

    /// Runs until cancelled or until every handle is dropped.
    pub async fn run(mut self) {
        crate::metrics::device_state(&self.id, self.state);
        if self.autostart {
            self.apply(Command::Start).ok();
        }
        while !self.retiring {
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
        self.shut_down();
    }

    /// Answers every command still waiting, on the link or in the request queue, with
    /// [`SendError::Unavailable`] (the gateway is shutting down, not the link failing), and
    /// refuses requests from now on.
    fn shut_down(&mut self) {
        self.close_link(SendError::Unavailable(self.id.clone()));
        self.requests.close();
        while let Ok(request) = self.requests.try_recv() {
            match request {
                Request::Send { reply, .. } => {
                    let _ = reply.send(Err(SendError::Unavailable(self.id.clone())));
                }
                Request::Write { reply, .. } => {
                    let _ = reply.send(Err(ModbusWriteError::Unavailable(self.id.clone())));
                }
                // Dropped unanswered, which the handle reports as unavailable.
                Request::Control { .. } | Request::Retire { .. } => {}
            }
        }
    }

    /// Closes the link, if open, answering every command waiting for a reply with `error`.
    fn close_link(&mut self, error: SendError) {
        if let Some(Open::Frames(link)) = self.link.take() {
            for reply in link.waiting.into_iter().filter_map(|p| p.reply) {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            // Dropped unanswered: the handle reports the task as gone, and the API goes on to
            // the device's new task, if the reload started one.
            Request::Control { .. } if self.retiring => {}
            Request::Send { reply, .. } if self.retiring => {
                let _ = reply.send(Err(SendError::Unavailable(self.id.clone())));
            }
            Request::Control { command, reply } => {
                let _ = reply.send(self.apply(command));
            }
            Request::Send {
                line,
                deadline,
                reply,
            } => self.send(line, deadline, reply).await,
            Request::Write {
                write,
                data_type,
                words,
                reply,
            } => {
                let result = self.write(&write, data_type, &words).await;
                let _ = reply.send(result);
            }
            Request::Retire { closed } => {
                self.retiring = true;
                self.close_link(SendError::LinkClosed);
                let _ = closed.send(());
            }
        }
    }

    /// Carries out a checked Modbus write on the open link. The device's exception is its
    /// answer, and the link stays; a timeout or a broken link is a link failure as in a poll.
    async fn write(
        &mut self,
        write: &WriteRequest,
        data_type: DataType,
        words: &[u16],
    ) -> Result<(), ModbusWriteError> {
        let Some(Open::Modbus(link)) = self.link.as_mut() else {
            return Err(ModbusWriteError::NotConnected {
                id: self.id.clone(),
                state: self.state,
            });
        };
        let outcome = link
            .write(&mut self.connector, write, data_type, words)
            .await;
        info!(device = %self.id, table = write.table.as_str(), address = write.address, ok = outcome.is_ok(), "Modbus write.");
        match outcome {
            Ok(()) => Ok(()),
            Err((ModbusFailure::Exception(code), _)) => Err(ModbusWriteError::Exception {
                code: u8::from(code),
                name: code.to_string(),
            }),
            Err((failure, message)) => {
                self.fail(LinkFailure::from(failure), &message);
                Err(match failure {
                    ModbusFailure::Timeout => ModbusWriteError::Timeout(message),
                    _ => ModbusWriteError::Link(message),
                })
            }
        }
    }

    fn apply(&mut self, command: Command) -> Result<DeviceState, IllegalTransition> {
        let next = state::on_command(self.state, command)?;
        if matches!(command, Command::Stop | Command::Reset) {
            self.close_link(SendError::LinkClosed);
            self.breaker.clear();
            self.last_error = None;
            // What the device sends while it is stopped is not read, not lost: counting gaps
            // starts afresh with the next start.
            self.last_seq = None;
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
            LinkEvent::Connected(io) if self.modbus.is_some() => {
                let map = self.modbus.clone().expect("checked by the guard");
                self.link = Some(Open::Modbus(ModbusLink::attach(io, map)));
                self.last_good = Instant::now();
                self.counters.mark_good(self.last_good);
                info!(device = %self.id, "Device link opened.");
            }
            LinkEvent::Connected(io) => {
                let (reader, writer) = tokio::io::split(io);
                let codec = FrameCodec::new(self.timing.max_frame_len);
                // A new codec hands out the names of its first sample.
                self.frame_labels = None;
                self.link = Some(Open::Frames(Link {
                    frames: FrameReader::new(reader, codec),
                    writer,
                    waiting: VecDeque::new(),
                }));
                self.last_good = Instant::now();
                self.counters.mark_good(self.last_good);
                // `last_seq` stays: a reconnect is the same device, and samples it sent while
                // the link was down are missing.
                info!(device = %self.id, "Device link opened.");
                if let Some(rate) = self.rate {
                    self.restore_rate(rate).await;
                }
            }
            LinkEvent::ConnectFailed(err) => self.fail(LinkFailure::Connect, &err.to_string()),
            LinkEvent::Frames(frames) => self.on_frames(frames).await,
            LinkEvent::PollDue => match self.poll().await {
                Some(Ok(samples)) => {
                    self.last_good = Instant::now();
                    self.counters.mark_good(self.last_good);
                    let next = self.breaker.on_success(self.state);
                    self.set_state(next);
                    self.push(samples.into()).await;
                }
                Some(Err((failure, message))) => {
                    self.fail(LinkFailure::from(failure), &message);
                }
                None => {}
            },
            LinkEvent::Ended => self.fail(LinkFailure::Closed, CLOSED_BY_DEVICE),
            LinkEvent::TimedOut => self.fail(
                LinkFailure::Timeout,
                &format!("no valid frame for {:?}", self.timing.read_timeout),
            ),
        }
    }

    /// Polls the Modbus link once, to its end (commands wait in their channel meanwhile; a
    /// poll is bounded by its requests' timeouts); `None` when cancelled.
    async fn poll(&mut self) -> Option<Outcome<Vec<Sample>>> {
        let Some(Open::Modbus(link)) = self.link.as_mut() else {
            return None;
        };
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => None,
            outcome = link.poll(&mut self.connector) => Some(outcome),
        }
    }

    async fn on_frames(&mut self, Chunk { frames, end }: Chunk) {
        // Frames of one chunk arrived together: one timestamp serves them all.
        let (timestamp, received) = (SystemTime::now(), std::time::Instant::now());
        let mut samples = VecDeque::with_capacity(frames.len());
        let mut invalid = [0u64; 3];
        let mut gaps = 0u64;
        for frame in frames {
            match frame {
                Frame::Sample(raw) => {
                    gaps += seq_gap(self.last_seq, raw.seq);
                    self.last_seq = Some(raw.seq);
                    let labels = match raw.names {
                        Some(names) => self.labels_of(&names),
                        None => match &self.frame_labels {
                            Some(labels) => labels.clone(),
                            None => {
                                // No names before any: not what a codec yields (a new link
                                // has a new codec, whose first sample names them), so counted
                                // rather than given labels it never had.
                                invalid[InvalidReason::Syntax.index()] += 1;
                                continue;
                            }
                        },
                    };
                    samples.push_back(Sample {
                        labels,
                        seq: Some(raw.seq),
                        value: raw.value,
                        timestamp,
                        received,
                        order: 0,
                        source: Source::Device,
                    });
                }
                Frame::Invalid(reason) => invalid[reason.index()] += 1,
                Frame::Reply(text) => self.deliver_reply(text),
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
        match end {
            None => {}
            Some(End::Closed) => self.fail(LinkFailure::Closed, CLOSED_BY_DEVICE),
            Some(End::Failed(err)) => self.fail(LinkFailure::Io, &err.to_string()),
        }
    }

    /// The shared labels of the samples a codec names `names`, kept for those that follow.
    fn labels_of(&mut self, names: &SampleNames) -> Arc<Labels> {
        let channel = names.channel.as_deref().unwrap_or(&self.channel);
        let labels = self.labels.get(&self.id, &names.unit, channel);
        self.frame_labels = Some(labels.clone());
        labels
    }

    fn deliver_reply(&mut self, text: String) {
        let now = Instant::now();
        let waiter = frames_of(&mut self.link).and_then(|link| link.take_waiting(now));
        let Some(waiter) = waiter else {
            debug!(device = %self.id, reply = %text, "Unsolicited reply from the device.");
            return;
        };
        if let Some(rate) = waiter.rate {
            if text.starts_with("OK:") {
                self.rate = Some(rate);
                self.apply_limits(rate);
            } else if waiter.reply.is_none() && text.starts_with("ERROR:") {
                warn!(device = %self.id, reply = %text, "Device refused the rate it had acknowledged; back to the configured rate.");
                self.rate = None;
                self.apply_limits(self.timing.configured_interval);
            }
        }
        // The caller may have hung up; the reply was still theirs.
        if let Some(reply) = waiter.reply {
            let _ = reply.send(Ok(text));
        }
    }

    /// Sets the read timeout and the staleness limit for a device sending every `interval`.
    fn apply_limits(&mut self, interval: Duration) {
        let limits = limits_for(
            interval,
            self.timing.explicit_read_timeout,
            self.timing.explicit_stale_after,
        );
        let changed = limits.read_timeout != self.timing.read_timeout
            || limits.stale_after != self.counters.stale_after();
        if changed {
            self.timing.read_timeout = limits.read_timeout;
            self.counters.set_stale_after(limits.stale_after);
            info!(
                device = %self.id,
                interval_ms = interval.as_millis() as u64,
                read_timeout_ms = limits.read_timeout.as_millis() as u64,
                stale_after_ms = limits.stale_after.as_millis() as u64,
                "Device timing follows its rate."
            );
            if limits.overridden {
                self.warn_overridden(interval);
            }
        }
    }

    fn warn_overridden(&self, interval: Duration) {
        warn!(
            device = %self.id,
            interval_ms = interval.as_millis() as u64,
            "The device sends slower than its configured read_timeout_ms or stale_after_ms allow; using the longer derived limits."
        );
    }

    /// Sends the rate the device acknowledged before, on a link just opened.
    async fn restore_rate(&mut self, rate: Duration) {
        let Some(link) = frames_of(&mut self.link) else {
            return;
        };
        let line = format!("SET_RATE={}", rate.as_millis());
        let deadline = Instant::now() + self.timing.command_timeout;
        match link.write_line(&line, deadline).await {
            Ok(()) => {
                debug!(device = %self.id, command = %line, "Device rate sent again.");
                link.waiting.push_back(Pending {
                    reply: None,
                    deadline,
                    rate: Some(rate),
                });
            }
            Err(WriteError::Io(err)) => self.fail(LinkFailure::Io, &err.to_string()),
            Err(WriteError::Deadline) => {
                warn!(device = %self.id, command = %line, "Could not send the device its rate again in time.");
            }
        }
    }

    async fn send(
        &mut self,
        line: String,
        deadline: Instant,
        reply: oneshot::Sender<Result<String, SendError>>,
    ) {
        let timeout = SendError::Timeout(self.timing.command_timeout);
        if self.modbus.is_some() {
            let _ = reply.send(Err(SendError::Unsupported(self.id.clone())));
            return;
        }
        let Some(link) = frames_of(&mut self.link) else {
            let _ = reply.send(Err(SendError::NotConnected {
                id: self.id.clone(),
                state: self.state,
            }));
            return;
        };
        let now = Instant::now();
        if deadline <= now {
            // The caller has given up already; a command nobody waits for would only take the
            // place of the next one in the reply queue.
            let _ = reply.send(Err(timeout));
            return;
        }
        link.expire_waiting(now);
        if link.waiting.len() >= MAX_WAITING {
            let _ = reply.send(Err(SendError::Busy(self.id.clone())));
            return;
        }
        match link.write_line(&line, deadline).await {
            Ok(()) => link.waiting.push_back(Pending {
                reply: Some(reply),
                deadline,
                rate: requested_rate(&line),
            }),
            Err(WriteError::Io(err)) => {
                let _ = reply.send(Err(SendError::Io(err.to_string())));
                self.fail(LinkFailure::Io, &err.to_string());
            }
            Err(WriteError::Deadline) => {
                let _ = reply.send(Err(timeout));
            }
        }
    }

    /// Hands samples to the buffer. With `Block` this may wait for room; commands are still
    /// served meanwhile, and a stop (or shutdown) drops what is left, counted with a reason.
    /// A retirement (a live reload) lets the push finish: a reload loses nothing.
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
                    // A retiring task (a live reload) serves no more requests and finishes its
                    // push: its handle is gone by now, and a closed channel is no shutdown.
                    request = self.requests.recv(), if !self.retiring => {
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
        self.close_link(SendError::LinkClosed);
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

/// The open frame link, if any.
fn frames_of<Io: AsyncRead>(link: &mut Option<Open<Io>>) -> Option<&mut Link<Io>> {
    match link.as_mut() {
        Some(Open::Frames(link)) => Some(link),
        _ => None,
    }
}

/// Waits for the next thing to happen on the link: (re)connection when it is closed, else the
/// next chunk of frames, bounded by the deadline for a valid frame.
async fn next_event<C: Connector>(
    link: &mut Option<Open<C::Io>>,
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
        Some(Open::Frames(link)) => {
            match tokio::time::timeout_at(deadline, link.frames.next_chunk(CHUNK_MAX)).await {
                Ok(Chunk {
                    frames,
                    end: Some(End::Closed),
                }) if frames.is_empty() => LinkEvent::Ended,
                Ok(chunk) => LinkEvent::Frames(chunk),
                Err(_) => LinkEvent::TimedOut,
            }
        }
        Some(Open::Modbus(link)) => {
            match tokio::time::timeout_at(deadline, tokio::time::sleep_until(link.next_poll()))
                .await
            {
                Ok(()) => LinkEvent::PollDue,
                Err(_) => LinkEvent::TimedOut,
            }
        }
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
