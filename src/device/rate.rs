//! The device's rate and the limits that follow it: which interval a `SET_RATE=<ms>` command
//! asks for, and the read timeout and staleness limit for an interval.
//!
//! The device task applies these when a device acknowledges a rate (and at start, with the
//! configured interval); the handle's freshness check reads the staleness limit it sets.

use std::time::Duration;

use crate::config::{read_timeout_for, stale_after_for};

/// An explicit read timeout or staleness limit is kept while it is longer than this many
/// sample intervals; a device sending slower would trip it between two good frames.
const MIN_INTERVALS_IN_LIMIT: u32 = 2;

/// The read timeout and staleness limit for one sample interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    /// How long a read may wait for a valid frame.
    pub(super) read_timeout: Duration,
    /// How long a Measuring device may go without a valid frame before `/readyz` fails.
    pub(super) stale_after: Duration,
    /// An explicit limit was too short for the interval and was replaced by the derived one.
    pub(super) overridden: bool,
}

/// The limits for a device sending every `interval`: an explicit limit wins while it is longer
/// than [`MIN_INTERVALS_IN_LIMIT`] intervals; otherwise (the device now sends slower than it
/// allows) the derived one, [`read_timeout_for`] or [`stale_after_for`], which is then the
/// larger.
pub(super) fn limits_for(
    interval: Duration,
    explicit_read_timeout: Option<Duration>,
    explicit_stale_after: Option<Duration>,
) -> Limits {
    let floor = interval.saturating_mul(MIN_INTERVALS_IN_LIMIT);
    let mut overridden = false;
    let mut pick = |explicit: Option<Duration>, derived: Duration| match explicit {
        Some(limit) if limit > floor => limit,
        Some(_) => {
            overridden = true;
            derived
        }
        None => derived,
    };
    let read_timeout = pick(explicit_read_timeout, read_timeout_for(interval));
    let stale_after = pick(
        explicit_stale_after,
        stale_after_for(interval, read_timeout),
    );
    Limits {
        read_timeout,
        stale_after,
        overridden,
    }
}

/// The interval a `SET_RATE=<ms>` command asks for.
pub(super) fn requested_rate(line: &str) -> Option<Duration> {
    let ms = line.strip_prefix("SET_RATE=")?.trim().parse().ok()?;
    Some(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn limits_follow_the_interval_unless_set() {
        let limits = limits_for(ms(2_000), None, None);
        assert_eq!(
            (limits.read_timeout, limits.stale_after, limits.overridden),
            (ms(6_000), ms(10_000), false)
        );
        // Unpaced: one second of read timeout, and staleness after one read timeout.
        let limits = limits_for(Duration::ZERO, None, None);
        assert_eq!(
            (limits.read_timeout, limits.stale_after),
            (ms(1_000), ms(1_000))
        );
    }

    #[test]
    fn explicit_limits_win_while_longer_than_two_intervals() {
        let kept = limits_for(ms(100), Some(ms(500)), Some(ms(300)));
        assert_eq!(
            (kept.read_timeout, kept.stale_after, kept.overridden),
            (ms(500), ms(300), false)
        );
        let kept = limits_for(Duration::ZERO, Some(ms(1)), Some(ms(1)));
        assert!(!kept.overridden);
        // Two intervals of 250 ms are exactly 500: no longer allowed; the derived limits are
        // the larger ones.
        let replaced = limits_for(ms(250), Some(ms(500)), Some(ms(500)));
        assert_eq!(
            (
                replaced.read_timeout,
                replaced.stale_after,
                replaced.overridden
            ),
            (ms(1_000), ms(1_250), true)
        );
        let one = limits_for(ms(2_000), Some(ms(30_000)), Some(ms(300)));
        assert_eq!(
            (one.read_timeout, one.stale_after, one.overridden),
            (ms(30_000), ms(10_000), true)
        );
    }

    #[test]
    fn set_rate_commands_name_their_interval() {
        assert_eq!(requested_rate("SET_RATE=2000"), Some(ms(2_000)));
        assert_eq!(requested_rate("SET_RATE= 50 "), Some(ms(50)));
        for other in [
            "SET_RATE=",
            "SET_RATE=-1",
            "SET_RATE=abc",
            "GET_STATUS",
            "set_rate=5",
        ] {
            assert_eq!(requested_rate(other), None, "{other}");
        }
    }
}
