//! The uplink against a real Mosquitto: every spooled record reaches a subscriber, in order,
//! acknowledged only by the broker's PUBACK; outages, refused credentials and an absent broker
//! lose nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use telemetryhub::config::UplinkSettings;
use telemetryhub::spool::{Append, Fsync, Spool, SpoolOptions, SpoolWriter, WhenFull};
use telemetryhub::uplink::payload::envelope;
use telemetryhub::uplink::{Forwarder, ForwarderOptions, UplinkStatus};
use tokio_util::sync::CancellationToken;

use super::broker::{Broker, Subscriber, uplink_settings};
use super::helpers::{DEADLINE, wait_until};

struct Running {
    spool: Spool,
    writer: SpoolWriter,
    status: Arc<UplinkStatus>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Cancels the forwarder and waits for it to end.
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the forwarder stops in time")
            .expect("the forwarder does not panic");
    }
}

fn start_forwarder(settings: &UplinkSettings) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let (spool, writer, reader, _) = Spool::open(SpoolOptions {
        dir: dir.path().to_owned(),
        max_bytes: 64 << 20,
        when_full: WhenFull::Block,
        fsync: Fsync::Interval(Duration::from_millis(100)),
    })
    .unwrap();
    let status = Arc::new(UplinkStatus::default());
    let cancel = CancellationToken::new();
    let forwarder = Forwarder::new(
        ForwarderOptions::new(settings).unwrap(),
        spool.clone(),
        reader,
        status.clone(),
        cancel.clone(),
    );
    let task = tokio::spawn(forwarder.run());
    Running {
        spool,
        writer,
        status,
        cancel,
        task,
        _dir: dir,
    }
}

/// Appends message `n` for device `dev` (topic `t/<dev>`, payload `n`).
fn append(writer: &mut SpoolWriter, dev: &str, n: u64) {
    let mut record = Vec::new();
    envelope(&format!("t/{dev}"), &mut record, |out| {
        out.extend_from_slice(n.to_string().as_bytes())
    });
    writer
        .append(&[Append {
            payload: &record,
            count: 1,
        }])
        .unwrap();
}

/// Per topic, the numbers received in arrival order.
fn received(sub: &Subscriber) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (topic, payload) in sub.messages() {
        let n = std::str::from_utf8(&payload).unwrap().parse().unwrap();
        out.entry(topic).or_default().push(n);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_reaches_the_broker_in_order_and_is_acknowledged_by_its_puback() {
    let broker = Broker::start().await;
    let sub = Subscriber::start(broker.port, "t/#").await;
    let mut up = start_forwarder(&uplink_settings(broker.url()));
    for n in 0..600 {
        append(&mut up.writer, if n % 2 == 0 { "a" } else { "b" }, n);
    }
    wait_until(DEADLINE, "every record acknowledged", async || {
        up.spool.stats().pending == 0 && sub.len() >= 600
    })
    .await;
    let got = received(&sub);
    assert_eq!(got["t/a"], (0..600).step_by(2).collect::<Vec<_>>());
    assert_eq!(got["t/b"], (1..600).step_by(2).collect::<Vec<_>>());
    let stats = up.spool.stats();
    assert_eq!((stats.forwarded, stats.tail), (600, 600));
    let status = up.status.snapshot();
    assert!(status.connected);
    assert_eq!((status.published, status.acked), (600, 600));
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_and_the_backlog_drains_when_the_broker_returns() {
    let mut broker = Broker::start().await;
    let sub = Subscriber::start(broker.port, "t/#").await;
    let mut up = start_forwarder(&uplink_settings(broker.url()));
    let total = 3000u64;
    for n in 0..total / 3 {
        append(&mut up.writer, "d", n);
    }
    wait_until(DEADLINE, "the first third forwarded", async || {
        up.spool.stats().forwarded >= total / 6
    })
    .await;
    broker.stop();
    // Appends go on during the outage: they wait in the spool.
    for n in total / 3..total * 2 / 3 {
        append(&mut up.writer, "d", n);
    }
    wait_until(DEADLINE, "the outage seen", async || {
        !up.status.snapshot().connected
    })
    .await;
    assert!(up.spool.stats().pending > 0, "a backlog during the outage");
    broker.resume().await;
    for n in total * 2 / 3..total {
        append(&mut up.writer, "d", n);
    }
    wait_until(DEADLINE, "the backlog drained", async || {
        up.spool.stats().pending == 0
    })
    .await;
    wait_until(DEADLINE, "every number at the subscriber", async || {
        let got = received(&sub);
        got.get("t/d").is_some_and(|v| {
            let distinct: std::collections::BTreeSet<_> = v.iter().collect();
            distinct.len() as u64 == total
        })
    })
    .await;
    let got = &received(&sub)["t/d"];
    let duplicates = got.len() as u64 - total;
    eprintln!("outage: {total} messages, {duplicates} duplicates");
    // In order: each number is first seen after every smaller one.
    let mut first_seen = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for &n in got {
        if seen.insert(n) {
            first_seen.push(n);
        }
    }
    assert_eq!(first_seen, (0..total).collect::<Vec<_>>());
    assert!(up.status.snapshot().reconnects >= 1);
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_broker_at_start_is_no_error_and_the_spool_keeps_everything() {
    let mut broker = Broker::start().await;
    broker.stop();
    let mut up = start_forwarder(&uplink_settings(broker.url()));
    for n in 0..100 {
        append(&mut up.writer, "d", n);
    }
    wait_until(DEADLINE, "a failed connection reported", async || {
        let s = up.status.snapshot();
        s.reconnects >= 2 && s.last_error.is_some()
    })
    .await;
    assert_eq!(up.spool.stats().pending, 100);
    broker.resume().await;
    let sub = Subscriber::start(broker.port, "t/#").await;
    wait_until(DEADLINE, "the spool drained", async || {
        up.spool.stats().pending == 0
    })
    .await;
    // The subscriber came late; what matters is that the broker acknowledged all of it.
    assert_eq!(up.spool.stats().forwarded, 100);
    drop(sub);
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_retried_with_backoff_and_visible() {
    // A broker that knows one user, whose password the gateway does not have.
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    let status = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["gateway", "right-password"])
        .status()
        .expect("mosquitto_passwd runs");
    assert!(status.success());
    let broker = Broker::start_with(&format!(
        "allow_anonymous false\npassword_file {}\n",
        passwords.display()
    ))
    .await;
    let mut s = uplink_settings(broker.url());
    s.username = Some("gateway".into());
    s.password = Some(telemetryhub::config::Secret::new("wrong-password"));
    let mut up = start_forwarder(&s);
    append(&mut up.writer, "d", 1);
    wait_until(DEADLINE, "refusals reported", async || {
        up.status.snapshot().reconnects >= 3
    })
    .await;
    let status = up.status.snapshot();
    assert!(!status.connected);
    let error = status.last_error.unwrap();
    assert!(error.contains("refused"), "{error}");
    assert!(
        !error.contains("wrong-password"),
        "the password is never shown"
    );
    assert_eq!(up.spool.stats().pending, 1);
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_private_ca_delivers_and_without_it_the_handshake_is_refused() {
    let tls = super::broker::TlsFiles::new();
    // One plain listener for the test's subscriber, one TLS listener for the gateway.
    let broker = Broker::start_with(&format!("allow_anonymous true\n{}", tls.listener())).await;
    let sub = Subscriber::start(broker.port, "t/#").await;
    let mut s = uplink_settings(tls.url());
    s.ca_file = Some(tls.ca.clone());
    let mut up = start_forwarder(&s);
    for n in 0..50 {
        append(&mut up.writer, "tls", n);
    }
    wait_until(DEADLINE, "every record acknowledged over TLS", async || {
        up.spool.stats().pending == 0 && sub.len() >= 50
    })
    .await;
    assert_eq!(received(&sub)["t/tls"], (0..50).collect::<Vec<_>>());
    up.stop().await;

    // Without the private CA (the system's CAs only), the broker's certificate is not trusted.
    let mut s = uplink_settings(tls.url());
    s.ca_file = None;
    let mut up = start_forwarder(&s);
    append(&mut up.writer, "tls", 99);
    wait_until(DEADLINE, "a refused handshake reported", async || {
        up.status.snapshot().reconnects >= 2
    })
    .await;
    let status = up.status.snapshot();
    assert!(!status.connected);
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("TLS") || error.contains("certificate"),
        "{error}"
    );
    assert_eq!(up.spool.stats().pending, 1, "nothing was sent");
    up.stop().await;
}
