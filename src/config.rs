//! Typed settings for the whole gateway.
//!
//! Settings come in layers, later layers winning: the built-in defaults (which equal
//! `config/default.toml`, a test checks it), an optional TOML file, `TELEMETRYHUB__SECTION__KEY`
//! environment variables, and finally CLI flags (applied by `main`). Every struct denies unknown
//! keys, and [`Settings::validate`] rejects values that parse but make no sense, so a typo or a
//! broken value is a clear start-up error naming the key, never a panic later.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::buffer::OverflowPolicy;

/// Prefix of environment variables that override settings, e.g. `TELEMETRYHUB__BUFFER__CAPACITY`.
pub const ENV_PREFIX: &str = "TELEMETRYHUB__";

/// The default configuration file, embedded so the defaults test and `validate` can use it.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

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
    /// An environment override names a key that cannot exist.
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
        }
    }
}

/// The HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on. Loopback by default.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// When set, every `POST` needs `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token: Option<Secret>,
    /// With a token set, also require it for reads (except `/healthz` and `/readyz`).
    #[serde(default)]
    pub protect_reads: bool,
    /// Largest accepted request body; larger ones get 413.
    #[serde(default = "default_body_limit_bytes")]
    pub body_limit_bytes: usize,
    /// Most samples in one `POST /samples`.
    #[serde(default = "default_ingest_max_samples")]
    pub ingest_max_samples: usize,
    /// A request that takes longer than this gets 408.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// A client must send a request's headers within this time, or the connection is closed.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Requests handled at once; more are refused at once with 503 and `Retry-After`.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            api_token: None,
            protect_reads: false,
            body_limit_bytes: default_body_limit_bytes(),
            ingest_max_samples: default_ingest_max_samples(),
            request_timeout_ms: default_request_timeout_ms(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            max_concurrent_requests: default_max_concurrent_requests(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_body_limit_bytes() -> usize {
    1 << 20
}
fn default_ingest_max_samples() -> usize {
    10_000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_max_concurrent_requests() -> usize {
    1024
}

/// A secret string: compared in constant time, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Whether `candidate` equals the secret. Takes the same time for every candidate of the
    /// secret's length, so response times do not reveal how much of a guess was right.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let secret = self.0.as_bytes();
        if candidate.len() != secret.len() {
            return false;
        }
        candidate
            .iter()
            .zip(secret)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
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

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Filter directive (`info`, `telemetryhub=debug,tower_http=info`); `RUST_LOG` wins over it.
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

/// The ring buffer between devices and workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferSettings {
    /// Maximum number of samples held.
    #[serde(default = "default_capacity")]
    pub capacity: usize,
    /// What happens to a sample that arrives when the buffer is full.
    #[serde(default)]
    pub overflow: OverflowPolicy,
    /// Fraction of capacity at which `POST /samples` is refused with 429 (backpressure).
    #[serde(default = "default_high_watermark")]
    pub high_watermark: f64,
}

impl Default for BufferSettings {
    fn default() -> Self {
        Self {
            capacity: default_capacity(),
            overflow: OverflowPolicy::default(),
            high_watermark: default_high_watermark(),
        }
    }
}

impl BufferSettings {
    /// The depth at which HTTP ingest is refused.
    pub fn high_watermark_samples(&self) -> usize {
        ((self.capacity as f64 * self.high_watermark).ceil() as usize).clamp(1, self.capacity)
    }
}

fn default_high_watermark() -> f64 {
    0.8
}

fn default_capacity() -> usize {
    1000
}

/// The dispatcher and the worker stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Most samples handed to one worker batch.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Batches processed at once (semaphore permits); unset means the number of CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Processed samples kept for `GET /samples`.
    #[serde(default = "default_history")]
    pub history: usize,
    /// How long shutdown may take to drain the buffer before the rest is counted as dropped.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            batch_max: default_batch_max(),
            workers: None,
            history: default_history(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
        }
    }
}

impl PipelineSettings {
    /// The number of worker permits, resolving "unset" to the number of CPUs.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(NonZeroUsize::get)
                .unwrap_or(1)
        })
    }

    /// The shutdown drain deadline.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

fn default_batch_max() -> usize {
    256
}
fn default_history() -> usize {
    1000
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}

/// What the workers do to each sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessingSettings {
    /// Accepted range of raw values, per unit. Units not listed only need a finite value.
    #[serde(default = "default_units")]
    pub units: BTreeMap<String, ValueRange>,
}

impl Default for ProcessingSettings {
    fn default() -> Self {
        Self {
            units: default_units(),
        }
    }
}

fn default_units() -> BTreeMap<String, ValueRange> {
    BTreeMap::from([(
        "arb.units".to_owned(),
        ValueRange {
            min: -1000.0,
            max: 1000.0,
        },
    )])
}

/// An inclusive range of accepted values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueRange {
    /// Smallest accepted value.
    pub min: f64,
    /// Largest accepted value.
    pub max: f64,
}

/// Which kind of link a device is read over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// The embedded simulator, over an in-memory duplex stream.
    #[default]
    Simulated,
    /// A real serial port (tty), opened with the `[devices.serial]` settings.
    Serial,
}

impl DeviceKind {
    /// The kind's name, as in the config and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Simulated => "simulated",
            Self::Serial => "serial",
        }
    }
}

/// One device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSettings {
    /// Unique id, used in URLs, metric labels and logs.
    pub id: String,
    /// The kind of link.
    #[serde(default)]
    pub kind: DeviceKind,
    /// Start measuring when the gateway starts, without waiting for `POST /start`.
    #[serde(default = "default_true")]
    pub autostart: bool,
    /// Interval between frames the device sends; 0 sends as fast as the link takes them.
    #[serde(default = "default_sample_interval_ms")]
    pub sample_interval_ms: u64,
    /// A read that yields no frame for this long is a failure.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// Consecutive failures that trip the circuit breaker into `SafeState`.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// First retry delay after a failure; doubles with each further failure.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// Cap on the retry delay.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Longest accepted frame in bytes; longer lines are counted as `too_long` and skipped.
    #[serde(default = "default_max_frame_len")]
    pub max_frame_len: usize,
    /// A Measuring device with no valid frame for this long makes `/readyz` fail; unset means
    /// five sample intervals (at least one read timeout when the interval is 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after_ms: Option<u64>,
    /// How long `POST /devices/{id}/command` waits for the device's reply.
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// Calibration: processed value = raw value * scale + offset.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Calibration offset, see `scale`.
    #[serde(default)]
    pub offset: f64,
    /// The simulated device, for `kind = "simulated"`.
    #[serde(default)]
    pub simulator: SimulatorSettings,
    /// The serial port, for `kind = "serial"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialSettings>,
}

impl DeviceSettings {
    /// A simulated device with every other setting at its default.
    pub fn simulated(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            kind: DeviceKind::Simulated,
            autostart: true,
            sample_interval_ms: default_sample_interval_ms(),
            read_timeout_ms: default_read_timeout_ms(),
            failure_threshold: default_failure_threshold(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            max_frame_len: default_max_frame_len(),
            stale_after_ms: None,
            command_timeout_ms: default_command_timeout_ms(),
            scale: default_scale(),
            offset: 0.0,
            simulator: SimulatorSettings::default(),
            serial: None,
        }
    }

    /// A serial device on `path` with every other setting at its default.
    pub fn serial(id: &str, path: impl Into<PathBuf>) -> Self {
        Self {
            kind: DeviceKind::Serial,
            serial: Some(SerialSettings::new(path)),
            ..Self::simulated(id)
        }
    }

    /// How long a Measuring device may go without a valid frame before it counts as stale.
    pub fn stale_after(&self) -> Duration {
        let ms = self
            .stale_after_ms
            .unwrap_or(if self.sample_interval_ms == 0 {
                self.read_timeout_ms
            } else {
                self.sample_interval_ms.saturating_mul(5)
            });
        Duration::from_millis(ms)
    }
}

/// A serial port's line settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSettings {
    /// The tty, e.g. `/dev/ttyUSB0` or `/dev/serial/by-id/...`.
    pub path: PathBuf,
    /// Bits per second.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Data bits per character, 5 to 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// `none`, `odd` or `even`.
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
}

impl SerialSettings {
    /// 115200 8N1 on `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            baud: default_baud(),
            data_bits: default_data_bits(),
            parity: Parity::None,
            stop_bits: default_stop_bits(),
        }
    }
}

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    /// No parity bit.
    #[default]
    None,
    /// Odd parity.
    Odd,
    /// Even parity.
    Even,
}

fn default_baud() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_command_timeout_ms() -> u64 {
    1000
}

fn default_devices() -> Vec<DeviceSettings> {
    vec![DeviceSettings::simulated("sim0")]
}
fn default_true() -> bool {
    true
}
fn default_sample_interval_ms() -> u64 {
    100
}
fn default_read_timeout_ms() -> u64 {
    1000
}
fn default_failure_threshold() -> u32 {
    5
}
fn default_backoff_initial_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    5000
}
fn default_max_frame_len() -> usize {
    128
}
fn default_scale() -> f64 {
    1.0
}

/// The simulated sensor and the faults it can inject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorSettings {
    /// Unit token written in every frame.
    #[serde(default = "default_unit")]
    pub unit: String,
    /// Amplitude of the uniform noise added to `42 + sin(seq / 10)`.
    #[serde(default = "default_noise")]
    pub noise: f64,
    /// Seed of the simulator's random numbers; 0 picks one from the clock.
    #[serde(default)]
    pub seed: u64,
    /// Pace bytes as a real UART at this baud rate (8N1: 10 bits per byte); 0 does not pace.
    #[serde(default)]
    pub baud: u32,
    /// Probability, per frame, that one byte of the frame is corrupted (fails its checksum).
    #[serde(default)]
    pub corrupt_rate: f64,
    /// Probability, per frame, that one byte of the frame is lost on the line.
    #[serde(default)]
    pub drop_rate: f64,
    /// Probability, per frame, that the device stalls for `stall_ms` before sending it.
    #[serde(default)]
    pub stall_rate: f64,
    /// How long a stall lasts.
    #[serde(default = "default_stall_ms")]
    pub stall_ms: u64,
    /// Probability, per frame, that the device closes the link instead of sending it.
    #[serde(default)]
    pub disconnect_rate: f64,
}

impl Default for SimulatorSettings {
    fn default() -> Self {
        Self {
            unit: default_unit(),
            noise: default_noise(),
            seed: 0,
            baud: 0,
            corrupt_rate: 0.0,
            drop_rate: 0.0,
            stall_rate: 0.0,
            stall_ms: default_stall_ms(),
            disconnect_rate: 0.0,
        }
    }
}

fn default_unit() -> String {
    "arb.units".to_owned()
}
fn default_noise() -> f64 {
    0.01
}
fn default_stall_ms() -> u64 {
    2000
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
        for (name, value) in env {
            if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
                apply_env_override(&mut root, &name, rest, &value)?;
            }
        }
        Self::from_value(root)
    }

    /// Parses settings from TOML text and validates them.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_value(toml::Value::Table(parse_table(
            text,
            Path::new("<inline>"),
        )?))
    }

    fn from_value(value: toml::Value) -> Result<Self, ConfigError> {
        let settings: Settings = serde_path_to_error::deserialize(value).map_err(|err| {
            let key = err.path().to_string();
            // The TOML error repeats the key on a second line; the path already names it.
            let message = err.into_inner().to_string();
            let message = message.lines().next().unwrap_or_default().to_owned();
            ConfigError::invalid(key, message)
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values that parse but cannot work, naming the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.buffer.capacity == 0 {
            return Err(ConfigError::invalid(
                "buffer.capacity",
                "must be at least 1",
            ));
        }
        if !(self.buffer.high_watermark > 0.0 && self.buffer.high_watermark <= 1.0) {
            return Err(ConfigError::invalid(
                "buffer.high_watermark",
                "must be a fraction of capacity above 0 and at most 1",
            ));
        }
        self.http.validate()?;
        if self.pipeline.batch_max == 0 {
            return Err(ConfigError::invalid(
                "pipeline.batch_max",
                "must be at least 1",
            ));
        }
        if self.pipeline.workers == Some(0) {
            return Err(ConfigError::invalid(
                "pipeline.workers",
                "must be at least 1 (leave it unset for one per CPU)",
            ));
        }
        if self.pipeline.history == 0 {
            return Err(ConfigError::invalid(
                "pipeline.history",
                "must be at least 1",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::invalid(
                "log.level",
                format!("`{}` is not a valid filter directive", self.log.level),
            ));
        }
        for (unit, range) in &self.processing.units {
            if !(range.min.is_finite() && range.max.is_finite() && range.min <= range.max) {
                return Err(ConfigError::invalid(
                    format!("processing.units.{unit}"),
                    "needs finite min <= max",
                ));
            }
        }
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

impl HttpSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self
            .api_token
            .as_ref()
            .is_some_and(|t| t.is_empty() || t.0.len() > 256)
        {
            return Err(ConfigError::invalid(
                "http.api_token",
                "must be 1 to 256 characters",
            ));
        }
        if self.protect_reads && self.api_token.is_none() {
            return Err(ConfigError::invalid(
                "http.protect_reads",
                "needs http.api_token to be set",
            ));
        }
        for (key, value) in [
            ("http.body_limit_bytes", self.body_limit_bytes as u64),
            ("http.ingest_max_samples", self.ingest_max_samples as u64),
            ("http.request_timeout_ms", self.request_timeout_ms),
            ("http.header_read_timeout_ms", self.header_read_timeout_ms),
            (
                "http.max_concurrent_requests",
                self.max_concurrent_requests as u64,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The header-read timeout.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
}

impl DeviceSettings {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let valid_id = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !valid_id {
            return Err(ConfigError::invalid(
                format!("{at}.id"),
                "must be 1-64 characters of A-Z, a-z, 0-9, '-', '_' or '.'",
            ));
        }
        if self.read_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                format!("{at}.read_timeout_ms"),
                "must be at least 1",
            ));
        }
        if self.failure_threshold == 0 {
            return Err(ConfigError::invalid(
                format!("{at}.failure_threshold"),
                "must be at least 1",
            ));
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return Err(ConfigError::invalid(
                format!("{at}.backoff_max_ms"),
                "needs 1 <= backoff_initial_ms <= backoff_max_ms",
            ));
        }
        if !(16..=65536).contains(&self.max_frame_len) {
            return Err(ConfigError::invalid(
                format!("{at}.max_frame_len"),
                "must be between 16 and 65536",
            ));
        }
        if !(self.scale.is_finite() && self.offset.is_finite()) {
            return Err(ConfigError::invalid(
                format!("{at}.scale"),
                "scale and offset must be finite",
            ));
        }
        if !(1..=60_000).contains(&self.command_timeout_ms) {
            return Err(ConfigError::invalid(
                format!("{at}.command_timeout_ms"),
                "must be between 1 and 60000",
            ));
        }
        if self.stale_after_ms == Some(0) {
            return Err(ConfigError::invalid(
                format!("{at}.stale_after_ms"),
                "must be at least 1 (leave it unset for five sample intervals)",
            ));
        }
        match (self.kind, &self.serial) {
            (DeviceKind::Serial, None) => Err(ConfigError::invalid(
                format!("{at}.serial"),
                "a serial device needs a [devices.serial] table with at least `path`",
            )),
            (DeviceKind::Serial, Some(serial)) => serial.validate(&format!("{at}.serial")),
            (DeviceKind::Simulated, Some(_)) => Err(ConfigError::invalid(
                format!("{at}.serial"),
                "only devices of kind \"serial\" take serial settings",
            )),
            (DeviceKind::Simulated, None) => self.simulator.validate(&format!("{at}.simulator")),
        }
    }
}

impl SerialSettings {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                format!("{at}.path"),
                "must not be empty",
            ));
        }
        if !(50..=4_000_000).contains(&self.baud) {
            return Err(ConfigError::invalid(
                format!("{at}.baud"),
                "must be between 50 and 4000000",
            ));
        }
        if !(5..=8).contains(&self.data_bits) {
            return Err(ConfigError::invalid(
                format!("{at}.data_bits"),
                "must be 5, 6, 7 or 8",
            ));
        }
        if !(1..=2).contains(&self.stop_bits) {
            return Err(ConfigError::invalid(
                format!("{at}.stop_bits"),
                "must be 1 or 2",
            ));
        }
        Ok(())
    }
}

impl SimulatorSettings {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let unit_ok = crate::device::codec::valid_unit(self.unit.as_bytes());
        if !unit_ok {
            return Err(ConfigError::invalid(
                format!("{at}.unit"),
                "must be 1-16 characters of A-Z, a-z, 0-9, '.', '_', '/', '%' or '-'",
            ));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(ConfigError::invalid(
                format!("{at}.noise"),
                "must be finite and >= 0",
            ));
        }
        for (key, rate) in [
            ("corrupt_rate", self.corrupt_rate),
            ("drop_rate", self.drop_rate),
            ("stall_rate", self.stall_rate),
            ("disconnect_rate", self.disconnect_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::invalid(
                    format!("{at}.{key}"),
                    "must be a probability between 0 and 1",
                ));
            }
        }
        Ok(())
    }
}

fn parse_table(text: &str, path: &Path) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|err| ConfigError::Syntax {
            path: path.to_owned(),
            message: err.to_string(),
        })
}

/// Sets one key from `TELEMETRYHUB__A__B__C=value`. Segments are lower-cased; a numeric segment
/// indexes an array (`TELEMETRYHUB__DEVICES__0__SAMPLE_INTERVAL_MS=50`). The value is read as a
/// TOML value when it parses as one (`50`, `true`, `1.5`), else as a string.
fn apply_env_override(
    root: &mut toml::Value,
    var: &str,
    path: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    if segments.iter().any(String::is_empty) {
        return Err(ConfigError::Env {
            var: var.to_owned(),
            message: "empty key segment".to_owned(),
        });
    }
    set_path(root, &segments, parse_env_value(value)).map_err(|message| ConfigError::Env {
        var: var.to_owned(),
        message: message.to_owned(),
    })
}

fn set_path(
    target: &mut toml::Value,
    segments: &[String],
    value: toml::Value,
) -> Result<(), &'static str> {
    let Some((head, rest)) = segments.split_first() else {
        *target = value;
        return Ok(());
    };
    let child = match target {
        toml::Value::Table(table) => table
            .entry(head.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new())),
        toml::Value::Array(items) => {
            let index: usize = head.parse().map_err(|_| "expected a numeric array index")?;
            if index == items.len() {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            items.get_mut(index).ok_or("array index out of range")?
        }
        _ => return Err("a parent key is not a table"),
    };
    set_path(child, rest, value)
}

/// Overlays `top` on `base`: tables merge key by key, anything else (arrays included) replaces.
fn merge(base: &mut toml::Value, top: toml::Value) {
    match (base, top) {
        (toml::Value::Table(base), toml::Value::Table(top)) => {
            for (key, value) in top {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, top) => *base = top,
    }
}

fn parse_env_value(value: &str) -> toml::Value {
    // `key = <value>` parses scalars, arrays and inline tables exactly as a file would.
    format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load_toml(text: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "telemetryhub-config-{}-{}",
            std::process::id(),
            text.len() + vars.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "{:x}.toml",
            text.bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31) ^ u64::from(b))
        ));
        std::fs::write(&path, text).unwrap();
        let result = Settings::load(Some(&path), env(vars));
        let _ = std::fs::remove_file(&path);
        result
    }

    fn invalid_key(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected an invalid key, got {other}"),
        }
    }

    #[test]
    fn built_in_defaults_equal_the_default_file() {
        assert_eq!(
            Settings::from_toml(DEFAULT_TOML).unwrap(),
            Settings::default()
        );
        assert_eq!(Settings::load(None, env(&[])).unwrap(), Settings::default());
    }

    #[test]
    fn the_default_file_sets_every_key() {
        // Every key the defaults serialise must appear in the file (workers is documented
        // there as a comment because "unset" is its default).
        fn keys(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
            match value {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        keys(&format!("{prefix}{k}."), v, out);
                    }
                }
                toml::Value::Array(items) => {
                    for item in items {
                        keys(prefix, item, out);
                    }
                }
                _ => out.push(prefix.trim_end_matches('.').to_owned()),
            }
        }
        let mut from_defaults = Vec::new();
        keys(
            "",
            &toml::Value::try_from(Settings::default()).unwrap(),
            &mut from_defaults,
        );
        let mut from_file = Vec::new();
        keys(
            "",
            &toml::Value::Table(DEFAULT_TOML.parse().unwrap()),
            &mut from_file,
        );
        from_defaults.sort();
        from_file.sort();
        assert_eq!(from_defaults, from_file);
        assert!(DEFAULT_TOML.contains("# workers = "));
        assert!(DEFAULT_TOML.contains("# stale_after_ms = "));
        assert!(DEFAULT_TOML.contains("# api_token = "));
    }

    #[test]
    fn serial_devices_and_several_devices_parse() {
        let text = "[[devices]]\nid = \"a\"\nsample_interval_ms = 10\n\n[[devices]]\nid = \"tty1\"\nkind = \"serial\"\n[devices.serial]\npath = \"/dev/ttyUSB0\"\nbaud = 9600\nparity = \"even\"\nstop_bits = 2\n";
        let settings = load_toml(text, &[]).unwrap();
        assert_eq!(settings.devices.len(), 2);
        assert_eq!(settings.devices[0].stale_after(), Duration::from_millis(50));
        let serial = settings.devices[1].serial.as_ref().unwrap();
        assert_eq!(settings.devices[1].kind, DeviceKind::Serial);
        assert_eq!(
            (
                serial.baud,
                serial.data_bits,
                serial.parity,
                serial.stop_bits
            ),
            (9600, 8, Parity::Even, 2)
        );
    }

    #[test]
    fn the_token_is_compared_exactly_and_never_printed() {
        let settings = Settings::load(
            None,
            env(&[("TELEMETRYHUB__HTTP__API_TOKEN", "s3cret-token")]),
        )
        .unwrap();
        let token = settings.http.api_token.as_ref().unwrap();
        assert!(token.matches(b"s3cret-token"));
        assert!(!token.matches(b"s3cret-tokem"));
        assert!(!token.matches(b"s3cret"));
        assert!(!token.matches(b""));
        assert!(!format!("{settings:?}").contains("s3cret"));
    }

    #[test]
    fn a_file_changes_only_what_it_sets() {
        let settings = load_toml("[buffer]\ncapacity = 50\n", &[]).unwrap();
        assert_eq!(settings.buffer.capacity, 50);
        assert_eq!(settings.buffer.overflow, OverflowPolicy::DropOldest);
        assert_eq!(settings.devices, Settings::default().devices);
    }

    #[test]
    fn environment_overrides_win_over_the_file() {
        let settings = load_toml(
            "[buffer]\ncapacity = 50\n",
            &[
                ("TELEMETRYHUB__BUFFER__CAPACITY", "70"),
                ("TELEMETRYHUB__BUFFER__OVERFLOW", "block"),
                ("TELEMETRYHUB__HTTP__LISTEN", "0.0.0.0:9000"),
                ("TELEMETRYHUB__DEVICES__0__SAMPLE_INTERVAL_MS", "5"),
                ("TELEMETRYHUB__DEVICES__0__SIMULATOR__UNIT", "degC"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(settings.buffer.capacity, 70);
        assert_eq!(settings.buffer.overflow, OverflowPolicy::Block);
        assert_eq!(settings.http.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(settings.devices[0].sample_interval_ms, 5);
        assert_eq!(settings.devices[0].simulator.unit, "degC");
    }

    #[test]
    fn a_string_where_a_number_belongs_names_the_key() {
        let err = load_toml("[buffer]\ncapacity = \"abc\"\n", &[]).unwrap_err();
        let message = err.to_string();
        assert_eq!(invalid_key(err), "buffer.capacity");
        assert!(message.contains("abc"), "{message}");
        let err =
            Settings::load(None, env(&[("TELEMETRYHUB__BUFFER__CAPACITY", "abc")])).unwrap_err();
        assert_eq!(invalid_key(err), "buffer.capacity");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = load_toml("[buffer]\ncapacty = 5\n", &[]).unwrap_err();
        assert!(err.to_string().contains("capacty"), "{err}");
        let err = load_toml("[bufer]\ncapacity = 5\n", &[]).unwrap_err();
        assert!(err.to_string().contains("bufer"), "{err}");
    }

    #[test]
    fn values_that_cannot_work_are_rejected_by_name() {
        let cases = [
            ("[pipeline]\nworkers = 0\n", "pipeline.workers"),
            ("[http]\napi_token = \"\"\n", "http.api_token"),
            ("[http]\nprotect_reads = true\n", "http.protect_reads"),
            ("[http]\nbody_limit_bytes = 0\n", "http.body_limit_bytes"),
            (
                "[http]\nrequest_timeout_ms = 0\n",
                "http.request_timeout_ms",
            ),
            ("[buffer]\nhigh_watermark = 1.5\n", "buffer.high_watermark"),
            ("[buffer]\ncapacity = 0\n", "buffer.capacity"),
            ("[pipeline]\nbatch_max = 0\n", "pipeline.batch_max"),
            ("[pipeline]\nhistory = 0\n", "pipeline.history"),
            ("[buffer]\noverflow = \"sometimes\"\n", "buffer.overflow"),
            ("[http]\nlisten = \"nowhere\"\n", "http.listen"),
            ("[pipeline]\nworkers = -1\n", "pipeline.workers"),
            ("[log]\nlevel = \"=[\"\n", "log.level"),
            (
                "[processing.units.V]\nmin = 5.0\nmax = 1.0\n",
                "processing.units.V",
            ),
            ("devices = []\n", "devices"),
            ("[[devices]]\nid = \"a b\"\n", "devices[0].id"),
            (
                "[[devices]]\nid = \"a\"\n[[devices]]\nid = \"a\"\n",
                "devices[1].id",
            ),
            (
                "[[devices]]\nid = \"a\"\nfailure_threshold = 0\n",
                "devices[0].failure_threshold",
            ),
            (
                "[[devices]]\nid = \"a\"\nread_timeout_ms = 0\n",
                "devices[0].read_timeout_ms",
            ),
            (
                "[[devices]]\nid = \"a\"\nbackoff_initial_ms = 10\nbackoff_max_ms = 5\n",
                "devices[0].backoff_max_ms",
            ),
            (
                "[[devices]]\nid = \"a\"\nmax_frame_len = 4\n",
                "devices[0].max_frame_len",
            ),
            (
                "[[devices]]\nid = \"a\"\nkind = \"usb\"\n",
                "devices[0].kind",
            ),
            (
                "[[devices]]\nid = \"a\"\n[devices.simulator]\ncorrupt_rate = 1.5\n",
                "devices[0].simulator.corrupt_rate",
            ),
            (
                "[[devices]]\nid = \"a\"\n[devices.simulator]\nunit = \"bad unit\"\n",
                "devices[0].simulator.unit",
            ),
        ];
        for (text, key) in cases {
            let err = load_toml(text, &[]).expect_err(text);
            assert_eq!(invalid_key(err), key, "{text}");
        }
    }

    #[test]
    fn syntax_errors_and_missing_files_are_reported() {
        assert!(matches!(
            load_toml("[buffer\n", &[]),
            Err(ConfigError::Syntax { .. })
        ));
        let err = Settings::load(Some(Path::new("/nonexistent/telemetryhub.toml")), env(&[]))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn malformed_environment_paths_are_errors() {
        for var in [
            "TELEMETRYHUB__BUFFER____CAPACITY",
            "TELEMETRYHUB__DEVICES__X__ID",
            "TELEMETRYHUB__DEVICES__9__ID",
        ] {
            let err = Settings::load(None, env(&[(var, "1")])).unwrap_err();
            assert!(matches!(err, ConfigError::Env { .. }), "{var}: {err}");
        }
    }
}
