//! The real `telemetryhub` binary: it drains and exits 0 on SIGTERM and SIGINT, writing a
//! balanced `--stats-file`; `validate` accepts the default config and rejects bad ones with
//! exit code 2 and a message naming the key; a bad config never makes the gateway panic.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::helpers::{DEADLINE, client, temp_path, u64_at, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_telemetryhub");

/// Shutdown grace given to the binary; it must exit well within this plus its final waits.
const GRACE_MS: u64 = 3_000;

/// The binary's exit code for a bad configuration.
const EXIT_CONFIG: i32 = 2;

/// A fast device and a short grace period; the listen address comes from `--listen`.
const CONFIG: &str = "
[pipeline]
shutdown_grace_ms = 3000

[[devices]]
id = \"bin0\"
sample_interval_ms = 10

[devices.simulator]
seed = 11
";

/// A temporary file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        let path = temp_path(name);
        std::fs::write(&path, contents).expect("the temp dir is writable");
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The binary with a clean environment: no inherited config overrides, info logs.
fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TELEMETRYHUB") {
            command.env_remove(key);
        }
    }
    command.env("RUST_LOG", "info").stdin(Stdio::null());
    command
}

/// Runs the binary to completion, with a deadline.
async fn run(args: &[&str]) -> Output {
    let mut command = command(args);
    command.kill_on_drop(true);
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("the binary exits in time")
        .expect("the binary runs")
}

/// A port that was free a moment ago (the binary needs a number it can be told).
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("a bound address").port()
}

/// A running gateway process.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    stderr: JoinHandle<String>,
}

impl Gateway {
    /// Starts the binary and waits until `/healthz` answers. The free port can be taken by
    /// someone else before the binary binds it; then the binary exits and we try another.
    async fn start(config: &Path, stats: &Path) -> Self {
        for _attempt in 0..3 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let listen = addr.to_string();
            let mut child = command(&[
                "--config",
                &config.to_string_lossy(),
                "--listen",
                &listen,
                "--stats-file",
                &stats.to_string_lossy(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
            // Read stderr all along, so a chatty child never blocks on a full pipe.
            let mut pipe = child.stderr.take().expect("stderr is piped");
            let stderr = tokio::spawn(async move {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text).await;
                text
            });
            let client = client();
            let mut exited = false;
            wait_until(DEADLINE, "the binary to answer /healthz", async || {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    return true;
                }
                let url = format!("http://{addr}/healthz");
                let response = client.get(url).send().await;
                response.is_ok_and(|r| r.status() == StatusCode::OK)
            })
            .await;
            if !exited {
                return Self {
                    child,
                    addr,
                    stderr,
                };
            }
            let stderr = stderr.await.unwrap_or_default();
            eprintln!("The binary exited before serving; retrying.\n{stderr}");
        }
        panic!("the binary did not start in three attempts");
    }

    /// Sends a signal with the `kill` command.
    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the child is running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("the kill command runs");
        assert!(status.success(), "kill -{name} {pid}");
    }
}

/// Starts the binary, lets samples flow, sends `signal`, and checks the clean exit.
async fn drains_and_exits_on(signal: &str) {
    let config = TempFile::new("signal.toml", CONFIG);
    let stats = TempFile(temp_path("stats.json"));
    let mut gateway = Gateway::start(&config.0, &stats.0).await;

    let client = client();
    let url = format!("http://{}/status", gateway.addr);
    let mut status = Value::Null;
    wait_until(DEADLINE, "samples to flow through the binary", async || {
        let Ok(response) = client.get(&url).send().await else {
            return false;
        };
        status = response.json().await.unwrap_or_default();
        status["metrics"]["samples_processed"].as_u64() > Some(20)
    })
    .await;
    let processed_before = u64_at(&status, "/metrics/samples_processed");

    gateway.signal(signal);
    let signalled = Instant::now();
    let grace = Duration::from_millis(GRACE_MS);
    // Beyond the grace period the binary may still wait a little for stragglers; not forever.
    let limit = grace + Duration::from_secs(5);
    let exit = tokio::time::timeout(limit, gateway.child.wait())
        .await
        .unwrap_or_else(|_| panic!("no exit within {limit:?} of {signal}"))
        .expect("waiting for the child works");
    let took = signalled.elapsed();
    assert!(took < grace, "a paced device drains at once, took {took:?}");
    let stderr = gateway.stderr.await.expect("the stderr reader finishes");
    assert!(exit.success(), "{signal}: exit {exit:?}\n{stderr}");
    assert!(stderr.contains("Shutdown complete."), "{stderr}");
    assert!(
        stderr.contains(&format!("SIG{signal}")),
        "the signal is logged: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let text = std::fs::read_to_string(&stats.0).expect("the stats file was written");
    let summary: Value = serde_json::from_str(&text).expect("the stats file is JSON");
    assert_eq!(summary["balanced"], true, "{summary}");
    assert!(
        u64_at(&summary, "/processed") >= processed_before,
        "{summary}"
    );
    let accepted = u64_at(&summary, "/read") + u64_at(&summary, "/ingested");
    let dropped = &summary["dropped"];
    let rejected = &summary["rejected"];
    let settled = u64_at(&summary, "/processed")
        + u64_at(rejected, "/non_finite")
        + u64_at(rejected, "/out_of_range")
        + u64_at(rejected, "/calibration_overflow")
        + u64_at(dropped, "/overflow")
        + u64_at(dropped, "/shutdown")
        + u64_at(dropped, "/stopped")
        + u64_at(dropped, "/worker_panic")
        + u64_at(&summary, "/in_buffer")
        + u64_at(&summary, "/in_flight");
    assert_eq!(accepted, settled, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    drains_and_exits_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_and_exits_cleanly() {
    drains_and_exits_on("INT").await;
}

#[tokio::test]
async fn validate_accepts_the_default_config() {
    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
    let output = run(&["validate", "--config", default]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("valid"), "{stdout}");
    // Without a file, the built-in defaults are valid too.
    assert!(run(&["validate"]).await.status.success());
}

/// Valid, but a POST of 5000 samples can never fit a buffer of 1000.
const SUSPICIOUS: &str = "[http]\ningest_max_samples = 5000\n\n[buffer]\ncapacity = 1000\n";

#[tokio::test]
async fn validate_prints_warnings_and_still_succeeds() {
    let file = TempFile::new("suspicious.toml", SUSPICIOUS);
    let output = run(&["validate", "--config", &file.0.to_string_lossy()]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{output:?}");
    let warnings: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("http.ingest_max_samples"), "{stderr}");
    // The defaults warn about nothing.
    let output = run(&["validate"]).await;
    assert!(output.status.success(), "{output:?}");
    assert!(output.stderr.is_empty(), "{output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_logs_warnings_at_start() {
    let config = TempFile::new("suspicious-run.toml", &format!("{SUSPICIOUS}\n{CONFIG}"));
    let stats = TempFile(temp_path("suspicious-stats.json"));
    let mut gateway = Gateway::start(&config.0, &stats.0).await;
    gateway.signal("TERM");
    tokio::time::timeout(DEADLINE, gateway.child.wait())
        .await
        .expect("the binary exits in time")
        .expect("waiting for the child works");
    let stderr = gateway.stderr.await.expect("the stderr reader finishes");
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("http.ingest_max_samples"));
    assert!(warning.is_some(), "{stderr}");
}

/// Bad files and the key each message must name. The last three once passed `validate` and
/// then crashed the gateway at start: a 104 GB allocation (exit 134) and semaphores above
/// tokio's `MAX_PERMITS` (a panic, exit 101).
const BAD_CONFIGS: [(&str, &str); 7] = [
    ("[buffer]\ncapacity = \"abc\"\n", "buffer.capacity"),
    ("[pipeline]\nworkers = 0\n", "pipeline.workers"),
    ("[buffer]\ncapacty = 5\n", "buffer.capacty"),
    ("[http]\nauth = true\n", "http.auth"),
    ("[buffer]\ncapacity = 1000000000\n", "buffer.capacity"),
    (
        "[pipeline]\nworkers = 9223372036854775807\n",
        "pipeline.workers",
    ),
    (
        "[http]\nmax_concurrent_requests = 9223372036854775807\n",
        "http.max_concurrent_requests",
    ),
];

#[tokio::test]
async fn validate_rejects_bad_configs_naming_the_key() {
    for (text, key) in BAD_CONFIGS {
        let file = TempFile::new("bad.toml", text);
        let output = run(&["validate", "--config", &file.0.to_string_lossy()]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{text}: {stderr}");
        assert!(
            stderr.contains(key),
            "{text}: message must name {key}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn the_gateway_refuses_a_bad_config_without_panicking() {
    for (text, key) in BAD_CONFIGS {
        let file = TempFile::new("bad-run.toml", text);
        let port = free_port().to_string();
        let listen = format!("127.0.0.1:{port}");
        let output = run(&["--config", &file.0.to_string_lossy(), "--listen", &listen]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{text}: {stderr}");
        assert!(stderr.contains(key), "{text}: {stderr}");
        assert!(!stderr.contains("panicked"), "{text}: {stderr}");
    }
}
