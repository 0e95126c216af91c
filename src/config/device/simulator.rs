//! `[devices.simulator]`: the embedded simulated sensor and the faults it can inject.

use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, MAX_MS, check_range};
use crate::device::codec::{encode_channel_frame, encode_frame, valid_channel};

/// The simulated sensor and the faults it can inject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorSettings {
    /// Unit token written in every frame: 1 to 16 of `A-Z a-z 0-9 . _ / % -`.
    #[serde(default = "default_unit")]
    pub unit: String,
    /// Channels the simulator reports, at most 16 distinct names of 1 to 32 of
    /// `A-Z a-z 0-9 _ . -`. Empty (the default): frames name no channel, and samples carry the
    /// device's `channel`. Otherwise frames name one channel each, in turn (frame `seq` reports
    /// channel `seq % n`), and channel `i` follows its own signal, `42 + 10 i + sin(seq / 10 + i)`.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Amplitude of the uniform noise added to the signal (`42 + sin(seq / 10)` with no
    /// channels), 0 to 1 000 000.
    #[serde(default = "default_noise")]
    pub noise: f64,
    /// Seed of the simulator's random numbers, any `u64`; 0 picks one from the clock.
    #[serde(default)]
    pub seed: u64,
    /// Pace bytes as a real UART at this baud rate (8N1: 10 bits per byte), 50 to 4 000 000;
    /// 0 does not pace. A frame must cross the line within the device's read timeout and
    /// staleness limit.
    #[serde(default)]
    pub baud: u32,
    /// Probability, per frame, that one byte of the frame is corrupted (fails its checksum),
    /// 0 to 1.
    #[serde(default)]
    pub corrupt_rate: f64,
    /// Probability, per frame, that one byte of the frame is lost on the line, 0 to 1.
    #[serde(default)]
    pub drop_rate: f64,
    /// Probability, per frame, that the device stalls for `stall_ms` before sending it, 0 to 1.
    #[serde(default)]
    pub stall_rate: f64,
    /// How long a stall lasts, 0 to 3 600 000 ms (one hour).
    #[serde(default = "default_stall_ms")]
    pub stall_ms: u64,
    /// Probability, per frame, that the device closes the link instead of sending it, 0 to 1.
    #[serde(default)]
    pub disconnect_rate: f64,
}

impl Default for SimulatorSettings {
    fn default() -> Self {
        Self {
            unit: default_unit(),
            channels: Vec::new(),
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

/// The largest noise amplitude: values stay readable numbers, and frames short.
const MAX_NOISE: f64 = 1_000_000.0;

/// The band of the simulator's signal before noise: `Simulator::signal` is `42 + sin(seq / 10)`
/// (a test checks it stays within). Channel `i` is shifted by `CHANNEL_STEP * i`.
const SIGNAL_BAND: (f64, f64) = (41.0, 43.0);

/// How far apart the signals of successive channels are.
pub const CHANNEL_STEP: f64 = 10.0;

/// Most channels one simulator reports.
pub const MAX_SIM_CHANNELS: usize = 16;

impl SimulatorSettings {
    /// The longest data frame this simulator can send, in bytes on the line (its `\r\n`
    /// included): the largest sequence number with the value the noise can push furthest from
    /// each channel's signal band (above it, or below it, where a minus sign may appear), in the
    /// configured unit and naming the channel, encoded by the codec.
    pub fn longest_frame_on_wire(&self) -> usize {
        let mut frame = BytesMut::new();
        let mut longest = |channel: Option<&str>, shift: f64| {
            let (low, high) = SIGNAL_BAND;
            [high + shift + self.noise, low + shift - self.noise]
                .into_iter()
                .map(|value| {
                    frame.clear();
                    match channel {
                        None => encode_frame(u32::MAX, value, &self.unit, &mut frame),
                        Some(c) => encode_channel_frame(u32::MAX, value, &self.unit, c, &mut frame),
                    }
                    frame.len()
                })
                .max()
                .unwrap_or_default()
        };
        if self.channels.is_empty() {
            return longest(None, 0.0);
        }
        self.channels
            .iter()
            .enumerate()
            .map(|(i, channel)| longest(Some(channel), Self::channel_shift(i)))
            .max()
            .unwrap_or_default()
    }

    /// How far channel `i`'s signal is shifted from `42 + sin(seq / 10)`.
    pub fn channel_shift(i: usize) -> f64 {
        CHANNEL_STEP * i as f64
    }

    /// That frame's length as `max_frame_len` counts it: up to and including its first
    /// line-end byte (the `\r` of its `\r\n`).
    pub fn longest_frame_len(&self) -> usize {
        self.longest_frame_on_wire() - 1
    }
}

impl SimulatorSettings {
    pub(super) fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let unit_ok = crate::device::codec::valid_unit(self.unit.as_bytes());
        if !unit_ok {
            return Err(ConfigError::invalid(
                format!("{at}.unit"),
                "must be 1-16 characters of A-Z, a-z, 0-9, '.', '_', '/', '%' or '-'",
            ));
        }
        self.check_channels(&format!("{at}.channels"))?;
        check_range(&format!("{at}.noise"), self.noise, 0.0..=MAX_NOISE)?;
        if self.baud != 0 {
            check_range(&format!("{at}.baud"), self.baud, 50..=4_000_000)?;
        }
        check_range(&format!("{at}.stall_ms"), self.stall_ms, 0..=MAX_MS)?;
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

impl SimulatorSettings {
    fn check_channels(&self, key: &str) -> Result<(), ConfigError> {
        if self.channels.len() > MAX_SIM_CHANNELS {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "at most {MAX_SIM_CHANNELS} channels, got {}",
                    self.channels.len()
                ),
            ));
        }
        for (i, channel) in self.channels.iter().enumerate() {
            if !valid_channel(channel.as_bytes()) {
                return Err(ConfigError::invalid(
                    format!("{key}[{i}]"),
                    super::validate::CHANNEL_RULE,
                ));
            }
            if self.channels[..i].contains(channel) {
                return Err(ConfigError::invalid(
                    format!("{key}[{i}]"),
                    format!("`{channel}` is listed twice"),
                ));
            }
        }
        Ok(())
    }
}
