//! Typed settings for the whole gateway.
//!
//! Settings come in layers, later layers winning: the built-in defaults (which equal
//! `config/default.toml`, a test checks it), an optional TOML file, `TELEMETRYHUB__SECTION__KEY`
//! environment variables (typed by the field they set, see `de.rs`), and finally CLI flags
//! (applied by `main`). Every struct denies unknown keys, and [`Settings::validate`] rejects
//! values outside each key's documented range and combinations that can never work, so a typo
//! or a broken value is a clear start-up error naming the key, never a panic later.
//! [`Settings::warnings`] lists what is valid but suspicious.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod de;
mod device;
mod http;
mod layers;
mod pipeline;
mod source;
#[cfg(test)]
mod tests;
mod uplink;

use self::de::{EnvMarks, Layered};
use self::device::default_devices;
pub use self::device::{
    ByteOrder, DataType, DeviceKind, DeviceSettings, Parity, RegisterSettings, SerialSettings,
    SimulatorSettings, Table, parse_host_port, read_timeout_for, stale_after_for,
};
pub use self::http::{HttpSettings, Secret};
use self::layers::{apply_env_overrides, merge, parse_table};
pub use self::pipeline::{BufferSettings, PipelineSettings, ProcessingSettings, ValueRange};
pub use self::source::ConfigSource;
pub use self::uplink::{
    BrokerUrl, FsyncSetting, SpoolSettings, UplinkFormat, UplinkSettings, parse_broker_url,
};

/// Prefix of environment variables that override settings, e.g. `TELEMETRYHUB__BUFFER__CAPACITY`.
pub const ENV_PREFIX: &str = "TELEMETRYHUB__";

/// The default configuration file, embedded so the defaults test and `validate` can use it.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file that was parsed.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key is unknown or its value has the wrong type.
    #[error("invalid config key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the offending key, e.g. `buffer.capacity`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// An environment override names a key that cannot exist, or an index that leaves a gap.
    #[error("invalid environment override {var}: {message}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// All settings of the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The HTTP API.
    #[serde(default)]
    pub http: HttpSettings,
    /// Logging.
    #[serde(default)]
    pub log: LogSettings,
    /// The ring buffer between devices and workers.
    #[serde(default)]
    pub buffer: BufferSettings,
    /// The dispatcher and the worker stage.
    #[serde(default)]
    pub pipeline: PipelineSettings,
    /// What the workers do to each sample.
    #[serde(default)]
    pub processing: ProcessingSettings,
    /// The devices to read from.
    #[serde(default = "default_devices")]
    pub devices: Vec<DeviceSettings>,
    /// The MQTT uplink; absent: processed samples go nowhere else (no spool either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<UplinkSettings>,
    /// The disk spool in front of the uplink (used only with an uplink).
    #[serde(default)]
    pub spool: SpoolSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::default(),
            log: LogSettings::default(),
            buffer: BufferSettings::default(),
            pipeline: PipelineSettings::default(),
            processing: ProcessingSettings::default(),
            devices: default_devices(),
            uplink: None,
            spool: SpoolSettings::default(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl std::fmt::Display for LogFormat {
    /// The name as in the config, so logs show what users write.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Filter directive (`info`, `telemetryhub=debug,hyper=info`); `RUST_LOG` wins over it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

fn default_log_level() -> String {
    "info".to_owned()
}

impl Settings {
    /// Loads settings from an optional file, then applies environment overrides.
    ///
    /// `env` is every environment variable (name, value); only those starting with
    /// [`ENV_PREFIX`] are used. The result is validated.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        // Start from the defaults so a file or a variable can change one key of a device.
        let mut root = toml::Value::try_from(Settings::default())
            .expect("default settings always serialize to TOML");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            merge(&mut root, toml::Value::Table(parse_table(&text, path)?));
        }
        let marks = apply_env_overrides(&mut root, ENV_PREFIX, env)?;
        Self::from_value(root, &marks)
    }

    /// Parses settings from TOML text and validates them.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let table = parse_table(text, Path::new("<inline>"))?;
        Self::from_value(toml::Value::Table(table), &EnvMarks::default())
    }

    fn from_value(value: toml::Value, marks: &EnvMarks) -> Result<Self, ConfigError> {
        let layered = Layered::new(value, marks);
        let settings: Settings = serde_path_to_error::deserialize(layered).map_err(|err| {
            let key = err.path().to_string();
            // The TOML error repeats the key on a second line; the path already names it.
            let message = err.into_inner().to_string();
            let message = message.lines().next().unwrap_or_default().to_owned();
            ConfigError::invalid(key, message)
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values that parse but cannot work, naming the offending key: every numeric
    /// setting against its documented range, then the combinations of settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::invalid(
                "log.level",
                format!("`{}` is not a valid filter directive", self.log.level),
            ));
        }
        self.buffer.validate()?;
        self.pipeline.validate()?;
        self.processing.validate()?;
        if let Some(uplink) = &self.uplink {
            uplink.validate()?;
        }
        self.spool.validate()?;
        if self.devices.is_empty() {
            return Err(ConfigError::invalid(
                "devices",
                "at least one device is needed",
            ));
        }
        for (i, device) in self.devices.iter().enumerate() {
            device.validate(&format!("devices[{i}]"))?;
            if self.devices[..i].iter().any(|d| d.id == device.id) {
                return Err(ConfigError::invalid(
                    format!("devices[{i}].id"),
                    format!("duplicate device id `{}`", device.id),
                ));
            }
        }
        Ok(())
    }
}

impl Settings {
    /// Settings that are valid but probably not what was meant, each a sentence that starts
    /// with the key and says why. `telemetryhub validate` prints them, start-up logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let (ingest, capacity) = (self.http.ingest_max_samples, self.buffer.capacity);
        if ingest > capacity {
            warnings.push(format!(
                "http.ingest_max_samples ({ingest}) is above buffer.capacity ({capacity}): a \
                 POST /samples that large can never fit in the buffer; lower it to {capacity} \
                 or raise the capacity"
            ));
        }
        for (i, device) in self.devices.iter().enumerate() {
            device.warnings(&format!("devices[{i}]"), &mut warnings);
        }
        warnings
    }
}

/// The longest wait most `*_ms` settings take: one hour. Every deadline the gateway computes
/// (`Instant::now() + duration`, in its own code and in hyper's) then stays far from overflowing,
/// and nothing in a gateway should wait longer than that on purpose.
const MAX_MS: u64 = 3_600_000;

/// Refuses a numeric setting outside its documented range, naming the key. NaN is outside
/// every range.
fn check_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    let (min, max) = range.into_inner();
    Err(ConfigError::invalid(
        key,
        format!("must be between {min} and {max}, got {value}"),
    ))
}
