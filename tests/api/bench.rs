//! `telemetryhub bench` does what its flags say: exactly the samples asked for, at the rate
//! asked for, and bad values are refused. Driven through the library with small numbers, and
//! through the binary for the refusals.

use std::time::Duration;

use telemetryhub::bench::{self, BenchOptions, BenchReport};
use telemetryhub::buffer::OverflowPolicy;

use crate::helpers::DEADLINE;

fn options(samples: u64, devices: usize, rate: Option<u64>) -> BenchOptions {
    BenchOptions {
        samples,
        devices,
        rate,
        policy: OverflowPolicy::Block,
        capacity: 65_536,
        batch_max: 1024,
        workers: Some(2),
        uplink: None,
    }
}

async fn run(options: &BenchOptions) -> BenchReport {
    tokio::time::timeout(DEADLINE, bench::run(options))
        .await
        .unwrap_or_else(|_| panic!("the bench did not finish in time: {options:?}"))
        .expect("the options are valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_processes_exactly_the_samples_asked_for() {
    for (samples, devices) in [(2, 5), (1, 1), (5, 5), (1_000, 3)] {
        let report = run(&options(samples, devices, None)).await;
        let what = format!("--samples {samples} --devices {devices}: {report:?}");
        assert_eq!(report.samples, samples, "{what}");
        assert_eq!(report.processed, samples, "{what}");
        assert_eq!(report.dropped, 0, "{what}");
        assert_eq!(report.rejected, 0, "{what}");
        assert!(report.balanced, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_bench_runs_at_the_rate_asked_for() {
    const RATE: u64 = 200;
    // 300 samples at 200 a second: 1.5 s, split over one device, then three.
    for devices in [1, 3] {
        let report = run(&options(300, devices, Some(RATE))).await;
        let what = format!("--rate {RATE} --devices {devices}: {report:?}");
        assert_eq!(report.processed, 300, "{what}");
        let measured = report.samples_per_sec;
        assert!(
            (measured - RATE as f64).abs() <= RATE as f64 * 0.10,
            "measured {measured:.1} samples/s; {what}"
        );
        assert!(
            (1.35..1.65).contains(&report.seconds),
            "300 samples at {RATE}/s take 1.5 s; {what}"
        );
    }
}

/// The binary's exit code for a bad command line.
const EXIT_CONFIG: i32 = 2;

#[tokio::test]
async fn bad_bench_flags_exit_2_with_a_message() {
    for (flag, value) in [
        ("--rate", "0"),
        ("--samples", "0"),
        ("--devices", "0"),
        ("--capacity", "0"),
        ("--batch-max", "0"),
        ("--workers", "0"),
        ("--rate", "-5"),
        ("--rate", "fast"),
    ] {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_telemetryhub"));
        command
            .args(["bench", "--samples", "10", &format!("{flag}={value}")])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TELEMETRYHUB") {
                command.env_remove(key);
            }
        }
        let output = tokio::time::timeout(Duration::from_secs(10), command.output())
            .await
            .unwrap_or_else(|_| panic!("bench {flag} {value} still runs"))
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(EXIT_CONFIG),
            "bench {flag} {value}: {stderr}"
        );
        assert!(stderr.contains(flag), "bench {flag} {value}: {stderr}");
        assert!(
            output.stdout.is_empty(),
            "bench {flag} {value} printed a report"
        );
    }
}
