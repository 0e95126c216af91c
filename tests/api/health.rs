//! Liveness and readiness, and what shutdown does to them: `/readyz` turns 503 as soon as
//! shutdown begins while the server keeps answering during the drain; what the grace period
//! leaves in the buffer is counted as dropped for `shutdown`.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use telemetryhub::buffer::OverflowPolicy;
use telemetryhub::config::Settings;
use telemetryhub::dispatch::ProcessFn;

use crate::accounting::assert_balanced;
use crate::helpers::{DEADLINE, fast_device, spawn_app, spawn_app_with, wait_until};

/// A processing function that takes `per_batch` for every batch.
fn slow(per_batch: Duration) -> ProcessFn {
    Arc::new(move |worker, batch, all| {
        std::thread::sleep(per_batch);
        worker.process_into(batch, all)
    })
}

/// A backlogged pipeline: an unpaced device, one slow worker taking one sample at a time.
fn backlogged(s: &mut Settings) {
    s.buffer.capacity = 20;
    s.buffer.overflow = OverflowPolicy::DropNewest;
    s.pipeline.workers = Some(1);
    s.pipeline.batch_max = 1;
    s.devices[0].sample_interval_ms = 0;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer_while_running() {
    let app = spawn_app(|_| {}).await;
    let (code, body) = app.get_json("/healthz").await;
    assert_eq!((code, &body["status"]), (StatusCode::OK, &"ok".into()));
    let (code, body) = app.get_json("/readyz").await;
    assert_eq!((code, &body["status"]), (StatusCode::OK, &"ready".into()));
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_buffer_drains() {
    // 20 queued samples at 80 ms each: more than a second of draining.
    let app = spawn_app_with(backlogged, Some(slow(Duration::from_millis(80)))).await;
    wait_until(DEADLINE, "the buffer to fill", async || {
        app.status().await["metrics"]["queue_depth"] == 20
    })
    .await;

    app.shutdown.cancel();
    wait_until(DEADLINE, "/readyz to turn 503", async || {
        let (code, body) = app.get_json("/readyz").await;
        assert!(
            body["error"].is_string() || code == StatusCode::OK,
            "{body}"
        );
        code == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    // Still draining, and still serving everything else.
    let (code, _) = app.get_json("/healthz").await;
    assert_eq!(code, StatusCode::OK);
    let status = app.status().await;
    assert!(
        status["metrics"]["queue_depth"].as_u64() > Some(0),
        "the drain should still be running: {status}"
    );

    let summary = tokio::time::timeout(Duration::from_secs(30), app.handle)
        .await
        .expect("the drain finishes")
        .expect("the app does not panic");
    assert_balanced(&summary);
    let l = &summary.ledger;
    // A 5 s grace drains the 20 queued samples: nothing is abandoned in the buffer.
    assert_eq!((l.pushed, l.processed), (l.popped, l.popped), "{summary:?}");
    assert_eq!((l.in_buffer, l.in_flight), (0, 0), "{summary:?}");
}

/// A device that has read a chunk of frames when shutdown begins hands it to the buffer if
/// there is room: only a push that would have to wait gives up. So with room in the buffer and
/// a generous grace period, nothing is dropped for `shutdown`. Shutdown races the devices, so
/// several short runs with several fast devices make the race likely to be hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generous_grace_period_drops_nothing_for_shutdown() {
    for run in 0..10 {
        let app = spawn_app(|s| {
            s.buffer.overflow = OverflowPolicy::DropNewest;
            s.devices = (0..3)
                .map(|i| {
                    let mut device = fast_device(&format!("grace{i}"));
                    device.sample_interval_ms = 0;
                    device
                })
                .collect();
        })
        .await;
        app.wait_processed_above(1000).await;
        let summary = app.shut_down().await;
        assert_balanced(&summary);
        assert_eq!(
            summary.ledger.dropped.shutdown, 0,
            "run {run}: samples read before shutdown were thrown away: {summary:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_left_after_the_grace_period_count_as_dropped() {
    let app = spawn_app_with(
        |s| {
            backlogged(s);
            s.pipeline.shutdown_grace_ms = 100;
        },
        Some(slow(Duration::from_millis(100))),
    )
    .await;
    wait_until(DEADLINE, "the buffer to fill", async || {
        app.status().await["metrics"]["queue_depth"] == 20
    })
    .await;

    let summary = app.shut_down().await;
    assert_balanced(&summary);
    let l = &summary.ledger;
    assert!(l.dropped.shutdown > 0, "{summary:?}");
    assert_eq!((l.in_buffer, l.in_flight), (0, 0), "{summary:?}");
    assert!(summary.drain_seconds < 5.0, "{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_a_measuring_device_is_stale_and_recovers() {
    // The simulator stalls for 1.5 s before every frame; the device's read timeout is longer,
    // so it stays Measuring, but after 300 ms without a frame it is stale.
    let app = spawn_app(|s| {
        let device = &mut s.devices[0];
        device.simulator.stall_rate = 1.0;
        device.simulator.stall_ms = 1_500;
        device.read_timeout_ms = Some(10_000);
        device.stale_after_ms = Some(300);
    })
    .await;
    wait_until(DEADLINE, "/readyz to report the stale device", async || {
        app.get_json("/readyz").await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let (_, body) = app.get_json("/readyz?verbose").await;
    assert_eq!(body["status"], "not_ready", "{body}");
    let check = &body["checks"][1];
    assert_eq!(
        (&check["check"], &check["ok"]),
        (&"device:sim0".into(), &false.into()),
        "{body}"
    );
    assert_eq!(check["state"], "Measuring", "{body}");
    assert!(
        check["ms_since_valid_frame"].as_u64().unwrap() > 300,
        "{body}"
    );
    // The next frame arrives and the gateway is ready again.
    wait_until(DEADLINE, "/readyz to recover after a frame", async || {
        app.get_json("/readyz").await.0 == StatusCode::OK
    })
    .await;
    // A stopped device is not stale: Idle on purpose is ready.
    app.post_json("/stop").await;
    wait_until(DEADLINE, "/readyz with the device stopped", async || {
        app.get_json("/readyz").await.0 == StatusCode::OK
    })
    .await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_every_device_is_in_safe_state() {
    let app = spawn_app(|s| {
        let device = &mut s.devices[0];
        device.simulator.disconnect_rate = 1.0;
        device.failure_threshold = 2;
        device.backoff_initial_ms = 5;
        device.backoff_max_ms = 10;
    })
    .await;
    app.wait_state("SafeState").await;
    let (code, body) = app.get_json("/readyz").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "every device is in SafeState", "{body}");
    // The checks are only listed on request.
    assert!(body.get("checks").is_none(), "{body}");
    app.shut_down().await;
}
