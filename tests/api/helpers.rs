//! Shared fixtures: [`spawn_app`] runs a real gateway (`App`) bound to `127.0.0.1:0` on the
//! test's runtime and hands back a [`TestApp`] with an HTTP client aimed at it; [`wait_until`]
//! polls a condition with a hard deadline; [`Scrape`] parses Prometheus text exposition.
//!
//! The Prometheus recorder is global to the process, so tests that inspect metrics use their
//! own device ids and assert with `>=` or on deltas: under `cargo test` several apps share it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use telemetryhub::app::{App, Summary};
use telemetryhub::config::{DeviceSettings, Settings};
use telemetryhub::dispatch::ProcessFn;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long any single condition may take to become true before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// How often [`wait_until`] re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long shutdown may take before the test fails (grace period plus the app's final waits).
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

/// A gateway running on the test's runtime.
pub struct TestApp {
    /// Where it listens (always loopback).
    pub addr: SocketAddr,
    /// A client that never goes through a proxy.
    pub client: reqwest::Client,
    /// Cancelling it starts the app's shutdown.
    pub shutdown: CancellationToken,
    /// The running app; yields the final accounting.
    pub handle: JoinHandle<Summary>,
}

/// Settings for tests: loopback on an ephemeral port, one fast, seeded simulated device.
pub fn test_settings() -> Settings {
    let mut settings = Settings::default();
    settings.http.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    settings.pipeline.shutdown_grace_ms = 5_000;
    settings.devices = vec![fast_device("sim0")];
    settings
}

/// A simulated device sending a frame every 10 ms, with a fixed seed.
pub fn fast_device(id: &str) -> DeviceSettings {
    let mut device = DeviceSettings::simulated(id);
    device.sample_interval_ms = 10;
    device.simulator.seed = 7;
    device
}

/// Builds and runs a gateway with [`test_settings`] changed by `tweak`.
pub async fn spawn_app(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with(tweak, None).await
}

/// Like [`spawn_app`], optionally replacing the worker's processing function.
pub async fn spawn_app_with(
    tweak: impl FnOnce(&mut Settings),
    process: Option<ProcessFn>,
) -> TestApp {
    let mut settings = test_settings();
    tweak(&mut settings);
    // Whatever the tweak did, tests only ever bind loopback.
    settings.http.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut app = App::build(settings)
        .await
        .expect("binding 127.0.0.1:0 succeeds");
    if let Some(process) = process {
        app = app.with_process(process);
    }
    let addr = app.local_addr();
    assert!(addr.ip().is_loopback(), "{addr}");
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    TestApp {
        addr,
        client: client(),
        shutdown,
        handle,
    }
}

/// An HTTP client for loopback tests: no proxy, bounded waits.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a plain HTTP client builds")
}

impl TestApp {
    /// The URL of `path` on this app.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {path} failed: {err}"))
    }

    /// `POST path` with an empty body.
    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .send()
            .await
            .unwrap_or_else(|err| panic!("POST {path} failed: {err}"))
    }

    /// `GET path`, expecting a JSON body.
    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        json_of(self.get(path).await).await
    }

    /// `POST path`, expecting a JSON body.
    pub async fn post_json(&self, path: &str) -> (StatusCode, Value) {
        json_of(self.post(path).await).await
    }

    /// `GET /status`, which must succeed.
    pub async fn status(&self) -> Value {
        let (code, body) = self.get_json("/status").await;
        assert_eq!(code, StatusCode::OK, "{body}");
        body
    }

    /// `metrics.samples_processed` from `/status`.
    pub async fn processed(&self) -> u64 {
        u64_at(&self.status().await, "/metrics/samples_processed")
    }

    /// `GET /devices/{id}`, which must succeed.
    pub async fn device(&self, id: &str) -> Value {
        let (code, body) = self.get_json(&format!("/devices/{id}")).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        body
    }

    /// `GET /metrics` as Prometheus text, parsed.
    pub async fn scrape(&self) -> Scrape {
        let response = self.get("/metrics").await;
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.expect("the scrape has a body");
        Scrape::parse(&text).unwrap_or_else(|err| panic!("{err}\n--- scrape ---\n{text}"))
    }

    /// Waits until `/status` shows more than `n` samples processed; returns the count.
    pub async fn wait_processed_above(&self, n: u64) -> u64 {
        let mut last = 0;
        wait_until(
            DEADLINE,
            &format!("more than {n} samples processed"),
            async || {
                last = self.processed().await;
                last > n
            },
        )
        .await;
        last
    }

    /// Waits until every device's state is `state`.
    pub async fn wait_state(&self, state: &str) {
        wait_until(DEADLINE, &format!("state {state}"), async || {
            self.status().await["state"] == state
        })
        .await;
    }

    /// Cancels the shutdown token and waits for the app's final accounting.
    pub async fn shut_down(self) -> Summary {
        self.shutdown.cancel();
        tokio::time::timeout(SHUTDOWN_DEADLINE, self.handle)
            .await
            .expect("the app shuts down in time")
            .expect("the app task does not panic")
    }
}

/// Reads a response that must be JSON (by content type and by body).
pub async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let code = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.expect("the body is readable");
    assert!(
        content_type.starts_with("application/json"),
        "{code}: content type {content_type:?}, body {text:?}"
    );
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("{code}: body is not JSON ({err}): {text:?}"));
    (code, body)
}

/// The unsigned integer at JSON pointer `pointer`, or a failure naming it.
pub fn u64_at(body: &Value, pointer: &str) -> u64 {
    body.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no unsigned integer at {pointer} in {body}"))
}

/// The number at JSON pointer `pointer`, or a failure naming it.
pub fn f64_at(body: &Value, pointer: &str) -> f64 {
    body.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {body}"))
}

/// Polls `condition` every few milliseconds until it holds; fails the test after `deadline`.
pub async fn wait_until(deadline: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let give_up = Instant::now() + deadline;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A unique path in the system's temporary directory, for config and stats files.
pub fn temp_path(name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "telemetryhub-itest-{}-{}-{nanos}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
    ))
}

/// One sample line of a Prometheus scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct PromSample {
    /// Metric name, with any `_bucket`/`_sum`/`_count` suffix.
    pub name: String,
    /// Label pairs.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// A parsed Prometheus text exposition (format 0.0.4).
#[derive(Debug, Default)]
pub struct Scrape {
    /// `# HELP` text by metric family.
    pub help: BTreeMap<String, String>,
    /// `# TYPE` by metric family.
    pub types: BTreeMap<String, String>,
    /// Every sample line, in order.
    pub samples: Vec<PromSample>,
}

impl Scrape {
    /// Parses the text format; any malformed line is an error naming it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut scrape = Scrape::default();
        for (number, line) in text.lines().enumerate() {
            let at = |err: String| format!("line {}: {err}: {line:?}", number + 1);
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix('#') {
                let mut words = rest.trim_start().splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("HELP"), Some(name), help) => {
                        scrape
                            .help
                            .insert(name.to_owned(), help.unwrap_or_default().to_owned());
                    }
                    (Some("TYPE"), Some(name), Some(kind)) => {
                        const KINDS: [&str; 5] =
                            ["counter", "gauge", "histogram", "summary", "untyped"];
                        if !KINDS.contains(&kind) {
                            return Err(at(format!("unknown type {kind}")));
                        }
                        if scrape
                            .types
                            .insert(name.to_owned(), kind.to_owned())
                            .is_some()
                        {
                            return Err(at(format!("second TYPE for {name}")));
                        }
                    }
                    _ => {} // A plain comment.
                }
                continue;
            }
            scrape.samples.push(parse_sample(line).map_err(at)?);
        }
        Ok(scrape)
    }

    /// Samples of metric `name` whose labels include every pair in `labels`.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&PromSample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample of `name` matching `labels`; fails the test otherwise.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.find(name, labels).as_slice() {
            [one] => one.value,
            other => panic!(
                "expected one sample of {name}{labels:?}, found {}: {other:?}",
                other.len()
            ),
        }
    }

    /// The `# TYPE` of a metric family.
    pub fn type_of(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }
}

/// Parses `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<PromSample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .ok_or("no value")?;
    let (name, mut rest) = line.split_at(name_end);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            // Skip separators; stop at the closing brace.
            while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
            match chars.next() {
                Some((i, '}')) => {
                    rest = &after[i + 1..];
                    break;
                }
                Some((start, _)) => {
                    let eq = after[start..].find('=').ok_or("label without '='")? + start;
                    let key = after[start..eq].trim().to_owned();
                    while chars.next_if(|(i, _)| *i <= eq).is_some() {}
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return Err(format!("label {key} value is not quoted"));
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().map(|(_, c)| c) {
                            Some('"') => break,
                            Some('\\') => match chars.next().map(|(_, c)| c) {
                                Some('n') => value.push('\n'),
                                Some(c @ ('\\' | '"')) => value.push(c),
                                other => return Err(format!("bad escape {other:?}")),
                            },
                            Some(c) => value.push(c),
                            None => return Err("unterminated label value".to_owned()),
                        }
                    }
                    if labels.insert(key.clone(), value).is_some() {
                        return Err(format!("label {key} repeated"));
                    }
                }
                None => return Err("unterminated label set".to_owned()),
            }
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value: f64 = value
        .parse()
        .map_err(|err| format!("bad value {value:?}: {err}"))?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|err| format!("bad timestamp {timestamp:?}: {err}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".to_owned());
    }
    Ok(PromSample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[test]
fn the_scrape_parser_reads_labels_escapes_and_special_values() {
    let text = "# HELP a_total Things.\n# TYPE a_total counter\n\
                a_total{route=\"/devices/{id}\",msg=\"say \\\"hi\\\"\\n\"} 3\n\
                b_bucket{le=\"+Inf\"} 7 1700000000\nc NaN\n";
    let scrape = Scrape::parse(text).unwrap();
    assert_eq!(scrape.type_of("a_total"), Some("counter"));
    assert_eq!(scrape.help["a_total"], "Things.");
    let a = &scrape.find("a_total", &[("route", "/devices/{id}")])[0];
    assert_eq!((a.labels["msg"].as_str(), a.value), ("say \"hi\"\n", 3.0));
    assert_eq!(scrape.value("b_bucket", &[("le", "+Inf")]), 7.0);
    assert!(scrape.value("c", &[]).is_nan());
    for bad in [
        "x{a=1} 2",
        "x{a=\"1\" 2",
        "x 1 2 3",
        "x abc",
        "# TYPE x thing",
    ] {
        assert!(Scrape::parse(bad).is_err(), "{bad}");
    }
}
