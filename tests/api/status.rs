//! `GET /status`: its JSON shape (the C++ original's, so its clients keep working) and that
//! its numbers come from the running pipeline.

use reqwest::StatusCode;
use serde_json::Value;
use telemetryhub::buffer::OverflowPolicy;

use crate::helpers::{DEADLINE, spawn_app, u64_at, wait_until};

/// The sorted keys of a JSON object.
fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_has_the_documented_shape_and_real_numbers() {
    let app = spawn_app(|s| {
        s.buffer.capacity = 123;
        s.pipeline.workers = Some(3);
    })
    .await;
    app.wait_processed_above(5).await;
    let status = app.status().await;

    assert_eq!(
        keys(&status),
        [
            "devices",
            "latest_sample",
            "metrics",
            "state",
            "uptime_seconds",
            "version"
        ]
    );
    assert_eq!(status["state"], "Measuring");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_seconds"].is_u64(), "{status}");
    assert_eq!(
        keys(&status["latest_sample"]),
        ["channel", "device", "seq", "timestamp", "unit", "value"]
    );
    assert_eq!(status["latest_sample"]["device"], "sim0");

    let metrics = &status["metrics"];
    assert_eq!(
        keys(metrics),
        [
            "pool_jobs_processed",
            "pool_jobs_queued",
            "pool_num_threads",
            "queue_capacity",
            "queue_depth",
            "samples_dropped",
            "samples_processed",
            "samples_rejected"
        ]
    );
    for key in keys(metrics) {
        assert!(metrics[key].is_u64(), "{key} is not a count: {metrics}");
    }
    assert_eq!(u64_at(metrics, "/queue_capacity"), 123);
    assert_eq!(u64_at(metrics, "/pool_num_threads"), 3);
    assert!(u64_at(metrics, "/samples_processed") > 5, "{metrics}");
    assert!(u64_at(metrics, "/pool_jobs_processed") > 0, "{metrics}");
    assert!(u64_at(metrics, "/queue_depth") <= 123, "{metrics}");
    // Paced at 10 ms into a buffer of 123: nothing overflows.
    assert_eq!(u64_at(metrics, "/samples_dropped"), 0, "{metrics}");
    // The simulator stays within the default range of its unit.
    assert_eq!(u64_at(metrics, "/samples_rejected"), 0, "{metrics}");

    let devices = status["devices"].as_array().expect("devices is an array");
    assert_eq!(devices.len(), 1);
    let device = &devices[0];
    assert_eq!(device["id"], "sim0");
    assert_eq!(device["kind"], "simulated");
    assert_eq!(device["state"], "Measuring");
    assert!(u64_at(device, "/samples_read") > 0, "{device}");

    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_sample_is_null_until_a_device_is_started() {
    let app = spawn_app(|s| s.devices[0].autostart = false).await;
    let status = app.status().await;
    assert_eq!(status["state"], "Idle");
    assert!(status["latest_sample"].is_null(), "{status}");
    assert_eq!(u64_at(&status, "/metrics/samples_processed"), 0);
    let (code, body) = app.get_json("/samples").await;
    assert_eq!(
        (code, u64_at(&body, "/count")),
        (StatusCode::OK, 0),
        "{body}"
    );

    let (code, body) = app.post_json("/start").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    app.wait_processed_above(0).await;
    assert!(app.status().await["latest_sample"].is_object());
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_drop_newest_buffer_reports_its_drops() {
    let app = spawn_app(|s| {
        s.buffer.capacity = 4;
        s.buffer.overflow = OverflowPolicy::DropNewest;
        s.pipeline.workers = Some(1);
        s.devices[0].sample_interval_ms = 0;
    })
    .await;
    let mut status = Value::Null;
    wait_until(DEADLINE, "samples to be dropped", async || {
        status = app.status().await;
        u64_at(&status, "/metrics/samples_dropped") > 0
            && u64_at(&status, "/metrics/samples_processed") > 0
    })
    .await;
    assert_eq!(u64_at(&status, "/metrics/queue_capacity"), 4);
    assert!(u64_at(&status, "/metrics/queue_depth") <= 4, "{status}");
    assert_eq!(u64_at(&status, "/metrics/pool_num_threads"), 1);

    let summary = app.shut_down().await;
    assert!(summary.balanced, "{summary:?}");
    assert!(summary.ledger.dropped.overflow > 0, "{summary:?}");
    assert!(
        summary.ledger.dropped.total() >= u64_at(&status, "/metrics/samples_dropped"),
        "{summary:?}"
    );
}

/// Waits until `GET /samples` shows a processed sample of `value`.
async fn wait_sample(app: &crate::helpers::TestApp, value: f64) {
    wait_until(DEADLINE, &format!("a sample of {value}"), async || {
        let (_, body) = app.get_json("/samples?limit=1000").await;
        body["samples"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["value"] == value))
    })
    .await;
}

/// The statistics entry of `device` for `unit` and `source`.
fn series<'a>(device: &'a Value, unit: &str, source: &str) -> &'a Value {
    device["series"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|s| s["unit"] == unit && s["source"] == source)
        })
        .unwrap_or_else(|| panic!("no {unit}/{source} series: {device}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_are_kept_per_unit_and_apart_by_source() {
    let app = spawn_app(|_| {}).await;
    app.wait_processed_above(5).await;
    // The simulator sends `arb.units` around 42; a client posts volts and degrees.
    let body = serde_json::json!([
        {"device": "sim0", "value": 1e6, "unit": "V"},
        {"device": "sim0", "value": -5, "unit": "degC"},
        {"device": "sim0", "value": 3e6, "unit": "V"},
    ]);
    let response = app.post_samples(&body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    wait_sample(&app, 3e6).await;

    for device in [
        app.device("sim0").await,
        app.status().await["devices"][0].clone(),
    ] {
        let volts = series(&device, "V", "http");
        assert_eq!(
            (
                volts["count"].as_u64(),
                volts["min"].as_f64(),
                volts["max"].as_f64()
            ),
            (Some(2), Some(1e6), Some(3e6)),
            "{device}"
        );
        assert_eq!(volts["mean"].as_f64(), Some(2e6), "{device}");
        assert_eq!(volts["last"].as_f64(), Some(3e6), "{device}");
        assert_eq!(series(&device, "degC", "http")["count"], 1, "{device}");
        let link = series(&device, "arb.units", "link");
        assert!(u64_at(link, "/count") > 5, "{device}");
        assert!(link["max"].as_f64() < Some(1000.0), "{device}");
        // The old `stats` object: the link's samples only, in their one unit.
        assert_eq!(device["stats"]["max"], link["max"], "{device}");
        assert!(
            u64_at(&device, "/stats/count") >= u64_at(link, "/count"),
            "{device}"
        );
    }
    app.shut_down().await;
}
