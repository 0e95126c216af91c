//! Real serial links: a pseudo-terminal pair made by `socat`, the gateway reading one end as a
//! `kind = "serial"` device through tokio-serial, the test playing the device on the other end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use telemetryhub::config::{DeviceSettings, Settings, SimulatorSettings};
use telemetryhub::device::codec::{encode_channel_frame, encode_frame};
use telemetryhub::device::sim::Simulator;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::sync::CancellationToken;

use crate::helpers::{DEADLINE, TestApp, spawn_app, temp_path, u64_at, wait_until};

/// A `socat` pty pair: the gateway opens `gateway`, the test writes to `device`.
pub(crate) struct PtyPair {
    child: Child,
    pub(crate) gateway: PathBuf,
    pub(crate) device: PathBuf,
}

impl PtyPair {
    pub(crate) async fn spawn(dir: &Path) -> Self {
        let gateway = dir.join("ttyGW");
        let device = dir.join("ttyDEV");
        let child = Command::new("socat")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", gateway.display()))
            .arg(format!("pty,raw,echo=0,link={}", device.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is installed (scripts/test.sh installs it)");
        let pair = Self {
            child,
            gateway,
            device,
        };
        wait_until(DEADLINE, "socat creates both pty links", async || {
            pair.gateway.exists() && pair.device.exists()
        })
        .await;
        pair
    }

    /// Kills socat: both ptys disappear, as when a USB adapter is unplugged.
    pub(crate) fn unplug(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.unplug();
    }
}

/// Plays the device: writes a frame every 5 ms to `path` (and garbage before every tenth),
/// reopening the path whenever it goes away, until `stop` is cancelled.
fn spawn_writer(path: PathBuf, garbage: bool, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut seq = 0u32;
        while !stop.is_cancelled() {
            let Ok(mut file) = tokio::fs::OpenOptions::new().write(true).open(&path).await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            loop {
                let mut buf = BytesMut::new();
                if garbage && seq.is_multiple_of(10) {
                    buf.extend_from_slice(b"\x00\xffnoise on the line\r\n");
                }
                encode_frame(seq, 40.0 + f64::from(seq % 7), "degC", &mut buf);
                let written = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = file.write_all(&buf) => r.and(file.flush().await),
                };
                if written.is_err() {
                    break;
                }
                seq = seq.wrapping_add(1);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
}

fn serial_device(path: &Path) -> DeviceSettings {
    let mut device = DeviceSettings::serial("tty0", path);
    device.sample_interval_ms = 5;
    device.read_timeout_ms = Some(30_000);
    device.failure_threshold = 1_000;
    device.backoff_initial_ms = 20;
    device.backoff_max_ms = 100;
    device
}

fn with_device(device: DeviceSettings) -> impl FnOnce(&mut Settings) {
    move |settings| settings.devices = vec![device]
}

async fn device_field(app: &TestApp, pointer: &str) -> u64 {
    u64_at(&app.device("tty0").await, pointer)
}

async fn wait_device_state(app: &TestApp, state: &str) {
    wait_until(DEADLINE, &format!("tty0 reaches {state}"), async || {
        app.device("tty0").await["state"] == state
    })
    .await;
}

#[tokio::test]
async fn frames_arrive_garbage_is_skipped_and_a_replugged_link_resumes() {
    let dir = temp_path("pty-replug");
    std::fs::create_dir_all(&dir).unwrap();
    let mut pair = PtyPair::spawn(&dir).await;
    let app = spawn_app(with_device(serial_device(&pair.gateway))).await;
    let stop = CancellationToken::new();
    spawn_writer(pair.device.clone(), true, stop.clone());

    wait_until(DEADLINE, "200 samples read from the pty", async || {
        device_field(&app, "/samples_read").await >= 200
    })
    .await;
    let device = app.device("tty0").await;
    assert_eq!(device["state"], "Measuring", "{device}");
    assert!(u64_at(&device, "/frames_invalid/syntax") >= 10, "{device}");
    assert_eq!(u64_at(&device, "/frames_invalid/checksum"), 0, "{device}");
    let (code, body) = app.get_json("/samples?limit=50").await;
    assert_eq!(code, StatusCode::OK);
    let samples = body["samples"].as_array().unwrap();
    assert!(
        samples
            .iter()
            .all(|s| s["device"] == "tty0" && s["unit"] == "degC"),
        "{body}"
    );
    let seqs: Vec<u64> = samples.iter().map(|s| s["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, none lost: {seqs:?}"
    );

    // Unplug: the gateway's end fails, the device goes to Error and retries the path.
    pair.unplug();
    wait_device_state(&app, "Error").await;
    let failures = app.device("tty0").await;
    assert!(
        u64_at(&failures, "/consecutive_failures") >= 1,
        "{failures}"
    );

    // Replug at the same path: the device resumes by itself.
    let read_before = device_field(&app, "/samples_read").await;
    let _pair = PtyPair::spawn(&dir).await;
    wait_until(
        DEADLINE,
        "samples flow again after replugging",
        async || device_field(&app, "/samples_read").await >= read_before + 100,
    )
    .await;
    wait_device_state(&app, "Measuring").await;
    assert_eq!(device_field(&app, "/consecutive_failures").await, 0);
    stop.cancel();
    let summary = app.shut_down().await;
    assert!(summary.balanced, "{summary:?}");
}

#[tokio::test]
async fn the_breaker_trips_on_a_missing_tty_and_reset_then_start_recovers() {
    let dir = temp_path("pty-breaker");
    std::fs::create_dir_all(&dir).unwrap();
    let mut device = serial_device(&dir.join("ttyGW"));
    device.failure_threshold = 3;
    device.backoff_initial_ms = 10;
    device.backoff_max_ms = 20;
    let app = spawn_app(with_device(device)).await;

    wait_device_state(&app, "SafeState").await;
    let tripped = app.device("tty0").await;
    assert_eq!(u64_at(&tripped, "/link_failures/connect"), 3, "{tripped}");
    let (code, body) = app.post_json("/devices/tty0/start").await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["ok"], false);
    let (code, _) = app.post_json("/start").await;
    assert_eq!(code, StatusCode::CONFLICT);

    let pair = PtyPair::spawn(&dir).await;
    let stop = CancellationToken::new();
    spawn_writer(pair.device.clone(), false, stop.clone());
    let (code, body) = app.post_json("/devices/tty0/reset").await;
    assert_eq!(
        (code, &body["state"]),
        (StatusCode::OK, &"Idle".into()),
        "{body}"
    );
    let (code, body) = app.post_json("/devices/tty0/start").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    wait_until(DEADLINE, "samples flow after reset and start", async || {
        device_field(&app, "/samples_read").await >= 50
    })
    .await;
    wait_device_state(&app, "Measuring").await;
    stop.cancel();
    app.shut_down().await;
}

#[tokio::test]
async fn commands_reach_a_simulator_on_the_far_end_of_a_pty() {
    let dir = temp_path("pty-commands");
    std::fs::create_dir_all(&dir).unwrap();
    let pair = PtyPair::spawn(&dir).await;
    let app = spawn_app(with_device(serial_device(&pair.gateway))).await;
    // The embedded simulator plays the device on the other end of the pty, opened as a
    // serial port too (a plain file cannot read and write at the same time).
    let far_end = tokio_serial::SerialStream::open(&tokio_serial::new(
        pair.device.to_string_lossy(),
        115_200,
    ))
    .expect("the far end of the pty opens as a serial port");
    let settings = SimulatorSettings {
        seed: 3,
        ..SimulatorSettings::default()
    };
    // One frame a second, so the rate change below is unmistakable.
    tokio::spawn(Simulator::new(settings, Duration::from_secs(1)).run(far_end));
    wait_until(
        DEADLINE,
        "simulator frames arrive over the pty",
        async || device_field(&app, "/samples_read").await >= 1,
    )
    .await;

    let response = app
        .client
        .post(app.url("/devices/tty0/command"))
        .json(&serde_json::json!({ "command": "SET_RATE=10" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["reply"], "OK: rate_ms=10", "{body}");
    // At 10 ms a frame, 200 more samples take two seconds; at the old rate, 200.
    let before = device_field(&app, "/samples_read").await;
    wait_until(DEADLINE, "the faster rate shows", async || {
        device_field(&app, "/samples_read").await >= before + 200
    })
    .await;
    app.shut_down().await;
}

#[tokio::test]
async fn a_command_the_device_never_answers_is_a_504_and_the_link_keeps_measuring() {
    let dir = temp_path("pty-silent");
    std::fs::create_dir_all(&dir).unwrap();
    let pair = PtyPair::spawn(&dir).await;
    let mut device = serial_device(&pair.gateway);
    device.command_timeout_ms = 300;
    let app = spawn_app(with_device(device)).await;
    // This device only sends frames: it never reads, so it never answers a command.
    let stop = CancellationToken::new();
    spawn_writer(pair.device.clone(), false, stop.clone());
    wait_until(DEADLINE, "frames arrive over the pty", async || {
        device_field(&app, "/samples_read").await >= 1
    })
    .await;

    let response = app
        .client
        .post(app.url("/devices/tty0/command"))
        .json(&serde_json::json!({ "command": "GET_STATUS" }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(body["error"].is_string(), "{body}");
    let before = device_field(&app, "/samples_read").await;
    wait_until(
        DEADLINE,
        "frames still arrive after the timeout",
        async || device_field(&app, "/samples_read").await > before,
    )
    .await;
    assert_eq!(app.device("tty0").await["state"], "Measuring");
    stop.cancel();
    app.shut_down().await;
}

/// A scripted device on the far end of a pty: it sends a frame every 20 ms, records every
/// command line it reads, and answers each with what `answer` returns (nothing for `None`).
/// It stops when dropped.
struct FakeDevice {
    commands: watch::Receiver<Vec<String>>,
    _stop: tokio_util::sync::DropGuard,
}

impl FakeDevice {
    fn spawn(path: &Path, answer: fn(&str) -> Option<String>) -> Self {
        let port =
            tokio_serial::SerialStream::open(&tokio_serial::new(path.to_string_lossy(), 115_200))
                .expect("the far end of the pty opens as a serial port");
        let (reader, mut writer) = tokio::io::split(port);
        let (commands_tx, commands) = watch::channel(Vec::new());
        let stop = CancellationToken::new();
        let cancelled = stop.clone();
        tokio::spawn(async move {
            let mut lines = FramedRead::new(reader, LinesCodec::new_with_max_length(256));
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut seq = 0u32;
            loop {
                let mut out = BytesMut::new();
                tokio::select! {
                    _ = cancelled.cancelled() => return,
                    _ = tick.tick() => {
                        encode_frame(seq, 21.5, "degC", &mut out);
                        seq = seq.wrapping_add(1);
                    }
                    line = lines.next() => {
                        let Some(Ok(line)) = line else { return };
                        let line = line.trim_end_matches('\r').to_owned();
                        if let Some(reply) = answer(&line) {
                            out.extend_from_slice(reply.as_bytes());
                            out.extend_from_slice(b"\r\n");
                        }
                        commands_tx.send_modify(|c| c.push(line));
                    }
                }
                if writer.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
        Self {
            commands,
            _stop: stop.drop_guard(),
        }
    }

    /// Waits until the device has read `n` commands; returns every command read so far.
    async fn wait_commands(&self, n: usize) -> Vec<String> {
        let mut commands = self.commands.clone();
        let read = tokio::time::timeout(DEADLINE, commands.wait_for(|c| c.len() >= n)).await;
        match read {
            Ok(Ok(commands)) => commands.clone(),
            _ => panic!(
                "the fake device read {:?}, not {n} commands",
                self.commands.borrow()
            ),
        }
    }
}

/// `POST /devices/tty0/command` with `line`: the status and the JSON body.
async fn post_command(app: &TestApp, line: &str) -> (StatusCode, Value) {
    let response = app
        .client
        .post(app.url("/devices/tty0/command"))
        .json(&json!({ "command": line }))
        .send()
        .await
        .unwrap_or_else(|err| panic!("POST command {line} failed: {err}"));
    crate::helpers::json_of(response).await
}

#[tokio::test]
async fn a_command_the_device_ignores_does_not_shift_the_replies_to_later_ones() {
    let dir = temp_path("pty-ignored");
    std::fs::create_dir_all(&dir).unwrap();
    let pair = PtyPair::spawn(&dir).await;
    let mut device = serial_device(&pair.gateway);
    // Long enough for the answered commands on a busy machine; TWO costs one of it.
    device.command_timeout_ms = 1_000;
    let app = spawn_app(with_device(device)).await;
    let fake = FakeDevice::spawn(&pair.device, |command| {
        (command != "TWO").then(|| format!("OK: {command}"))
    });
    wait_until(DEADLINE, "frames arrive over the pty", async || {
        device_field(&app, "/samples_read").await >= 1
    })
    .await;

    let (code, body) = post_command(&app, "ONE").await;
    assert_eq!(
        (code, &body["reply"]),
        (StatusCode::OK, &json!("OK: ONE")),
        "{body}"
    );
    let (code, body) = post_command(&app, "TWO").await;
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT, "{body}");
    for command in ["THREE", "FOUR"] {
        let (code, body) = post_command(&app, command).await;
        let reply = json!(format!("OK: {command}"));
        assert_eq!((code, &body["reply"]), (StatusCode::OK, &reply), "{body}");
    }
    assert_eq!(fake.wait_commands(4).await, ["ONE", "TWO", "THREE", "FOUR"]);
    assert_eq!(app.device("tty0").await["state"], "Measuring");
    app.shut_down().await;
}

#[tokio::test]
async fn a_command_waiting_for_its_reply_at_shutdown_is_a_503() {
    let dir = temp_path("pty-shutdown");
    std::fs::create_dir_all(&dir).unwrap();
    let pair = PtyPair::spawn(&dir).await;
    let mut device = serial_device(&pair.gateway);
    device.command_timeout_ms = 10_000;
    let app = spawn_app(with_device(device)).await;
    let fake = FakeDevice::spawn(&pair.device, |_| None);
    wait_until(DEADLINE, "frames arrive over the pty", async || {
        device_field(&app, "/samples_read").await >= 1
    })
    .await;

    let request = app
        .client
        .post(app.url("/devices/tty0/command"))
        .json(&json!({ "command": "CALIBRATE" }))
        .send();
    let pending = tokio::spawn(request);
    // The command is on the wire and its caller waits for the reply: now shut down.
    assert_eq!(fake.wait_commands(1).await, ["CALIBRATE"]);
    app.shutdown.cancel();
    let response = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("the command is answered during shutdown")
        .expect("the request task does not panic")
        .expect("the server answers in-flight requests before it stops");
    let (code, body) = crate::helpers::json_of(response).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("shutting down"), "{body}");
    let summary = app.shut_down().await;
    assert!(summary.balanced, "{summary:?}");
}

/// The staleness limit `/readyz?verbose` reports for tty0.
async fn stale_after_ms(app: &TestApp) -> u64 {
    let (_, body) = app.get_json("/readyz?verbose").await;
    let check = body["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["check"] == "device:tty0"))
        .unwrap_or_else(|| panic!("no tty0 check in {body}"));
    u64_at(check, "/stale_after_ms")
}

#[tokio::test]
async fn a_rate_the_device_acknowledged_is_sent_again_after_stop_and_start() {
    let dir = temp_path("pty-rate");
    std::fs::create_dir_all(&dir).unwrap();
    let pair = PtyPair::spawn(&dir).await;
    let app = spawn_app(with_device(serial_device(&pair.gateway))).await;
    let fake = FakeDevice::spawn(&pair.device, |command| {
        let ms = command.strip_prefix("SET_RATE=")?;
        Some(format!("OK: rate_ms={ms}"))
    });
    wait_until(DEADLINE, "frames arrive over the pty", async || {
        device_field(&app, "/samples_read").await >= 1
    })
    .await;
    // 5 ms configured: stale after 25 ms.
    assert_eq!(stale_after_ms(&app).await, 25);

    let (code, body) = post_command(&app, "SET_RATE=2000").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["reply"], "OK: rate_ms=2000", "{body}");
    assert_eq!(stale_after_ms(&app).await, 10_000);

    for route in ["/devices/tty0/stop", "/devices/tty0/start"] {
        let (code, body) = app.post_json(route).await;
        assert_eq!(code, StatusCode::OK, "{route}: {body}");
    }
    assert_eq!(
        fake.wait_commands(2).await,
        ["SET_RATE=2000", "SET_RATE=2000"]
    );
    let read = device_field(&app, "/samples_read").await;
    wait_until(DEADLINE, "frames arrive after the restart", async || {
        device_field(&app, "/samples_read").await > read
    })
    .await;
    assert_eq!(stale_after_ms(&app).await, 10_000);
    app.shut_down().await;
}

/// Plays a two-quantity device: every 5 ms, a frame naming channel `flow` and one naming
/// none, until `stop` is cancelled.
fn spawn_channel_writer(path: PathBuf, stop: CancellationToken) {
    tokio::spawn(async move {
        let Ok(mut file) = tokio::fs::OpenOptions::new().write(true).open(&path).await else {
            return;
        };
        let mut seq = 0u32;
        while !stop.is_cancelled() {
            let mut buf = BytesMut::new();
            encode_channel_frame(seq, 3.5, "m3/h", "flow", &mut buf);
            encode_frame(seq + 1, 20.0, "degC", &mut buf);
            if file.write_all(&buf).await.and(file.flush().await).is_err() {
                return;
            }
            seq = seq.wrapping_add(2);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

#[tokio::test]
async fn frames_naming_a_channel_and_frames_naming_none_arrive_over_a_pty() {
    let dir = temp_path("pty-channels");
    std::fs::create_dir_all(&dir).unwrap();
    let pair = PtyPair::spawn(&dir).await;
    let mut device = serial_device(&pair.gateway);
    device.channel = "water_temp".to_owned();
    let app = spawn_app(with_device(device)).await;
    let stop = CancellationToken::new();
    spawn_channel_writer(pair.device.clone(), stop.clone());

    let series = |device: &Value, channel: &str| -> Option<Value> {
        device["series"]
            .as_array()?
            .iter()
            .find(|s| s["channel"] == channel && s["source"] == "link")
            .cloned()
    };
    wait_until(DEADLINE, "20 samples on each channel", async || {
        let device = app.device("tty0").await;
        ["flow", "water_temp"]
            .iter()
            .all(|c| series(&device, c).is_some_and(|s| s["count"].as_u64() >= Some(20)))
    })
    .await;
    stop.cancel();
    let device = app.device("tty0").await;
    let flow = series(&device, "flow").unwrap();
    assert_eq!(
        (flow["unit"].as_str(), flow["max"].as_f64()),
        (Some("m3/h"), Some(3.5))
    );
    let temp = series(&device, "water_temp").unwrap();
    assert_eq!(
        (temp["unit"].as_str(), temp["min"].as_f64()),
        (Some("degC"), Some(20.0))
    );
    assert_eq!(u64_at(&device, "/frames_invalid/syntax"), 0, "{device}");
    assert_eq!(u64_at(&device, "/frames_invalid/checksum"), 0, "{device}");
    let (_, body) = app.get_json("/samples?limit=100").await;
    let pairs: std::collections::BTreeSet<_> = body["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["channel"].as_str().unwrap().to_owned(),
                s["unit"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [("flow", "m3/h"), ("water_temp", "degC")]
            .map(|(c, u)| (c.to_owned(), u.to_owned()))
            .into(),
        "{body}"
    );
    app.shut_down().await;
}
