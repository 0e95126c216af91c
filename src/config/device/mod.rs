//! `[[devices]]`: each device's link (simulated or serial), timing, circuit breaker, backoff,
//! calibration, and the simulator's fault injection.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod modbus;
mod serial;
mod simulator;
mod validate;

pub use self::modbus::{ByteOrder, DataType, RegisterSettings, Table, parse_host_port};
#[cfg(test)]
pub(super) use self::serial::SHORTEST_FRAME;
pub use self::serial::{Parity, SerialSettings};
pub use self::simulator::SimulatorSettings;

/// Which kind of link a device is read over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// The embedded simulator, over an in-memory duplex stream.
    #[default]
    Simulated,
    /// A real serial port (tty), opened with the `[devices.serial]` settings.
    Serial,
    /// A Modbus TCP server at `address`, polled for its `[[devices.registers]]`.
    ModbusTcp,
    /// A Modbus RTU slave on the `[devices.serial]` line, polled for its
    /// `[[devices.registers]]`.
    ModbusRtu,
}

impl DeviceKind {
    /// The kind's name, as in the config and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Simulated => "simulated",
            Self::Serial => "serial",
            Self::ModbusTcp => "modbus_tcp",
            Self::ModbusRtu => "modbus_rtu",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    /// The name as in the config, so logs show what users write.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// Interval between frames the device sends, 0 to 3 600 000 ms (one hour); 0 sends as fast
    /// as the link takes them.
    #[serde(default = "default_sample_interval_ms")]
    pub sample_interval_ms: u64,
    /// A read that yields no frame for this long is a failure, 1 to 86 400 000 ms (one day)
    /// and above `sample_interval_ms`; unset means [`read_timeout_for`] the sample interval
    /// (three intervals, at least one second). On a paced line a frame must cross within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_timeout_ms: Option<u64>,
    /// Consecutive failures that trip the circuit breaker into `SafeState`, 1 to 1 000 000.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// First retry delay after a failure, 1 to 3 600 000 ms; doubles with each further failure.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// Cap on the retry delay, from `backoff_initial_ms` to 3 600 000 ms.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Longest accepted frame in bytes, 16 to 65 536; longer lines are counted as `too_long`
    /// and skipped. A simulated device needs at least the simulator's longest frame
    /// ([`SimulatorSettings::longest_frame_len`]).
    #[serde(default = "default_max_frame_len")]
    pub max_frame_len: usize,
    /// A Measuring device with no valid frame for this long makes `/readyz` fail, 1 to
    /// 86 400 000 ms (one day) and above `sample_interval_ms`; unset means five sample
    /// intervals (one read timeout when the interval is 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after_ms: Option<u64>,
    /// How long `POST /devices/{id}/command` waits for the device's reply, 1 to 60 000 ms; on
    /// a paced simulator, longer than two frames take on the line.
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// The channel (name of the quantity measured) of samples from frames that name none, and
    /// of samples posted for this device without one: 1 to 32 of `A-Z a-z 0-9 _ . -`.
    #[serde(default = "default_channel")]
    pub channel: String,
    /// Calibration: processed value = raw value * scale + offset. Any finite number.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Calibration offset, see `scale`. Any finite number.
    #[serde(default)]
    pub offset: f64,
    /// The simulated device, for `kind = "simulated"`; a serial device refuses one that
    /// differs from the defaults, since it would ignore it.
    #[serde(default)]
    pub simulator: SimulatorSettings,
    /// The serial port, for `kind = "serial"` and `"modbus_rtu"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialSettings>,
    /// Modbus TCP: the server's `host:port`, e.g. `"192.168.1.20:502"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Modbus: the unit (slave) id, 0 to 247; unset means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_id: Option<u32>,
    /// Modbus: time between two polls of the register map, 1 to 3 600 000 ms; unset means
    /// 1000. The read timeout and staleness limit derive from it as from `sample_interval_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
    /// Modbus: longest wait for one answer, 1 to 60 000 ms; unset means 500. tokio-modbus has
    /// no request timeout of its own, so every request is wrapped in this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Modbus: attempts after the first before a request counts as a failure, 0 to 10; unset
    /// means 1. The connection is rebuilt before each retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Modbus: the register map, one named channel per register.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registers: Vec<RegisterSettings>,
}

impl DeviceSettings {
    /// A simulated device with every other setting at its default.
    pub fn simulated(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            kind: DeviceKind::Simulated,
            autostart: true,
            sample_interval_ms: default_sample_interval_ms(),
            read_timeout_ms: None,
            failure_threshold: default_failure_threshold(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            max_frame_len: default_max_frame_len(),
            stale_after_ms: None,
            command_timeout_ms: default_command_timeout_ms(),
            channel: default_channel(),
            scale: default_scale(),
            offset: 0.0,
            simulator: SimulatorSettings::default(),
            serial: None,
            address: None,
            unit_id: None,
            poll_interval_ms: None,
            timeout_ms: None,
            retries: None,
            registers: Vec::new(),
        }
    }

    /// A Modbus TCP device at `address` reading `registers`, every other setting at its
    /// default.
    pub fn modbus_tcp(id: &str, address: &str, registers: Vec<RegisterSettings>) -> Self {
        Self {
            kind: DeviceKind::ModbusTcp,
            address: Some(address.to_owned()),
            registers,
            ..Self::simulated(id)
        }
    }

    /// The Modbus unit id (validated to 0..=247).
    pub fn modbus_unit_id(&self) -> u8 {
        u8::try_from(self.unit_id.unwrap_or(modbus::default_unit_id())).unwrap_or(u8::MAX)
    }

    /// The Modbus request timeout.
    pub fn modbus_timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.unwrap_or(modbus::default_timeout_ms()))
    }

    /// Attempts after the first of a Modbus request.
    pub fn modbus_retries(&self) -> u32 {
        self.retries.unwrap_or(modbus::default_retries())
    }

    /// A serial device on `path` with every other setting at its default.
    pub fn serial(id: &str, path: impl Into<PathBuf>) -> Self {
        Self {
            kind: DeviceKind::Serial,
            serial: Some(SerialSettings::new(path)),
            ..Self::simulated(id)
        }
    }

    /// The read timeout: the configured one, else derived from the sample interval.
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout_ms
            .map_or_else(|| read_timeout_for(self.interval()), Duration::from_millis)
    }

    /// How long a Measuring device may go without a valid frame before it counts as stale:
    /// the configured time, else derived from the sample interval.
    pub fn stale_after(&self) -> Duration {
        self.stale_after_ms.map_or_else(
            || stale_after_for(self.interval(), self.read_timeout()),
            Duration::from_millis,
        )
    }

    /// The configured sample interval; for a Modbus device, its poll interval.
    pub fn interval(&self) -> Duration {
        if self.is_modbus() {
            let ms = self
                .poll_interval_ms
                .unwrap_or(modbus::default_poll_interval_ms());
            return Duration::from_millis(ms);
        }
        Duration::from_millis(self.sample_interval_ms)
    }
}

/// The default read timeout for a device sending every `interval`: three intervals, and at
/// least one second, so a frame that comes a little late is not a failure. Also applied when a
/// `SET_RATE` command changes the interval at run time.
pub fn read_timeout_for(interval: Duration) -> Duration {
    interval.saturating_mul(3).max(Duration::from_secs(1))
}

/// The default staleness limit for a device sending every `interval`: five intervals, or one
/// read timeout when the device sends as fast as it can (`interval` 0).
pub fn stale_after_for(interval: Duration, read_timeout: Duration) -> Duration {
    if interval.is_zero() {
        read_timeout
    } else {
        interval.saturating_mul(5)
    }
}

fn default_command_timeout_ms() -> u64 {
    1000
}

pub(super) fn default_devices() -> Vec<DeviceSettings> {
    vec![DeviceSettings::simulated("sim0")]
}
fn default_true() -> bool {
    true
}
fn default_sample_interval_ms() -> u64 {
    100
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
fn default_channel() -> String {
    crate::sample::DEFAULT_CHANNEL.to_owned()
}
fn default_scale() -> f64 {
    1.0
}
