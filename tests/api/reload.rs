//! Live reload: `POST /-/reload` and `SIGHUP` re-read the config file and apply it whole or not
//! at all, without a restart and without losing a sample; devices a reload does not touch keep
//! their tasks, and what needs a restart is named and left as it runs.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use telemetryhub::app::App;
use telemetryhub::config::ConfigSource;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Subscriber};
use crate::helpers::{
    Binary, DEADLINE, TestApp, assert_stats_balanced, client, json_of, raw_exchange, temp_path,
    u64_at, wait_until,
};

/// One simulated device in a test config: id, interval, calibration scale.
#[derive(Clone, Copy)]
struct Dev(&'static str, u64, f64);

/// A config file with these devices, then `extra` TOML (top-level tables).
fn config(devices: &[Dev], extra: &str) -> String {
    let mut text = String::from("[pipeline]\nshutdown_grace_ms = 5000\n\n");
    text.push_str(extra);
    text.push('\n');
    for Dev(id, interval, scale) in devices {
        text.push_str(&format!(
            "[[devices]]\nid = \"{id}\"\nsample_interval_ms = {interval}\nscale = {scale:?}\n\
             [devices.simulator]\nseed = 7\n\n"
        ));
    }
    text
}

/// A gateway started from a config file, as the binary starts, with live reload on.
async fn spawn_from_file(text: &str) -> (TestApp, PathBuf) {
    let path = temp_path("reload.toml");
    std::fs::write(&path, text).expect("the temp dir is writable");
    let source = ConfigSource {
        listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        ..ConfigSource::new(Some(path.clone()), std::iter::empty())
    };
    let settings = source.load().expect("the test config is valid");
    let app = App::build(settings)
        .await
        .expect("binding 127.0.0.1:0 succeeds")
        .with_reload(source, None);
    let addr = app.local_addr();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    let app = TestApp {
        addr,
        client: client(),
        shutdown,
        handle,
    };
    (app, path)
}

/// Rewrites the config and asks for a reload, with `token` if given.
async fn reload_with(
    app: &TestApp,
    path: &Path,
    text: &str,
    token: Option<&str>,
) -> (StatusCode, Value) {
    std::fs::write(path, text).expect("the temp dir is writable");
    let mut request = app.client.post(app.url("/-/reload"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    json_of(request.send().await.expect("POST /-/reload answers")).await
}

async fn reload(app: &TestApp, path: &Path, text: &str) -> (StatusCode, Value) {
    reload_with(app, path, text, None).await
}

/// The ids `GET /devices` lists, in order.
async fn device_ids(app: &TestApp) -> Vec<String> {
    let (code, body) = app.get_json("/devices").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body["devices"]
        .as_array()
        .expect("a device list")
        .iter()
        .map(|d| d["id"].as_str().expect("an id").to_owned())
        .collect()
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{value} is not an array"))
        .iter()
        .map(|v| v.as_str().expect("a string"))
        .collect()
}

/// `telemetryhub validate` on `path`: its stderr.
fn validate_message(path: &Path) -> String {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_telemetryhub"));
    command.arg("--config").arg(path).arg("validate");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TELEMETRYHUB") {
            command.env_remove(key);
        }
    }
    let output = command.output().expect("the binary runs");
    assert_eq!(
        output.status.code(),
        Some(2),
        "validate must refuse the file"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits until a processed sample of `device` has a value in `range` (calibration applied).
async fn wait_for_value(app: &TestApp, device: &str, range: std::ops::RangeInclusive<f64>) {
    wait_until(
        DEADLINE,
        &format!("a sample of {device} in {range:?}"),
        async || {
            let (_, body) = app.get_json("/samples?limit=1000").await;
            body["samples"].as_array().is_some_and(|samples| {
                samples.iter().any(|s| {
                    s["device"] == device && s["value"].as_f64().is_some_and(|v| range.contains(&v))
                })
            })
        },
    )
    .await;
}

#[tokio::test]
async fn a_reload_adds_removes_restarts_and_recalibrates_devices_and_leaves_the_others_alone() {
    let v1 = [
        Dev("keep", 10, 1.0),
        Dev("gone", 10, 1.0),
        Dev("changed", 10, 1.0),
        Dev("recal", 10, 1.0),
    ];
    let (app, path) = spawn_from_file(&config(&v1, "")).await;
    wait_until(DEADLINE, "every device has read 50 samples", async || {
        let (_, body) = app.get_json("/devices").await;
        body["devices"]
            .as_array()
            .is_some_and(|ds| ds.iter().all(|d| d["samples_read"].as_u64() >= Some(50)))
    })
    .await;
    let keep_before = app.device("keep").await;
    let recal_before = app.device("recal").await;
    let changed_before = u64_at(&app.device("changed").await, "/samples_read");

    let v2 = [
        Dev("keep", 10, 1.0),
        Dev("changed", 200, 1.0),
        Dev("recal", 10, 2.0),
        Dev("new", 10, 1.0),
    ];
    let (code, report) = reload(&app, &path, &config(&v2, "")).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    let devices = &report["devices"];
    assert_eq!(strings(&devices["added"]), ["new"], "{report}");
    assert_eq!(strings(&devices["removed"]), ["gone"], "{report}");
    assert_eq!(strings(&devices["restarted"]), ["changed"], "{report}");
    assert_eq!(strings(&devices["recalibrated"]), ["recal"], "{report}");
    assert_eq!(strings(&devices["unchanged"]), ["keep"], "{report}");
    assert_eq!(strings(&report["restart_required"]), Vec::<&str>::new());
    assert_eq!(strings(&report["applied"]), ["devices"], "{report}");

    assert_eq!(device_ids(&app).await, ["keep", "changed", "recal", "new"]);
    let (code, _) = app.get_json("/devices/gone").await;
    assert_eq!(code, StatusCode::NOT_FOUND, "a removed device is gone");
    // The changed device runs a new task: its counters started again (it sends every 200 ms
    // now, far slower than it had read before).
    let changed_after = u64_at(&app.device("changed").await, "/samples_read");
    assert!(
        changed_after < changed_before,
        "{changed_after} vs {changed_before}"
    );
    // The untouched and the recalibrated devices kept their tasks: counters and statistics
    // continue, the link never failed or reconnected.
    for (id, before) in [("keep", &keep_before), ("recal", &recal_before)] {
        let after = app.device(id).await;
        assert!(
            u64_at(&after, "/samples_read") >= u64_at(before, "/samples_read"),
            "{id}: {before} then {after}"
        );
        assert_eq!(after["link_failures"], before["link_failures"], "{id}");
        assert_eq!(after["seq_gaps"], 0, "{id}: {after}");
        assert_eq!(after["state"], "Measuring", "{id}: {after}");
    }
    // The new calibration applies to what the workers process next: the simulator sends
    // 42 +- 1, so 82 to 86 once scaled by 2.
    wait_for_value(&app, "recal", 82.0..=86.0).await;
    wait_until(DEADLINE, "the new device reads", async || {
        u64_at(&app.device("new").await, "/samples_read") > 0
    })
    .await;

    let summary = app.shut_down().await;
    assert!(summary.balanced, "{summary:?}");
    assert_eq!(summary.ledger.dropped.total(), 0, "{summary:?}");
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn an_invalid_file_changes_nothing_and_answers_400_with_the_validate_message() {
    let v1 = [Dev("keep", 10, 1.0), Dev("other", 10, 1.0)];
    let good = config(&v1, "[http]\ningest_max_samples = 5\n");
    let (app, path) = spawn_from_file(&good).await;
    app.wait_processed_above(20).await;
    let before = app.device("keep").await;

    // Valid changes (a new device, a new token, another limit) next to one bad key: none of
    // them may apply.
    let bad = config(
        &[
            Dev("keep", 10, 1.0),
            Dev("other", 10, 1.0),
            Dev("added", 10, 1.0),
        ],
        "[http]\ningest_max_samples = 50\napi_token = \"s3cret\"\n\
         [buffer]\nhigh_watermark = 1.5\n",
    );
    let (code, body) = reload(&app, &path, &bad).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    let error = body["error"].as_str().expect("an error message");
    assert!(error.contains("buffer.high_watermark"), "{error}");
    let validate = validate_message(&path);
    assert!(
        validate.contains(&format!("configuration error: {error}")),
        "the 400 says what validate says:\n{error}\n{validate}"
    );

    assert_eq!(device_ids(&app).await, ["keep", "other"]);
    let after = app.device("keep").await;
    assert!(u64_at(&after, "/samples_read") >= u64_at(&before, "/samples_read"));
    // No token came into force, and the old sample limit still holds.
    let samples: Vec<Value> = (0..6)
        .map(|i| json!({"device": "keep", "value": f64::from(i), "unit": "arb.units"}))
        .collect();
    let response = app.post_samples(&samples).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (code, body) = app.post_json("/stop").await;
    assert_eq!(code, StatusCode::OK, "no token is needed yet: {body}");

    // A syntax error is refused the same way.
    let (code, body) = reload(&app, &path, "[[devices]\nid = ").await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not valid TOML"),
        "{body}"
    );
    assert_eq!(device_ids(&app).await, ["keep", "other"]);

    // Fixed, the same file applies whole.
    let fixed = bad.replace("high_watermark = 1.5", "high_watermark = 0.5");
    let (code, report) = reload(&app, &path, &fixed).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    assert_eq!(device_ids(&app).await, ["keep", "other", "added"]);
    let (code, _) = app.post_json("/start").await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "the new token is in force");
    app.shut_down().await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn http_limits_token_and_hosts_apply_live_and_restart_only_keys_are_named_and_kept() {
    let devices = [Dev("sim0", 10, 1.0)];
    let (app, path) = spawn_from_file(&config(&devices, "")).await;
    let capacity = u64_at(&app.status().await, "/metrics/queue_capacity");

    let v2 = config(
        &devices,
        "[http]\napi_token = \"s3cret\"\ningest_max_samples = 2\nbody_limit_bytes = 300\n\
         allowed_hosts = [\"gateway.example\"]\nheader_read_timeout_ms = 200\n\
         [buffer]\ncapacity = 77\n[log]\nlevel = \"debug\"\nformat = \"json\"\n",
    );
    let (code, report) = reload(&app, &path, &v2).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    assert_eq!(
        strings(&report["restart_required"]),
        ["log.format", "buffer.capacity"],
        "{report}"
    );
    // This gateway did not install the log subscriber (the test binary's tracing is its
    // own), so log.level cannot apply: the report says so rather than listing it as applied.
    assert_eq!(strings(&report["applied"]), ["http"], "{report}");
    assert!(
        strings(&report["notes"])
            .iter()
            .any(|n| n.starts_with("log.level not applied")),
        "{report}"
    );
    // Still running with the capacity it had (`http.listen` is covered by a unit test: here
    // the command line's `--listen` wins over the file, as it does in the binary).
    assert_eq!(
        u64_at(&app.status().await, "/metrics/queue_capacity"),
        capacity
    );
    // The token is in force, for the reload route too.
    let (code, _) = app.post_json("/stop").await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _) = reload(&app, &path, &v2).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    // The sample limit and the body limit are the new ones.
    let post = |body: String| {
        app.client
            .post(app.url("/samples"))
            .bearer_auth("s3cret")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let three = json!([
        {"device": "sim0", "value": 1.0, "unit": "arb.units"},
        {"device": "sim0", "value": 2.0, "unit": "arb.units"},
        {"device": "sim0", "value": 3.0, "unit": "arb.units"},
    ]);
    let (code, body) = json_of(post(three.to_string()).await.expect("answers")).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("http.ingest_max_samples")
    );
    let padded = format!("[{}]", " ".repeat(400));
    let response = post(padded).await.expect("answers");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A new connection gets the new header-read timeout (the old one was 10 s).
    let half_sent = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    let reply = raw_exchange(app.addr, half_sent, Duration::from_secs(5)).await;
    assert!(reply.closed, "the half-sent request is cut off: {reply:?}");
    // A browser page under the newly allowed host may post.
    let response = app
        .client
        .post(app.url("/stop"))
        .bearer_auth("s3cret")
        .header("host", "gateway.example")
        .header("origin", "http://gateway.example")
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::OK);

    // protect_reads and a new token: reads need it now.
    let v3 = config(
        &devices,
        "[http]\napi_token = \"other\"\nprotect_reads = true\n",
    );
    let (code, report) = reload_with(&app, &path, &v3, Some("s3cret")).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    let (code, _) = app.get_json("/status").await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let response = app
        .client
        .get(app.url("/status"))
        .bearer_auth("other")
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::OK);
    app.shut_down().await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn concurrent_reloads_are_serialized() {
    let (app, path) = spawn_from_file(&config(&[Dev("keep", 10, 1.0)], "")).await;
    std::fs::write(
        &path,
        config(&[Dev("keep", 10, 1.0), Dev("new", 10, 1.0)], ""),
    )
    .expect("writable");
    let requests = (0..8).map(|_| async {
        let response = app
            .client
            .post(app.url("/-/reload"))
            .send()
            .await
            .expect("POST /-/reload answers");
        json_of(response).await
    });
    let reports = futures_util::future::join_all(requests).await;
    let mut added = 0;
    for (code, report) in &reports {
        assert_eq!(*code, StatusCode::OK, "{report}");
        match strings(&report["devices"]["added"]).as_slice() {
            [] => assert_eq!(strings(&report["devices"]["unchanged"]), ["keep", "new"]),
            ["new"] => added += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(added, 1, "exactly one reload added the device: {reports:?}");
    assert_eq!(device_ids(&app).await, ["keep", "new"]);
    app.shut_down().await;
    let _ = std::fs::remove_file(path);
}

/// Posts batches of `n` samples for `device` until `stop`; counts the samples answered 202.
async fn ingest_until(app: &TestApp, device: &str, n: usize, stop: &AtomicBool) -> u64 {
    let body: Vec<Value> = (0..n)
        .map(|i| json!({"device": device, "value": i as f64, "unit": "arb.units"}))
        .collect();
    let body = serde_json::to_string(&body).expect("serialises");
    let mut accepted = 0;
    while !stop.load(Ordering::Relaxed) {
        let response = app
            .client
            .post(app.url("/samples"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("POST /samples answers");
        match response.status() {
            StatusCode::ACCEPTED => accepted += n as u64,
            StatusCode::TOO_MANY_REQUESTS => tokio::time::sleep(Duration::from_millis(5)).await,
            other => panic!("POST /samples answered {other}"),
        }
    }
    accepted
}

#[tokio::test]
async fn fifty_reloads_under_load_lose_no_sample_and_each_applies_whole_or_not_at_all() {
    // A small `block` buffer: it fills under this load, so a device a reload retires is often
    // waiting for room, and a sample lost on the way would be counted (not hidden by a buffer
    // too large to ever fill).
    const EXTRA: &str = "[buffer]\ncapacity = 64\noverflow = \"block\"\n";
    let a = [Dev("keep", 1, 1.0), Dev("a", 2, 1.0), Dev("c", 5, 1.0)];
    let b = [Dev("keep", 1, 1.0), Dev("c", 5, 2.0), Dev("b", 2, 1.0)];
    let c = [
        Dev("keep", 1, 1.0),
        Dev("a", 2, 1.0),
        Dev("c", 3, 1.0),
        Dev("b", 2, 1.0),
    ];
    let units = "[processing.units]\n\"arb.units\" = { min = -5000.0, max = 5000.0 }\n";
    // Each file with the `POST /samples` limit it sets (the refused ones set one too: it must
    // not come into force).
    let http = |limit: usize| format!("[http]\ningest_max_samples = {limit}\n");
    let versions: [(Option<&[Dev]>, usize, String); 5] = [
        (Some(&a), 40, config(&a, &format!("{EXTRA}{}", http(40)))),
        (
            Some(&b),
            41,
            config(&b, &format!("{EXTRA}{}{units}", http(41))),
        ),
        (
            None,
            42,
            config(&c, &format!("{EXTRA}{}request_timeout_ms = 0\n", http(42))),
        ),
        (Some(&c), 43, config(&c, &format!("{EXTRA}{}", http(43)))),
        (
            None,
            44,
            config(
                &b,
                &format!("{EXTRA}{}[[devices]]\nid = \"x\"\nbogus = 1\n", http(44)),
            ),
        ),
    ];
    let (app, path) = spawn_from_file(&versions[0].2).await;
    app.wait_processed_above(100).await;
    let app = Arc::new(app);
    let stop = Arc::new(AtomicBool::new(false));
    let posters: Vec<_> = (0..2)
        .map(|_| {
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move { ingest_until(&app, "keep", 20, &stop).await })
        })
        .collect();

    let mut expected: Vec<&str> = a.iter().map(|d| d.0).collect();
    let mut limit = versions[0].1;
    let mut keep_read = 0;
    for i in 0..50 {
        let (devices, file_limit, text) = &versions[(i + 1) % versions.len()];
        let (code, body) = reload(&app, &path, text).await;
        match devices {
            Some(devices) => {
                assert_eq!(code, StatusCode::OK, "reload {i}: {body}");
                expected = devices.iter().map(|d| d.0).collect();
                limit = *file_limit;
            }
            None => {
                assert_eq!(code, StatusCode::BAD_REQUEST, "reload {i}: {body}");
                let error = body["error"].as_str().unwrap_or_default();
                assert!(
                    error.contains("http.request_timeout_ms") || error.contains("bogus"),
                    "reload {i}: the error names the key: {error}"
                );
            }
        }
        // Samples keep flowing between reloads, so every reload happens under load.
        let processed = app.processed().await;
        app.wait_processed_above(processed).await;
        // Applied whole, or not at all: the devices and the `POST /samples` limit are exactly
        // those of the last good file.
        assert_eq!(device_ids(&app).await, expected, "after reload {i}");
        assert_eq!(
            ingest_limit(&app, limit).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "after reload {i}: a POST over the limit {limit} is refused"
        );
        let read = u64_at(&app.device("keep").await, "/samples_read");
        assert!(
            read >= keep_read,
            "keep's counters never reset: {keep_read} then {read}"
        );
        keep_read = read;
    }
    let keep = app.device("keep").await;
    assert_eq!(keep["link_failures"]["closed"], 0, "{keep}");
    assert_eq!(keep["link_failures"]["connect"], 0, "{keep}");
    stop.store(true, Ordering::Relaxed);
    let mut accepted = 0;
    for poster in posters {
        accepted += poster.await.expect("the poster does not panic");
    }
    assert!(accepted > 0, "HTTP traffic flowed during the reloads");
    let app = Arc::into_inner(app).expect("the posters are done");
    let summary = app.shut_down().await;
    let ledger = &summary.ledger;
    eprintln!("accepted {accepted}; {summary:?}");
    assert!(summary.balanced, "{summary:?}");
    assert_eq!(
        ledger.ingested, accepted,
        "every 202 is in the ledger: {summary:?}"
    );
    // Shutdown may drop what waits for room in the full buffer when the devices stop; the
    // reloads drop nothing.
    let shutdown = ledger
        .dropped
        .get(telemetryhub::ledger::DropReason::Shutdown);
    assert_eq!(
        ledger.dropped.total() - shutdown,
        0,
        "no sample dropped: {summary:?}"
    );
    assert_eq!(
        ledger.read + ledger.ingested,
        ledger.processed + ledger.rejected.total() + shutdown,
        "{summary:?}"
    );
    let _ = std::fs::remove_file(path);
}

/// The status of a `POST /samples` of `limit + 1` samples (413 while `limit` is in force).
async fn ingest_limit(app: &TestApp, limit: usize) -> StatusCode {
    let body: Vec<Value> = (0..=limit)
        .map(|i| json!({"device": "keep", "value": i as f64, "unit": "arb.units"}))
        .collect();
    let response = app.post_samples(&body).await;
    response.status()
}

/// A metric's value from a Prometheus scrape of the binary.
async fn metric(binary: &Binary, name: &str) -> Option<f64> {
    let text = client()
        .get(binary.url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn binary_device_ids(binary: &Binary) -> Vec<String> {
    let response = client()
        .get(binary.url("/devices"))
        .send()
        .await
        .expect("GET /devices answers");
    let (_, body) = json_of(response).await;
    body["devices"]
        .as_array()
        .expect("a device list")
        .iter()
        .map(|d| d["id"].as_str().expect("an id").to_owned())
        .collect()
}

#[tokio::test]
async fn sighup_reloads_the_binary_with_its_log_level_and_the_reload_metrics_follow() {
    let v1 = config(&[Dev("keep", 10, 1.0)], "[log]\nlevel = \"warn\"\n");
    let mut binary = Binary::start(&v1, &[("RUST_LOG", "")]).await;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    const OK: &str = "telemetryhub_config_last_reload_successful";
    const AT: &str = "telemetryhub_config_last_reload_success_timestamp_seconds";
    assert_eq!(
        metric(&binary, OK).await,
        Some(1.0),
        "start-up counts as a load"
    );
    let first = metric(&binary, AT).await.expect("a timestamp at start");

    // Reload 1 (SIGHUP): level info and a new device. The reload's own info line shows.
    let v2 = config(
        &[Dev("keep", 10, 1.0), Dev("x", 10, 1.0)],
        "[log]\nlevel = \"info\"\n",
    );
    std::fs::write(binary.config_path(), v2).expect("writable");
    binary.signal("HUP");
    wait_until(DEADLINE, "SIGHUP added device x", async || {
        binary_device_ids(&binary).await == ["keep", "x"]
    })
    .await;
    let second = metric(&binary, AT).await.expect("a timestamp");
    assert!(
        second >= first && second >= started.floor(),
        "{first} {second}"
    );

    // Reload 2 (SIGHUP and POST at once): back to warn, and another device; serialized, so
    // one of the two adds it and the other finds nothing to do.
    let v3 = config(
        &[Dev("keep", 10, 1.0), Dev("x", 10, 1.0), Dev("y", 10, 1.0)],
        "[log]\nlevel = \"warn\"\n",
    );
    std::fs::write(binary.config_path(), v3).expect("writable");
    binary.signal("HUP");
    let response = client()
        .post(binary.url("/-/reload"))
        .send()
        .await
        .expect("POST /-/reload answers");
    assert_eq!(response.status(), StatusCode::OK);
    wait_until(DEADLINE, "device y added", async || {
        binary_device_ids(&binary).await == ["keep", "x", "y"]
    })
    .await;

    // Reload 3: invalid. Nothing changes, the metric says so, the log names the key.
    let bad = config(
        &[Dev("keep", 10, 1.0), Dev("x", 0, 1.0)],
        "[log]\nlevel = \"warn\"\n[http]\nmax_concurrent_requests = 0\n",
    );
    std::fs::write(binary.config_path(), bad).expect("writable");
    binary.signal("HUP");
    wait_until(
        DEADLINE,
        "the refused reload shows in the metric",
        async || metric(&binary, OK).await == Some(0.0),
    )
    .await;
    assert_eq!(binary_device_ids(&binary).await, ["keep", "x", "y"]);
    assert_eq!(metric(&binary, AT).await.map(|t| t >= second), Some(true));

    binary.signal("TERM");
    let (status, stderr) = binary.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}\n{stderr}");
    assert!(
        stderr.contains("http.max_concurrent_requests") && stderr.contains("reload refused"),
        "the refusal is logged with its key:\n{stderr}"
    );
    // Logged at info only while the level was info: exactly one of the reloads.
    assert_eq!(
        stderr.matches("Configuration reloaded.").count(),
        1,
        "log.level follows the reloads:\n{stderr}"
    );
    assert_stats_balanced(&binary.read_stats());
}

/// The sequence numbers of the messages `sub` received for `device`.
fn seqs_of(sub: &Subscriber, device: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    for (_, payload) in sub.messages() {
        let doc: Value = serde_json::from_slice(&payload).expect("a JSON message");
        if doc["device"] == device {
            for sample in doc["samples"].as_array().expect("samples") {
                seqs.push(sample["seq"].as_u64().expect("a seq"));
            }
        }
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarder_reconnects_to_a_new_broker_and_no_spooled_sample_is_lost() {
    let (first, second) = (Broker::start().await, Broker::start().await);
    let sub_first = Subscriber::start(first.port, "telemetryhub/gw/#").await;
    let sub_second = Subscriber::start(second.port, "telemetryhub/gw/#").await;
    let spool = tempfile::tempdir().expect("a temp dir");
    let uplink = |url: String, max_batch: u32| {
        format!(
            "[uplink]\nurl = \"{url}\"\ngateway_id = \"gw\"\nmax_batch = {max_batch}\n\
             reconnect_initial_ms = 50\nreconnect_max_ms = 500\n\
             [spool]\npath = \"{}\"\nfsync = \"always\"\n",
            spool.path().display()
        )
    };
    let devices = [Dev("dev", 10, 1.0)];
    let (app, path) = spawn_from_file(&config(&devices, &uplink(first.url(), 256))).await;
    let post = async |seqs: std::ops::Range<u64>| {
        let body: Vec<Value> = seqs
            .map(|seq| json!({"device": "dev", "value": 1.5, "unit": "V", "seq": seq}))
            .collect();
        let response = app.post_samples(&body).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    };
    post(1_000_000..1_000_050).await;
    wait_until(
        DEADLINE,
        "the first broker got the first batch",
        async || seqs_of(&sub_first, "dev").contains(&1_000_049),
    )
    .await;

    // A new broker is live; the message format is not (the workers encode with it).
    let (code, report) = reload(&app, &path, &config(&devices, &uplink(second.url(), 100))).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    assert_eq!(strings(&report["applied"]), ["uplink"], "{report}");
    assert_eq!(
        strings(&report["restart_required"]),
        ["uplink.max_batch"],
        "{report}"
    );
    assert_eq!(
        strings(&report["devices"]["unchanged"]),
        ["dev"],
        "{report}"
    );
    wait_until(DEADLINE, "connected to the second broker", async || {
        let (_, u) = app.get_json("/uplink").await;
        u["broker"] == second.url() && u["connected"] == true
    })
    .await;
    post(2_000_000..2_000_050).await;
    wait_until(
        DEADLINE,
        "the second broker got the second batch",
        async || {
            let seqs = seqs_of(&sub_second, "dev");
            (2_000_000..2_000_050).all(|s| seqs.contains(&s))
        },
    )
    .await;
    assert!(
        !seqs_of(&sub_first, "dev").contains(&2_000_000),
        "nothing goes to the old broker after the reload"
    );
    let (code, _) = app.post_json("/stop").await;
    assert_eq!(code, StatusCode::OK);
    wait_until(DEADLINE, "the spool drained", async || {
        let (_, u) = app.get_json("/uplink").await;
        u["pending_samples"] == 0
    })
    .await;
    let summary = app.shut_down().await;
    assert!(summary.balanced, "{summary:?}");
    assert_eq!(summary.ledger.dropped.total(), 0, "{summary:?}");
    assert_eq!(summary.ledger.unspooled, 0, "{summary:?}");
    let _ = std::fs::remove_file(path);
}

/// `POST /stop` racing reloads that remove, re-add and restart a device always succeeds, as
/// the README promises: a device whose task the reload just ended is skipped if it is gone and
/// commanded again through its new task if it was restarted, never a 503 "shutting down" with
/// the devices after it left uncommanded (review finding 2).
#[tokio::test]
async fn stop_racing_reloads_always_succeeds() {
    let with_b = [Dev("keep", 5, 1.0), Dev("b", 5, 1.0), Dev("z", 5, 1.0)];
    let b_restarted = [Dev("keep", 5, 1.0), Dev("b", 7, 1.0), Dev("z", 5, 1.0)];
    let without_b = [Dev("keep", 5, 1.0), Dev("z", 5, 1.0)];
    let versions = [
        config(&without_b, ""),
        config(&with_b, ""),
        config(&b_restarted, ""),
    ];
    let (app, path) = spawn_from_file(&config(&with_b, "")).await;
    app.wait_processed_above(10).await;
    let app = Arc::new(app);
    let done = Arc::new(AtomicBool::new(false));
    let stoppers: Vec<_> = (0..3)
        .map(|_| {
            let (app, done) = (app.clone(), done.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !done.load(Ordering::Relaxed) {
                    let (code, body) = app.post_json("/stop").await;
                    answers.push((code, body));
                }
                answers
            })
        })
        .collect();
    for i in 0..150 {
        let (code, body) = reload(&app, &path, &versions[i % versions.len()]).await;
        assert_eq!(code, StatusCode::OK, "reload {i}: {body}");
    }
    done.store(true, Ordering::Relaxed);
    let mut stops = 0;
    for stopper in stoppers {
        for (code, body) in stopper.await.expect("the stopper does not panic") {
            assert_eq!(code, StatusCode::OK, "POST /stop during a reload: {body}");
            stops += 1;
        }
    }
    assert!(stops > 100, "only {stops} stops raced the reloads");
    let app = Arc::into_inner(app).expect("the stoppers are done");
    assert!(app.shut_down().await.balanced);
    let _ = std::fs::remove_file(path);
}

/// Under `overflow = "block"` a full buffer makes device tasks wait in their push; a reload that
/// removes or restarts such a device lets it finish the push before its task ends, so nothing
/// is dropped, as `block` promises (review finding 1: 40 reloads of this kind dropped about
/// 1 400 samples as `stopped`).
#[tokio::test]
async fn reloads_under_block_with_a_tiny_buffer_drop_nothing() {
    const EXTRA: &str = "[buffer]\ncapacity = 1\noverflow = \"block\"\n";
    let with_b = [Dev("a", 0, 1.0), Dev("b", 0, 1.0), Dev("c", 0, 1.0)];
    let b_restarted = [Dev("a", 0, 1.0), Dev("b", 1, 1.0), Dev("c", 0, 1.0)];
    let without_b = [Dev("a", 0, 1.0), Dev("c", 0, 1.0)];
    let versions = [
        config(&without_b, EXTRA),
        config(&with_b, EXTRA),
        config(&b_restarted, EXTRA),
    ];
    let (app, path) = spawn_from_file(&config(&with_b, EXTRA)).await;
    app.wait_processed_above(100).await;
    for i in 0..40 {
        let (code, body) = reload(&app, &path, &versions[i % versions.len()]).await;
        assert_eq!(code, StatusCode::OK, "reload {i}: {body}");
        let processed = app.processed().await;
        app.wait_processed_above(processed).await;
    }
    // While the gateway runs, nothing at all is dropped: a retired task's handle is gone once
    // the reload is done, and its push must not read that as a shutdown (it did, and dropped
    // what it held as `shutdown` while the gateway ran on).
    let running = app.status().await;
    assert_eq!(
        u64_at(&running, "/metrics/samples_dropped"),
        0,
        "no sample dropped while running: {running}"
    );
    let summary = app.shut_down().await;
    eprintln!("{summary:?}");
    assert!(summary.balanced, "{summary:?}");
    let ledger = &summary.ledger;
    assert!(ledger.read > 1000, "the devices were reading: {summary:?}");
    // Shutdown itself may drop what waits for room (`shutdown`); the reloads drop nothing.
    assert_eq!(
        ledger.dropped.total()
            - ledger
                .dropped
                .get(telemetryhub::ledger::DropReason::Shutdown),
        0,
        "no sample dropped by a reload: {summary:?}"
    );
    let _ = std::fs::remove_file(path);
}

/// New uplink settings take effect at once, even while the forwarder sits out a long reconnect
/// backoff after failing to reach the old broker (review finding 4: it connected to the new
/// broker only when the 20 s backoff ran out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_uplink_settings_cut_the_reconnect_backoff_short() {
    let dead = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a free port");
    let dead_url = format!(
        "mqtt://127.0.0.1:{}",
        dead.local_addr().expect("bound").port()
    );
    drop(dead);
    let broker = Broker::start().await;
    let spool = tempfile::tempdir().expect("a temp dir");
    // The first retry comes 30 to 60 s after a failure (jitter of up to half).
    let uplink = |url: &str| {
        format!(
            "[uplink]\nurl = \"{url}\"\ngateway_id = \"gw\"\n\
             reconnect_initial_ms = 60000\nreconnect_max_ms = 60000\n\
             [spool]\npath = \"{}\"\n",
            spool.path().display()
        )
    };
    let devices = [Dev("dev", 10, 1.0)];
    let (app, path) = spawn_from_file(&config(&devices, &uplink(&dead_url))).await;
    wait_until(
        DEADLINE,
        "the dead broker refused a connection",
        async || {
            let (_, u) = app.get_json("/uplink").await;
            !u["last_error"].is_null()
        },
    )
    .await;
    let (code, report) = reload(&app, &path, &config(&devices, &uplink(&broker.url()))).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    // Well within the 30 s the backoff has left at least.
    wait_until(
        Duration::from_secs(10),
        "connected to the new broker",
        async || {
            let (_, u) = app.get_json("/uplink").await;
            u["broker"] == broker.url() && u["connected"] == true
        },
    )
    .await;
    assert!(app.shut_down().await.balanced);
    let _ = std::fs::remove_file(path);
}

/// After a refused file, the `POST /samples` limit and the unit ranges are those of the last
/// good file, not the refused file's (which sets both differently next to one bad key); the
/// fixed file then applies both.
#[tokio::test]
async fn a_refused_file_leaves_limits_and_unit_ranges_as_they_were() {
    // One quiet device: the ingested samples decide what is rejected.
    let devices = [Dev("keep", 1000, 1.0)];
    let file = |limit: usize, max: f64, watermark: f64| {
        config(
            &devices,
            &format!(
                "[http]\ningest_max_samples = {limit}\n\
                 [buffer]\nhigh_watermark = {watermark:?}\n\
                 [processing.units]\n\"test.volts\" = {{ min = 0.0, max = {max:?} }}\n"
            ),
        )
    };
    let (app, path) = spawn_from_file(&file(5, 10.0, 0.8)).await;
    let post = async |n: usize, value: f64| {
        let body: Vec<Value> = (0..n)
            .map(|_| json!({"device": "keep", "value": value, "unit": "test.volts"}))
            .collect();
        let response = app.post_samples(&body).await;
        response.status()
    };
    let rejected = async || u64_at(&app.status().await, "/metrics/samples_rejected");

    for round in 0..3 {
        let (code, body) = reload(&app, &path, &file(50, 100.0, 1.5)).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "round {round}: {body}");
        assert_eq!(
            post(6, 1.0).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "round {round}"
        );
        // 50 V is out of the running range (0..10), though within the refused one.
        let before = rejected().await;
        assert_eq!(post(1, 50.0).await, StatusCode::ACCEPTED);
        wait_until(
            DEADLINE,
            "the out-of-range sample is rejected",
            async || rejected().await == before + 1,
        )
        .await;
    }

    // The same file fixed applies both.
    let (code, report) = reload(&app, &path, &file(50, 100.0, 0.5)).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    assert_eq!(post(6, 50.0).await, StatusCode::ACCEPTED);
    wait_until(DEADLINE, "the 50 V samples are processed", async || {
        let (_, body) = app.get_json("/samples?limit=100").await;
        body["samples"].as_array().is_some_and(|samples| {
            samples
                .iter()
                .filter(|s| s["unit"] == "test.volts" && s["value"] == 50.0)
                .count()
                == 6
        })
    })
    .await;
    let summary = app.shut_down().await;
    assert!(summary.balanced, "{summary:?}");
    assert_eq!(summary.ledger.rejected.total(), 3, "{summary:?}");
    let _ = std::fs::remove_file(path);
}
