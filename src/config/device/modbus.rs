//! The Modbus keys of a `[[devices]]` entry of kind `modbus_tcp` or `modbus_rtu`: where the
//! device is (`address`, or the `[devices.serial]` line), its unit id and polling, and its
//! register map (`[[devices.registers]]`), each register a named channel.

use serde::{Deserialize, Serialize};

use super::{DeviceKind, DeviceSettings};
use crate::config::{ConfigError, MAX_MS, check_range};

/// A Modbus table (the "data model" block a register lives in).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// Read-write 16-bit registers (functions 3, 6, 16).
    Holding,
    /// Read-only 16-bit registers (function 4).
    Input,
    /// Read-write bits (functions 1, 5).
    Coil,
    /// Read-only bits (function 2).
    Discrete,
}

impl Table {
    /// The table's name, as in the config and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Holding => "holding",
            Self::Input => "input",
            Self::Coil => "coil",
            Self::Discrete => "discrete",
        }
    }

    /// Whether the table holds bits rather than 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Self::Coil | Self::Discrete)
    }

    /// Whether a master can write it at all.
    pub fn is_writable(self) -> bool {
        matches!(self, Self::Holding | Self::Coil)
    }

    /// Most items one read request may ask for: 125 registers or 2000 bits (Modbus
    /// application protocol v1.1b3, functions 1 to 4).
    pub fn max_read(self) -> u16 {
        if self.is_bits() { 2000 } else { 125 }
    }
}

/// How a value is stored in its registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// Signed 16 bits, one register.
    Int16,
    /// Unsigned 16 bits, one register.
    Uint16,
    /// Signed 32 bits, two registers.
    Int32,
    /// Unsigned 32 bits, two registers.
    Uint32,
    /// IEEE 754 single precision, two registers.
    Float32,
    /// Signed 64 bits, four registers.
    Int64,
    /// Unsigned 64 bits, four registers.
    Uint64,
    /// IEEE 754 double precision, four registers.
    Float64,
    /// One coil or discrete input.
    Bool,
}

impl DataType {
    /// The type's name, as in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Int16 => "int16",
            Self::Uint16 => "uint16",
            Self::Int32 => "int32",
            Self::Uint32 => "uint32",
            Self::Float32 => "float32",
            Self::Int64 => "int64",
            Self::Uint64 => "uint64",
            Self::Float64 => "float64",
            Self::Bool => "bool",
        }
    }

    /// How many items (registers, or bits for `bool`) a value takes.
    pub fn width(self) -> u16 {
        match self {
            Self::Int16 | Self::Uint16 | Self::Bool => 1,
            Self::Int32 | Self::Uint32 | Self::Float32 => 2,
            Self::Int64 | Self::Uint64 | Self::Float64 => 4,
        }
    }
}

/// The order of a value's bytes in its registers, named after a 32-bit value whose big-endian
/// bytes are `A B C D`. Wider and narrower values follow the same two rules: whether the
/// register order is reversed, and whether the two bytes in each register are swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ByteOrder {
    /// Big-endian: most significant register first, each big-endian (the Modbus default).
    #[default]
    #[serde(rename = "ABCD")]
    Abcd,
    /// Little-endian: least significant register first, each with its bytes swapped.
    #[serde(rename = "DCBA")]
    Dcba,
    /// Registers in big-endian order, bytes swapped within each.
    #[serde(rename = "BADC")]
    Badc,
    /// Least significant register first ("word swap"), each big-endian.
    #[serde(rename = "CDAB")]
    Cdab,
}

impl ByteOrder {
    /// Every byte order.
    pub const ALL: [ByteOrder; 4] = [Self::Abcd, Self::Dcba, Self::Badc, Self::Cdab];

    /// Whether the least significant register comes first.
    pub fn words_reversed(self) -> bool {
        matches!(self, Self::Dcba | Self::Cdab)
    }

    /// Whether the two bytes within each register are swapped.
    pub fn bytes_swapped(self) -> bool {
        matches!(self, Self::Dcba | Self::Badc)
    }
}

/// One register (or coil) of a Modbus device, read as one named channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterSettings {
    /// The channel name its samples carry: 1 to 32 of `A-Z a-z 0-9 _ . -`, unique per device.
    pub channel: String,
    /// `holding`, `input`, `coil` or `discrete`.
    pub table: Table,
    /// The first register (or bit) address, 0 to 65 535, zero-based as on the wire; the value
    /// must end within the table.
    pub address: u32,
    /// `int16`, `uint16`, `int32`, `uint32`, `float32`, `int64`, `uint64`, `float64` (for
    /// `holding` and `input`) or `bool` (for `coil` and `discrete`).
    pub data_type: DataType,
    /// `ABCD` (default), `DCBA`, `BADC` or `CDAB`; see [`ByteOrder`].
    #[serde(default)]
    pub byte_order: ByteOrder,
    /// Sample value = raw value * scale + offset, any finite number.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// See `scale`; any finite number.
    #[serde(default)]
    pub offset: f64,
    /// The unit its samples carry: 1 to 16 of `A-Z a-z 0-9 . _ / % -`.
    #[serde(default = "default_unit")]
    pub unit: String,
    /// Whether `POST /devices/{id}/command` may write it (`holding` and `coil` only); writable
    /// registers must not overlap.
    #[serde(default)]
    pub writable: bool,
}

impl RegisterSettings {
    /// A register with the default byte order, scale, offset and unit, not writable.
    pub fn new(channel: &str, table: Table, address: u16, data_type: DataType) -> Self {
        Self {
            channel: channel.to_owned(),
            table,
            address: u32::from(address),
            data_type,
            byte_order: ByteOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: default_unit(),
            writable: false,
        }
    }

    /// The address as the protocol carries it (validated to fit).
    pub fn start(&self) -> u16 {
        u16::try_from(self.address).unwrap_or(u16::MAX)
    }

    /// One past the last item it covers.
    pub fn end(&self) -> u32 {
        self.address + u32::from(self.data_type.width())
    }

    /// Whether it covers `address` in `table`.
    pub fn covers(&self, table: Table, address: u16) -> bool {
        self.table == table && (self.address..self.end()).contains(&u32::from(address))
    }
}

fn default_scale() -> f64 {
    1.0
}
fn default_unit() -> String {
    "arb.units".to_owned()
}
pub(super) fn default_unit_id() -> u32 {
    1
}
pub(super) fn default_poll_interval_ms() -> u64 {
    1000
}
pub(super) fn default_timeout_ms() -> u64 {
    500
}
pub(super) fn default_retries() -> u32 {
    1
}

/// Most registers on one device: enough for a large meter, bounded so a poll stays small.
const MAX_REGISTERS: usize = 1000;
/// Most attempts after the first one of a request.
const MAX_RETRIES: u32 = 10;
/// Longest wait for one Modbus answer.
const MAX_TIMEOUT_MS: u64 = 60_000;

impl DeviceSettings {
    /// Whether the device is polled over Modbus.
    pub fn is_modbus(&self) -> bool {
        matches!(self.kind, DeviceKind::ModbusTcp | DeviceKind::ModbusRtu)
    }

    /// The Modbus keys of a Modbus device, in range and consistent.
    pub(super) fn validate_modbus(&self, at: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{at}.{name}");
        match self.kind {
            DeviceKind::ModbusTcp => {
                let Some(address) = &self.address else {
                    return Err(ConfigError::invalid(
                        key("address"),
                        "a modbus_tcp device needs `address = \"host:port\"`",
                    ));
                };
                if parse_host_port(address).is_none() {
                    return Err(ConfigError::invalid(
                        key("address"),
                        format!("`{address}` is not host:port (e.g. \"192.168.1.20:502\")"),
                    ));
                }
                if self.serial.is_some() {
                    return Err(ConfigError::invalid(
                        key("serial"),
                        "a modbus_tcp device has no serial line; use kind = \"modbus_rtu\"",
                    ));
                }
            }
            _ => {
                if self.address.is_some() {
                    return Err(ConfigError::invalid(
                        key("address"),
                        "a modbus_rtu device is on its [devices.serial] line, not an address",
                    ));
                }
                let Some(serial) = &self.serial else {
                    return Err(ConfigError::invalid(
                        key("serial"),
                        "a modbus_rtu device needs a [devices.serial] table with at least `path`",
                    ));
                };
                serial.validate(&key("serial"))?;
            }
        }
        if self.simulator != super::SimulatorSettings::default() {
            return Err(ConfigError::invalid(
                key("simulator"),
                "a Modbus device does not use a [devices.simulator] table and would ignore it",
            ));
        }
        let unit_id = self.unit_id.unwrap_or(default_unit_id());
        check_range(&key("unit_id"), unit_id, 0..=247)?;
        let poll = self.poll_interval_ms.unwrap_or(default_poll_interval_ms());
        check_range(&key("poll_interval_ms"), poll, 1..=MAX_MS)?;
        let timeout = self.timeout_ms.unwrap_or(default_timeout_ms());
        check_range(&key("timeout_ms"), timeout, 1..=MAX_TIMEOUT_MS)?;
        let retries = self.retries.unwrap_or(default_retries());
        check_range(&key("retries"), retries, 0..=MAX_RETRIES)?;
        if self.command_timeout_ms <= timeout {
            return Err(ConfigError::invalid(
                key("command_timeout_ms"),
                format!(
                    "must be above timeout_ms ({timeout}): a write would be given up before the \
                     device's answer is due; raise it, or lower timeout_ms"
                ),
            ));
        }
        self.validate_registers(at)
    }

    /// Keys only a Modbus device takes, set on another kind: refused, since they would be
    /// ignored.
    pub(super) fn refuse_modbus_keys(&self, at: &str) -> Result<(), ConfigError> {
        let set = [
            ("address", self.address.is_some()),
            ("unit_id", self.unit_id.is_some()),
            ("poll_interval_ms", self.poll_interval_ms.is_some()),
            ("timeout_ms", self.timeout_ms.is_some()),
            ("retries", self.retries.is_some()),
            ("registers", !self.registers.is_empty()),
        ];
        match set.iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(ConfigError::invalid(
                format!("{at}.{name}"),
                format!(
                    "only devices of kind \"modbus_tcp\" or \"modbus_rtu\" take `{name}`, not \
                     \"{}\"",
                    self.kind.as_str()
                ),
            )),
            None => Ok(()),
        }
    }

    fn validate_registers(&self, at: &str) -> Result<(), ConfigError> {
        if self.registers.is_empty() {
            return Err(ConfigError::invalid(
                format!("{at}.registers"),
                "a Modbus device needs at least one [[devices.registers]]",
            ));
        }
        if self.registers.len() > MAX_REGISTERS {
            return Err(ConfigError::invalid(
                format!("{at}.registers"),
                format!("at most {MAX_REGISTERS} registers per device"),
            ));
        }
        for (i, reg) in self.registers.iter().enumerate() {
            let at = format!("{at}.registers[{i}]");
            reg.validate(&at)?;
            if let Some(j) = self.registers[..i]
                .iter()
                .position(|r| r.channel == reg.channel)
            {
                return Err(ConfigError::invalid(
                    format!("{at}.channel"),
                    format!("duplicate channel `{}` (also registers[{j}])", reg.channel),
                ));
            }
            let overlap = self.registers[..i].iter().position(|r| {
                r.writable
                    && reg.writable
                    && r.table == reg.table
                    && r.address < reg.end()
                    && reg.address < r.end()
            });
            if let Some(j) = overlap {
                return Err(ConfigError::invalid(
                    format!("{at}.address"),
                    format!(
                        "writable {} {}..{} overlaps writable registers[{j}] (`{}`): a write \
                         to one would change the other",
                        reg.table.as_str(),
                        reg.address,
                        reg.end(),
                        self.registers[j].channel
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl RegisterSettings {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{at}.{name}");
        let channel_ok = !self.channel.is_empty()
            && self.channel.len() <= 32
            && self
                .channel
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !channel_ok {
            return Err(ConfigError::invalid(
                key("channel"),
                "must be 1-32 characters of A-Z, a-z, 0-9, '_', '.' or '-'",
            ));
        }
        check_range(&key("address"), self.address, 0..=65_535)?;
        let bits = self.table.is_bits();
        if bits != (self.data_type == DataType::Bool) {
            let fits = if bits {
                "bool"
            } else {
                "int16, uint16, int32, uint32, float32, int64, uint64 or float64"
            };
            return Err(ConfigError::invalid(
                key("data_type"),
                format!(
                    "`{}` does not fit the {} table, which holds {}: use {fits}",
                    self.data_type.as_str(),
                    self.table.as_str(),
                    if bits { "bits" } else { "16-bit registers" },
                ),
            ));
        }
        if self.end() > 65_536 {
            return Err(ConfigError::invalid(
                key("address"),
                format!(
                    "a {} at {} would run past the last address (65535)",
                    self.data_type.as_str(),
                    self.address
                ),
            ));
        }
        for (name, value) in [("scale", self.scale), ("offset", self.offset)] {
            if !value.is_finite() {
                return Err(ConfigError::invalid(
                    key(name),
                    format!("must be a finite number, got {value}"),
                ));
            }
        }
        if !crate::device::codec::valid_unit(self.unit.as_bytes()) {
            return Err(ConfigError::invalid(
                key("unit"),
                "must be 1-16 characters of A-Z, a-z, 0-9, '.', '_', '/', '%' or '-'",
            ));
        }
        if self.writable && !self.table.is_writable() {
            return Err(ConfigError::invalid(
                key("writable"),
                format!(
                    "the {} table is read-only in Modbus; only holding and coil are writable",
                    self.table.as_str()
                ),
            ));
        }
        Ok(())
    }
}

/// `host:port` with a non-empty host and a port number; the host is resolved when connecting.
pub fn parse_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host, port.parse().ok()?))
}
