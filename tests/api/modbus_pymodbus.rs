//! The cross-implementation test: the gateway polls a Modbus TCP server that this project did
//! not write (pymodbus, from PyPI; `scripts/test.sh` installs it), started once on a free
//! loopback port (it binds port 0 and reports it) with a register map of typed values that the Python script encodes itself.
//! The gateway's decoded values must equal what the server was given, and ten contiguous
//! channels must cost one request.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use telemetryhub::config::{ByteOrder, DataType, DeviceSettings, RegisterSettings, Table};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::{DEADLINE, spawn_app, wait_until};

/// How long the Python server may live, whatever happens to the test.
const SERVER_LIFETIME_S: u32 = 60;

#[tokio::test]
async fn the_gateway_decodes_what_a_pymodbus_server_was_given() {
    use ByteOrder::*;
    use DataType::*;
    // (channel, table, address, type, order, value): ten contiguous input channels of every
    // width and order, and one of each other table.
    let map: Vec<(&str, Table, u16, DataType, ByteOrder, f64)> = vec![
        ("a", Table::Input, 0, Int16, Abcd, -153.0),
        ("b", Table::Input, 1, Uint16, Abcd, 65000.0),
        ("c", Table::Input, 2, Int32, Cdab, -123_456_789.0),
        ("d", Table::Input, 4, Uint32, Dcba, 4_000_000_000.0),
        ("e", Table::Input, 6, Float32, Badc, 3.25),
        ("f", Table::Input, 8, Float32, Abcd, -1013.5),
        ("g", Table::Input, 10, Int64, Abcd, -1_234_567_890_123.0),
        ("h", Table::Input, 14, Uint64, Cdab, 1_234_567_890_123_456.0),
        ("i", Table::Input, 18, Float64, Dcba, std::f64::consts::E),
        ("j", Table::Input, 22, Int16, Badc, 300.0),
        ("k", Table::Holding, 5, Float64, Cdab, -0.5),
        ("l", Table::Coil, 2, Bool, Abcd, 1.0),
        ("m", Table::Discrete, 3, Bool, Abcd, 1.0),
    ];
    let order_name = |o: ByteOrder| match o {
        Abcd => "ABCD",
        Dcba => "DCBA",
        Badc => "BADC",
        Cdab => "CDAB",
    };
    let server_map: Vec<_> = map
        .iter()
        .map(|&(_, table, address, t, order, value)| {
            let value = if matches!(t, Float32 | Float64) {
                json!(value)
            } else {
                json!(value as i64) // Integers as JSON integers, so Python packs ints.
            };
            json!({ "table": table.as_str(), "address": address, "type": t.as_str(),
                    "order": order_name(order), "value": value })
        })
        .collect();

    let mut server = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/modbus/pymodbus_server.py"
        ))
        .args(["--port", "0"])
        .args(["--lifetime", &SERVER_LIFETIME_S.to_string()])
        .args(["--map", &serde_json::to_string(&server_map).unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (scripts/test.sh installs pymodbus)");
    let mut stdout = BufReader::new(server.stdout.take().unwrap()).lines();
    // The script binds a port the kernel picks, and says which once it listens.
    let port: u16 = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = stdout.next_line().await {
            if let Some(port) = line.strip_prefix("LISTENING ") {
                return port.parse().ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("pymodbus starts and prints its port (is pymodbus installed? scripts/test.sh)");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stdout.next_line().await {
            seen.lock().unwrap().push(line);
        }
    });

    let registers = map
        .iter()
        .map(|&(channel, table, address, t, order, _)| RegisterSettings {
            byte_order: order,
            unit: "u".to_owned(),
            ..RegisterSettings::new(channel, table, address, t)
        })
        .collect();
    let mut device = DeviceSettings::modbus_tcp("py", &format!("127.0.0.1:{port}"), registers);
    device.poll_interval_ms = Some(50);
    device.timeout_ms = Some(1000);
    let app = spawn_app(move |s| s.devices = vec![device]).await;

    let mut got = Vec::new();
    wait_until(DEADLINE, "every channel from pymodbus", async || {
        let (_, body) = app.get_json("/samples?limit=200").await;
        got = body["samples"]
            .as_array()
            .map(|samples| {
                map.iter()
                    .map(|(channel, ..)| {
                        samples
                            .iter()
                            .rev()
                            .find(|s| s["channel"] == *channel)
                            .and_then(|s| s["value"].as_f64())
                    })
                    .collect()
            })
            .unwrap_or_default();
        got.iter().all(Option::is_some)
    })
    .await;
    for ((channel, .., expected), value) in map.iter().zip(&got) {
        assert_eq!(value.unwrap(), *expected, "channel {channel}");
    }
    // The named channels reach every view: one statistics series and one
    // `telemetryhub_channel_value` series per register, holding what pymodbus was given (the
    // server's values do not move).
    let scrape = app.scrape().await;
    let (_, device) = app.get_json("/devices/py").await;
    for (channel, .., expected) in &map {
        let labels = [("device", "py"), ("channel", *channel), ("unit", "u")];
        assert_eq!(
            scrape.value("telemetryhub_channel_value", &labels),
            *expected,
            "gauge of {channel}"
        );
        let series = device["series"]
            .as_array()
            .and_then(|all| all.iter().find(|s| s["channel"] == *channel))
            .unwrap_or_else(|| panic!("a series for {channel}: {device}"));
        assert_eq!(series["last"].as_f64(), Some(*expected), "series {channel}");
    }
    assert_eq!(
        scrape
            .find("telemetryhub_channel_value", &[("device", "py")])
            .len(),
        map.len()
    );

    // Every poll is four requests: one per table, the ten input channels in one of them.
    let requests = lines.lock().unwrap().clone();
    let inputs: Vec<_> = requests
        .iter()
        .filter(|l| l.starts_with("REQ 4 "))
        .collect();
    assert!(!inputs.is_empty());
    assert!(inputs.iter().all(|l| *l == "REQ 4 0 23"), "{inputs:?}");
    for expected in ["REQ 3 5 4", "REQ 1 2 1", "REQ 2 3 1"] {
        assert!(
            requests.iter().any(|l| l == expected),
            "{expected} in {requests:?}"
        );
    }
    assert!(
        requests.iter().all(|l| !l.starts_with("REQ")
            || ["REQ 4 0 23", "REQ 3 5 4", "REQ 1 2 1", "REQ 2 3 1"].contains(&l.as_str())),
        "{requests:?}"
    );

    app.shut_down().await;
    drop(server.stdin.take()); // The script exits when its stdin closes.
    let exited = tokio::time::timeout(Duration::from_secs(10), server.wait()).await;
    assert!(exited.is_ok_and(|s| s.is_ok()), "pymodbus exits when asked");
}
