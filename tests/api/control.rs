//! Device control: the state machine's refusals are `409 {"ok": false, "error": ...}`, the
//! per-device routes act on one device only, and unknown ids are JSON 404s.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{DEADLINE, fast_device, spawn_app, u64_at, wait_until};

/// Asserts a `409` body: `ok` false, a non-empty error, and the state it was refused in.
fn assert_conflict(code: StatusCode, body: &Value, state: &str) {
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["ok"], false, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "{body}");
    assert_eq!(body["state"], state, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tripped_breaker_refuses_start_until_reset() {
    let app = spawn_app(|s| {
        let device = &mut s.devices[0];
        device.simulator.disconnect_rate = 1.0;
        device.failure_threshold = 2;
        device.backoff_initial_ms = 10;
        device.backoff_max_ms = 20;
    })
    .await;
    app.wait_state("SafeState").await;
    let device = app.device("sim0").await;
    assert_eq!(device["state"], "SafeState");
    assert!(u64_at(&device, "/consecutive_failures") >= 2, "{device}");
    assert!(u64_at(&device, "/link_failures/closed") >= 2, "{device}");
    assert!(device["last_error"].as_str().is_some(), "{device}");

    let (code, body) = app.post_json("/start").await;
    assert_conflict(code, &body, "SafeState");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("reset"),
        "the error says what to do: {body}"
    );
    let (code, body) = app.post_json("/devices/sim0/start").await;
    assert_conflict(code, &body, "SafeState");
    assert_eq!(app.status().await["state"], "SafeState");

    let (code, body) = app.post_json("/reset").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "ok": true, "state": "Idle" }));
    let device = app.device("sim0").await;
    assert_eq!(device["state"], "Idle");
    assert_eq!(u64_at(&device, "/consecutive_failures"), 0, "{device}");
    assert!(device["last_error"].is_null(), "{device}");

    // Started again, the still-broken link trips the breaker again.
    let (code, body) = app.post_json("/start").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    app.wait_state("SafeState").await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_while_measuring_is_a_conflict() {
    let app = spawn_app(|_| {}).await;
    app.wait_processed_above(0).await;
    let (code, body) = app.post_json("/reset").await;
    assert_conflict(code, &body, "Measuring");
    let (code, body) = app.post_json("/devices/sim0/reset").await;
    assert_conflict(code, &body, "Measuring");
    // The refusal changed nothing.
    let before = app.processed().await;
    app.wait_processed_above(before).await;

    let (code, _) = app.post_json("/stop").await;
    assert_eq!(code, StatusCode::OK);
    let (code, body) = app.post_json("/reset").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "Idle");
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_device_routes_act_on_one_device() {
    let app = spawn_app(|s| s.devices = vec![fast_device("left"), fast_device("right")]).await;
    let (code, body) = app.get_json("/devices").await;
    assert_eq!(code, StatusCode::OK);
    let ids: Vec<&Value> = body["devices"]
        .as_array()
        .expect("devices is an array")
        .iter()
        .map(|d| &d["id"])
        .collect();
    assert_eq!(ids, [&json!("left"), &json!("right")]);
    wait_until(DEADLINE, "both devices to read", async || {
        let (l, r) = (app.device("left").await, app.device("right").await);
        u64_at(&l, "/samples_read") > 0 && u64_at(&r, "/samples_read") > 0
    })
    .await;

    let (code, body) = app.post_json("/devices/left/stop").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "ok": true, "id": "left", "state": "Idle" }));
    let left_read = u64_at(&app.device("left").await, "/samples_read");
    let right_read = u64_at(&app.device("right").await, "/samples_read");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = app.device("left").await;
    assert_eq!(left["state"], "Idle");
    assert_eq!(
        u64_at(&left, "/samples_read"),
        left_read,
        "stopped device read"
    );
    let right = app.device("right").await;
    assert_eq!(right["state"], "Measuring");
    assert!(u64_at(&right, "/samples_read") > right_read, "{right}");
    // The combined state is the most severe one.
    assert_eq!(app.status().await["state"], "Measuring");

    let (code, body) = app.post_json("/devices/left/reset").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "Idle");
    let (code, body) = app.post_json("/devices/right/reset").await;
    assert_conflict(code, &body, "Measuring");
    let (code, body) = app.post_json("/devices/left/start").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "ok": true, "id": "left", "state": "Measuring" })
    );
    wait_until(DEADLINE, "the restarted device to read", async || {
        u64_at(&app.device("left").await, "/samples_read") > left_read
    })
    .await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_device_ids_are_json_404s() {
    let app = spawn_app(|_| {}).await;
    let responses = [
        app.get("/devices/nope").await,
        app.post("/devices/nope/start").await,
        app.post("/devices/nope/stop").await,
        app.post("/devices/nope/reset").await,
    ];
    for response in responses {
        let (code, body) = crate::helpers::json_of(response).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("nope"), "{body}");
    }
    // Known ids still answer.
    assert_eq!(app.device("sim0").await["id"], "sim0");
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_all_also_stops_a_tripped_device() {
    let app = spawn_app(|s| {
        let mut tripping = fast_device("tripping");
        tripping.simulator.disconnect_rate = 1.0;
        tripping.failure_threshold = 2;
        tripping.backoff_initial_ms = 10;
        tripping.backoff_max_ms = 20;
        s.devices = vec![fast_device("healthy"), tripping];
    })
    .await;
    wait_until(
        DEADLINE,
        "the tripping device reaches SafeState",
        async || app.device("tripping").await["state"] == "SafeState",
    )
    .await;

    let (code, body) = app.post_json("/stop").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "ok": true, "state": "Idle" }));
    for id in ["healthy", "tripping"] {
        let device = app.device(id).await;
        assert_eq!(device["state"], "Idle", "{device}");
        assert_eq!(u64_at(&device, "/consecutive_failures"), 0, "{device}");
        assert!(device["last_error"].is_null(), "{device}");
    }
    // Stopping one tripped device alone works the same way.
    let (code, body) = app.post_json("/start").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    wait_until(DEADLINE, "the tripping device trips again", async || {
        app.device("tripping").await["state"] == "SafeState"
    })
    .await;
    let (code, body) = app.post_json("/devices/tripping/stop").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "ok": true, "id": "tripping", "state": "Idle" })
    );
    assert_eq!(app.device("healthy").await["state"], "Measuring");
    app.shut_down().await;
}
