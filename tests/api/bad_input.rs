//! Bad input, everywhere: a corpus of malformed, oversized, mistyped and tricky HTTP requests,
//! each answered with the right 4xx and followed by a healthy `GET /status`; and on the link
//! side, garbage, partial frames and 64 KiB lines without a newline, counted and skipped.
//!
//! Requests that reach the router get a JSON `{"error": ...}` body. Requests so broken that
//! hyper refuses them while parsing the head (a bad request line, a bad `Content-Length`, too
//! many headers, a 64 KiB URI) get hyper's own bodyless 4xx and a closed connection: no
//! handler ever sees them, so they are checked for status and close only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use reqwest::{Method, StatusCode};
use serde_json::json;
use telemetryhub::buffer::{OverflowPolicy, RingBuffer};
use telemetryhub::config::DeviceSettings;
use telemetryhub::device::codec::encode_frame;
use telemetryhub::device::{Connector, DeviceTask};
use telemetryhub::ledger::RejectReason;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

use crate::helpers::{DEADLINE, TestApp, json_of, raw_exchange, spawn_app, u64_at, wait_until};

/// Small limits, so oversized requests are cheap to send.
const BODY_LIMIT: usize = 4096;
const MAX_SAMPLES: usize = 20;
const HISTORY: usize = 100;

/// How long a raw exchange may take.
const RAW_LIMIT: Duration = Duration::from_secs(3);

async fn spawn_limited() -> TestApp {
    spawn_app(|s| {
        s.http.body_limit_bytes = BODY_LIMIT;
        s.http.ingest_max_samples = MAX_SAMPLES;
        s.http.request_timeout_ms = 5_000;
        s.pipeline.history = HISTORY;
    })
    .await
}

/// One bad request sent with reqwest: well-formed HTTP with bad content.
struct Case {
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    expected: u16,
}

fn case(method: Method, path: &str, expected: u16) -> Case {
    Case {
        method,
        path: path.to_owned(),
        content_type: None,
        body: Vec::new(),
        expected,
    }
}

/// `POST /samples` with a JSON content type and `body`.
fn ingest(body: impl Into<Vec<u8>>, expected: u16) -> Case {
    Case {
        content_type: Some("application/json"),
        body: body.into(),
        ..case(Method::POST, "/samples", expected)
    }
}

/// `POST /samples` with `content_type` and a valid body.
fn ingest_typed(content_type: Option<&'static str>, expected: u16) -> Case {
    Case {
        content_type,
        ..ingest(VALID_BATCH, expected)
    }
}

/// `POST /devices/{id}/command` with a JSON content type and `body`.
fn command(id: &str, body: impl Into<Vec<u8>>, expected: u16) -> Case {
    Case {
        content_type: Some("application/json"),
        body: body.into(),
        ..case(Method::POST, &format!("/devices/{id}/command"), expected)
    }
}

const VALID_BATCH: &str = r#"[{"device":"sim0","value":1.5,"unit":"V"}]"#;

fn item(fields: &str) -> String {
    format!("[{{{fields}}}]")
}

/// The corpus of well-formed HTTP requests with bad content.
fn corpus() -> Vec<Case> {
    let many: Vec<_> = (0..=MAX_SAMPLES)
        .map(|i| json!({"device": "sim0", "value": i, "unit": "V"}))
        .collect();
    let oversized = {
        let filler = "x".repeat(BODY_LIMIT);
        format!(r#"[{{"device":"sim0","value":1,"unit":"V","timestamp":"{filler}"}}]"#)
    };
    vec![
        // Malformed and truncated JSON.
        ingest(r#"[{"device":"#, 400),
        ingest(r#"[{"device":"sim0","value":1,"unit":"V"}"#, 400),
        ingest(r#"[{"device":"sim0","value":1,"unit":"V"},]"#, 400),
        ingest("", 400),
        ingest("null", 400),
        ingest(r#"{"device":"sim0","value":1,"unit":"V"}"#, 400),
        ingest("[] []", 400),
        ingest("\u{feff}[]", 400),
        ingest("[".repeat(1000), 400),
        // Wrong types, missing and unknown fields.
        ingest(item(r#""device":"sim0","value":"1","unit":"V""#), 400),
        ingest(item(r#""device":7,"value":1,"unit":"V""#), 400),
        ingest(item(r#""device":"sim0","value":null,"unit":"V""#), 400),
        ingest(item(r#""device":"sim0","value":1"#), 400),
        ingest(
            item(r#""device":"sim0","value":1,"unit":"V","extra":true"#),
            400,
        ),
        ingest(
            item(r#""device":"sim0","device":"sim0","value":1,"unit":"V""#),
            400,
        ),
        // Huge numbers and negative or overflowing integers.
        ingest(item(r#""device":"sim0","value":1e999,"unit":"V""#), 400),
        ingest(item(r#""device":"sim0","value":-1e400,"unit":"V""#), 400),
        ingest(
            item(r#""device":"sim0","value":1,"unit":"V","seq":-1"#),
            400,
        ),
        ingest(
            item(r#""device":"sim0","value":1,"unit":"V","seq":4294967296"#),
            400,
        ),
        // A fraction is no sequence number (`1e3` is one: JSON Schema's integer 1000).
        ingest(
            item(r#""device":"sim0","value":1,"unit":"V","seq":1.5"#),
            400,
        ),
        // Unknown devices, bad units and timestamps.
        ingest(item(r#""device":"nope","value":1,"unit":"V""#), 400),
        ingest(item(r#""device":"","value":1,"unit":"V""#), 400),
        ingest(item(r#""device":"../sim0","value":1,"unit":"V""#), 400),
        ingest(item(r#""device":"sim0","value":1,"unit":"bad unit""#), 400),
        ingest(
            item(r#""device":"sim0","value":1,"unit":"seventeen-chars-x""#),
            400,
        ),
        ingest(
            item(r#""device":"sim0","value":1,"unit":"V","timestamp":"yesterday""#),
            400,
        ),
        ingest(
            item(r#""device":"sim0","value":1,"unit":"V","timestamp":"2026-13-45T99:00:00Z""#),
            400,
        ),
        // Non-UTF-8 bodies.
        ingest(b"\xff\xfe[\x00]".to_vec(), 400),
        ingest(
            [
                br#"[{"device":"sim0","value":1,"unit":""#.as_slice(),
                b"\xc3\x28\"}]",
            ]
            .concat(),
            400,
        ),
        // Wrong content types.
        ingest_typed(None, 415),
        ingest_typed(Some("text/plain"), 415),
        ingest_typed(Some("application/x-www-form-urlencoded"), 415),
        ingest_typed(Some("application/json-seq"), 415),
        ingest_typed(Some("multipart/form-data; boundary=x"), 415),
        // Too big: the body limit, and the sample count limit.
        ingest(oversized, 413),
        ingest(serde_json::to_vec(&many).unwrap(), 413),
        // Bad `limit` parameters.
        case(Method::GET, "/samples?limit=-1", 400),
        case(Method::GET, "/samples?limit=0", 400),
        case(Method::GET, "/samples?limit=abc", 400),
        case(Method::GET, "/samples?limit=1e3", 400),
        case(Method::GET, "/samples?limit=18446744073709551616", 400),
        case(Method::GET, &format!("/samples?limit={}", HISTORY + 1), 400),
        case(Method::GET, "/samples?limit=%FF", 400),
        case(Method::GET, "/samples?limit=1&limit=2", 400),
        case(Method::GET, "/samples?limit=5&debug=1", 400),
        // Unknown devices and path tricks.
        case(Method::GET, "/devices/nope", 404),
        case(Method::GET, "/devices/..%2F..%2Fetc", 404),
        case(Method::GET, "/devices/..%2F..%2Fetc%2Fpasswd", 404),
        case(Method::GET, "/devices/sim0%2Fstart", 404),
        case(Method::GET, "/devices/sim0%00", 404),
        case(Method::GET, "/devices/sim0/", 404),
        case(Method::GET, "/devices/%FF", 400),
        case(Method::POST, "/devices/%FF%FE/start", 400),
        case(Method::POST, "/devices/nope/start", 404),
        case(Method::POST, "/devices/nope/reset", 404),
        command("nope", r#"{"command":"GET_STATUS"}"#, 404),
        // Bad device commands.
        command("sim0", "GET_STATUS", 400),
        command("sim0", r#"{"command":5}"#, 422),
        command("sim0", r#"{"command":"GET_STATUS","x":1}"#, 422),
        command("sim0", r#"{"command":""}"#, 400),
        command("sim0", r#"{"command":"GET_STATUS\r\nRESET"}"#, 400),
        command(
            "sim0",
            format!(r#"{{"command":"{}"}}"#, "A".repeat(65)),
            400,
        ),
        command("sim0", r#"{"command":"CAF\u00c9"}"#, 400),
        command("sim0", b"{\"command\":\"\xff\"}".to_vec(), 400),
        Case {
            content_type: Some("text/plain"),
            ..command("sim0", r#"{"command":"GET_STATUS"}"#, 415)
        },
        // Wrong methods.
        case(Method::DELETE, "/devices/sim0", 405),
        case(Method::PUT, "/samples", 405),
        case(Method::PATCH, "/start", 405),
    ]
}

/// Sends `case`; asserts the status and a JSON error body.
async fn send_case(app: &TestApp, case: &Case) {
    let what = format!(
        "{} {} {:?} {:?}",
        case.method,
        case.path,
        case.content_type,
        String::from_utf8_lossy(&case.body[..case.body.len().min(80)])
    );
    let mut request = app
        .client
        .request(case.method.clone(), app.url(&case.path))
        .body(case.body.clone());
    if let Some(content_type) = case.content_type {
        request = request.header(reqwest::header::CONTENT_TYPE, content_type);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|err| panic!("{what}: no answer: {err}"));
    let (code, body) = json_of(response).await;
    assert_eq!(code.as_u16(), case.expected, "{what}: {body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: no error message: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_json_4xx_and_the_server_keeps_serving() {
    let app = spawn_limited().await;
    app.wait_processed_above(0).await;
    let corpus = corpus();
    assert!(
        corpus.len() >= 40,
        "the corpus has {} requests",
        corpus.len()
    );
    for case in &corpus {
        send_case(&app, case).await;
        app.status().await;
    }
    // Nothing was ingested by any of them.
    let summary = app.shut_down().await;
    assert_eq!(summary.ledger.ingested, 0, "{summary:?}");
    assert!(summary.balanced, "{summary:?}");
}

/// What a raw request must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A JSON error with this status, from the router.
    Json(u16),
    /// Hyper's bodyless answer with this status, and the connection closed.
    Refused(u16),
    /// No answer at all, and the connection closed.
    Dropped,
}

/// Requests only a raw socket can send.
fn raw_corpus() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").into_bytes();
    let post_samples = |headers: &str, body: &[u8]| {
        [
            format!("POST /samples HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{headers}\r\n")
                .as_bytes(),
            body,
        ]
        .concat()
    };
    let many_headers: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let chunked_oversized = {
        let chunk = format!("400\r\n{}\r\n", "x".repeat(0x400));
        format!("{}0\r\n\r\n", chunk.repeat(BODY_LIMIT / 0x400 + 2))
    };
    vec![
        (
            "garbage request line",
            b"GARBAGE\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        ("space in the path", get("/sta tus"), Expect::Refused(400)),
        (
            "HTTP/0.9 style",
            b"GET /status\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        (
            "unknown HTTP version",
            b"GET /status HTTP/3.7\r\nHost: t\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        (
            "NUL in a header",
            b"GET /status HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        (
            "header without a colon",
            b"GET /status HTTP/1.1\r\nHost t\r\n\r\n".to_vec(),
            Expect::Refused(400),
        ),
        (
            "non-numeric Content-Length",
            post_samples("Content-Length: abc\r\n", b"[]"),
            Expect::Refused(400),
        ),
        (
            "negative Content-Length",
            post_samples("Content-Length: -2\r\n", b"[]"),
            Expect::Refused(400),
        ),
        (
            "conflicting Content-Lengths",
            post_samples("Content-Length: 2\r\nContent-Length: 3\r\n", b"[]"),
            Expect::Refused(400),
        ),
        (
            "150 headers",
            format!("GET /status HTTP/1.1\r\nHost: t\r\n{many_headers}\r\n").into_bytes(),
            Expect::Refused(431),
        ),
        (
            "70 KB URI",
            get(&format!("/{}", "a".repeat(70_000))),
            Expect::Refused(414),
        ),
        (
            "HTTP/2 preface on HTTP/1",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            Expect::Dropped,
        ),
        (
            "bad chunk size",
            post_samples("Transfer-Encoding: chunked\r\n", b"ZZ\r\n[]\r\n0\r\n\r\n"),
            Expect::Json(400),
        ),
        (
            "chunked body over the limit",
            post_samples(
                "Transfer-Encoding: chunked\r\n",
                chunked_oversized.as_bytes(),
            ),
            Expect::Json(413),
        ),
        (
            "dot segments",
            get("/devices/sim0/../../status"),
            Expect::Json(404),
        ),
        (
            "encoded dot segments",
            get("/%2e%2e/%2e%2e/etc/passwd"),
            Expect::Json(404),
        ),
        (
            "backslash traversal",
            get("/devices/..\\..\\etc"),
            Expect::Json(404),
        ),
        (
            "absolute-form URI",
            get("http://evil.example/devices/nope"),
            Expect::Json(404),
        ),
        (
            "unknown method",
            b"FOO /status HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            Expect::Json(405),
        ),
        (
            "non-UTF-8 path parameter",
            get("/devices/%C3%28"),
            Expect::Json(400),
        ),
    ]
}

async fn send_raw(addr: SocketAddr, name: &str, request: &[u8], expect: Expect) {
    let reply = raw_exchange(addr, request, RAW_LIMIT).await;
    match expect {
        Expect::Json(status) => {
            assert_eq!(reply.status, Some(status), "{name}: {reply:?}");
            let body = reply
                .json()
                .unwrap_or_else(|| panic!("{name}: not a JSON answer: {reply:?}"));
            assert!(body["error"].is_string(), "{name}: {body}");
        }
        Expect::Refused(status) => {
            assert_eq!(reply.status, Some(status), "{name}: {reply:?}");
            assert!(reply.closed, "{name}: the connection stays open: {reply:?}");
        }
        Expect::Dropped => {
            assert!(
                reply.status.is_none_or(|s| (400..500).contains(&s)),
                "{name}: {reply:?}"
            );
            assert!(reply.closed, "{name}: the connection stays open: {reply:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_malformed_http_is_refused_and_the_server_keeps_serving() {
    let app = spawn_limited().await;
    for (name, request, expect) in raw_corpus() {
        send_raw(app.addr, name, &request, expect).await;
        app.status().await;
    }
    let summary = app.shut_down().await;
    assert_eq!(summary.ledger.ingested, 0, "{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_oversized_body_is_refused_at_once_with_413() {
    // The client announces more than the limit and sends nothing: the answer must not wait
    // for a body that would be refused anyway (nor hold a request slot until the timeout).
    let app = spawn_limited().await;
    let request = format!(
        "POST /samples HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n[",
        BODY_LIMIT * 1000
    );
    let started = std::time::Instant::now();
    let reply = raw_exchange(app.addr, request.as_bytes(), RAW_LIMIT).await;
    let took = started.elapsed();
    assert_eq!(reply.status, Some(413), "after {took:?}: {reply:?}");
    assert!(reply.json().is_some(), "{reply:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    app.status().await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_at_the_edge_of_the_calendar_do_not_break_reads() {
    // RFC 3339 allows 9999-12-31T23:59:59-23:59, which is in the year 10000 in UTC. Either it
    // is refused with a 400, or it is accepted and every read that shows it still works.
    let app = spawn_limited().await;
    app.wait_processed_above(0).await;
    let (code, _) = app.post_json("/stop").await;
    assert_eq!(code, StatusCode::OK);
    // `/metrics` as JSON shows counts only, never a timestamp.
    let processed = || async {
        let response = app
            .client
            .get(app.url("/metrics"))
            .header("accept", "application/json")
            .send()
            .await
            .expect("GET /metrics answers");
        u64_at(&json_of(response).await.1, "/samples_processed")
    };
    // Let the stopped device's last samples drain, so the next one processed is ours.
    let mut last = u64::MAX;
    wait_until(DEADLINE, "the pipeline to go quiet", async || {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = processed().await;
        std::mem::replace(&mut last, now) == now
    })
    .await;
    for timestamp in [
        "9999-12-31T23:59:59-23:59",
        "0000-01-01T00:00:00+23:59",
        "9999-12-31T23:59:60Z",
    ] {
        let before = processed().await;
        let body = json!([{"device": "sim0", "value": 1, "unit": "V", "timestamp": timestamp}]);
        let response = app.post_samples(&body).await;
        let (code, answer) = json_of(response).await;
        assert!(
            code == StatusCode::ACCEPTED || code == StatusCode::BAD_REQUEST,
            "{timestamp}: {code} {answer}"
        );
        if code == StatusCode::ACCEPTED {
            wait_until(DEADLINE, "the sample to be processed", async || {
                processed().await > before
            })
            .await;
        }
        // The route that formats every sample's timestamp, and /status's latest sample.
        for path in ["/samples?limit=100", "/status"] {
            let response = app.client.get(app.url(path)).send().await;
            let response = response.unwrap_or_else(|err| {
                panic!("{timestamp} accepted, then GET {path} got no answer: {err}")
            });
            let (code, body) = json_of(response).await;
            assert_eq!(code, StatusCode::OK, "{timestamp}: GET {path}: {body}");
        }
    }
    app.shut_down().await;
}

/// A link that is opened once and handed to the device task; later connects fail.
struct OneLink(Option<DuplexStream>);

impl Connector for OneLink {
    type Io = DuplexStream;

    async fn connect(&mut self) -> std::io::Result<DuplexStream> {
        self.0
            .take()
            .ok_or_else(|| std::io::Error::other("the test link was used up"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_garbage_partial_frames_and_64k_lines_are_counted_and_skipped() {
    const ROUNDS: u32 = 40;
    let (gateway_end, mut device_end) = tokio::io::duplex(64 * 1024);
    let buffer = Arc::new(RingBuffer::new(10_000, OverflowPolicy::Block));
    let cancel = CancellationToken::new();
    let mut settings = DeviceSettings::simulated("link0");
    settings.read_timeout_ms = Some(5_000);
    let (task, handle) = DeviceTask::new(
        &settings,
        "simulated",
        OneLink(Some(gateway_end)),
        buffer.clone(),
        cancel.clone(),
    );
    let task = tokio::spawn(task.run());

    // Each round: binary garbage, a frame cut short, a 64 KiB line without a newline, a
    // 64 KiB run of noise without `$` or a newline; each followed by one valid frame.
    let mut valid = 0u32;
    let mut frame = |buf: &mut BytesMut| {
        encode_frame(valid, 42.0, "arb.units", buf);
        valid += 1;
    };
    for round in 0..ROUNDS {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"\x00\xff\xfe garbage \x07");
        frame(&mut buf);
        buf.extend_from_slice(format!("$TH,{round},1.0,arb").as_bytes());
        frame(&mut buf);
        buf.extend_from_slice(b"$TH,");
        buf.extend_from_slice(&[b'9'; 64 * 1024]);
        frame(&mut buf);
        buf.extend_from_slice(&[b'A'; 64 * 1024]);
        frame(&mut buf);
        device_end
            .write_all(&buf)
            .await
            .expect("the link takes bytes");
    }
    let expected = u64::from(valid);
    let mut counters = handle.counters();
    wait_until(DEADLINE, "every valid frame to be read", async || {
        counters = handle.counters();
        counters.samples_read >= expected
    })
    .await;
    assert_eq!(counters.samples_read, expected, "{counters:?}");
    // Per round: one over-long line; the garbage, the cut frame and the noise run are one
    // syntax error each.
    assert_eq!(
        counters.frames_invalid.too_long,
        u64::from(ROUNDS),
        "{counters:?}"
    );
    assert_eq!(
        counters.frames_invalid.syntax,
        u64::from(ROUNDS) * 3,
        "{counters:?}"
    );
    assert_eq!(counters.frames_invalid.checksum, 0, "{counters:?}");
    assert_eq!(counters.seq_gaps, 0, "{counters:?}");
    assert_eq!(counters.link_failures, Default::default(), "{counters:?}");
    assert_eq!(handle.state().as_str(), "Measuring");
    let ledger = buffer.ledger();
    assert_eq!(
        (ledger.read, ledger.in_buffer),
        (expected, expected),
        "{ledger:?}"
    );

    cancel.cancel();
    task.await.expect("the device task ends cleanly");
    drop(device_end);
}

/// Paths of `null`s among a JSON document's numbers (`value`, `min`, `max`, `mean`, `last`).
fn null_numbers(value: &serde_json::Value, path: &str, found: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                let at = format!("{path}/{key}");
                if v.is_null() && ["value", "min", "max", "mean", "last"].contains(&key.as_str()) {
                    found.push(at);
                } else {
                    null_numbers(v, &at, found);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                null_numbers(v, &format!("{path}/{i}"), found);
            }
        }
        _ => {}
    }
}

/// `POST /samples` of `body`, which must be accepted; then waits until `GET /samples` shows
/// a sample of `last` (the batch's last sample, so the whole batch has been through a worker).
async fn ingest_and_wait(app: &TestApp, body: serde_json::Value, last: f64) {
    let response = app.post_samples(&body).await;
    let (code, answer) = json_of(response).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{answer}");
    wait_until(DEADLINE, &format!("a sample of {last}"), async || {
        let (_, body) = app.get_json("/samples?limit=100").await;
        body["samples"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["value"] == last))
    })
    .await;
}

/// Every route that shows sample values or statistics, checked for `null` numbers.
async fn assert_no_null_numbers(app: &TestApp) {
    for path in ["/samples?limit=100", "/status", "/devices", "/devices/sim0"] {
        let (code, body) = app.get_json(path).await;
        assert_eq!(code, StatusCode::OK, "{path}: {body}");
        let mut nulls = Vec::new();
        null_numbers(&body, "", &mut nulls);
        assert!(nulls.is_empty(), "GET {path}: null at {nulls:?} in {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calibration_that_overflows_is_rejected_not_shown_as_null() {
    let app = spawn_app(|s| {
        s.devices[0].scale = 1e307;
        s.devices[0].autostart = false;
    })
    .await;
    // 100 * 1e307 is beyond f64::MAX; 1e-300 * 1e307 = 1e7 is fine.
    let body = json!([
        {"device": "sim0", "value": 100, "unit": "V"},
        {"device": "sim0", "value": 1e-300, "unit": "V"},
    ]);
    ingest_and_wait(&app, body, 1e7).await;
    assert_no_null_numbers(&app).await;
    wait_until(DEADLINE, "the rejection to be counted", async || {
        u64_at(&app.status().await, "/metrics/samples_rejected") == 1
    })
    .await;
    let reason = [("reason", "calibration_overflow")];
    let scraped = app
        .scrape()
        .await
        .value("telemetryhub_samples_rejected_total", &reason);
    // The recorder is shared by every app in this test binary: at least ours.
    assert!(scraped >= 1.0, "{scraped}");
    let summary = app.shut_down().await;
    let l = &summary.ledger;
    assert_eq!(l.processed, 1, "{summary:?}");
    assert_eq!(l.rejected.get(RejectReason::CalibrationOverflow), 1);
    assert_eq!(l.rejected.total(), 1, "{summary:?}");
    assert!(summary.balanced, "{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_near_the_f64_limits_keep_statistics_finite() {
    let app = spawn_app(|s| s.devices[0].autostart = false).await;
    // Their mean is 0, but a naive running mean computes 1e308 + (-1e308 - 1e308) / 2 = -inf.
    let body = json!([
        {"device": "sim0", "value": 1e308, "unit": "V"},
        {"device": "sim0", "value": -1e308, "unit": "V"},
    ]);
    ingest_and_wait(&app, body, -1e308).await;
    assert_no_null_numbers(&app).await;
    app.shut_down().await;
}
