//! What a device's settings must satisfy: each key's range, timeouts a device can meet, frames
//! that fit and cross its line in time; and what is valid but suspicious.

use super::{
    DeviceKind, DeviceSettings, SimulatorSettings, read_timeout_for, serial, stale_after_for,
};
use crate::config::{ConfigError, MAX_MS, check_range};

/// The longest read timeout or staleness limit: one day. The derived ones reach three hours
/// (three intervals of one hour); `Instant + duration` stays far from overflowing.
const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Most consecutive failures before the breaker trips.
const MAX_FAILURE_THRESHOLD: u32 = 1_000_000;
/// What a channel name must be, for the error naming a bad one.
pub(super) const CHANNEL_RULE: &str = "must be 1-32 characters of A-Z, a-z, 0-9, '_', '.' or '-'";
/// Longest wait for a command's reply.
const MAX_COMMAND_TIMEOUT_MS: u64 = 60_000;

impl DeviceSettings {
    pub(in crate::config) fn validate(&self, at: &str) -> Result<(), ConfigError> {
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
        if !crate::device::codec::valid_channel(self.channel.as_bytes()) {
            return Err(ConfigError::invalid(format!("{at}.channel"), CHANNEL_RULE));
        }
        self.check_ranges(at)?;
        self.check_timeouts(at)?;
        if self.is_modbus() {
            return self.validate_modbus(at);
        }
        self.refuse_modbus_keys(at)?;
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
            (_, Some(_)) => Err(ConfigError::invalid(
                format!("{at}.serial"),
                "only devices of kind \"serial\" take serial settings",
            )),
            (_, None) => {
                self.simulator.validate(&format!("{at}.simulator"))?;
                self.check_simulated_frames(at)
            }
        }
    }

    /// Appends what is valid but suspicious about this device (see `Settings::warnings`).
    pub(in crate::config) fn warnings(&self, at: &str, out: &mut Vec<String>) {
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
            let bits = sim.longest_frame_on_wire() as u64 * 10;
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
        let interval = self.interval().as_millis() as u64;
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
                    "the simulator's frames reach {longest} bytes (unit `{}`, noise {}, {} \
                     channels) and longer frames are skipped as too_long; set max_frame_len to \
                     at least {longest}",
                    self.simulator.unit,
                    self.simulator.noise,
                    self.simulator.channels.len()
                ),
            ));
        }
        let baud = self.simulator.baud;
        if baud == 0 {
            return Ok(()); // Unpaced: a frame crosses the link at once.
        }
        // 8N1: ten bits a byte.
        let on_wire = self.simulator.longest_frame_on_wire();
        let bits = on_wire as u64 * 10;
        self.check_line(at, "simulator.baud", baud, on_wire, bits)?;
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
