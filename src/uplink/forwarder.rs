//! The forwarder: reads spool records in order and publishes each as one MQTT message with
//! QoS 1; a record is acknowledged in the spool only when the broker's PUBACK for it arrives.
//!
//! rumqttc's `publish()` does not return the packet id, so acknowledgements are mapped to
//! records deliberately: every connection gets a fresh client and event loop (nothing queued
//! for an old connection can be sent on a new one), messages are handed to the event loop in
//! order, and the event loop reports `Outgoing::Publish(pkid)` for each in that same order
//! (or `Outgoing::AwaitAck(pkid)` when the id is still taken, followed by
//! `Outgoing::Publish(pkid)` once it is sent). So the n-th report names the n-th record, and
//! the PUBACK with that id acknowledges it. After a disconnect the reader rewinds to the oldest
//! unacknowledged record: at least once, in order per device, duplicates only around a
//! reconnect. The event loop is polled by a task of its own ([`Events`]): its `poll` is not
//! cancel safe.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use super::payload::open_envelope;
use crate::config::UplinkSettings;
use crate::device::sim::SplitMix64;
use crate::spool::{Record, Spool, SpoolReader};

/// Most bytes of records read from the spool at once.
const READ_BYTES: usize = 4 << 20;

/// Longest wait at shutdown for PUBACKs of messages already sent.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(2);

/// No PUBACK for this long while messages await one means a lost PUBACK or a dead connection:
/// the connection is dropped and the spool resent from its oldest unacknowledged record (at
/// least once), rather than waiting on it for good.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the forwarder looks for messages older than [`ACK_TIMEOUT`].
const ACK_CHECK: Duration = Duration::from_secs(1);

/// Largest MQTT packet sent: a spool record's largest payload plus headers.
const MAX_PACKET: usize = (16 << 20) + 4096;

/// Why the uplink could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The broker URL is invalid (validation catches this first).
    #[error("uplink.url: {0}")]
    Url(String),
    /// The CA file could not be used.
    #[error("uplink.ca_file {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The forwarder's state, shared with the API.
#[derive(Debug, Default)]
pub struct UplinkStatus {
    connected: AtomicBool,
    published: AtomicU64,
    acked: AtomicU64,
    reconnects: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A copy of the forwarder's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UplinkSnapshot {
    /// Connected to the broker now.
    pub connected: bool,
    /// Messages handed to the broker (including resends).
    pub published: u64,
    /// Messages the broker acknowledged.
    pub acked: u64,
    /// Connections lost or refused.
    pub reconnects: u64,
    /// The last connection error, if any since start.
    pub last_error: Option<String>,
}

impl UplinkStatus {
    /// A copy of the counters.
    pub fn snapshot(&self) -> UplinkSnapshot {
        UplinkSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn set_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

/// Connection settings derived from `[uplink]`.
#[derive(Clone)]
pub struct ForwarderOptions {
    mqtt: MqttOptions,
    broker: String,
    max_inflight: usize,
    reconnect_initial: Duration,
    reconnect_max: Duration,
}

impl ForwarderOptions {
    /// Builds the MQTT options; reads the CA file for `mqtts://`.
    pub fn new(settings: &UplinkSettings) -> Result<Self, UplinkError> {
        let broker = settings.broker().map_err(UplinkError::Url)?;
        let mut mqtt = MqttOptions::new(settings.client(), broker.host.clone(), broker.port);
        mqtt.set_keep_alive(Duration::from_secs(u64::from(settings.keep_alive_secs)))
            // Every connection starts clean: what the broker had not acknowledged is sent
            // again from the spool, never replayed by the client library on its own.
            .set_clean_session(true)
            // The client's packet-id space is kept well above what we let be in flight:
            // rumqttc hands out ids in a cycle, so a PUBACK that arrives out of order would
            // otherwise make the next id collide and stall the connection.
            .set_inflight(settings.max_inflight.saturating_mul(4).max(1024))
            .set_max_packet_size(1 << 20, MAX_PACKET);
        if let Some(user) = &settings.username {
            let password = settings
                .password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default();
            mqtt.set_credentials(user.clone(), password);
        }
        if broker.tls {
            mqtt.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(settings)?)),
            ));
        }
        Ok(Self {
            mqtt,
            broker: broker.to_string(),
            max_inflight: usize::from(settings.max_inflight),
            reconnect_initial: settings.reconnect_initial(),
            reconnect_max: settings.reconnect_max(),
        })
    }

    /// The broker, as `mqtt://host:port`.
    pub fn broker(&self) -> &str {
        &self.broker
    }
}

fn tls_config(settings: &UplinkSettings) -> Result<rustls::ClientConfig, UplinkError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    match &settings.ca_file {
        Some(path) => {
            let ca_error = |message: String| UplinkError::CaFile {
                path: path.display().to_string(),
                message,
            };
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| ca_error(e.to_string()))?;
            for cert in certs {
                let cert = cert.map_err(|e| ca_error(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ca_error("holds no PEM certificate".to_owned()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Reads the spool and publishes to the broker until cancelled.
pub struct Forwarder {
    options: ForwarderOptions,
    spool: Spool,
    reader: Option<SpoolReader>,
    status: Arc<UplinkStatus>,
    cancel: CancellationToken,
    /// New connection settings from a live reload.
    updates: Option<watch::Receiver<ForwarderOptions>>,
}

/// How a connection ended.
enum Session {
    Cancelled,
    /// New settings arrived: connect again with them, at once.
    Reconfigured,
    Failed {
        error: String,
        was_connected: bool,
    },
}

/// Records in flight on one connection, and which packet id each got.
#[derive(Default)]
struct InFlight {
    /// Handed to the client, not yet reported sent: the next report names the front one.
    handed: VecDeque<(u64, u32)>,
    /// Sent, awaiting PUBACK, with when it was sent.
    by_pkid: HashMap<u16, ((u64, u32), tokio::time::Instant)>,
    /// Its packet id was still taken: sent once the PUBACK for that id arrives.
    collided: Option<(u16, (u64, u32))>,
}

impl InFlight {
    fn len(&self) -> usize {
        self.handed.len() + self.by_pkid.len() + usize::from(self.collided.is_some())
    }

    /// The event loop reports that a message went out with `pkid`.
    fn sent(&mut self, pkid: u16) {
        match self.collided.take() {
            Some((id, record)) if id == pkid => {
                self.by_pkid
                    .insert(pkid, (record, tokio::time::Instant::now()));
            }
            other => {
                self.collided = other;
                if let Some(record) = self.handed.pop_front() {
                    self.by_pkid
                        .insert(pkid, (record, tokio::time::Instant::now()));
                }
            }
        }
    }

    /// The event loop reports that the next message waits for `pkid` to be free.
    fn await_ack(&mut self, pkid: u16) {
        if let Some(record) = self.handed.pop_front() {
            self.collided = Some((pkid, record));
        }
    }

    /// The broker acknowledged `pkid`: the record it carried.
    fn acked(&mut self, pkid: u16) -> Option<(u64, u32)> {
        self.by_pkid.remove(&pkid).map(|(record, _)| record)
    }

    /// How long the broker has kept every message waiting: the time since the last PUBACK (or
    /// since the oldest message was sent, if later), while any message awaits one. Measured
    /// from progress rather than per message, so a slow link where messages queue behind each
    /// other is not taken for a lost PUBACK.
    fn stalled_for(&self, last_ack: tokio::time::Instant) -> Option<Duration> {
        let oldest = self.by_pkid.values().map(|(_, sent)| *sent).min()?;
        Some(oldest.max(last_ack).elapsed())
    }
}

/// Events buffered between the event loop's task and the session.
const EVENTS_BUFFERED: usize = 64;

/// A session's MQTT event loop, polled to completion by a task of its own.
///
/// rumqttc's `EventLoop::poll` is not cancel safe: when it takes a publish from the client it
/// records the packet id as in flight, and only then writes the packet; a `poll` dropped during
/// that write (the socket's buffer full) loses the packet while rumqttc waits for its PUBACK.
/// Selected against the session's other work, that happened: in about one drain in three of
/// `telemetryhub bench --uplink replay` (3 M samples), 1,024 packet ids later the id collided,
/// rumqttc stopped sending, and the session stalled for `ACK_TIMEOUT` and resent ~70,000
/// samples. Here `poll` always runs to completion, and the session selects on a channel,
/// which loses nothing when a select drops its `recv`. Dropping `Events` stops the task.
struct Events {
    rx: mpsc::Receiver<Result<Event, ConnectionError>>,
    _task: AbortOnDropHandle<()>,
}

impl Events {
    fn start(mut eventloop: EventLoop) -> Self {
        let (tx, rx) = mpsc::channel(EVENTS_BUFFERED);
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                // After an error, another `poll` would reconnect: the session ends instead.
                let failed = event.is_err();
                if tx.send(event).await.is_err() || failed {
                    break;
                }
            }
        });
        Self {
            rx,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// The event loop's next event. Cancel safe.
    async fn next(&mut self) -> Result<Event, ConnectionError> {
        self.rx
            .recv()
            .await
            .unwrap_or(Err(ConnectionError::RequestsDone))
    }
}

impl Forwarder {
    /// A forwarder reading `reader` of `spool`.
    pub fn new(
        options: ForwarderOptions,
        spool: Spool,
        reader: SpoolReader,
        status: Arc<UplinkStatus>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            options,
            spool,
            reader: Some(reader),
            status,
            cancel,
            updates: None,
        }
    }

    /// Reconnects with the settings `updates` receives whenever they change.
    pub fn with_updates(mut self, mut updates: watch::Receiver<ForwarderOptions>) -> Self {
        updates.mark_unchanged();
        self.updates = Some(updates);
        self
    }

    /// Waits for new settings; never returns without them.
    async fn updated(updates: &mut Option<watch::Receiver<ForwarderOptions>>) {
        if let Some(rx) = updates
            && rx.changed().await.is_ok()
        {
            return;
        }
        std::future::pending().await
    }

    /// Runs until cancelled: connects, forwards, and reconnects with capped, jittered backoff.
    pub async fn run(mut self) {
        let mut rng = SplitMix64::new(0);
        let mut attempt = 0u32;
        loop {
            match self.session().await {
                Session::Cancelled => break,
                Session::Reconfigured => {
                    self.take_update();
                    attempt = 0;
                }
                Session::Failed {
                    error,
                    was_connected,
                } => {
                    self.status.connected.store(false, Ordering::Relaxed);
                    self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    if was_connected {
                        attempt = 0;
                    }
                    let delay = crate::device::state::backoff(
                        attempt + 1,
                        self.options.reconnect_initial,
                        self.options.reconnect_max,
                    );
                    // Jitter: between half and all of the delay, so a fleet of gateways that
                    // lost the same broker does not reconnect in step.
                    let delay = delay.mul_f64(0.5 + 0.5 * rng.next_f64());
                    attempt = attempt.saturating_add(1);
                    warn!(
                        broker = %self.options.broker,
                        error = %error,
                        retry_in_ms = delay.as_millis() as u64,
                        "Uplink connection failed."
                    );
                    self.status.set_error(error);
                    // New settings (a reload, likely to fix this very failure) end the wait:
                    // the next attempt uses them at once, from the first backoff step.
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                        _ = Self::updated(&mut self.updates) => {
                            self.take_update();
                            attempt = 0;
                        }
                    }
                }
            }
        }
        self.status.connected.store(false, Ordering::Relaxed);
    }

    /// Switches to the settings a reload sent; the next connection uses them.
    fn take_update(&mut self) {
        if let Some(updates) = &mut self.updates {
            self.options = updates.borrow_and_update().clone();
        }
        self.status.connected.store(false, Ordering::Relaxed);
        info!(broker = %self.options.broker, "Uplink settings changed; reconnecting.");
    }

    async fn session(&mut self) -> Session {
        let (client, eventloop) =
            AsyncClient::new(self.options.mqtt.clone(), self.options.max_inflight + 16);
        let mut events = Events::start(eventloop);
        let mut reader = self
            .reader
            .take()
            .expect("the reader is home between sessions");
        reader.rewind();
        let mut next = reader.next();
        let mut reader = Some(reader);
        let mut read_task: Option<JoinHandle<(SpoolReader, io::Result<Vec<Record>>)>> = None;
        let mut queue: VecDeque<Record> = VecDeque::new();
        let mut inflight = InFlight::default();
        let mut connected = false;
        // The last read found nothing new: wait for appends before reading again.
        let mut idle = false;
        // The spool was closed (shutdown): nothing more will come; wait to be cancelled.
        let mut spool_closed = false;
        let max = self.options.max_inflight;
        let mut ack_check = tokio::time::interval(ACK_CHECK);
        let mut last_ack = tokio::time::Instant::now();
        let outcome = loop {
            let mut queue_error = None;
            if connected {
                while inflight.len() < max {
                    let Some(record) = queue.pop_front() else {
                        break;
                    };
                    match open_envelope(&record.payload) {
                        Ok((topic, payload)) => {
                            if let Err(err) =
                                client.try_publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                            {
                                queue_error = Some(format!("cannot queue a message: {err}"));
                                queue.push_front(record);
                                break;
                            }
                            inflight.handed.push_back((record.offset, record.count));
                            self.status.published.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => {
                            warn!(offset = record.offset, error = %err, "Spool record skipped.");
                            self.spool.reject(record.offset, record.count);
                        }
                    }
                }
            }
            if let Some(error) = queue_error {
                break Session::Failed {
                    error,
                    was_connected: true,
                };
            }
            let want_read = connected && queue.len() < max && read_task.is_none() && !idle;
            if want_read && let Some(r) = reader.take() {
                read_task = Some(tokio::task::spawn_blocking(move || {
                    let mut r = r;
                    let records = r.read(max, READ_BYTES);
                    (r, records)
                }));
            }
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break Session::Cancelled,
                () = Self::updated(&mut self.updates) => break Session::Reconfigured,
                event = events.next() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        self.status.connected.store(true, Ordering::Relaxed);
                        info!(broker = %self.options.broker, "Uplink connected.");
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => inflight.sent(pkid),
                    Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => inflight.await_ack(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        last_ack = tokio::time::Instant::now();
                        if let Some((offset, count)) = inflight.acked(ack.pkid) {
                            self.spool.ack(offset, count);
                            self.status.acked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(err) => break Session::Failed {
                        error: describe(&err),
                        was_connected: connected,
                    },
                },
                done = async { read_task.as_mut().expect("guarded").await }, if read_task.is_some() => {
                    read_task = None;
                    match done {
                        Ok((r, Ok(records))) => {
                            next = r.next();
                            idle = records.is_empty();
                            queue.extend(records);
                            reader = Some(r);
                        }
                        Ok((r, Err(err))) => {
                            reader = Some(r);
                            break Session::Failed {
                                error: format!("cannot read the spool: {err}"),
                                was_connected: connected,
                            };
                        }
                        Err(join) => panic!("a spool read panicked: {join}"),
                    }
                }
                more = self.spool.wait_beyond(next), if idle && read_task.is_none() && !spool_closed => {
                    idle = !more;
                    spool_closed = !more;
                }
                _ = ack_check.tick() => {
                    if let Some(waited) = inflight.stalled_for(last_ack).filter(|w| *w > ACK_TIMEOUT) {
                        break Session::Failed {
                            error: format!("no PUBACK for {}s; resending from the spool", waited.as_secs()),
                            was_connected: connected,
                        };
                    }
                }
            }
        };
        if let Some(task) = read_task
            && let Ok((r, _)) = task.await
        {
            reader = Some(r);
        }
        if matches!(outcome, Session::Cancelled | Session::Reconfigured) && connected {
            finish(
                &mut events,
                &client,
                &mut inflight,
                &self.spool,
                &self.status,
            )
            .await;
        }
        self.reader = Some(reader.expect("the reader came home"));
        outcome
    }
}

/// At shutdown: waits a little for PUBACKs of messages already sent, so they are not sent
/// again after a restart, then disconnects.
async fn finish(
    events: &mut Events,
    client: &AsyncClient,
    inflight: &mut InFlight,
    spool: &Spool,
    status: &UplinkStatus,
) {
    // Messages handed to the client but not yet sent stay in the spool.
    inflight.handed.clear();
    let deadline = tokio::time::Instant::now() + SHUTDOWN_ACK_WAIT;
    while !inflight.by_pkid.is_empty() {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some((offset, count)) = inflight.acked(ack.pkid) {
                    spool.ack(offset, count);
                    status.acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
}

fn describe(err: &ConnectionError) -> String {
    match err {
        ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_map_packet_ids_to_records_in_order_and_through_a_collision() {
        let mut f = InFlight::default();
        f.handed.extend([(0, 1), (1, 1), (2, 1)]);
        f.sent(1);
        f.sent(2);
        // Packet id 1 is still taken: the third record waits for it.
        f.await_ack(1);
        assert_eq!(f.len(), 3);
        assert_eq!(f.acked(2), Some((1, 1)));
        assert_eq!(f.acked(1), Some((0, 1)));
        // The collided record goes out with id 1 once that id is free.
        f.sent(1);
        assert_eq!(f.acked(1), Some((2, 1)));
        assert_eq!(f.len(), 0);
        assert_eq!(f.acked(7), None, "an unknown id acknowledges nothing");
    }
}
