//! `GET /metrics`: Prometheus text with every documented family, typed and labelled as
//! documented, agreeing with `/status`; and the C++ original's JSON with
//! `Accept: application/json`.
//!
//! The recorder is global to the process and `cargo test` runs several apps in it, so these
//! tests use their own device ids and compare with `>=`.

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE};

use crate::helpers::{Scrape, f64_at, fast_device, json_of, spawn_app, u64_at};

/// Asserts that `family` is a histogram with consistent buckets, sum and count; returns count.
fn assert_histogram(scrape: &Scrape, family: &str) -> f64 {
    assert_eq!(scrape.type_of(family), Some("histogram"), "{family}");
    let buckets = scrape.find(&format!("{family}_bucket"), &[]);
    assert!(buckets.len() > 1, "{family} has buckets");
    let mut last = 0.0;
    for bucket in &buckets {
        assert!(bucket.labels.contains_key("le"), "{bucket:?}");
        assert!(bucket.value >= last, "buckets are cumulative: {buckets:?}");
        last = bucket.value;
    }
    let count = scrape.value(&format!("{family}_count"), &[]);
    assert_eq!(
        scrape.value(&format!("{family}_bucket"), &[("le", "+Inf")]),
        count
    );
    assert!(scrape.value(&format!("{family}_sum"), &[]) >= 0.0);
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrape_has_every_documented_family() {
    const ID: &str = "metrics-prom";
    let app = spawn_app(|s| s.devices = vec![fast_device(ID)]).await;
    app.wait_processed_above(5).await;
    // A request on a route with a path parameter, to see how it is labelled.
    let (code, _) = app.get_json(&format!("/devices/{ID}")).await;
    assert_eq!(code, StatusCode::OK);
    let status = app.status().await;
    let processed_before = u64_at(&status, "/metrics/samples_processed");

    let response = app.get("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.expect("the scrape has a body");
    let scrape = Scrape::parse(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));

    let processed = "telemetryhub_samples_processed_total";
    assert_eq!(scrape.type_of(processed), Some("counter"));
    assert!(scrape.help.contains_key(processed));
    assert!(scrape.value(processed, &[]) >= processed_before as f64);

    let dropped = "telemetryhub_buffer_dropped_total";
    assert_eq!(scrape.type_of(dropped), Some("counter"));
    for reason in ["overflow", "shutdown", "stopped", "worker_panic"] {
        assert!(scrape.value(dropped, &[("reason", reason)]) >= 0.0);
    }
    let rejected = "telemetryhub_samples_rejected_total";
    assert_eq!(scrape.type_of(rejected), Some("counter"));
    for reason in ["non_finite", "out_of_range", "calibration_overflow"] {
        assert!(scrape.value(rejected, &[("reason", reason)]) >= 0.0);
    }

    assert_eq!(scrape.type_of("telemetryhub_buffer_depth"), Some("gauge"));
    assert!(scrape.value("telemetryhub_buffer_depth", &[]) >= 0.0);
    assert_eq!(
        scrape.type_of("telemetryhub_buffer_capacity"),
        Some("gauge")
    );
    // Every app that scrapes in this test binary keeps the default capacity.
    assert_eq!(scrape.value("telemetryhub_buffer_capacity", &[]), 1000.0);

    let invalid = "telemetryhub_frames_invalid_total";
    assert_eq!(scrape.type_of(invalid), Some("counter"));
    for reason in ["checksum", "syntax", "too_long"] {
        let value = scrape.value(invalid, &[("device", ID), ("reason", reason)]);
        assert_eq!(value, 0.0, "a clean link has no {reason} frames");
    }

    let state = "telemetryhub_device_state";
    assert_eq!(scrape.type_of(state), Some("gauge"));
    let states = scrape.find(state, &[("device", ID)]);
    assert_eq!(states.len(), 4, "one series per state: {states:?}");
    let current: Vec<&str> = states
        .iter()
        .filter(|s| s.value == 1.0)
        .map(|s| s.labels["state"].as_str())
        .collect();
    assert_eq!(
        current,
        [status["devices"][0]["state"].as_str().unwrap_or("?")]
    );
    assert!(states.iter().all(|s| s.value == 0.0 || s.value == 1.0));

    assert!(assert_histogram(&scrape, "telemetryhub_processing_duration_seconds") > 0.0);

    let http = "telemetryhub_http_requests_total";
    assert_eq!(scrape.type_of(http), Some("counter"));
    let by_id = scrape.find(
        http,
        &[
            ("method", "GET"),
            ("route", "/devices/{id}"),
            ("status", "200"),
        ],
    );
    assert!(by_id.len() == 1 && by_id[0].value >= 1.0, "{by_id:?}");
    let status_route = scrape.value(
        http,
        &[("method", "GET"), ("route", "/status"), ("status", "200")],
    );
    assert!(status_route >= 2.0, "{status_route}");
    for sample in scrape.find(http, &[]) {
        let route = &sample.labels["route"];
        assert!(!route.contains(ID), "raw path as a label: {sample:?}");
    }

    let build = "telemetryhub_build_info";
    assert_eq!(scrape.type_of(build), Some("gauge"));
    assert_eq!(
        scrape.value(build, &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_are_labelled_without_their_path() {
    let app = spawn_app(|s| s.devices = vec![fast_device("metrics-unmatched")]).await;
    let path = "/no-such-route-metrics-test";
    let response = app.get(path).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let scrape = app.scrape().await;
    let http = "telemetryhub_http_requests_total";
    let unmatched = scrape.find(http, &[("method", "GET"), ("status", "404")]);
    assert!(!unmatched.is_empty(), "the 404 was counted");
    for sample in scrape.find(http, &[]) {
        assert!(
            !sample.labels["route"].contains("no-such-route"),
            "raw path as a label: {sample:?}"
        );
    }
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_json_has_the_original_shape_with_real_values() {
    let app = spawn_app(|s| {
        s.pipeline.workers = Some(2);
        s.devices = vec![fast_device("metrics-json")];
    })
    .await;
    let before = app.wait_processed_above(5).await;
    let response = app
        .client
        .get(app.url("/metrics"))
        .header(ACCEPT, "application/json")
        .send()
        .await
        .expect("GET /metrics");
    let (code, body) = json_of(response).await;
    assert_eq!(code, StatusCode::OK, "{body}");

    let mut keys: Vec<&str> = body
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "latency_p99_ms",
            "queue_depth",
            "samples_dropped",
            "samples_processed",
            "thread_pool",
            "uptime_seconds"
        ]
    );
    assert!(u64_at(&body, "/samples_processed") >= before, "{body}");
    assert_eq!(u64_at(&body, "/samples_dropped"), 0, "{body}");
    assert!(u64_at(&body, "/queue_depth") <= 1000, "{body}");
    assert!(body["uptime_seconds"].is_u64(), "{body}");
    let p99 = f64_at(&body, "/latency_p99_ms");
    assert!(p99.is_finite() && p99 > 0.0, "{body}");

    let pool = &body["thread_pool"];
    assert!(u64_at(pool, "/jobs_processed") > 0, "{body}");
    assert!(pool["jobs_queued"].is_u64(), "{body}");
    assert_eq!(u64_at(pool, "/num_threads"), 2, "{body}");
    let avg = f64_at(pool, "/avg_processing_ms");
    assert!(avg.is_finite() && avg >= 0.0, "{body}");
    app.shut_down().await;
}
