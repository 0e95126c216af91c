//! The `telemetryhub` binary: parse the CLI, load the config, start logging, bind, run until
//! SIGINT or SIGTERM, drain, and report.

use std::path::PathBuf;
use std::process::ExitCode;

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use clap::{Parser, Subcommand};
use telemetryhub::app::App;
use telemetryhub::bench::BenchOptions;
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
        #[arg(long, default_value = "block")]
        policy: String,
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
            println!("configuration is valid");
            return ExitCode::SUCCESS;
        }
        Some(Cmd::Healthcheck { url, timeout_ms }) => {
            return healthcheck(&url, Duration::from_millis(timeout_ms));
        }
        Some(Cmd::Simulate {
            path,
            interval_ms,
            baud,
        }) => {
            return simulate(&path, Duration::from_millis(interval_ms), baud);
        }
        Some(Cmd::Bench {
            samples,
            devices,
            rate,
            policy,
            capacity,
            batch_max,
            workers,
        }) => {
            let Ok(policy) = serde_json::from_value(serde_json::Value::String(policy.clone()))
            else {
                eprintln!(
                    "telemetryhub: --policy must be block, drop_oldest or drop_newest, not {policy}"
                );
                return ExitCode::from(EXIT_CONFIG);
            };
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
            let report = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime.block_on(telemetryhub::bench::run(&options)),
                Err(err) => {
                    eprintln!("telemetryhub: cannot start the async runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            println!(
                "{}",
                serde_json::to_string(&report).expect("the report serialises")
            );
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    telemetryhub::telemetry::init(&settings.log.level, settings.log.format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("telemetryhub: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(settings, cli.stats_file))
}

async fn run(settings: Settings, stats_file: Option<PathBuf>) -> ExitCode {
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

/// `GET url` over plain HTTP/1.1; success is a 200 status line. Kept dependency-free so a
/// container health check needs nothing but this binary.
fn healthcheck(url: &str, timeout: Duration) -> ExitCode {
    match probe(url, timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("telemetryhub: healthcheck {url}: {err}");
            ExitCode::FAILURE
        }
    }
}

fn probe(url: &str, timeout: Duration) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("bad address {authority}: {e}"))?
        .next()
        .ok_or("the address resolves to nothing")?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).map_err(|e| e.to_string())?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    match status_line.split(' ').nth(1) {
        Some("200") => Ok(()),
        Some(code) => Err(format!("status {code}")),
        None => Err("no HTTP status line".to_owned()),
    }
}

/// Runs the embedded simulator on a tty until Ctrl-C or until the tty goes away.
fn simulate(path: &std::path::Path, interval: Duration, baud: u32) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("telemetryhub: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let line_speed = if baud == 0 { 115_200 } else { baud };
        let port = match tokio_serial::SerialStream::open(&tokio_serial::new(
            path.to_string_lossy(),
            line_speed,
        )) {
            Ok(port) => port,
            Err(err) => {
                eprintln!("telemetryhub: cannot open {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
        };
        let settings = telemetryhub::config::SimulatorSettings {
            baud,
            ..Default::default()
        };
        let simulator = telemetryhub::device::sim::Simulator::new(settings, interval);
        tokio::select! {
            result = simulator.run(port) => match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("telemetryhub: {}: {err}", path.display());
                    ExitCode::FAILURE
                }
            },
            _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        }
    })
}
