//! The `telemetryhub` binary: parse the CLI, load the config, start logging, bind, run until
//! SIGINT or SIGTERM, drain, and report.

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use clap::{Parser, Subcommand};
use telemetryhub::app::App;
use telemetryhub::bench::BenchOptions;
use telemetryhub::buffer::OverflowPolicy;
use telemetryhub::cli;
use telemetryhub::config::{LogFormat, Settings};

/// Exit code for a bad configuration or command line.
const EXIT_CONFIG: u8 = 2;

/// Edge telemetry gateway: serial sensors → ring buffer → workers → REST + Prometheus.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file; built-in defaults (config/default.toml) when omitted.
    #[arg(long, global = true, env = "TELEMETRYHUB_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, overriding the config (e.g. 127.0.0.1:8080).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Log format, overriding the config.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Write the final sample accounting to this file as JSON at shutdown.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check the configuration and exit: 0 if valid, 2 with a message naming the bad key.
    Validate,
    /// Exit 0 if the gateway at URL answers 200 (for container health checks; needs no curl).
    Healthcheck {
        /// The URL to probe (plain HTTP).
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
        /// How long to wait for the answer.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Play a simulated device on a tty (e.g. one end of a socat pty pair) until Ctrl-C.
    Simulate {
        /// The tty to write frames to and read commands from.
        #[arg(long)]
        path: PathBuf,
        /// Milliseconds between frames; 0 sends as fast as the tty takes them.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Line speed (also paces the simulator like a UART when not 0).
        #[arg(long, default_value_t = 0)]
        baud: u32,
    },
    /// Run the real pipeline in-process (unpaced simulators, no HTTP); print one JSON line.
    Bench {
        /// Samples to push through the pipeline.
        #[arg(long, default_value_t = 5_000_000)]
        samples: u64,
        /// Simulated devices, each on its own link.
        #[arg(long, default_value_t = 1)]
        devices: usize,
        /// Total frames per second (paced like a UART); unpaced when omitted.
        #[arg(long)]
        rate: Option<u64>,
        /// Buffer overflow policy: block, drop_oldest or drop_newest.
        #[arg(long, default_value = "block", value_parser = parse_policy)]
        policy: OverflowPolicy,
        /// Buffer capacity.
        #[arg(long, default_value_t = 65_536)]
        capacity: usize,
        /// Samples per worker batch.
        #[arg(long, default_value_t = 1024)]
        batch_max: usize,
        /// Worker permits (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    let mut settings = match Settings::load(cli.config.as_deref(), env) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("telemetryhub: configuration error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(listen) = cli.listen {
        settings.http.listen = listen;
    }
    if let Some(format) = cli.log_format {
        settings.log.format = format;
    }
    match cli.command {
        Some(Cmd::Validate) => {
            for warning in settings.warnings() {
                eprintln!("warning: {warning}");
            }
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Some(Cmd::Healthcheck { url, timeout_ms }) => {
            match cli::probe(&url, Duration::from_millis(timeout_ms)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("telemetryhub: healthcheck {url}: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Cmd::Simulate {
            path,
            interval_ms,
            baud,
        }) => block_on(async move {
            let result = tokio::select! {
                result = cli::simulate(&path, Duration::from_millis(interval_ms), baud) => result,
                _ = tokio::signal::ctrl_c() => Ok(()),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("telemetryhub: {}: {err}", path.display());
                    ExitCode::FAILURE
                }
            }
        }),
        Some(Cmd::Bench {
            samples,
            devices,
            rate,
            policy,
            capacity,
            batch_max,
            workers,
        }) => {
            if samples == 0 || devices == 0 || capacity == 0 || batch_max == 0 || workers == Some(0)
            {
                eprintln!("telemetryhub: bench sizes must be at least 1");
                return ExitCode::from(EXIT_CONFIG);
            }
            let options = BenchOptions {
                samples,
                devices,
                rate,
                policy,
                capacity,
                batch_max,
                workers,
            };
            block_on(async move {
                let report = telemetryhub::bench::run(&options).await;
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("the report serialises")
                );
                ExitCode::SUCCESS
            })
        }
        None => {
            telemetryhub::telemetry::init(&settings.log.level, settings.log.format);
            block_on(run(settings, cli.stats_file))
        }
    }
}

/// Runs `future` on a new multi-threaded runtime.
fn block_on(future: impl Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(future),
        Err(err) => {
            eprintln!("telemetryhub: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

fn parse_policy(text: &str) -> Result<OverflowPolicy, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("`{text}` is not block, drop_oldest or drop_newest"))
}

async fn run(settings: Settings, stats_file: Option<PathBuf>) -> ExitCode {
    for warning in settings.warnings() {
        tracing::warn!(%warning, "Suspicious configuration.");
    }
    let app = match App::build(settings).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!(error = %err, "Cannot start.");
            return ExitCode::FAILURE;
        }
    };
    let summary = app.run_until(shutdown_signal()).await;
    if let Some(path) = stats_file {
        let json = serde_json::to_string_pretty(&summary).expect("the summary serialises");
        if let Err(err) = std::fs::write(&path, json + "\n") {
            tracing::error!(path = %path.display(), error = %err, "Cannot write the stats file.");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "Cannot listen for Ctrl-C.");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "Cannot listen for SIGTERM.");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!(signal = "SIGINT", "Signal received."),
        _ = terminate => tracing::info!(signal = "SIGTERM", "Signal received."),
    }
}
