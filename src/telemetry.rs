//! Logging: `tracing` to stderr, human-readable or JSON, filtered by `RUST_LOG` or the config.
//!
//! The filter sits behind a `tracing_subscriber::reload` layer, so a live reload can change
//! `log.level` ([`LogControl::set_level`]); the format is fixed for the process.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::LogFormat;

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set at start: it wins over `log.level`, on reload too.
    env_wins: bool,
}

/// Why the log level could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// The directive does not parse (validation catches this first).
    #[error("`{0}` is not a valid filter directive")]
    Invalid(String),
    /// The subscriber is gone.
    #[error("the log subscriber is gone")]
    Gone,
}

impl LogControl {
    /// Checks that `level` is a valid filter directive, without applying it.
    pub fn check(level: &str) -> Result<(), LogLevelError> {
        EnvFilter::try_new(level)
            .map(drop)
            .map_err(|_| LogLevelError::Invalid(level.to_owned()))
    }

    /// Applies `level` as the filter, unless `RUST_LOG` was set at start (then it stays, and
    /// this returns `Ok(false)`).
    pub fn set_level(&self, level: &str) -> Result<bool, LogLevelError> {
        if self.env_wins {
            return Ok(false);
        }
        let filter =
            EnvFilter::try_new(level).map_err(|_| LogLevelError::Invalid(level.to_owned()))?;
        self.handle
            .reload(filter)
            .map_err(|_| LogLevelError::Gone)?;
        Ok(true)
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`. Returns the control
/// a live reload changes the level with; `None` when a subscriber was already installed (tests).
pub fn init(level: &str, format: LogFormat) -> Option<LogControl> {
    // An empty `RUST_LOG` counts as unset (as `RUST_LOG= telemetryhub` means to).
    let from_env = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|_| EnvFilter::try_from_default_env().ok());
    let env_wins = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    // `try_init` fails only if a subscriber is already set (tests); keep that one.
    let installed = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .try_init(),
    };
    installed.ok().map(|()| LogControl { handle, env_wins })
}
