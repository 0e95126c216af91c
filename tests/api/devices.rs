//! Several devices in one gateway: each keeps its own rate, counters and metric labels.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{DEADLINE, TestApp, fast_device, spawn_app, u64_at, wait_until};

async fn command(app: &TestApp, id: &str, line: &str) -> String {
    let response = app
        .client
        .post(app.url(&format!("/devices/{id}/command")))
        .json(&json!({ "command": line }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{id} {line}");
    let body: Value = response.json().await.unwrap();
    body["reply"].as_str().unwrap().to_owned()
}

/// Frames the simulator behind `id` has sent on its current link, from `GET_STATUS`.
async fn frames_sent(app: &TestApp, id: &str) -> u64 {
    let status = command(app, id, "GET_STATUS").await;
    let seq = status
        .strip_prefix("STATUS: seq=")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("unexpected status reply {status}"));
    seq.parse().unwrap()
}

#[tokio::test]
async fn two_devices_at_different_rates_are_counted_apart() {
    let app = spawn_app(|settings| {
        let mut slow = fast_device("slow");
        slow.sample_interval_ms = 40;
        settings.devices = vec![fast_device("fast"), slow];
    })
    .await;
    wait_until(DEADLINE, "the slow device sends 10 samples", async || {
        u64_at(&app.device("slow").await, "/samples_read") >= 10
    })
    .await;

    // Park both simulators (one frame per 10 s), then compare what each sent with what the
    // gateway counted for it.
    for id in ["fast", "slow"] {
        assert_eq!(
            command(&app, id, "SET_RATE=10000").await,
            "OK: rate_ms=10000"
        );
    }
    let mut sent = Vec::new();
    for id in ["fast", "slow"] {
        let n = frames_sent(&app, id).await;
        wait_until(
            DEADLINE,
            &format!("{id} counts all {n} frames it sent"),
            async || u64_at(&app.device(id).await, "/samples_read") == n,
        )
        .await;
        sent.push(n);
    }
    let (fast, slow) = (sent[0], sent[1]);
    assert!(
        fast > 2 * slow,
        "10 ms vs 40 ms: fast sent {fast}, slow {slow}"
    );

    let scrape = app.scrape().await;
    for (id, n) in [("fast", fast), ("slow", slow)] {
        let metric = scrape.value("telemetryhub_device_samples_read_total", &[("device", id)]);
        assert_eq!(metric, n as f64, "{id}");
        let state = scrape.value(
            "telemetryhub_device_state",
            &[("device", id), ("state", "Measuring")],
        );
        assert_eq!(state, 1.0, "{id}");
    }
    let (code, devices) = app.get_json("/devices").await;
    assert_eq!(code, StatusCode::OK);
    let ids: Vec<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["fast", "slow"]);
    let summary = app.shut_down().await;
    assert_eq!(summary.ledger.read, fast + slow);
    assert!(summary.balanced, "{summary:?}");
}

#[tokio::test]
async fn stopping_one_device_leaves_the_other_running() {
    let app = spawn_app(|settings| {
        settings.devices = vec![fast_device("a"), fast_device("b")];
    })
    .await;
    let (code, body) = app.post_json("/devices/a/stop").await;
    assert_eq!(
        (code, &body["state"]),
        (StatusCode::OK, &json!("Idle")),
        "{body}"
    );
    let a_before = u64_at(&app.device("a").await, "/samples_read");
    let b_before = u64_at(&app.device("b").await, "/samples_read");
    wait_until(DEADLINE, "b keeps reading", async || {
        u64_at(&app.device("b").await, "/samples_read") >= b_before + 20
    })
    .await;
    assert_eq!(u64_at(&app.device("a").await, "/samples_read"), a_before);
    // The combined state is the most severe one: Measuring beats Idle.
    assert_eq!(app.status().await["state"], "Measuring");
    app.shut_down().await;
}
