//! The `telemetryhub` binary: parse the CLI, load the config, start logging, bind, run until
//! SIGINT or SIGTERM, drain, and report.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use telemetryhub::app::App;
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
    if let Some(Cmd::Validate) = cli.command {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
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
