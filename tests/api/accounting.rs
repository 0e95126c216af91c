//! Sample accounting under overload: while running, no snapshot shows more samples finished
//! than read; after shutdown, every sample read is processed, rejected or dropped.

use std::sync::Arc;
use std::time::Duration;

use telemetryhub::app::Summary;
use telemetryhub::buffer::OverflowPolicy;
use telemetryhub::config::Settings;
use telemetryhub::dispatch::ProcessFn;

use crate::helpers::{DEADLINE, TestApp, spawn_app, spawn_app_with, u64_at, wait_until};

/// Asserts `read + ingested == processed + rejected + dropped + in_buffer + in_flight`.
pub fn assert_balanced(summary: &Summary) {
    let l = &summary.ledger;
    assert_eq!(
        l.read + l.ingested,
        l.processed + l.rejected.total() + l.dropped.total() + l.in_buffer + l.in_flight,
        "{summary:?}"
    );
    assert!(summary.balanced, "{summary:?}");
    assert_eq!(summary.abandoned_in_flight, l.in_flight, "{summary:?}");
}

/// An unpaced device into a buffer of 16 drained by one worker: it overflows all the time.
fn overloaded(s: &mut Settings) {
    s.buffer.capacity = 16;
    s.buffer.overflow = OverflowPolicy::DropNewest;
    s.pipeline.workers = Some(1);
    s.pipeline.batch_max = 8;
    s.devices[0].sample_interval_ms = 0;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_balances_after_an_overloaded_run() {
    let app = spawn_app(overloaded).await;
    let mut status = serde_json::Value::Null;
    wait_until(
        DEADLINE,
        "samples to be processed and dropped",
        async || {
            status = app.status().await;
            u64_at(&status, "/metrics/samples_processed") > 50
                && u64_at(&status, "/metrics/samples_dropped") > 0
        },
    )
    .await;

    let summary = app.shut_down().await;
    assert_balanced(&summary);
    let l = &summary.ledger;
    assert!(l.read > 0 && l.ingested == 0, "{summary:?}");
    assert!(
        l.processed >= u64_at(&status, "/metrics/samples_processed"),
        "{summary:?}"
    );
    assert!(
        l.dropped.overflow >= u64_at(&status, "/metrics/samples_dropped"),
        "{summary:?}"
    );
    assert_eq!((l.in_buffer, l.in_flight), (0, 0), "drained: {summary:?}");
    assert_eq!(l.pushed, l.popped, "{summary:?}");
    assert_eq!(l.rejected.total(), 0, "{summary:?}");
}

/// Takes `/status` snapshots while the pipeline runs and checks each one: samples can only be
/// processed or dropped after they were read, so no snapshot may show more finished than the
/// devices' `samples_read`. (`/status` reads the ledger first, then each device's counters.)
async fn assert_snapshots_never_overshoot(app: &TestApp, snapshots: usize) {
    let (mut last_processed, mut last_dropped) = (0, 0);
    for i in 0..snapshots {
        let status = app.status().await;
        let processed = u64_at(&status, "/metrics/samples_processed");
        let dropped = u64_at(&status, "/metrics/samples_dropped");
        let read: u64 = status["devices"]
            .as_array()
            .expect("devices is an array")
            .iter()
            .map(|d| u64_at(d, "/samples_read"))
            .sum();
        assert!(
            processed + dropped <= read,
            "snapshot {i}: processed {processed} + dropped {dropped} > read {read}: {status}"
        );
        assert!(u64_at(&status, "/metrics/queue_depth") <= 16, "{status}");
        assert!(
            processed >= last_processed && dropped >= last_dropped,
            "{status}"
        );
        (last_processed, last_dropped) = (processed, dropped);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_status_snapshot_shows_more_finished_than_read_when_dropping() {
    let app = spawn_app(overloaded).await;
    app.wait_processed_above(0).await;
    assert_snapshots_never_overshoot(&app, 300).await;
    assert!(app.status().await["metrics"]["samples_dropped"].as_u64() > Some(0));
    assert_balanced(&app.shut_down().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_status_snapshot_shows_more_finished_than_read_when_blocking() {
    // A slow worker: the device waits for room in the middle of pushing a chunk of frames.
    let slow: ProcessFn = Arc::new(|worker, batch, all| {
        std::thread::sleep(Duration::from_millis(20));
        worker.process_into(batch, all)
    });
    let block = |s: &mut Settings| {
        overloaded(s);
        s.buffer.overflow = OverflowPolicy::Block;
    };
    let app = spawn_app_with(block, Some(slow)).await;
    app.wait_processed_above(0).await;
    assert_snapshots_never_overshoot(&app, 30).await;
    let summary = app.shut_down().await;
    assert_balanced(&summary);
    assert_eq!(summary.ledger.dropped.overflow, 0, "{summary:?}");
}
