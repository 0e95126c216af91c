//! Injected link faults are counted where operators look: corrupted frames appear as
//! `frames_invalid.checksum` in `/devices/{id}` and in `/metrics`, and valid frames still flow.

use serde_json::Value;

use crate::helpers::{DEADLINE, fast_device, spawn_app, u64_at, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_frames_are_counted_as_invalid_checksums() {
    // Its own device id: the Prometheus recorder is shared by every app in this process.
    const ID: &str = "faults-corrupt";
    let app = spawn_app(|s| {
        let mut device = fast_device(ID);
        device.simulator.corrupt_rate = 0.5;
        device.simulator.seed = 42;
        s.devices = vec![device];
    })
    .await;
    let mut device = Value::Null;
    wait_until(DEADLINE, "corrupted frames to be counted", async || {
        device = app.device(ID).await;
        u64_at(&device, "/frames_invalid/checksum") >= 5 && u64_at(&device, "/samples_read") >= 5
    })
    .await;
    assert_eq!(
        device["state"], "Measuring",
        "bad frames are not link failures"
    );
    assert_eq!(u64_at(&device, "/frames_invalid/too_long"), 0, "{device}");
    let checksum = u64_at(&device, "/frames_invalid/checksum");
    // A corrupted sequence number still has to pass the checksum, so gaps follow skipped frames.
    assert!(u64_at(&device, "/seq_gaps") > 0, "{device}");

    let scrape = app.scrape().await;
    assert_eq!(
        scrape.type_of("telemetryhub_frames_invalid_total"),
        Some("counter")
    );
    let scraped = scrape.value(
        "telemetryhub_frames_invalid_total",
        &[("device", ID), ("reason", "checksum")],
    );
    assert!(scraped >= checksum as f64, "{scraped} < {checksum}");
    let too_long = scrape.value(
        "telemetryhub_frames_invalid_total",
        &[("device", ID), ("reason", "too_long")],
    );
    assert_eq!(too_long, 0.0);
    app.shut_down().await;
}
