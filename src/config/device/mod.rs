//! `[[devices]]`: each device's link (simulated or serial), timing, circuit breaker, backoff,
//! calibration, and the simulator's fault injection.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, MAX_MS, check_range};

mod serial;
mod simulator;

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
            read_timeout_ms: None,
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

    /// The configured sample interval.
    pub fn interval(&self) -> Duration {
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

/// The longest read timeout or staleness limit: one day. The derived ones reach three hours
/// (three intervals of one hour); `Instant + duration` stays far from overflowing.
const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Most consecutive failures before the breaker trips.
const MAX_FAILURE_THRESHOLD: u32 = 1_000_000;
/// Longest wait for a command's reply.
const MAX_COMMAND_TIMEOUT_MS: u64 = 60_000;

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
fn default_scale() -> f64 {
    1.0
}

impl DeviceSettings {
    pub(super) fn validate(&self, at: &str) -> Result<(), ConfigError> {
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
        self.check_ranges(at)?;
        self.check_timeouts(at)?;
        match (self.kind, &self.serial) {
            (DeviceKind::Serial, None) => Err(ConfigError::invalid(
                format!("{at}.serial"),
                "a serial device needs a [devices.serial] table with at least `path`",
            )),
            (DeviceKind::Serial, Some(_)) if self.simulator != SimulatorSettings::default() => {
                // Equal to the defaults it says nothing (the default device carries one, so
                // it can be made serial from the environment); otherwise it would be ignored.
                Err(ConfigError::invalid(
                    format!("{at}.simulator"),
                    "a serial device does not use a [devices.simulator] table and would \
                     ignore it: remove the table, or set kind = \"simulated\"",
                ))
            }
            (DeviceKind::Serial, Some(serial)) => {
                serial.validate(&format!("{at}.serial"))?;
                let bytes = serial::SHORTEST_FRAME.len();
                let bits = serial.frame_bits();
                self.check_line(at, "serial.baud", serial.baud, bytes, bits)
            }
            (DeviceKind::Simulated, Some(_)) => Err(ConfigError::invalid(
                format!("{at}.serial"),
                "only devices of kind \"serial\" take serial settings",
            )),
            (DeviceKind::Simulated, None) => {
                self.simulator.validate(&format!("{at}.simulator"))?;
                self.check_simulated_frames(at)
            }
        }
    }

    /// Appends what is valid but suspicious about this device (see `Settings::warnings`).
    pub(super) fn warnings(&self, at: &str, out: &mut Vec<String>) {
        if self.kind != DeviceKind::Simulated {
            return;
        }
        let sim = &self.simulator;
        for (key, rate, effect) in [
            ("corrupt_rate", sim.corrupt_rate, "fails its checksum"),
            ("drop_rate", sim.drop_rate, "loses a byte"),
            (
                "disconnect_rate",
                sim.disconnect_rate,
                "closes the link instead",
            ),
        ] {
            if rate >= 1.0 {
                out.push(format!(
                    "{at}.simulator.{key} is 1: every frame {effect}, so the device never \
                     delivers a sample"
                ));
            }
        }
        let interval = self.sample_interval_ms;
        if sim.baud > 0 && interval > 0 {
            let bits = sim.longest_frame_len() as u64 * 10;
            let frame_ms = line_ms(bits, sim.baud);
            if bits * 1000 > interval * u64::from(sim.baud) {
                out.push(format!(
                    "{at}.simulator.baud ({}) takes {frame_ms} ms for a frame: the simulator \
                     sends slower than sample_interval_ms ({interval})",
                    sim.baud
                ));
            }
        }
    }

    /// Explicit timeouts that a device sending every `sample_interval_ms` can never satisfy.
    fn check_timeouts(&self, at: &str) -> Result<(), ConfigError> {
        let interval = self.sample_interval_ms;
        if interval == 0 {
            return Ok(()); // As fast as the link goes: any timeout can be met.
        }
        if self.read_timeout_ms.is_some_and(|ms| ms <= interval) {
            let derived = read_timeout_for(self.interval()).as_millis();
            return Err(ConfigError::invalid(
                format!("{at}.read_timeout_ms"),
                format!(
                    "must be above sample_interval_ms ({interval}): reads would time out \
                     between two frames; raise it, or leave it unset for {derived} ms"
                ),
            ));
        }
        if self.stale_after_ms.is_some_and(|ms| ms <= interval) {
            let derived = stale_after_for(self.interval(), self.read_timeout()).as_millis();
            return Err(ConfigError::invalid(
                format!("{at}.stale_after_ms"),
                format!(
                    "must be above sample_interval_ms ({interval}): /readyz would fail between \
                     two frames; raise it, or leave it unset for {derived} ms"
                ),
            ));
        }
        Ok(())
    }

    /// A simulated device's frames must fit `max_frame_len`, and when the simulator paces its
    /// line, a frame (and a command's reply behind it) must cross it within the timeouts.
    fn check_simulated_frames(&self, at: &str) -> Result<(), ConfigError> {
        let longest = self.simulator.longest_frame_len();
        if self.max_frame_len < longest {
            return Err(ConfigError::invalid(
                format!("{at}.max_frame_len"),
                format!(
                    "the simulator's frames reach {longest} bytes (unit `{}`, noise {}) and \
                     longer frames are skipped as too_long; set max_frame_len to at least \
                     {longest}",
                    self.simulator.unit, self.simulator.noise
                ),
            ));
        }
        let baud = self.simulator.baud;
        if baud == 0 {
            return Ok(()); // Unpaced: a frame crosses the link at once.
        }
        // 8N1: ten bits a byte.
        let bits = longest as u64 * 10;
        self.check_line(at, "simulator.baud", baud, longest, bits)?;
        // A reply is queued behind the frame being sent, and is about as long.
        let reply_ms = line_ms(2 * bits, baud);
        if 2 * bits * 1000 >= self.command_timeout_ms * u64::from(baud) {
            return Err(ConfigError::invalid(
                format!("{at}.command_timeout_ms"),
                format!(
                    "at {baud} baud a reply can wait {reply_ms} ms behind a frame on the line; \
                     raise command_timeout_ms above {reply_ms}, or the simulator's baud"
                ),
            ));
        }
        Ok(())
    }

    /// A frame of `bytes`, `bits` on the line, must cross a line of `baud` within the read
    /// timeout and the staleness limit, or every read fails or readiness flaps; `key` names
    /// the baud setting.
    fn check_line(
        &self,
        at: &str,
        key: &str,
        baud: u32,
        bytes: usize,
        bits: u64,
    ) -> Result<(), ConfigError> {
        let frame_ms = line_ms(bits, baud);
        // The tighter of the two limits binds; a baud that meets it meets both.
        let (limit, what, setting) = [
            (self.read_timeout(), "the read timeout", "read_timeout_ms"),
            (self.stale_after(), "the staleness limit", "stale_after_ms"),
        ]
        .into_iter()
        .min_by_key(|(limit, ..)| *limit)
        .expect("two limits");
        let limit_ms = limit.as_millis() as u64;
        if bits * 1000 < limit_ms * u64::from(baud) {
            return Ok(());
        }
        let min_baud = bits * 1000 / limit_ms + 1;
        Err(ConfigError::invalid(
            format!("{at}.{key}"),
            format!(
                "at {baud} baud a frame of {bytes} bytes takes {frame_ms} ms, not less than \
                 {what} ({limit_ms} ms); set the baud to at least {min_baud}, or raise {setting}"
            ),
        ))
    }

    /// Every numeric setting of the device (not its link's) against its documented range.
    fn check_ranges(&self, at: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{at}.{name}");
        check_range(
            &key("sample_interval_ms"),
            self.sample_interval_ms,
            0..=MAX_MS,
        )?;
        if let Some(ms) = self.read_timeout_ms {
            check_range(&key("read_timeout_ms"), ms, 1..=MAX_TIMEOUT_MS)?;
        }
        check_range(
            &key("failure_threshold"),
            self.failure_threshold,
            1..=MAX_FAILURE_THRESHOLD,
        )?;
        check_range(
            &key("backoff_initial_ms"),
            self.backoff_initial_ms,
            1..=MAX_MS,
        )?;
        check_range(&key("backoff_max_ms"), self.backoff_max_ms, 1..=MAX_MS)?;
        if self.backoff_max_ms < self.backoff_initial_ms {
            return Err(ConfigError::invalid(
                key("backoff_max_ms"),
                format!(
                    "must be at least backoff_initial_ms ({}): raise it, or lower backoff_initial_ms",
                    self.backoff_initial_ms
                ),
            ));
        }
        check_range(&key("max_frame_len"), self.max_frame_len, 16..=65_536)?;
        if let Some(ms) = self.stale_after_ms {
            check_range(&key("stale_after_ms"), ms, 1..=MAX_TIMEOUT_MS)?;
        }
        check_range(
            &key("command_timeout_ms"),
            self.command_timeout_ms,
            1..=MAX_COMMAND_TIMEOUT_MS,
        )?;
        for (name, value) in [("scale", self.scale), ("offset", self.offset)] {
            if !value.is_finite() {
                return Err(ConfigError::invalid(
                    key(name),
                    format!("must be a finite number, got {value}"),
                ));
            }
        }
        Ok(())
    }
}

/// Milliseconds, rounded up, that `bits` take on a line of `baud` bits per second.
fn line_ms(bits: u64, baud: u32) -> u64 {
    (bits * 1000).div_ceil(u64::from(baud))
}
