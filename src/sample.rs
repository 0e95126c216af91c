//! The sample: one measurement, as it travels from a source through the buffer to a worker.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;
use smol_str::SmolStr;

use crate::ledger::Source;

/// The channel of a sample whose source names none.
pub const DEFAULT_CHANNEL: &str = "value";

/// What names a sample's series: the device that sent it, its unit and its channel.
///
/// Samples of one device link with one unit and channel, of one Modbus register, or of one run
/// of an HTTP body share one `Arc<Labels>` (links and bodies through a [`LabelCache`], Modbus
/// registers from their map), so a sample carries one pointer through the buffer and the
/// worker instead of three strings: 72 bytes instead of 136, which every stage moves
/// (docs/PERFORMANCE.md, fifth pass).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Labels {
    /// Id of the device that produced it.
    pub device: SmolStr,
    /// Unit token.
    pub unit: SmolStr,
    /// Name of the quantity measured (`temperature`, `humidity`, ...); one device may report
    /// several. Devices that name none report [`DEFAULT_CHANNEL`].
    pub channel: SmolStr,
}

impl Labels {
    /// Shared labels of `device`, `unit` and `channel`.
    pub fn new(
        device: impl Into<SmolStr>,
        unit: impl Into<SmolStr>,
        channel: impl Into<SmolStr>,
    ) -> Arc<Self> {
        Arc::new(Self {
            device: device.into(),
            unit: unit.into(),
            channel: channel.into(),
        })
    }

    /// Device, unit and channel, for tests to compare.
    #[cfg(test)]
    pub fn names(&self) -> (&str, &str, &str) {
        (&self.device, &self.unit, &self.channel)
    }

    /// Whether these are the labels of `device`, `unit` and `channel`.
    pub fn is(&self, device: &str, unit: &str, channel: &str) -> bool {
        self.unit == unit && self.channel == channel && self.device == device
    }
}

/// The labels a source used last, so that its samples share them: a link or a request body
/// uses a few label sets in runs (one unit per channel, a few channels per device). Holds at
/// most [`Self::SIZE`] sets; a source that cycles through more makes new `Arc`s (correct, only
/// slower).
#[derive(Debug, Default)]
pub struct LabelCache {
    recent: Vec<Arc<Labels>>,
    /// The set used last, looked at first.
    last: usize,
    /// The set the next new one replaces once the cache is full.
    next: usize,
}

impl LabelCache {
    /// Label sets kept.
    pub const SIZE: usize = 8;

    /// The shared labels of `device`, `unit` and `channel`.
    pub fn get(&mut self, device: &str, unit: &str, channel: &str) -> Arc<Labels> {
        if let Some(labels) = self.recent.get(self.last)
            && labels.is(device, unit, channel)
        {
            return labels.clone();
        }
        if let Some(i) = self.recent.iter().position(|l| l.is(device, unit, channel)) {
            self.last = i;
            return self.recent[i].clone();
        }
        let labels = Labels::new(device, unit, channel);
        if self.recent.len() < Self::SIZE {
            self.last = self.recent.len();
            self.recent.push(labels.clone());
        } else {
            self.last = self.next;
            self.recent[self.next] = labels.clone();
            self.next = (self.next + 1) % Self::SIZE;
        }
        labels
    }
}

/// One measurement, stamped by the gateway on arrival.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Its device, unit and channel.
    pub labels: Arc<Labels>,
    /// The device's sequence number, when it sends one.
    pub seq: Option<u32>,
    /// The raw value.
    pub value: f64,
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
            labels: Labels::new("test", "arb.units", DEFAULT_CHANNEL),
            seq: Some(seq),
            value,
            timestamp: SystemTime::now(),
            received: Instant::now(),
            order: u64::from(seq),
            source: Source::Device,
        }
    }
}

/// A processed sample, as the worker keeps it in the history and hands it to the uplink.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedSample {
    /// The device's sequence number, if any.
    pub seq: Option<u32>,
    /// The calibrated value.
    pub value: f64,
    /// Its device, unit and channel: the sample's own, moved or shared, never copied.
    pub labels: Arc<Labels>,
    /// Receive time.
    pub timestamp: SystemTime,
    /// Arrival order in the buffer (not shown).
    pub order: u64,
}

/// A processed sample as the API shows it.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ProcessedSample)]
struct ProcessedSampleJson<'a> {
    /// The device's sequence number, if any.
    seq: Option<u32>,
    /// The calibrated value.
    value: f64,
    /// Unit token.
    unit: &'a str,
    /// Device id.
    device: &'a str,
    /// The quantity measured.
    channel: &'a str,
    /// Receive time, RFC 3339 UTC.
    #[schema(value_type = String, format = DateTime)]
    timestamp: Rfc3339,
}

impl Serialize for ProcessedSample {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ProcessedSampleJson {
            seq: self.seq,
            value: self.value,
            unit: &self.labels.unit,
            device: &self.labels.device,
            channel: &self.labels.channel,
            timestamp: Rfc3339::new(self.timestamp),
        }
        .serialize(s)
    }
}

impl utoipa::PartialSchema for ProcessedSample {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        <ProcessedSampleJson as utoipa::PartialSchema>::schema()
    }
}

impl utoipa::ToSchema for ProcessedSample {}

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
    ///
    /// Times from 1970 to 9999 (every clock reading and almost every client timestamp) are
    /// written directly from the day count (the civil-from-days algorithm of H. Hinnant's
    /// `chrono`-compatible date algorithms): a few dozen instructions where the `time` crate's
    /// general formatter takes about 1,500. Earlier times take that formatter
    /// ([`Self::formatted`]), which a property test holds the fast path to.
    pub fn new(t: SystemTime) -> Self {
        /// 10000-01-01T00:00:00Z: the first second RFC 3339's four-digit year cannot show.
        const END_SECS: u64 = 253_402_300_800;
        match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(after) if after.as_secs() < END_SECS => {
                Self::from_unix(after.as_secs(), after.subsec_millis())
            }
            _ => Self::formatted(t),
        }
    }

    /// `secs` after the epoch (below year 10000) and `millis` (below 1,000).
    fn from_unix(secs: u64, millis: u32) -> Self {
        let (days, rem) = (secs / 86_400, secs % 86_400);
        // Days since 0000-03-01, in 400-year eras of 146,097 days.
        let z = days + 719_468;
        let (era, doe) = (z / 146_097, z % 146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + u64::from(month <= 2);
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut n: u64| {
            for b in out[at..at + width].iter_mut().rev() {
                *b = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, rem / 3_600);
        put(14, 2, rem / 60 % 60);
        put(17, 2, rem % 60);
        put(20, 3, u64::from(millis));
        Self(out)
    }

    /// Formats `t` with the `time` crate: every time RFC 3339 can show (years 0 to 9999).
    fn formatted(t: SystemTime) -> Self {
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
    fn samples_carry_one_pointer_for_their_labels_not_three_strings() {
        // 136 and 112 bytes with three 24-byte `SmolStr`s.
        let (sample, processed) = (size_of::<Sample>(), size_of::<ProcessedSample>());
        assert!(sample <= 72, "{sample}");
        assert!(processed <= 48, "{processed}");
    }

    #[test]
    fn the_label_cache_shares_equal_labels_and_never_confuses_different_ones() {
        let mut cache = LabelCache::default();
        let temp = cache.get("d", "degC", "temp");
        let hum = cache.get("d", "%RH", "hum");
        let other_channel = cache.get("d", "degC", "hum");
        assert_eq!(other_channel.channel, "hum");
        assert!(!Arc::ptr_eq(&temp, &other_channel));
        assert!(Arc::ptr_eq(&temp, &cache.get("d", "degC", "temp")));
        assert!(Arc::ptr_eq(&hum, &cache.get("d", "%RH", "hum")));
        assert_eq!(
            *cache.get("e", "degC", "temp"),
            *Labels::new("e", "degC", "temp")
        );
        assert_eq!(
            *cache.get("d", "degF", "temp"),
            *Labels::new("d", "degF", "temp")
        );
        // More sets than the cache holds: each answer still names what was asked.
        for i in 0..3 * LabelCache::SIZE {
            let unit = format!("u{}", i % (LabelCache::SIZE + 3));
            let labels = cache.get("d", &unit, "c");
            assert_eq!(
                (labels.device.as_str(), labels.unit.as_str()),
                ("d", unit.as_str())
            );
            assert_eq!(labels.channel, "c");
        }
        assert!(cache.recent.len() <= LabelCache::SIZE);
    }

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
        let last = SystemTime::UNIX_EPOCH + Duration::new(253_402_300_799, 999_999_999);
        assert_eq!(format_rfc3339(last), "9999-12-31T23:59:59.999Z");
        let end = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(format_rfc3339(end), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn leap_days_and_century_years_are_where_the_calendar_puts_them() {
        for (secs, text) in [
            (951_782_400, "2000-02-29T00:00:00.000Z"),
            (951_868_800, "2000-03-01T00:00:00.000Z"),
            (4_107_542_400, "2100-03-01T00:00:00.000Z"),
            (4_107_456_000, "2100-02-28T00:00:00.000Z"),
            (1_709_164_799, "2024-02-28T23:59:59.000Z"),
        ] {
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(format_rfc3339(t), text, "{secs}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_direct_formatter_writes_what_the_time_crate_writes(
            secs in 0u64..253_402_300_800,
            nanos in 0u32..1_000_000_000,
        ) {
            let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
            let (direct, general) = (Rfc3339::new(t), Rfc3339::formatted(t));
            proptest::prop_assert_eq!(direct.as_str(), general.as_str());
        }
    }
}
