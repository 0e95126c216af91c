//! The `telemetryhub` binary: parse the CLI, load the config, start logging, bind, run until
//! SIGINT or SIGTERM (SIGHUP reloads the config), drain, and report. A second signal during the
//! drain stops at once (exit code 130), still writing the report. Under systemd it reports
//! readiness, reloads, watchdog pings and the drain through `NOTIFY_SOCKET` (see
//! `telemetryhub::notify`). `completions` and `man` print what clap generates from the
//! definitions below, before any configuration is read.

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use clap::{Parser, Subcommand};
use telemetryhub::app::App;
use telemetryhub::bench::BenchOptions;
use telemetryhub::buffer::OverflowPolicy;
use telemetryhub::cli;
use telemetryhub::config::{ConfigSource, LogFormat, Settings};
use telemetryhub::reload::{ReloadHandle, Trigger};
use telemetryhub::telemetry::LogControl;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad configuration or command line.
const EXIT_CONFIG: u8 = 2;

/// Exit code when a second signal cut the drain short (128 + SIGINT, as shells report an
/// interrupted program): the stats file is written, but queued samples were dropped.
const EXIT_STOPPED_NOW: u8 = 130;

/// Longest wait, once the gateway has reported, for worker batches still running on blocking
/// threads (they cannot be cancelled); the process exits without them after that.
const LEFTOVER_WAIT: Duration = Duration::from_millis(500);

/// `--version`: the package version and the git commit it was built from (see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TELEMETRYHUB_GIT_COMMIT"),
    ")"
);

/// Edge telemetry gateway: serial sensors → ring buffer → workers → REST + Prometheus.
#[derive(Debug, Parser)]
#[command(version = VERSION, about)]
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
    /// Write the final sample accounting to this file as JSON at shutdown. It is created (or
    /// emptied) at start: a path that cannot be written exits at once with code 2.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check the configuration and exit: 0 if valid, 2 with a message naming the bad key.
    Validate,
    /// Print the shell completion script for SHELL to standard output (e.g. `telemetryhub
    /// completions bash > /etc/bash_completion.d/telemetryhub`).
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output (e.g. `telemetryhub man | man -l -`).
    Man,
    /// Exit 0 if the gateway at URL answers 200 (for container health checks; needs no curl).
    Healthcheck {
        /// The URL to probe (plain HTTP).
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
        /// How long to wait for the answer.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Play a simulated device on a tty (e.g. one end of a socat pty pair) until Ctrl-C; or a
    /// Modbus device serving the example register map (config/modbus-example.toml).
    Simulate {
        /// The tty to write frames to and read commands from.
        #[arg(long, required_unless_present_any = ["modbus_tcp", "modbus_rtu"])]
        path: Option<PathBuf>,
        /// Serve Modbus TCP on this address (e.g. 127.0.0.1:1502) instead.
        #[arg(long, conflicts_with_all = ["path", "modbus_rtu"])]
        modbus_tcp: Option<String>,
        /// Serve Modbus RTU (unit id 1) on this tty instead; --baud paces it.
        #[arg(long, conflicts_with = "path")]
        modbus_rtu: Option<PathBuf>,
        /// Modbus: probability per request of a fault (exception, no answer, dropped
        /// connection, corrupted answer), 0 to 1.
        #[arg(long, default_value_t = 0.0)]
        fault_rate: f64,
        /// Milliseconds between frames; 0 sends as fast as the tty takes them.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Line speed (also paces the simulator like a UART when not 0).
        #[arg(long, default_value_t = 0)]
        baud: u32,
    },
    /// Run the real pipeline in-process (simulated devices, no HTTP); print one JSON line.
    /// Every count must be at least 1 (exit 2 otherwise).
    Bench {
        /// Samples the devices send in all (shared out between them); the run ends when every
        /// one has left the pipeline.
        #[arg(long, default_value_t = 5_000_000, value_parser = at_least_one::<u64>)]
        samples: u64,
        /// Simulated devices, each on its own link.
        #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
        devices: usize,
        /// Total frames per second across devices, each frame sent at its time in the run's
        /// schedule; unpaced (as fast as the pipeline takes them) when omitted.
        #[arg(long, value_parser = at_least_one::<u64>)]
        rate: Option<u64>,
        /// Buffer overflow policy: block, drop_oldest or drop_newest.
        #[arg(long, default_value = "block", value_parser = parse_policy)]
        policy: OverflowPolicy,
        /// Buffer capacity.
        #[arg(long, default_value_t = 65_536, value_parser = at_least_one::<usize>)]
        capacity: usize,
        /// Samples per worker batch.
        #[arg(long, default_value_t = 4096, value_parser = at_least_one::<usize>)]
        batch_max: usize,
        /// Worker permits (default: one per CPU).
        #[arg(long, value_parser = at_least_one::<usize>)]
        workers: Option<usize>,
        /// Also run the uplink: spool, forwarder, and a Mosquitto of the bench's own on a free
        /// loopback port (mosquitto must be installed), with a subscriber checking that every
        /// sample arrived. `live` forwards as the devices send; `replay` spools everything
        /// first, then measures the drain.
        #[arg(long, value_enum)]
        uplink: Option<telemetryhub::bench::uplink::UplinkMode>,
        /// The spool's fsync with --uplink: `always` or an interval in milliseconds.
        #[arg(long, default_value = "100", value_parser = parse_fsync)]
        fsync: telemetryhub::config::FsyncSetting,
        /// The spool directory with --uplink (emptied first); a temporary one when omitted.
        #[arg(long)]
        spool_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // These describe the command line itself: they need no configuration.
    match &cli.command {
        Some(Cmd::Completions { shell }) => return print_completions(*shell),
        Some(Cmd::Man) => return print_man_page(),
        _ => {}
    }
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    // Kept for the whole run: a live reload reads the same layers again.
    let source = ConfigSource {
        listen: cli.listen,
        log_format: cli.log_format,
        ..ConfigSource::new(cli.config.clone(), env)
    };
    let settings = match source.load() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("telemetryhub: configuration error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Some(Cmd::Validate) => {
            for warning in settings.warnings() {
                eprintln!("warning: {warning}");
            }
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Some(Cmd::Completions { .. } | Cmd::Man) => unreachable!("handled before loading"),
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
            modbus_tcp,
            modbus_rtu,
            fault_rate,
            interval_ms,
            baud,
        }) => block_on(async move {
            let interval = Duration::from_millis(interval_ms);
            let modbus = cli::ModbusSim {
                tcp: modbus_tcp.clone(),
                rtu: modbus_rtu.clone(),
                fault_rate,
            };
            let path = path.or(modbus_rtu).unwrap_or_default();
            let result = tokio::select! {
                result = cli::simulate_modbus(&modbus, interval, baud), if modbus.is_some() => result,
                result = cli::simulate(&path, interval, baud), if !modbus.is_some() => result,
                _ = tokio::signal::ctrl_c() => Ok(()),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    let target = modbus_tcp.unwrap_or_else(|| path.display().to_string());
                    eprintln!("telemetryhub: {target}: {err}");
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
            uplink,
            fsync,
            spool_dir,
        }) => {
            let options = BenchOptions {
                samples,
                devices,
                rate,
                policy,
                capacity,
                batch_max,
                workers,
                uplink: uplink.map(|mode| telemetryhub::bench::uplink::UplinkOptions {
                    mode,
                    fsync,
                    spool_dir,
                }),
            };
            // Warnings (a lost broker connection, a damaged spool) belong in a benchmark's output.
            telemetryhub::telemetry::init("warn", settings.log.format);
            block_on(async move {
                match telemetryhub::bench::run(&options).await {
                    Ok(report) => {
                        let json = serde_json::to_string(&report).expect("the report serialises");
                        println!("{json}");
                        ExitCode::SUCCESS
                    }
                    Err(err) => {
                        eprintln!("telemetryhub: bench: {err}");
                        ExitCode::from(EXIT_CONFIG)
                    }
                }
            })
        }
        None => {
            if let Some(path) = &cli.stats_file
                && let Err(err) = prepare_stats_file(path)
            {
                eprintln!(
                    "telemetryhub: cannot write the stats file {}: {err}",
                    path.display()
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            let log = telemetryhub::telemetry::init(&settings.log.level, settings.log.format);
            block_on(run(settings, source, log, cli.stats_file))
        }
    }
}

/// Writes the completion script for `shell`, generated from the same clap definitions that
/// parse the command line.
fn print_completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut command, "telemetryhub", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// Writes the man page, generated from the same clap definitions that parse the command line.
fn print_man_page() -> ExitCode {
    let command = <Cli as clap::CommandFactory>::command();
    match clap_mangen::Man::new(command).render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("telemetryhub: man: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `future` on a new multi-threaded runtime.
fn block_on(future: impl Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => {
            let code = runtime.block_on(future);
            runtime.shutdown_timeout(LEFTOVER_WAIT);
            code
        }
        Err(err) => {
            eprintln!("telemetryhub: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Creates (or empties) the stats file now, so a path that cannot be written is refused before
/// anything starts rather than after a whole run; an old report is not left looking current.
fn prepare_stats_file(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::create(path).map(drop)
}

/// A whole number of at least 1 (clap then names the flag and exits 2 for anything else).
fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(text: &str) -> Result<T, String> {
    match text.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err(format!("`{text}` is not a whole number of at least 1")),
    }
}

fn parse_fsync(text: &str) -> Result<telemetryhub::config::FsyncSetting, String> {
    match text {
        "always" => Ok(telemetryhub::config::FsyncSetting::Always),
        ms => match ms.parse::<u64>() {
            Ok(ms) if (1..=60_000).contains(&ms) => {
                Ok(telemetryhub::config::FsyncSetting::IntervalMs(ms))
            }
            _ => Err(format!(
                "`{text}` is not `always` or an interval of 1 to 60000 ms"
            )),
        },
    }
}

fn parse_policy(text: &str) -> Result<OverflowPolicy, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("`{text}` is not block, drop_oldest or drop_newest"))
}

async fn run(
    settings: Settings,
    source: ConfigSource,
    log: Option<LogControl>,
    stats_file: Option<PathBuf>,
) -> ExitCode {
    for warning in settings.warnings() {
        tracing::warn!(%warning, "Suspicious configuration.");
    }
    let hangups = match Hangups::listen() {
        Ok(hangups) => hangups,
        Err(err) => {
            tracing::error!(error = %err, "Cannot listen for SIGHUP.");
            return ExitCode::FAILURE;
        }
    };
    let app = match App::build(settings).await {
        // systemd's NOTIFY_SOCKET and WATCHDOG_USEC, when it started us.
        Ok(app) => app
            .with_notifier(telemetryhub::notify::Notifier::from_env())
            .with_reload(source, log),
        Err(err) => {
            tracing::error!(error = %err, "Cannot start.");
            // A spool directory or broker setting that cannot be used is a configuration
            // error, named by its key; a busy port is not.
            return match err {
                telemetryhub::app::AppError::Uplink(_) => ExitCode::from(EXIT_CONFIG),
                _ => ExitCode::FAILURE,
            };
        }
    };
    if let Some(reload) = app.reload_handle() {
        hangups.reload_with(reload);
    }
    let (drain, stop_now) = match watch_signals() {
        Ok(tokens) => tokens,
        Err(err) => {
            tracing::error!(error = %err, "Cannot listen for signals.");
            return ExitCode::FAILURE;
        }
    };
    let summary = app
        .run_until_or_stopped(drain.cancelled_owned(), stop_now.cancelled_owned())
        .await;
    if let Some(path) = stats_file {
        let json = serde_json::to_string_pretty(&summary).expect("the summary serialises");
        if let Err(err) = std::fs::write(&path, json + "\n") {
            tracing::error!(path = %path.display(), error = %err, "Cannot write the stats file.");
            return ExitCode::FAILURE;
        }
    }
    if summary.stopped_early {
        ExitCode::from(EXIT_STOPPED_NOW)
    } else {
        ExitCode::SUCCESS
    }
}

/// Listens for SIGINT and SIGTERM for the rest of the process: the first signal cancels the
/// first token (drain and exit), the next one the second (stop now).
///
/// The handlers stay installed after the first signal, so the second is not lost (with tokio, a
/// signal nobody is waiting for any more is caught and ignored).
fn watch_signals() -> std::io::Result<(CancellationToken, CancellationToken)> {
    let mut signals = Signals::new()?;
    let drain = CancellationToken::new();
    let stop_now = CancellationToken::new();
    let tokens = (drain.clone(), stop_now.clone());
    tokio::spawn(async move {
        let signal = signals.next().await;
        tracing::info!(signal, "Signal received.");
        drain.cancel();
        let signal = signals.next().await;
        tracing::warn!(signal, "Second signal; stopping now.");
        stop_now.cancel();
    });
    Ok(tokens)
}

/// SIGHUP, caught from the start of [`run`]: a hang-up while the gateway starts (a long spool
/// recovery, say) must not end the process, which is SIGHUP's default action.
struct Hangups {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Hangups {
    fn listen() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                signal: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Reloads the configuration on every SIGHUP, for the rest of the process (Prometheus,
    /// Vector and Telegraf do the same); one caught during start-up reloads once the gateway
    /// runs. Signals that arrive during a reload are merged into one more reload after it (the
    /// kernel does not queue them); the outcome is logged by the reloader.
    fn reload_with(self, reload: ReloadHandle) {
        #[cfg(unix)]
        {
            let mut hangups = self.signal;
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::info!(
                        signal = "SIGHUP",
                        "Signal received; reloading the configuration."
                    );
                    if let Err(telemetryhub::reload::ReloadError::ShuttingDown) =
                        reload.reload(Trigger::Signal).await
                    {
                        break;
                    }
                }
            });
        }
        #[cfg(not(unix))]
        drop((self, reload));
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, installed once.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the next signal; returns its name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            // `recv` ends only if the runtime shuts down; then nobody waits for this any more.
            tokio::select! {
                Some(()) = self.interrupt.recv() => "SIGINT",
                Some(()) = self.terminate.recv() => "SIGTERM",
                else => std::future::pending().await,
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            "SIGINT"
        }
    }
}
