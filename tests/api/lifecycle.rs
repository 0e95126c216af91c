//! Start → samples flow → stop → start again, several times: the C++ original's queue never
//! reopened after a stop; ours must. Also what `/samples` returns and in which order.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use telemetryhub::dispatch::ProcessFn;

use crate::helpers::{DEADLINE, TestApp, spawn_app, spawn_app_with, u64_at, wait_until};

/// Several sample intervals of the test device: long enough for a running device to be seen.
const QUIET_WINDOW: Duration = Duration::from_millis(300);

/// Samples read by all devices, from `/status`.
fn samples_read(status: &Value) -> u64 {
    status["devices"]
        .as_array()
        .expect("devices is an array")
        .iter()
        .map(|d| u64_at(d, "/samples_read"))
        .sum()
}

/// Waits until every sample read has been processed or dropped (the device must be stopped,
/// and with the default unit range nothing is rejected); returns the final `/status`.
async fn wait_drained(app: &TestApp) -> Value {
    let mut last = Value::Null;
    wait_until(DEADLINE, "the buffer to drain", async || {
        last = app.status().await;
        let done =
            u64_at(&last, "/metrics/samples_processed") + u64_at(&last, "/metrics/samples_dropped");
        u64_at(&last, "/metrics/queue_depth") == 0 && done == samples_read(&last)
    })
    .await;
    last
}

/// Asserts a `/samples` entry's shape and plausible values.
fn assert_sample(sample: &Value, device: &str) {
    let object = sample.as_object().expect("a sample is an object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["channel", "device", "seq", "timestamp", "unit", "value"],
        "{sample}"
    );
    assert_eq!(sample["device"], device);
    assert_eq!(sample["unit"], "arb.units");
    assert!(sample["seq"].is_u64(), "{sample}");
    // The simulator sends 42 + sin(seq / 10) + noise (0.01).
    let value = sample["value"].as_f64().expect("value is a number");
    assert!((40.9..=43.1).contains(&value), "{sample}");
    let timestamp = sample["timestamp"].as_str().expect("timestamp is a string");
    assert_rfc3339_millis(timestamp);
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn assert_rfc3339_millis(t: &str) {
    let ok = t.len() == 24
        && t.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            19 => b == b'.',
            23 => b == b'Z',
            _ => b.is_ascii_digit(),
        });
    assert!(ok, "not RFC 3339 UTC with milliseconds: {t:?}");
}

/// The `seq` numbers of a `/samples` answer, checking every entry on the way.
async fn recent_seqs(app: &TestApp, limit: usize, device: &str) -> Vec<u64> {
    let (code, body) = app.get_json(&format!("/samples?limit={limit}")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let samples = body["samples"].as_array().expect("samples is an array");
    assert_eq!(u64_at(&body, "/count"), samples.len() as u64, "{body}");
    samples.iter().for_each(|s| assert_sample(s, device));
    let timestamps: Vec<&str> = samples
        .iter()
        .map(|s| s["timestamp"].as_str().unwrap_or_default())
        .collect();
    assert!(
        timestamps.is_sorted(),
        "timestamps must not go backwards: {timestamps:?}"
    );
    samples.iter().map(|s| u64_at(s, "/seq")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_flow_and_are_listed_oldest_first() {
    let app = spawn_app(|s| s.pipeline.workers = Some(1)).await;
    app.wait_processed_above(30).await;

    let seqs = recent_seqs(&app, 20, "sim0").await;
    assert_eq!(seqs.len(), 20);
    // One link session, nothing dropped: consecutive sequence numbers, oldest first.
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "not consecutive and ascending: {seqs:?}"
    );
    let (code, body) = app.get_json("/samples").await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        u64_at(&body, "/count") > 20,
        "default limit returns more: {body}"
    );

    // Once stopped and drained, /status's latest sample is the newest one listed.
    let (code, _) = app.post_json("/stop").await;
    assert_eq!(code, StatusCode::OK);
    let status = wait_drained(&app).await;
    let (_, body) = app.get_json("/samples?limit=1").await;
    assert_eq!(body["samples"][0], status["latest_sample"], "{body}");

    let summary = app.shut_down().await;
    assert!(summary.balanced, "{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_start_works_again_and_again() {
    let app = spawn_app(|s| s.pipeline.workers = Some(1)).await;
    let mut processed = app.wait_processed_above(10).await;

    for cycle in 0..4 {
        let (code, body) = app.post_json("/stop").await;
        assert_eq!(code, StatusCode::OK, "cycle {cycle}: {body}");
        assert_eq!(
            body,
            json!({ "ok": true, "state": "Idle" }),
            "cycle {cycle}"
        );

        // Everything read so far is processed, then nothing more arrives.
        let stopped = wait_drained(&app).await;
        let stopped_processed = u64_at(&stopped, "/metrics/samples_processed");
        assert!(stopped_processed >= processed, "cycle {cycle}");
        tokio::time::sleep(QUIET_WINDOW).await;
        let quiet = app.status().await;
        assert_eq!(quiet["state"], "Idle", "cycle {cycle}");
        assert_eq!(
            u64_at(&quiet, "/metrics/samples_processed"),
            stopped_processed,
            "cycle {cycle}: processed grew while stopped"
        );
        assert_eq!(
            samples_read(&quiet),
            samples_read(&stopped),
            "cycle {cycle}: the device read while stopped"
        );

        let (code, body) = app.post_json("/start").await;
        assert_eq!(code, StatusCode::OK, "cycle {cycle}: {body}");
        assert_eq!(
            body,
            json!({ "ok": true, "state": "Measuring" }),
            "cycle {cycle}"
        );
        processed = app.wait_processed_above(stopped_processed + 10).await;
        assert_eq!(app.status().await["state"], "Measuring", "cycle {cycle}");
    }

    // Repeating a command already in effect is accepted and changes nothing.
    let (code, body) = app.post_json("/start").await;
    assert_eq!(
        (code, &body["state"]),
        (StatusCode::OK, &json!("Measuring"))
    );

    let summary = app.shut_down().await;
    assert!(summary.balanced, "{summary:?}");
    assert!(summary.ledger.processed >= processed, "{summary:?}");
}

/// With several workers, a batch that takes longer than the next one must not make `/samples`
/// list a newer sample before an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_stay_oldest_first_when_one_batch_is_slow() {
    // Seq 5 of the first link session is slow to process (a long GC pause, a busy core).
    let process: ProcessFn = Arc::new(|worker, batch, all| {
        if batch.iter().any(|s| s.seq == Some(5)) {
            std::thread::sleep(Duration::from_millis(300));
        }
        worker.process_into(batch, all)
    });
    let app = spawn_app_with(|s| s.pipeline.workers = Some(2), Some(process)).await;
    app.wait_processed_above(40).await;
    let (code, _) = app.post_json("/stop").await;
    assert_eq!(code, StatusCode::OK);
    wait_drained(&app).await;

    let (_, body) = app.get_json("/samples?limit=1000").await;
    let seqs: Vec<u64> = body["samples"]
        .as_array()
        .expect("samples is an array")
        .iter()
        .map(|s| u64_at(s, "/seq"))
        .collect();
    assert!(
        seqs.is_sorted(),
        "/samples must list samples oldest first, got {seqs:?}"
    );
    app.shut_down().await;
}
