//! SIGTERM under full load, against the built binary: an unpaced simulator filling a `block`
//! buffer faster than a deliberately narrow worker stage drains it, concurrent `POST /samples`
//! ingest, and pollers. Readiness turns 503 before the process goes; it exits 0 shortly after
//! its grace period; and the stats file accounts for every sample, with the backlog left at
//! the deadline counted as `dropped.shutdown` and the ingest count equal to what clients were
//! told was accepted.
//!
//! Why this is deterministic: with `batch_max = 1` and one worker the stage settles roughly
//! 10-50 thousand samples a second in a debug build (about 200 000 at most in release), while
//! the unpaced simulator offers several times that, so the buffer fills before the signal. A
//! grace of 250 ms cannot drain a backlog of 80 000, so the deadline expires with samples queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{Binary, DEADLINE, assert_stats_balanced, client, u64_at, wait_until};

const GRACE: Duration = Duration::from_millis(250);
/// Queue depth to reach before the signal (the capacity is 100 000).
const BACKLOG: u64 = 80_000;

const CONFIG: &str = "
[buffer]
capacity = 100000
overflow = \"block\"

[pipeline]
batch_max = 1
workers = 1
shutdown_grace_ms = 250

[[devices]]
id = \"sim0\"
sample_interval_ms = 0
autostart = false

[devices.simulator]
seed = 5
";

/// A client posting batches of 500 samples until `stop`; returns the samples accepted.
fn spawn_ingest(
    base: String,
    stop: CancellationToken,
    accepted: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = client();
        let batch: Vec<Value> = (0..500)
            .map(|i| json!({ "device": "sim0", "value": f64::from(i), "unit": "V" }))
            .collect();
        while !stop.is_cancelled() {
            let response = http
                .post(format!("{base}/samples"))
                .json(&batch)
                .send()
                .await;
            match response {
                Ok(r) if r.status() == StatusCode::ACCEPTED => {
                    let body: Value = r.json().await.expect("a 202 has a JSON body");
                    accepted.fetch_add(u64_at(&body, "/accepted"), Ordering::SeqCst);
                }
                Ok(r) => {
                    let code = r.status();
                    assert!(
                        code == StatusCode::TOO_MANY_REQUESTS
                            || code == StatusCode::SERVICE_UNAVAILABLE,
                        "ingest got {code}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // The server is going or gone.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_full_load_exits_in_time_with_exact_accounting() {
    let mut binary = Binary::start(CONFIG, &[]).await;
    let base = format!("http://{}", binary.addr);
    let http = client();
    let stop = CancellationToken::new();

    // Ingest first, so some of it is accepted before the device fills the buffer.
    let accepted = Arc::new(AtomicU64::new(0));
    let ingest: Vec<_> = (0..2)
        .map(|_| spawn_ingest(base.clone(), stop.clone(), accepted.clone()))
        .collect();
    wait_until(DEADLINE, "some ingest to be accepted", async || {
        accepted.load(Ordering::SeqCst) > 0
    })
    .await;

    // Readiness poller: remembers when it first saw 503.
    let signalled = Arc::new(AtomicBool::new(false));
    let not_ready_after_signal = Arc::new(AtomicBool::new(false));
    let readiness = {
        let (base, stop, signalled, seen) = (
            base.clone(),
            stop.clone(),
            signalled.clone(),
            not_ready_after_signal.clone(),
        );
        tokio::spawn(async move {
            let http = client();
            while !stop.is_cancelled() {
                if let Ok(r) = http.get(format!("{base}/readyz")).send().await
                    && r.status() == StatusCode::SERVICE_UNAVAILABLE
                    && signalled.load(Ordering::SeqCst)
                {
                    seen.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let response = http.post(format!("{base}/start")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut status = Value::Null;
    wait_until(DEADLINE, "the backlog to build up", async || {
        status = http
            .get(format!("{base}/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        u64_at(&status, "/metrics/queue_depth") >= BACKLOG
    })
    .await;
    let depth_seen = u64_at(&status, "/metrics/queue_depth");
    let processed_seen = u64_at(&status, "/metrics/samples_processed");

    signalled.store(true, Ordering::SeqCst);
    binary.signal("TERM");
    let sent = Instant::now();
    let (exit, stderr) = binary.wait_exit(GRACE + Duration::from_secs(10)).await;
    let took = sent.elapsed();
    stop.cancel();
    for task in ingest {
        task.await
            .expect("the ingest clients saw only expected answers");
    }
    readiness.await.unwrap();
    eprintln!("exit after {took:?} (grace {GRACE:?})");

    assert!(exit.success(), "{exit:?}\n{stderr}");
    assert!(
        took < GRACE + Duration::from_millis(1500),
        "exit took {took:?}, grace {GRACE:?}"
    );
    assert!(
        not_ready_after_signal.load(Ordering::SeqCst),
        "readiness never answered 503 during the drain"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("Grace period over"), "{stderr}");
    assert!(
        stderr.contains("Shutdown complete.") && stderr.contains("balanced=true"),
        "{stderr}"
    );

    let stats = binary.read_stats();
    assert_stats_balanced(&stats);
    assert_eq!(u64_at(&stats, "/in_buffer"), 0, "{stats}");
    assert_eq!(u64_at(&stats, "/in_flight"), 0, "{stats}");
    assert_eq!(u64_at(&stats, "/abandoned_in_flight"), 0, "{stats}");
    assert_eq!(
        u64_at(&stats, "/ingested"),
        accepted.load(Ordering::SeqCst),
        "the stats count exactly what clients were told was accepted: {stats}"
    );
    assert!(u64_at(&stats, "/read") > 0, "{stats}");
    let dropped_shutdown = u64_at(&stats, "/dropped/shutdown");
    assert!(
        dropped_shutdown > 0,
        "the grace period expired with a backlog: {stats}"
    );
    // Every sample queued when we looked was processed afterwards or dropped at the deadline.
    let processed_after = u64_at(&stats, "/processed") - processed_seen;
    assert!(
        dropped_shutdown + processed_after >= depth_seen,
        "queued {depth_seen}, then processed {processed_after} and dropped {dropped_shutdown}: {stats}"
    );
    assert_eq!(
        u64_at(&stats, "/dropped/overflow"),
        0,
        "block never overflows: {stats}"
    );
    assert_eq!(u64_at(&stats, "/dropped/worker_panic"), 0, "{stats}");
}
