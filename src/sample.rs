//! The sample: one measurement, as it travels from a source through the buffer to a worker.

use std::time::{Instant, SystemTime};

use serde::Serialize;
use smol_str::SmolStr;

use crate::ledger::Source;

/// The channel of a sample whose source names none.
pub const DEFAULT_CHANNEL: &str = "value";

/// One measurement, stamped by the gateway on arrival.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Id of the device that produced it.
    pub device: SmolStr,
    /// The device's sequence number, when it sends one.
    pub seq: Option<u32>,
    /// The raw value.
    pub value: f64,
    /// Unit token.
    pub unit: SmolStr,
    /// Name of the quantity measured (`temperature`, `humidity`, ...); one device may report
    /// several. Devices that name none report [`DEFAULT_CHANNEL`].
    pub channel: SmolStr,
    /// When the gateway received it (UTC wall clock), or the time the client gave.
    pub timestamp: SystemTime,
    /// When the gateway received it (monotonic), for read-to-processed latency.
    pub received: Instant,
    /// Position in the buffer's arrival order, stamped on entry; keeps the history in order
    /// when batches finish out of order on several workers.
    pub order: u64,
    /// Where it came from; statistics keep sources apart. The buffer's ledger counts by the
    /// source its producer pushes with, which must be this one.
    pub source: Source,
}

impl Sample {
    /// A sample of device `test`, for tests.
    #[cfg(test)]
    pub fn test(seq: u32, value: f64) -> Self {
        Self {
            device: SmolStr::new_static("test"),
            seq: Some(seq),
            value,
            unit: SmolStr::new_static("arb.units"),
            channel: SmolStr::new_static(DEFAULT_CHANNEL),
            timestamp: SystemTime::now(),
            received: Instant::now(),
            order: u64::from(seq),
            source: Source::Device,
        }
    }
}

/// A processed sample as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ProcessedSample {
    /// The device's sequence number, if any.
    pub seq: Option<u32>,
    /// The calibrated value.
    pub value: f64,
    /// Unit token.
    #[schema(value_type = String)]
    pub unit: SmolStr,
    /// Device id.
    #[schema(value_type = String)]
    pub device: SmolStr,
    /// The quantity measured.
    #[schema(value_type = String)]
    pub channel: SmolStr,
    /// Receive time, RFC 3339 UTC.
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub timestamp: SystemTime,
    /// Arrival order in the buffer (not shown).
    #[serde(skip)]
    pub order: u64,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    Rfc3339::new(*t).serialize(s)
}

/// A wall-clock time as RFC 3339 UTC with milliseconds, e.g. `2026-11-26T23:10:00.123Z`,
/// formatted into a buffer of its own: serialising one allocates nothing, which matters for
/// the uplink's JSON, one timestamp per sample.
#[derive(Clone, Copy)]
pub struct Rfc3339([u8; Self::LEN]);

impl Rfc3339 {
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`: every time RFC 3339 can show has this length.
    const LEN: usize = 24;

    /// Formats `t`. Never panics: a time outside what RFC 3339 can show is written as the
    /// Unix epoch.
    pub fn new(t: SystemTime) -> Self {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let epoch = time::OffsetDateTime::UNIX_EPOCH;
        let t = match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(after) => time::Duration::try_from(after)
                .ok()
                .and_then(|d| epoch.checked_add(d)),
            Err(before) => time::Duration::try_from(before.duration())
                .ok()
                .and_then(|d| epoch.checked_sub(d)),
        };
        let mut out = *b"1970-01-01T00:00:00.000Z";
        if let Some(t) = t.filter(|t| (0..=9999).contains(&t.year())) {
            let mut buf = [0u8; Self::LEN];
            if let Ok(Self::LEN) = t.format_into(&mut &mut buf[..], &format) {
                out = buf;
            }
        }
        Self(out)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).expect("RFC 3339 text is ASCII")
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Formats a wall-clock time as RFC 3339 UTC with milliseconds, e.g. `2026-11-26T23:10:00.123Z`.
/// Never panics: a time outside what RFC 3339 can show is written as the Unix epoch.
pub fn format_rfc3339(t: SystemTime) -> String {
    Rfc3339::new(t).as_str().to_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_198_600_123);
        assert_eq!(format_rfc3339(t), "2025-11-26T23:10:00.123Z");
    }

    #[test]
    fn times_outside_rfc3339_do_not_panic() {
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(format_rfc3339(far), "1970-01-01T00:00:00.000Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(format_rfc3339(before), "1969-12-31T00:00:00.000Z");
    }
}
