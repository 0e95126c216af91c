//! Where the settings come from, kept for the whole run so a live reload reads them exactly as
//! start-up did: the defaults, the file (read again), the environment captured at start, and
//! the command-line flags, in that order.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{ConfigError, ENV_PREFIX, LogFormat, Settings};

/// The layers of the configuration, as the command line gave them.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The TOML file (`--config`); the built-in defaults alone when `None`.
    pub file: Option<PathBuf>,
    /// The `TELEMETRYHUB__*` environment variables (other variables are dropped).
    pub env: Vec<(String, String)>,
    /// `--listen`, overriding the file.
    pub listen: Option<SocketAddr>,
    /// `--log-format`, overriding the file.
    pub log_format: Option<LogFormat>,
}

impl ConfigSource {
    /// A source over `file` and the `TELEMETRYHUB__*` variables among `env`.
    pub fn new(file: Option<PathBuf>, env: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            file,
            env: env
                .into_iter()
                .filter(|(name, _)| name.starts_with(ENV_PREFIX))
                .collect(),
            listen: None,
            log_format: None,
        }
    }

    /// Loads and validates the settings: the same function at start and on every reload, so a
    /// reload refuses exactly what `telemetryhub validate` refuses, with the same message.
    pub fn load(&self) -> Result<Settings, ConfigError> {
        let mut settings = Settings::load(self.file.as_deref(), self.env.iter().cloned())?;
        if let Some(listen) = self.listen {
            settings.http.listen = listen;
        }
        if let Some(format) = self.log_format {
            settings.log.format = format;
        }
        Ok(settings)
    }
}
