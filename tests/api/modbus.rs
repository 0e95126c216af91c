//! Modbus devices end to end: the gateway polls our simulator over Modbus TCP on loopback and
//! over Modbus RTU on a socat pty pair; faults played by the simulator show in `/devices/{id}`
//! and Prometheus and drive the breaker; writes go through `POST /devices/{id}/command`.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use telemetryhub::config::{
    ByteOrder, DataType, DeviceKind, DeviceSettings, RegisterSettings, SerialSettings, Table,
};
use telemetryhub::device::modbus::codec::Raw;
use telemetryhub::device::modbus::sim::{Fault, Line, SimHandle, serve_rtu, serve_tcp};
use tokio_util::sync::CancellationToken;

use crate::helpers::{DEADLINE, TestApp, spawn_app, temp_path, u64_at, wait_until};
use crate::serial::PtyPair;

/// The map both tests use: five input channels in one block, a writable holding register and
/// a writable coil.
fn registers() -> Vec<RegisterSettings> {
    let reg = |channel: &str, table, address, data_type, byte_order, unit: &str| RegisterSettings {
        byte_order,
        unit: unit.to_owned(),
        ..RegisterSettings::new(channel, table, address, data_type)
    };
    let mut map = vec![
        reg(
            "temperature",
            Table::Input,
            0,
            DataType::Int16,
            ByteOrder::Abcd,
            "degC",
        ),
        reg(
            "humidity",
            Table::Input,
            1,
            DataType::Uint16,
            ByteOrder::Badc,
            "%RH",
        ),
        reg(
            "pressure",
            Table::Input,
            2,
            DataType::Float32,
            ByteOrder::Cdab,
            "hPa",
        ),
        reg(
            "energy",
            Table::Input,
            4,
            DataType::Uint64,
            ByteOrder::Dcba,
            "Wh",
        ),
        reg(
            "setpoint",
            Table::Holding,
            10,
            DataType::Uint16,
            ByteOrder::Abcd,
            "degC",
        ),
        reg(
            "pump",
            Table::Coil,
            0,
            DataType::Bool,
            ByteOrder::Abcd,
            "bool",
        ),
    ];
    map[0].scale = 0.1;
    map[4].writable = true;
    map[5].writable = true;
    // Writable in the map, locked on the device (see `SimHandle::protect`).
    map.push(RegisterSettings {
        writable: true,
        ..RegisterSettings::new("locked", Table::Holding, 12, DataType::Uint16)
    });
    map
}

fn load(sim: &SimHandle) {
    sim.set(
        Table::Input,
        0,
        DataType::Int16,
        ByteOrder::Abcd,
        Raw::Int(-153),
    );
    sim.set(
        Table::Input,
        1,
        DataType::Uint16,
        ByteOrder::Badc,
        Raw::Uint(456),
    );
    sim.set(
        Table::Input,
        2,
        DataType::Float32,
        ByteOrder::Cdab,
        Raw::Float(1013.25),
    );
    sim.set(
        Table::Input,
        4,
        DataType::Uint64,
        ByteOrder::Dcba,
        Raw::Uint(123_456_789_012),
    );
    sim.set(
        Table::Holding,
        10,
        DataType::Uint16,
        ByteOrder::Abcd,
        Raw::Uint(20),
    );
    sim.set(
        Table::Coil,
        0,
        DataType::Bool,
        ByteOrder::Abcd,
        Raw::Bool(true),
    );
    sim.protect(12);
}

const EXPECTED: [(&str, f64, &str); 6] = [
    ("temperature", -15.3, "degC"),
    ("humidity", 456.0, "%RH"),
    ("pressure", 1013.25, "hPa"),
    ("energy", 123_456_789_012.0, "Wh"),
    ("setpoint", 20.0, "degC"),
    ("pump", 1.0, "bool"),
];

fn tune(device: &mut DeviceSettings) {
    device.poll_interval_ms = Some(20);
    device.timeout_ms = Some(200);
    device.retries = Some(0);
    device.failure_threshold = 3;
    device.backoff_initial_ms = 20;
    device.backoff_max_ms = 100;
}

/// The latest value of `channel` of device `id` in `/samples`, with its unit.
async fn latest(app: &TestApp, id: &str, channel: &str) -> Option<(f64, String)> {
    let (_, body) = app.get_json("/samples?limit=200").await;
    body["samples"].as_array()?.iter().rev().find_map(|s| {
        (s["device"] == id && s["channel"] == channel).then(|| {
            (
                s["value"].as_f64().unwrap_or(f64::NAN),
                s["unit"].as_str().unwrap_or_default().to_owned(),
            )
        })
    })
}

async fn wait_values(app: &TestApp, id: &str, expected: &[(&str, f64, &str)]) {
    for &(channel, value, unit) in expected {
        wait_until(
            DEADLINE,
            &format!("{channel} = {value} {unit}"),
            async || {
                latest(app, id, channel)
                    .await
                    .is_some_and(|(v, u)| (v - value).abs() < 1e-9 && u == unit)
            },
        )
        .await;
    }
}

async fn wait_state(app: &TestApp, id: &str, state: &str) {
    wait_until(DEADLINE, &format!("{id} reaches {state}"), async || {
        app.device(id).await["state"] == state
    })
    .await;
}

async fn failures(app: &TestApp, id: &str, kind: &str) -> u64 {
    u64_at(&app.device(id).await, &format!("/link_failures/{kind}"))
}

async fn wait_failures(app: &TestApp, id: &str, kind: &str, at_least: u64) {
    wait_until(
        DEADLINE,
        &format!("{id}: {at_least} {kind} failures"),
        async || failures(app, id, kind).await >= at_least,
    )
    .await;
}

async fn write(
    app: &TestApp,
    id: &str,
    table: &str,
    address: u16,
    value: f64,
) -> (StatusCode, Value) {
    let response = app
        .client
        .post(app.url(&format!("/devices/{id}/command")))
        .json(&json!({ "write": { "table": table, "address": address, "value": value } }))
        .send()
        .await
        .expect("the gateway answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn start_tcp_sim(sim: &SimHandle, at: SocketAddr) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(serve_tcp(listener, sim.clone(), cancel.clone()));
    (addr, cancel)
}

#[tokio::test]
async fn the_gateway_polls_the_simulator_over_tcp_and_rides_out_its_faults() {
    let sim = SimHandle::default();
    load(&sim);
    let (addr, server) = start_tcp_sim(&sim, "127.0.0.1:0".parse().unwrap()).await;
    let mut device = DeviceSettings::modbus_tcp("plc", &addr.to_string(), registers());
    tune(&mut device);
    let app = spawn_app(move |s| s.devices = vec![device]).await;
    wait_values(&app, "plc", &EXPECTED).await;
    let view = app.device("plc").await;
    assert_eq!(view["kind"], "modbus_tcp");
    assert_eq!(view["state"], "Measuring");

    // An exception, a lost answer and an invalid answer: each one failure of its kind, and
    // the device recovers by itself.
    for (fault, kind) in [
        (Fault::Exception(2), "exception"),
        (Fault::Silence, "timeout"),
        (Fault::Corrupt, "invalid"),
        (Fault::Drop, "closed"),
    ] {
        sim.inject(fault, 1);
        wait_failures(&app, "plc", kind, 1).await;
        wait_state(&app, "plc", "Measuring").await;
    }
    let error = app.device("plc").await["last_error"].clone();
    assert!(
        error.as_str().is_some_and(|e| e.starts_with("closed")),
        "{error}"
    );

    // A rebooted PLC: the server goes away (connects fail), then comes back on its address.
    server.cancel();
    wait_failures(&app, "plc", "connect", 1).await;
    let (_, server) = start_tcp_sim(&sim, addr).await;
    sim.set(
        Table::Input,
        1,
        DataType::Uint16,
        ByteOrder::Badc,
        Raw::Uint(457),
    );
    wait_values(&app, "plc", &[("humidity", 457.0, "%RH")]).await;
    wait_state(&app, "plc", "Measuring").await;

    // failure_threshold (3) exceptions in a row trip the breaker; reset and start recover.
    sim.inject(Fault::Exception(6), 3);
    wait_state(&app, "plc", "SafeState").await;
    let scrape = app.scrape().await;
    let exceptions = scrape.value(
        "telemetryhub_device_link_failures_total",
        &[("device", "plc"), ("kind", "exception")],
    );
    assert!(exceptions >= 4.0, "{exceptions}");
    assert_eq!(app.post_json("/devices/plc/reset").await.0, StatusCode::OK);
    let read = u64_at(&app.device("plc").await, "/samples_read");
    assert_eq!(app.post_json("/devices/plc/start").await.0, StatusCode::OK);
    // Measuring at once; the link is open once a poll has come through it.
    wait_until(DEADLINE, "a poll after the restart", async || {
        u64_at(&app.device("plc").await, "/samples_read") > read
    })
    .await;

    // Writes: a writable register changes on the device and in the next poll.
    let (status, body) = write(&app, "plc", "holding", 10, 42.0).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(sim.words(Table::Holding, 10, 1), [42]);
    let (status, body) = write(&app, "plc", "coil", 0, 0.0).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_values(
        &app,
        "plc",
        &[("setpoint", 42.0, "degC"), ("pump", 0.0, "bool")],
    )
    .await;
    // Not writable in the map: refused, and the device's register is untouched.
    let (status, body) = write(&app, "plc", "holding", 11, 7.0).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.to_string().contains("writable"), "{body}");
    assert_eq!(sim.words(Table::Holding, 11, 1), [0]);
    let (status, _) = write(&app, "plc", "input", 0, 7.0).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The device's exception is a clear error.
    let (status, body) = write(&app, "plc", "holding", 12, 43.0).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.to_string().contains("exception 4"), "{body}");
    server.cancel();
    app.shut_down().await;
}

#[tokio::test]
async fn the_gateway_polls_the_simulator_over_rtu_on_a_pty_pair() {
    let dir = temp_path("modbus-rtu");
    std::fs::create_dir_all(&dir).unwrap();
    let mut pty = PtyPair::spawn(&dir).await;
    let sim = SimHandle::default();
    load(&sim);
    let serve = |path: std::path::PathBuf, sim: SimHandle| async move {
        // Reopened whenever the pty goes away, as a device on a replugged adapter.
        loop {
            let port = tokio_serial::SerialStream::open(&tokio_serial::new(
                path.to_string_lossy(),
                115_200,
            ));
            if let Ok(port) = port {
                let line = Line {
                    baud: 115_200,
                    bits_per_char: 10,
                };
                let _ = serve_rtu(port, sim.clone(), 1, Some(line)).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let server = tokio::spawn(serve(pty.device.clone(), sim.clone()));

    let mut device = DeviceSettings::modbus_tcp("rtu", "unused:1", registers());
    device.kind = DeviceKind::ModbusRtu;
    device.address = None;
    device.serial = Some(SerialSettings::new(&pty.gateway));
    tune(&mut device);
    let app = spawn_app(move |s| s.devices = vec![device]).await;
    wait_values(&app, "rtu", &EXPECTED).await;
    assert_eq!(app.device("rtu").await["kind"], "modbus_rtu");

    // A corrupted CRC: tokio-modbus skips the frame and waits on; the bytes that came count
    // it as an invalid answer, not a timeout.
    sim.inject(Fault::Corrupt, 1);
    wait_failures(&app, "rtu", "invalid", 1).await;
    assert_eq!(failures(&app, "rtu", "timeout").await, 0);
    wait_state(&app, "rtu", "Measuring").await;
    sim.inject(Fault::Silence, 1);
    wait_failures(&app, "rtu", "timeout", 1).await;
    wait_state(&app, "rtu", "Measuring").await;
    sim.inject(Fault::Exception(6), 1);
    wait_failures(&app, "rtu", "exception", 1).await;
    wait_state(&app, "rtu", "Measuring").await;

    // The adapter is unplugged (the pty disappears) and plugged back: it recovers by itself.
    pty.unplug();
    wait_failures(&app, "rtu", "connect", 1).await;
    let _pty = PtyPair::spawn(&dir).await;
    sim.set(
        Table::Input,
        0,
        DataType::Int16,
        ByteOrder::Abcd,
        Raw::Int(99),
    );
    wait_values(&app, "rtu", &[("temperature", 9.9, "degC")]).await;

    let (status, body) = write(&app, "rtu", "holding", 10, 5.0).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(sim.words(Table::Holding, 10, 1), [5]);
    server.abort();
    app.shut_down().await;
}

/// The binary with no inherited config overrides.
fn binary(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_telemetryhub"));
    command.args(args).stdin(std::process::Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TELEMETRYHUB") {
            command.env_remove(key);
        }
    }
    command.kill_on_drop(true);
    command
}

#[tokio::test]
async fn validate_accepts_the_example_and_refuses_modbus_mistakes_with_exit_2() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/modbus-example.toml");
    let output = binary(&["validate", "--config", example])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let base = "[[devices]]\nid = \"p\"\nkind = \"modbus_tcp\"\naddress = \"127.0.0.1:502\"\n";
    let reg = "[[devices.registers]]\nchannel = \"t\"\ntable = \"input\"\naddress = 0\n";
    for (text, key) in [
        (
            format!("{base}unit_id = 300\n{reg}data_type = \"int16\"\n"),
            "devices[0].unit_id",
        ),
        (
            format!("{base}{reg}data_type = \"bool\"\n"),
            "devices[0].registers[0].data_type",
        ),
        (
            format!("{base}{reg}data_type = \"int16\"\nbyte_order = \"XYZW\"\n"),
            "devices[0].registers[0].byte_order",
        ),
        (
            format!("{base}{reg}data_type = \"int16\"\n{reg}data_type = \"int16\"\n"),
            "devices[0].registers[1].channel",
        ),
    ] {
        let path = temp_path("modbus-bad.toml");
        std::fs::write(&path, &text).unwrap();
        let output = binary(&["validate", "--config", &path.to_string_lossy()])
            .output()
            .await
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(key), "{text}: must name {key}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn the_simulate_command_serves_the_example_map_with_moving_values() {
    use tokio::io::AsyncBufReadExt;
    let mut child = binary(&[
        "simulate",
        "--modbus-tcp",
        "127.0.0.1:0",
        "--interval-ms",
        "10",
    ])
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("the binary runs");
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = stderr.next_line().await {
            if let Some(rest) = line.strip_prefix("Serving Modbus TCP on ") {
                return rest.trim_end_matches('.').parse::<SocketAddr>().ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("the simulator says where it listens");

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/modbus-example.toml"
    ))
    .unwrap();
    let mut settings = telemetryhub::config::Settings::from_toml(&text).unwrap();
    let mut plc = settings.devices.remove(0);
    plc.address = Some(addr.to_string());
    plc.poll_interval_ms = Some(20);
    let app = spawn_app(move |s| s.devices = vec![plc]).await;
    let first = {
        let mut got = None;
        wait_until(DEADLINE, "a temperature from the simulator", async || {
            got = latest(&app, "plc1", "temperature").await;
            got.is_some()
        })
        .await;
        got.unwrap()
    };
    assert_eq!(first.1, "degC");
    assert!((0.0..=50.0).contains(&first.0), "{first:?}");
    wait_until(DEADLINE, "the temperature moves", async || {
        latest(&app, "plc1", "temperature")
            .await
            .is_some_and(|(v, _)| v != first.0)
    })
    .await;
    app.shut_down().await;
    let _ = child.kill().await;
}
