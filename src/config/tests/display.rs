//! Config enums display as users write them in the config (their serde names), so a log line
//! shows `overflow=drop_oldest`, never `DropOldest`.

use super::*;

/// `value` displays exactly as it serialises, and that name reads back as `value`.
fn assert_displays_as_written<T>(value: T)
where
    T: std::fmt::Display + Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let written = match serde_json::to_value(&value).unwrap() {
        serde_json::Value::String(name) => name,
        other => other.to_string(),
    };
    assert_eq!(value.to_string(), written, "{value:?}");
    let read: T = serde_json::from_value(serde_json::Value::String(written.clone())).unwrap();
    assert_eq!(read, value, "{written}");
}

#[test]
fn every_config_enum_displays_its_config_name() {
    for policy in [
        OverflowPolicy::DropOldest,
        OverflowPolicy::DropNewest,
        OverflowPolicy::Block,
    ] {
        assert_displays_as_written(policy);
    }
    assert_eq!(OverflowPolicy::DropOldest.to_string(), "drop_oldest");
    for format in [LogFormat::Text, LogFormat::Json] {
        assert_displays_as_written(format);
    }
    for format in [UplinkFormat::Json, UplinkFormat::Thingsboard] {
        assert_displays_as_written(format);
    }
    for kind in [DeviceKind::Simulated, DeviceKind::Serial] {
        assert_displays_as_written(kind);
    }
    for parity in [Parity::None, Parity::Odd, Parity::Even] {
        assert_displays_as_written(parity);
    }
    // An interval serialises as a number; the environment gives it as text, which reads back.
    for fsync in [FsyncSetting::Always, FsyncSetting::IntervalMs(250)] {
        assert_displays_as_written(fsync);
    }
}
