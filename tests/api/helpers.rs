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

    /// `POST /samples` with `body` as JSON.
    pub async fn post_samples(&self, body: &impl serde::Serialize) -> reqwest::Response {
        self.client
            .post(self.url("/samples"))
            .json(body)
            .send()
            .await
            .expect("POST /samples answers")
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

/// One HTTP/1.1 exchange as it happened on the wire, for requests `reqwest` will not send.
#[derive(Debug, Default)]
pub struct RawReply {
    /// The status code, when a status line arrived.
    pub status: Option<u16>,
    /// Header names (lower-cased) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, as far as `Content-Length` says (or up to EOF without one).
    pub body: Vec<u8>,
    /// The server closed (or reset) the connection after its answer, or without one.
    pub closed: bool,
}

impl RawReply {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, when the content type and the body both say JSON.
    pub fn json(&self) -> Option<Value> {
        let json = self
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json"));
        json.then(|| serde_json::from_slice(&self.body).ok())
            .flatten()
    }
}

/// Opens a connection to `addr`, writes `request` byte for byte (errors ignored: the server may
/// close before it has read everything) and reads one response, for at most `limit`. The
/// connection counts as closed if the server ends it within `limit` after a `Connection: close`
/// answer, or without answering.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> RawReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the test server accepts connections");
    let (mut reader, mut writer) = stream.into_split();
    let request = request.to_vec();
    let write = tokio::spawn(async move {
        let _ = writer.write_all(&request).await;
        // Keep the write half open: a half-close could read as the end of the request.
        std::future::pending::<()>().await;
        drop(writer);
    });
    let give_up = Instant::now() + limit;
    let mut reply = RawReply::default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut head_len = None;
    let mut body_len = None;
    loop {
        if let (Some(head), Some(len)) = (head_len, body_len)
            && buf.len() >= head + len
        {
            break;
        }
        match tokio::time::timeout_at(give_up, reader.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                reply.closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
        if head_len.is_none()
            && let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
        {
            head_len = Some(end + 4);
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            reply.status = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|c| c.parse().ok());
            reply.headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            body_len = reply
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok());
        }
    }
    if let Some(head) = head_len {
        let end = body_len.map_or(buf.len(), |len| (head + len).min(buf.len()));
        reply.body = buf[head..end].to_vec();
    }
    if !reply.closed && reply.header("connection") == Some("close") {
        // Wait for the close the server announced.
        let closed = async {
            loop {
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        reply.closed = tokio::time::timeout_at(give_up, closed).await.is_ok();
    }
    write.abort();
    reply
}

/// The built `telemetryhub` binary, running on a free loopback port with a config file and a
/// stats file of its own; killed if dropped while running.
pub struct Binary {
    /// The process.
    pub child: tokio::process::Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The `--stats-file` it writes at shutdown.
    pub stats: PathBuf,
    config: PathBuf,
    stderr: JoinHandle<String>,
}

impl Binary {
    /// Writes `config` (which must not set `http.listen`) to a file and starts the binary with
    /// it, a free port, a stats file, `RUST_LOG=info` and the `env` pairs, then waits until
    /// `/healthz` answers. Retries on another port if the binary exits first (port taken).
    pub async fn start(config: &str, env: &[(&str, &str)]) -> Self {
        let config_path = temp_path("binary.toml");
        std::fs::write(&config_path, config).expect("the temp dir is writable");
        let stats = temp_path("binary-stats.json");
        for _attempt in 0..3 {
            let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_telemetryhub"));
            command
                .arg("--config")
                .arg(&config_path)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--stats-file")
                .arg(&stats);
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("TELEMETRYHUB") {
                    command.env_remove(key);
                }
            }
            command.env("RUST_LOG", "info");
            for (key, value) in env {
                command.env(key, value);
            }
            let mut child = command
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("the binary starts");
            let mut pipe = child.stderr.take().expect("stderr is piped");
            // Read stderr all along, so a chatty child never blocks on a full pipe.
            let stderr = tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes).await;
                String::from_utf8_lossy(&bytes).into_owned()
            });
            let http = client();
            let mut exited = false;
            wait_until(DEADLINE, "the binary to answer /healthz", async || {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    return true;
                }
                let response = http.get(format!("http://{addr}/healthz")).send().await;
                response.is_ok_and(|r| r.status() == StatusCode::OK)
            })
            .await;
            if !exited {
                return Self {
                    child,
                    addr,
                    stats,
                    config: config_path,
                    stderr,
                };
            }
            let text = stderr.await.unwrap_or_default();
            eprintln!("The binary exited before serving; retrying.\n{text}");
        }
        panic!("the binary did not start in three attempts");
    }

    /// The config file it was started with (a test may rewrite it and send SIGHUP).
    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// The URL of `path` on the binary.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends signal `name` (`TERM`, `INT`) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the child is running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("the kill command runs");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Waits at most `limit` for the process to exit; returns its status and everything it
    /// wrote to stderr.
    pub async fn wait_exit(&mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the child works"),
            Err(_) => {
                let _ = self.child.kill().await;
                let stderr = (&mut self.stderr).await.unwrap_or_default();
                panic!("the binary did not exit within {limit:?}\n{stderr}");
            }
        };
        let stderr = (&mut self.stderr).await.unwrap_or_default();
        (status, stderr)
    }

    /// The stats file, parsed.
    pub fn read_stats(&self) -> Value {
        let text = std::fs::read_to_string(&self.stats).expect("the stats file was written");
        serde_json::from_str(&text).expect("the stats file is JSON")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.stats);
    }
}

/// Asserts the stats file's accounting is exact: `read + ingested = processed + rejected +
/// dropped (every reason) + in_buffer + in_flight`, and `balanced` says so.
pub fn assert_stats_balanced(stats: &Value) {
    let sum = |pointer: &str| -> u64 {
        stats
            .pointer(pointer)
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("no object at {pointer} in {stats}"))
            .values()
            .map(|v| v.as_u64().unwrap_or_else(|| panic!("{v} in {stats}")))
            .sum()
    };
    let accepted = u64_at(stats, "/read") + u64_at(stats, "/ingested");
    let settled = u64_at(stats, "/processed")
        + sum("/rejected")
        + sum("/dropped")
        + u64_at(stats, "/in_buffer")
        + u64_at(stats, "/in_flight");
    assert_eq!(
        accepted, settled,
        "the accounting does not balance: {stats}"
    );
    assert_eq!(stats["balanced"], true, "{stats}");
}
