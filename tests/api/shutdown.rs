//! Shutdown of the real binary, as an operator sees it: a client still sending its first
//! request's headers does not hold SIGTERM back, while a request in flight is answered; the
//! report times the drain and the whole shutdown apart; a second signal stops at once and still
//! reports; a stats file that cannot be written is refused before anything starts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{
    Binary, DEADLINE, assert_stats_balanced, client, f64_at, temp_path, u64_at, wait_until,
};

/// Far longer than any wait below, so only the shutdown itself can end a slow client.
const CLIENT_TIMEOUTS: &str = "
[http]
header_read_timeout_ms = 60000
request_timeout_ms = 60000

[pipeline]
shutdown_grace_ms = 3000

[[devices]]
id = \"sim0\"
sample_interval_ms = 10
";

/// How long the in-flight upload holds its body back once shutdown has reached HTTP.
const UPLOAD_HOLD: Duration = Duration::from_secs(1);

/// A raw HTTP/1.1 connection, for requests sent a piece at a time.
struct RawClient {
    stream: TcpStream,
    received: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr, first_bytes: &[u8]) -> Self {
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("the binary accepts connections");
        stream
            .write_all(first_bytes)
            .await
            .expect("the first bytes are sent");
        Self {
            stream,
            received: Vec::new(),
        }
    }

    /// Reads until the received bytes contain `needle`; false if the server closed first.
    async fn read_until(&mut self, needle: &[u8], limit: Duration) -> bool {
        let give_up = tokio::time::Instant::now() + limit;
        let mut chunk = [0u8; 4096];
        while !self.received.windows(needle.len()).any(|w| w == needle) {
            match tokio::time::timeout_at(give_up, self.stream.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => return false,
                Ok(Ok(n)) => self.received.extend_from_slice(&chunk[..n]),
                Err(_) => panic!(
                    "nothing like {:?} within {limit:?}; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&self.received)
                ),
            }
        }
        true
    }

    /// Waits at most `limit` for the server to close the connection; false if it did not.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut chunk = [0u8; 4096];
        let give_up = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(give_up, self.stream.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(n)) => self.received.extend_from_slice(&chunk[..n]),
                Err(_) => return false,
            }
        }
    }
}

/// The first status code in `bytes` after an interim `100 Continue`.
fn final_status(bytes: &[u8]) -> Option<u16> {
    String::from_utf8_lossy(bytes)
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|reply| reply.get(..3)?.parse().ok())
        .find(|code| *code != 100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_a_half_sent_request_at_once_and_answers_the_one_in_flight() {
    let mut binary = Binary::start(CLIENT_TIMEOUTS, &[]).await;
    let host = format!("Host: {}\r\n", binary.addr);

    // Half a request: the request line and one header, never the blank line.
    let half = format!("GET /status HTTP/1.1\r\n{host}");
    let mut half_sent = RawClient::connect(binary.addr, half.as_bytes()).await;
    // A request in flight: its handler is reading the body when `100 Continue` comes back.
    let body = br#"[{"device":"sim0","value":1.5,"unit":"V"}]"#;
    let head = format!(
        "POST /samples HTTP/1.1\r\n{host}Content-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    let mut upload = RawClient::connect(binary.addr, head.as_bytes()).await;
    assert!(upload.read_until(b"100 Continue", DEADLINE).await);
    // The server accepts connections in order: the upload's being served means the half-sent
    // one was accepted before it.

    binary.signal("TERM");
    let signalled = Instant::now();
    assert!(
        half_sent.closed_within(Duration::from_secs(5)).await,
        "a connection with no request in flight is still open {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert!(
        half_sent.received.is_empty(),
        "a half-sent request gets no answer: {:?}",
        String::from_utf8_lossy(&half_sent.received)
    );

    // The request in flight still finishes, even after a pause.
    tokio::time::sleep(UPLOAD_HOLD).await;
    upload
        .stream
        .write_all(body)
        .await
        .expect("the upload's connection is still open");
    assert!(upload.read_until(b"\r\n\r\n{", DEADLINE).await);
    let status = final_status(&upload.received);
    assert!(
        matches!(status, Some(202 | 503)),
        "the request in flight gets its answer: {:?}",
        String::from_utf8_lossy(&upload.received)
    );

    let (exit, stderr) = binary.wait_exit(Duration::from_secs(5)).await;
    assert!(exit.success(), "{exit:?}\n{stderr}");
    assert!(stderr.contains("Shutdown complete."), "{stderr}");
    let stats: Value = binary.read_stats();
    assert_stats_balanced(&stats);
    // The pipeline drained a paced device's few samples at once; the upload held up only the
    // HTTP stage, which the total shows.
    let drain = f64_at(&stats, "/drain_seconds");
    let total = f64_at(&stats, "/shutdown_seconds");
    assert!(
        drain < 0.5,
        "drain_seconds {drain} measures more than the drain: {stats}"
    );
    assert!(
        total >= UPLOAD_HOLD.as_secs_f64() && total >= drain,
        "shutdown_seconds {total} is not the whole shutdown: {stats}"
    );
}

/// A backlog that takes seconds to drain: an unpaced device fills a `block` buffer far faster
/// than one worker taking one sample per batch empties it (see `shutdown_load.rs`), and the
/// grace period would let the drain run for a minute.
const SLOW_DRAIN: &str = "
[buffer]
capacity = 100000
overflow = \"block\"

[pipeline]
batch_max = 1
workers = 1
shutdown_grace_ms = 60000

[[devices]]
id = \"sim0\"
sample_interval_ms = 0

[devices.simulator]
seed = 5
";

/// Queue depth to reach before the first signal: seconds of work for the worker.
const BACKLOG: u64 = 50_000;

/// The binary's exit code when a second signal cut the drain short.
const EXIT_STOPPED_NOW: i32 = 130;

/// SIGTERM starts the drain of a long backlog; `second` during the drain must end it at once,
/// still writing a balanced stats file in which the samples left behind are dropped.
async fn a_second_signal_stops_the_drain_at_once(second: &str) {
    let mut binary = Binary::start(SLOW_DRAIN, &[]).await;
    let http = client();
    wait_until(DEADLINE, "the backlog to build up", async || {
        let Ok(response) = http.get(binary.url("/status")).send().await else {
            return false;
        };
        let status: Value = response.json().await.unwrap_or_default();
        status["metrics"]["queue_depth"].as_u64() >= Some(BACKLOG)
    })
    .await;

    binary.signal("TERM");
    wait_until(
        DEADLINE,
        "readiness to turn 503 (the drain began)",
        async || {
            let response = http.get(binary.url("/readyz")).send().await;
            response.is_ok_and(|r| r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE)
        },
    )
    .await;
    binary.signal(second);
    let signalled = Instant::now();
    let (exit, stderr) = binary.wait_exit(Duration::from_secs(5)).await;
    let took = signalled.elapsed();

    assert_eq!(exit.code(), Some(EXIT_STOPPED_NOW), "{exit:?}\n{stderr}");
    assert!(
        took < Duration::from_secs(2),
        "exit took {took:?}\n{stderr}"
    );
    assert!(stderr.contains("Second signal; stopping now."), "{stderr}");
    assert!(stderr.contains("Shutdown complete."), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let stats = binary.read_stats();
    assert_stats_balanced(&stats);
    assert_eq!(stats["stopped_early"], true, "{stats}");
    assert_eq!(u64_at(&stats, "/in_buffer"), 0, "{stats}");
    assert_eq!(u64_at(&stats, "/in_flight"), 0, "{stats}");
    assert!(
        u64_at(&stats, "/dropped/shutdown") > 0,
        "the backlog left behind is dropped for shutdown: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_the_drain_at_once() {
    a_second_signal_stops_the_drain_at_once("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigint_during_the_drain_stops_it_at_once() {
    a_second_signal_stops_the_drain_at_once("INT").await;
}

/// The binary's exit code for a bad configuration or command line.
const EXIT_CONFIG: i32 = 2;

#[tokio::test]
async fn a_stats_file_that_cannot_be_written_is_refused_at_start() {
    let dir = temp_path("stats-dir");
    std::fs::create_dir(&dir).expect("the temp dir is writable");
    let missing_dir = dir.join("missing").join("stats.json");
    for path in [&missing_dir, &dir] {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_telemetryhub"));
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--stats-file")
            .arg(path)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TELEMETRYHUB") {
                command.env_remove(key);
            }
        }
        let output = tokio::time::timeout(Duration::from_secs(10), command.output())
            .await
            .unwrap_or_else(|_| panic!("still running with --stats-file {}", path.display()))
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "the message names the path: {stderr}"
        );
        assert!(!stderr.contains("listening"), "it never started: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(!missing_dir.exists());
    std::fs::remove_dir(&dir).expect("the test's directory is empty");
}
