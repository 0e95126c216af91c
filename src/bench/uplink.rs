//! `telemetryhub bench --uplink`: the pipeline with the spool and the forwarder, publishing to
//! a real Mosquitto that the bench starts on a free loopback port, and a subscriber that checks
//! every sequence number of every device arrived.
//!
//! - `live`: the run ends when every sample is acknowledged by the broker; the rate is samples
//!   acknowledged per second, end to end.
//! - `replay`: the forwarder is held back until every sample is in the spool (an outage as
//!   long as the run; the bench reports the resident memory's high-water mark then), then let
//!   go; the rate is the backlog's drain rate.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{FsyncSetting, Settings, UplinkSettings};

/// The gateway id, and so the topic level, of the bench's messages.
pub(super) const GATEWAY: &str = "bench";

/// Longest wait for the subscriber to see the last messages after the broker acknowledged them.
const SUBSCRIBER_WAIT: Duration = Duration::from_secs(60);

/// How the uplink is exercised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum UplinkMode {
    /// Forward while the devices send.
    Live,
    /// Spool everything with the broker out of reach, then drain the backlog.
    Replay,
}

/// The uplink part of a bench run.
#[derive(Debug, Clone)]
pub struct UplinkOptions {
    /// Live or replay.
    pub mode: UplinkMode,
    /// The spool's fsync setting.
    pub fsync: FsyncSetting,
    /// The spool directory (emptied first); a temporary one when `None`.
    pub spool_dir: Option<std::path::PathBuf>,
}

/// What the uplink did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UplinkReport {
    /// `"always"` or the interval in milliseconds.
    pub fsync: String,
    /// Samples written to the spool.
    pub spooled: u64,
    /// Samples the broker acknowledged.
    pub forwarded: u64,
    /// Distinct (device, seq) pairs the subscriber received.
    pub received: u64,
    /// Samples spooled that the subscriber never received.
    pub missing: u64,
    /// Samples the subscriber received more than once.
    pub duplicates: u64,
    /// Replay: seconds from letting the forwarder go until the spool was empty.
    pub replay_seconds: Option<f64>,
    /// Replay: `spooled / replay_seconds`.
    pub replay_samples_per_sec: Option<f64>,
    /// Replay: the resident memory's high-water mark when the backlog was complete, MiB.
    pub outage_max_rss_mib: Option<f64>,
    /// Bytes of spool files when the backlog was complete (replay).
    pub backlog_bytes: Option<u64>,
}

/// A Mosquitto process on a free loopback port, killed on drop.
pub(super) struct Broker {
    pub(super) port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Starts `mosquitto` (which must be installed) and waits until it accepts connections.
    pub(super) async fn start() -> std::io::Result<Broker> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_inflight_messages 0\nmax_queued_messages 0\nlog_dest none\n"
            ),
        )?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run mosquitto: {e}")))?;
        let broker = Broker {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err(std::io::Error::other("mosquitto did not start"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which sequence numbers of which device arrived.
#[derive(Default)]
struct Seen {
    by_device: HashMap<String, Vec<bool>>,
    distinct: u64,
    duplicates: u64,
}

impl Seen {
    fn record(&mut self, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        let Some(device) = text
            .split_once("\"device\":\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(device, _)| device)
        else {
            return;
        };
        let seen = self.by_device.entry(device.to_owned()).or_default();
        for part in text.split("\"seq\":").skip(1) {
            let digits = part.bytes().take_while(u8::is_ascii_digit).count();
            let Ok(seq) = part[..digits].parse::<usize>() else {
                continue;
            };
            if seq >= seen.len() {
                seen.resize(seq + 1, false);
            }
            if std::mem::replace(&mut seen[seq], true) {
                self.duplicates += 1;
            } else {
                self.distinct += 1;
            }
        }
    }
}

/// A subscriber on the bench's topics, recording every sequence number.
pub(super) struct Subscriber {
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Subscriber {
    pub(super) async fn start(port: u16) -> std::io::Result<Subscriber> {
        let mut options = MqttOptions::new("telemetryhub-bench-sub", "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(64 << 20, 64 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let store = seen.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let topic = format!("telemetryhub/{GATEWAY}/#");
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        store
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(&p.payload);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .map_err(|_| std::io::Error::other("the subscriber could not subscribe"))?
            .map_err(|_| std::io::Error::other("the subscriber stopped"))?;
        Ok(Subscriber { seen, task })
    }

    /// (distinct, duplicates) so far.
    pub(super) fn counts(&self) -> (u64, u64) {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        (seen.distinct, seen.duplicates)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The uplink and spool settings of a bench run against the broker on `port`.
pub(super) fn configure(
    settings: &mut Settings,
    options: &UplinkOptions,
    port: u16,
    spool_dir: &std::path::Path,
) {
    let mut uplink = UplinkSettings::new(format!("mqtt://127.0.0.1:{port}"));
    uplink.gateway_id = Some(GATEWAY.to_owned());
    uplink.reconnect_initial_ms = 20;
    uplink.reconnect_max_ms = 200;
    settings.uplink = Some(uplink);
    settings.spool.path = spool_dir.to_owned();
    settings.spool.fsync = options.fsync;
    // Room for the whole backlog of a replay run.
    settings.spool.max_bytes = 1 << 40;
}

/// Waits until the subscriber has seen `expected` distinct samples (or gives up), and fills
/// in the report's delivery counts.
pub(super) async fn verify(subscriber: &Subscriber, expected: u64, report: &mut UplinkReport) {
    let deadline = Instant::now() + SUBSCRIBER_WAIT;
    while subscriber.counts().0 < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (distinct, duplicates) = subscriber.counts();
    report.received = distinct;
    report.missing = expected.saturating_sub(distinct);
    report.duplicates = duplicates;
}

/// The resident memory's high-water mark, MiB (Linux).
pub(super) fn max_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The fsync setting as the report shows it.
pub(super) fn fsync_label(fsync: FsyncSetting) -> String {
    match fsync {
        FsyncSetting::Always => "always".to_owned(),
        FsyncSetting::IntervalMs(ms) => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subscriber_counts_each_sequence_number_once() {
        let mut seen = Seen::default();
        seen.record(br#"{"gateway":"bench","device":"bench0","samples":[{"seq":0,"value":1.0},{"seq":2,"value":1.0}]}"#);
        seen.record(br#"{"gateway":"bench","device":"bench0","samples":[{"seq":2,"value":1.0}]}"#);
        seen.record(br#"{"gateway":"bench","device":"bench1","samples":[{"seq":0,"value":1.0}]}"#);
        assert_eq!((seen.distinct, seen.duplicates), (3, 1));
    }
}
