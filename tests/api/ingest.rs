//! `POST /samples` against a bounded buffer: a batch is taken whole without evicting or
//! dropping any sample, under every overflow policy, or refused whole: 413 when it can never
//! fit, 429 with `Retry-After` when it could fit later. Nothing a client was told is accepted
//! is ever dropped for `overflow`, and the ledger balances.

use std::sync::{Arc, Mutex, mpsc};

use reqwest::StatusCode;
use serde_json::{Value, json};
use telemetryhub::buffer::OverflowPolicy;
use telemetryhub::dispatch::ProcessFn;

use crate::accounting::assert_balanced;
use crate::helpers::{DEADLINE, TestApp, json_of, spawn_app, spawn_app_with, wait_until};

const POLICIES: [OverflowPolicy; 3] = [
    OverflowPolicy::DropOldest,
    OverflowPolicy::DropNewest,
    OverflowPolicy::Block,
];

/// `n` valid samples of device `sim0`.
fn batch(n: usize) -> Value {
    (0..n)
        .map(|i| json!({ "device": "sim0", "value": i, "unit": "V" }))
        .collect()
}

/// `POST /samples` with `body`; the status, the `Retry-After` header and the JSON body.
async fn post_samples(app: &TestApp, body: &Value) -> (StatusCode, Option<String>, Value) {
    let response = app.post_samples(body).await;
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let (code, body) = json_of(response).await;
    (code, retry_after, body)
}

/// A processing function that holds every batch until the returned sender is dropped, so the
/// buffer's depth is whatever the test pushed, less the one batch the dispatcher took.
fn gated() -> (ProcessFn, mpsc::Sender<()>) {
    let (open, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let process: ProcessFn = Arc::new(move |worker, batch, all| {
        // Nothing is ever sent: `recv` returns once the sender is dropped.
        let _ = gate.lock().expect("no test panics holding the gate").recv();
        worker.process_into(batch, all)
    });
    (process, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_buffer_is_413_under_every_policy_and_nothing_is_dropped() {
    for policy in POLICIES {
        // The capacity (1,000) is below `ingest_max_samples`: the buffer sets the limit.
        let app = spawn_app(|s| {
            s.http.ingest_max_samples = 10_000;
            s.buffer.overflow = policy;
            s.devices[0].autostart = false;
        })
        .await;
        let (code, retry_after, body) = post_samples(&app, &batch(5_000)).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{policy:?}: {body}");
        assert_eq!(retry_after, None, "{policy:?}: it can never succeed");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("1000") && error.contains("buffer.capacity"),
            "{policy:?}: the message names the limit and the setting: {error}"
        );
        let summary = app.shut_down().await;
        assert_balanced(&summary);
        let l = &summary.ledger;
        assert_eq!((l.ingested, l.dropped.total()), (0, 0), "{policy:?}: {l:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_samples_into_a_buffer_of_one_are_413_not_one_dropped() {
    for policy in POLICIES {
        let app = spawn_app(|s| {
            s.buffer.capacity = 1;
            s.buffer.overflow = policy;
            s.devices[0].autostart = false;
        })
        .await;
        let (code, _, body) = post_samples(&app, &batch(2)).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{policy:?}: {body}");
        let (code, _, body) = post_samples(&app, &batch(1)).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{policy:?}: {body}");
        app.wait_processed_above(0).await;
        let summary = app.shut_down().await;
        assert_balanced(&summary);
        let l = &summary.ledger;
        assert_eq!((l.ingested, l.processed, l.dropped.total()), (1, 1, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_limit_names_ingest_max_samples_when_it_is_the_smaller() {
    let app = spawn_app(|s| {
        s.http.ingest_max_samples = 20;
        s.devices[0].autostart = false;
    })
    .await;
    let (code, _, body) = post_samples(&app, &batch(21)).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("20") && error.contains("http.ingest_max_samples"),
        "{error}"
    );
    let (code, _, body) = post_samples(&app, &batch(20)).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    app.shut_down().await;
}

/// With the worker stage held, a batch that does not fit beside what is queued is refused with
/// 429 saying how much room there is, whatever the policy; a batch that fits is taken; above
/// the high watermark, 429 says so; and a batch that can never fit is still 413, not 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fits_only_later_is_429_and_evicts_nothing() {
    for policy in POLICIES {
        let (process, open) = gated();
        let tweak = |s: &mut telemetryhub::config::Settings| {
            s.buffer.capacity = 100;
            s.buffer.high_watermark = 0.8;
            s.buffer.overflow = policy;
            s.pipeline.workers = Some(1);
            s.pipeline.batch_max = 10;
            s.devices[0].autostart = false;
        };
        let app = spawn_app_with(tweak, Some(process)).await;
        let (code, _, body) = post_samples(&app, &batch(60)).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{policy:?}: {body}");
        // 50 or 60 queued (the dispatcher may have taken its batch of 10): 60 more do not fit.
        let (code, retry_after, body) = post_samples(&app, &batch(60)).await;
        assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "{policy:?}: {body}");
        assert_eq!(retry_after.as_deref(), Some("1"));
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("room") && !error.contains("watermark"),
            "{policy:?}: {error}"
        );
        // 40 fit, and take the depth to the high watermark or above.
        let (code, _, body) = post_samples(&app, &batch(40)).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{policy:?}: {body}");
        let (code, retry_after, body) = post_samples(&app, &batch(1)).await;
        assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "{policy:?}: {body}");
        assert_eq!(retry_after.as_deref(), Some("1"));
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("watermark"), "{policy:?}: {error}");
        // Busy or not, a batch larger than the buffer can never succeed.
        let (code, _, body) = post_samples(&app, &batch(101)).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{policy:?}: {body}");

        drop(open);
        wait_until(DEADLINE, "every accepted sample processed", async || {
            app.processed().await == 100
        })
        .await;
        let summary = app.shut_down().await;
        assert_balanced(&summary);
        let l = &summary.ledger;
        assert_eq!(
            (l.ingested, l.processed, l.dropped.total()),
            (100, 100, 0),
            "{policy:?}: {l:?}"
        );
    }
}
