//! Uplink messages: plain functions from one device's processed samples to an MQTT topic and
//! payload, and the envelope that stores a message as one opaque spool record.
//!
//! Messages are encoded once, by the worker that processed the batch (on its blocking thread,
//! in `SpoolStage::submit`), so the forwarder only moves bytes: it knows no devices and no
//! formats.

use serde::Serialize;
use serde::ser::SerializeMap;

use crate::config::UplinkFormat;
use crate::sample::{ProcessedSample, Rfc3339};
use crate::spool::unix_ms;

/// Builds topics and payloads for one gateway.
#[derive(Debug, Clone)]
pub struct Encoder {
    format: UplinkFormat,
    gateway: String,
    /// The topic template split at its placeholders.
    topic: Vec<TopicPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TopicPart {
    Text(String),
    Gateway,
    Device,
}

impl Encoder {
    /// An encoder for `format`, with a template validated by the config.
    pub fn new(format: UplinkFormat, gateway: impl Into<String>, template: &str) -> Self {
        let mut topic = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            let (part, len) = if rest.starts_with("{gateway}") {
                (TopicPart::Gateway, "{gateway}".len())
            } else if rest.starts_with("{device}") {
                (TopicPart::Device, "{device}".len())
            } else {
                let end = rest[1..].find('{').map_or(rest.len(), |i| i + 1);
                (TopicPart::Text(rest[..end].to_owned()), end)
            };
            topic.push(part);
            rest = &rest[len..];
        }
        Self {
            format,
            gateway: gateway.into(),
            topic,
        }
    }

    /// The topic for `device`.
    pub fn topic(&self, device: &str) -> String {
        let mut out = String::new();
        for part in &self.topic {
            match part {
                TopicPart::Text(text) => out.push_str(text),
                TopicPart::Gateway => out.push_str(&self.gateway),
                TopicPart::Device => out.push_str(device),
            }
        }
        out
    }

    /// Appends the payload of one message (samples of `device`, in order) to `out`.
    pub fn payload(&self, device: &str, samples: &[ProcessedSample], out: &mut Vec<u8>) {
        match self.format {
            UplinkFormat::Json => json_batch(&self.gateway, device, samples, out),
            UplinkFormat::Thingsboard => {
                // Writing to a Vec cannot fail, and every value is finite (the worker rejects
                // the rest), so serialisation cannot fail either.
                serde_json::to_writer(&mut *out, &ThingsboardBatch { device, samples })
                    .expect("a batch of finite samples serialises");
            }
        }
    }
}

/// `{"gateway": .., "device": .., "samples": [{"seq", "value", "unit", "channel",
/// "timestamp"}, ..]}`, exactly as serde_json writes the derived form (a property test holds
/// the two to the same bytes), but with the keys as constant bytes and a string copied as it
/// is when it needs no escaping: serde_json's escaping took ~150 instructions per string,
/// eight strings per sample.
fn json_batch(gateway: &str, device: &str, samples: &[ProcessedSample], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"gateway\":");
    json_str(gateway, out);
    out.extend_from_slice(b",\"device\":");
    json_str(device, out);
    out.extend_from_slice(b",\"samples\":[");
    // Samples of one read (or one request) share their timestamp: format it once per run.
    let mut last: Option<(std::time::SystemTime, Rfc3339)> = None;
    for (i, sample) in samples.iter().enumerate() {
        let timestamp = match last {
            Some((at, text)) if at == sample.timestamp => text,
            _ => {
                let text = Rfc3339::new(sample.timestamp);
                last = Some((sample.timestamp, text));
                text
            }
        };
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"seq\":");
        match sample.seq {
            Some(seq) => json_value(&seq, out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"value\":");
        json_value(&sample.value, out);
        out.extend_from_slice(b",\"unit\":");
        json_str(&sample.labels.unit, out);
        out.extend_from_slice(b",\"channel\":");
        json_str(&sample.labels.channel, out);
        out.extend_from_slice(b",\"timestamp\":\"");
        out.extend_from_slice(timestamp.as_str().as_bytes());
        out.extend_from_slice(b"\"}");
    }
    out.extend_from_slice(b"]}");
}

/// `text` as a JSON string: copied between quotes when no byte needs escaping (units and
/// channels never do), else through serde_json.
fn json_str(text: &str, out: &mut Vec<u8>) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        json_value(text, out);
    }
}

/// A number or a string as serde_json writes it. Writing to a Vec cannot fail, and the worker
/// rejects non-finite values, so this cannot fail either.
fn json_value<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, value).expect("a finite number or a string serialises");
}

/// `{"<device>": [{"ts": <ms>, "values": {"<channel>": v}}]}`, ThingsBoard's gateway telemetry:
/// the channel is the telemetry key (`value` for devices that name no channel).
struct ThingsboardBatch<'a> {
    device: &'a str,
    samples: &'a [ProcessedSample],
}

impl Serialize for ThingsboardBatch<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        /// `{"<channel>": value}`.
        struct Values<'a> {
            channel: &'a str,
            value: f64,
        }
        impl Serialize for Values<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry(self.channel, &self.value)?;
                map.end()
            }
        }
        #[derive(Serialize)]
        struct Item<'a> {
            ts: u64,
            values: Values<'a>,
        }
        struct Items<'a>(&'a [ProcessedSample]);
        impl Serialize for Items<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|sample| Item {
                    ts: unix_ms(sample.timestamp),
                    values: Values {
                        channel: &sample.labels.channel,
                        value: sample.value,
                    },
                }))
            }
        }
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(self.device, &Items(self.samples))?;
        map.end()
    }
}

/// Why a spool record is not a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a spool record is not an uplink message (bad envelope)")]
pub struct BadEnvelope;

/// Appends a message as one spool record payload: `[topic length u16 LE][topic][payload]`.
/// `payload` is appended by `write_payload`, so it is never copied.
pub fn envelope(topic: &str, out: &mut Vec<u8>, write_payload: impl FnOnce(&mut Vec<u8>)) {
    let len = u16::try_from(topic.len()).expect("topics are validated to be short");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    write_payload(out);
}

/// Splits a spool record payload into topic and message payload.
pub fn open_envelope(record: &[u8]) -> Result<(&str, &[u8]), BadEnvelope> {
    let len = record.get(..2).ok_or(BadEnvelope)?;
    let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
    let topic = record.get(2..2 + len).ok_or(BadEnvelope)?;
    let topic = std::str::from_utf8(topic).map_err(|_| BadEnvelope)?;
    if topic.is_empty() {
        return Err(BadEnvelope);
    }
    Ok((topic, &record[2 + len..]))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde::ser::SerializeSeq;

    use super::*;
    use crate::sample::Labels;

    /// The derived serialisation `json_batch` replaced, kept as the oracle it must match.
    #[derive(Serialize)]
    struct JsonBatch<'a> {
        gateway: &'a str,
        device: &'a str,
        samples: JsonSamples<'a>,
    }

    struct JsonSamples<'a>(&'a [ProcessedSample]);

    impl Serialize for JsonSamples<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            #[derive(Serialize)]
            struct Item<'a> {
                seq: Option<u32>,
                value: f64,
                unit: &'a str,
                channel: &'a str,
                timestamp: Rfc3339,
            }
            let mut seq = s.serialize_seq(Some(self.0.len()))?;
            for sample in self.0 {
                seq.serialize_element(&Item {
                    seq: sample.seq,
                    value: sample.value,
                    unit: &sample.labels.unit,
                    channel: &sample.labels.channel,
                    timestamp: Rfc3339::new(sample.timestamp),
                })?;
            }
            seq.end()
        }
    }

    fn sample(seq: u32, value: f64) -> ProcessedSample {
        ProcessedSample {
            seq: Some(seq),
            value,
            labels: Labels::new("probe-1", "degC", "value"),
            timestamp: UNIX_EPOCH + Duration::from_millis(1_764_198_600_123 + u64::from(seq)),
            order: u64::from(seq),
        }
    }

    #[test]
    fn topics_fill_their_placeholders() {
        let e = Encoder::new(UplinkFormat::Json, "gw1", "site/{gateway}/dev/{device}/x");
        assert_eq!(e.topic("probe-1"), "site/gw1/dev/probe-1/x");
        let e = Encoder::new(UplinkFormat::Thingsboard, "gw1", "v1/gateway/telemetry");
        assert_eq!(e.topic("probe-1"), "v1/gateway/telemetry");
    }

    #[test]
    fn json_carries_gateway_device_and_each_sample_with_its_original_time() {
        let e = Encoder::new(UplinkFormat::Json, "gw1", "t/{device}");
        let mut out = Vec::new();
        let humidity = ProcessedSample {
            labels: Labels::new("probe-1", "degC", "humidity"),
            ..sample(2, -3.0)
        };
        e.payload("probe-1", &[sample(1, 21.5), humidity], &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "gateway": "gw1",
                "device": "probe-1",
                "samples": [
                    {"seq": 1, "value": 21.5, "unit": "degC", "channel": "value", "timestamp": "2025-11-26T23:10:00.124Z"},
                    {"seq": 2, "value": -3.0, "unit": "degC", "channel": "humidity", "timestamp": "2025-11-26T23:10:00.125Z"},
                ]
            })
        );
    }

    #[test]
    fn runs_of_one_timestamp_and_changes_of_it_are_each_written_as_their_own_time() {
        let e = Encoder::new(UplinkFormat::Json, "gw1", "t/{device}");
        let at = |ms: u64| ProcessedSample {
            timestamp: UNIX_EPOCH + Duration::from_millis(ms),
            ..sample(1, 1.0)
        };
        // A run, a change, a return to an earlier time, another run.
        let ms = [1_000, 1_000, 1_000, 61_001, 1_000, 3_600_002, 3_600_002];
        let samples: Vec<_> = ms.iter().map(|&ms| at(ms)).collect();
        let mut out = Vec::new();
        e.payload("probe-1", &samples, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let times: Vec<_> = v["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["timestamp"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<_> = ms
            .iter()
            .map(|&ms| crate::sample::format_rfc3339(UNIX_EPOCH + Duration::from_millis(ms)))
            .collect();
        assert_eq!(times, expected);
        assert_eq!(expected[3], "1970-01-01T00:01:01.001Z");
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_json_writer_writes_what_the_derived_serialisation_writes(
            gateway in "(.|\"|\\\\){0,12}",
            device in "(.|\"|\\\\){0,12}",
            items in proptest::collection::vec(
                (
                    proptest::option::of(proptest::num::u32::ANY),
                    proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO,
                    prop_oneof![Just("degC".to_owned()), "(.|\"|\\\\){0,8}"],
                    prop_oneof![Just("value".to_owned()), "(.|\"|\\\\){0,8}"],
                    0u64..3,
                ),
                0..20,
            ),
        ) {
            let samples: Vec<_> = items
                .into_iter()
                .map(|(seq, value, unit, channel, t)| ProcessedSample {
                    seq,
                    value,
                    labels: Labels::new("probe-1", unit, channel),
                    timestamp: UNIX_EPOCH + Duration::from_millis(1_764_198_600_000 + t * 61_001),
                    ..sample(0, 0.0)
                })
                .collect();
            let mut written = Vec::new();
            json_batch(&gateway, &device, &samples, &mut written);
            let derived = serde_json::to_vec(&JsonBatch {
                gateway: &gateway,
                device: &device,
                samples: JsonSamples(&samples),
            })
            .unwrap();
            prop_assert_eq!(String::from_utf8(written).unwrap(), String::from_utf8(derived).unwrap());
        }
    }

    #[test]
    fn thingsboard_is_the_gateway_telemetry_api() {
        let e = Encoder::new(UplinkFormat::Thingsboard, "gw1", "v1/gateway/telemetry");
        let mut out = Vec::new();
        let humidity = ProcessedSample {
            labels: Labels::new("probe-1", "degC", "humidity"),
            ..sample(2, 55.0)
        };
        e.payload("probe-1", &[sample(1, 21.5), humidity], &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"probe-1": [
                {"ts": 1_764_198_600_124u64, "values": {"value": 21.5}},
                {"ts": 1_764_198_600_125u64, "values": {"humidity": 55.0}},
            ]})
        );
    }

    #[test]
    fn envelopes_round_trip_and_bad_ones_are_errors() {
        let mut out = Vec::new();
        envelope("a/b", &mut out, |o| o.extend_from_slice(b"{}"));
        assert_eq!(open_envelope(&out), Ok(("a/b", &b"{}"[..])));
        for bad in [&b""[..], b"\x05\x00ab", b"\x00\x00x", b"\x02\x00\xff\xfe"] {
            assert_eq!(open_envelope(bad), Err(BadEnvelope), "{bad:?}");
        }
    }
}
