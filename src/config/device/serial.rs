//! `[devices.serial]`: the line settings of a device read over a real serial port.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, check_range};

/// The shortest frame a device can send (`$TH,<seq>,<value>,<unit>*CC\r\n` with one-character
/// fields): a read timeout that cannot carry even this at the line's speed can never succeed.
pub(in crate::config) const SHORTEST_FRAME: &[u8] = b"$TH,0,0,a*51\r\n";

/// A serial port's line settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSettings {
    /// The tty, e.g. `/dev/ttyUSB0` or `/dev/serial/by-id/...`.
    pub path: PathBuf,
    /// Bits per second, 50 to 4 000 000; fast enough that the shortest frame crosses the line
    /// within the device's read timeout and staleness limit.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Data bits per character, 5 to 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// `none`, `odd` or `even`.
    #[serde(default)]
    pub parity: Parity,
    /// Stop bits, 1 or 2.
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

impl std::fmt::Display for Parity {
    /// The name as in the config, so logs show what users write.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Odd => "odd",
            Self::Even => "even",
        })
    }
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

impl SerialSettings {
    /// The bits the shortest frame takes on this line: a start bit, the data bits, the parity
    /// bit if any and the stop bits per character.
    pub(super) fn frame_bits(&self) -> u64 {
        let parity = u64::from(self.parity != Parity::None);
        let per_char = 1 + u64::from(self.data_bits) + parity + u64::from(self.stop_bits);
        SHORTEST_FRAME.len() as u64 * per_char
    }

    pub(super) fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                format!("{at}.path"),
                "must not be empty",
            ));
        }
        check_range(&format!("{at}.baud"), self.baud, 50..=4_000_000)?;
        check_range(&format!("{at}.data_bits"), self.data_bits, 5..=8)?;
        check_range(&format!("{at}.stop_bits"), self.stop_bits, 1..=2)
    }
}
