//! `POST /samples`: HTTP ingest of a JSON array of samples into the same ring buffer as the
//! devices. All or nothing: a request is accepted whole (202) only if every sample fits in the
//! buffer beside what is queued, so the overflow policy never drops or evicts for it; otherwise
//! it is refused whole: 400 naming the item and field, 415, 413 when it can never succeed (more
//! samples than [`SampleLimit`]), 429 with `Retry-After` when it could later (the buffer is at
//! its high watermark, or has too little room for this batch).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::json;
use smol_str::SmolStr;

use std::ops::Range;

use super::guard::with_retry_after;
use super::{ApiError, AppState};
use crate::buffer::PushError;
use crate::device::codec::{valid_channel, valid_unit};
use crate::ledger::Source;
use crate::sample::Sample;
use crate::uplink::stage::SpoolStage;

/// One sample as a client posts it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestSample {
    device: SmolStr,
    value: f64,
    unit: SmolStr,
    #[serde(default)]
    channel: Option<SmolStr>,
    #[serde(default)]
    seq: Option<u32>,
    #[serde(default)]
    timestamp: Option<String>,
}

/// The most samples one request may hold, and the setting that makes it so (for the 413).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleLimit {
    /// The most samples.
    pub max: usize,
    /// The configuration key that sets `max`.
    pub setting: &'static str,
}

impl From<usize> for SampleLimit {
    /// A limit set by `http.ingest_max_samples` alone.
    fn from(max: usize) -> Self {
        Self {
            max,
            setting: "http.ingest_max_samples",
        }
    }
}

impl SampleLimit {
    /// The smaller of `http.ingest_max_samples` and the largest batch the buffer can ever take
    /// (its capacity: see [`RingBuffer::try_push_all`](crate::buffer::RingBuffer::try_push_all)).
    /// A request above it can never succeed, so it gets 413, not a 429 to retry forever.
    pub fn effective(ingest_max_samples: usize, capacity: usize) -> Self {
        if ingest_max_samples <= capacity {
            Self::from(ingest_max_samples)
        } else {
            Self::by_capacity(capacity)
        }
    }

    fn by_capacity(capacity: usize) -> Self {
        Self {
            max: capacity,
            setting: "buffer.capacity",
        }
    }

    /// The 413 for a request of `n` samples.
    fn refuse(self, n: usize) -> ApiError {
        ApiError::Rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{n} samples in one request; at most {} (set by `{}`)",
                self.max, self.setting
            ),
        )
    }
}

/// Parses and validates a request body into samples stamped `received`; the error names the
/// offending item and field, or is a 413 naming the limit. `default_channel` gives a known
/// device's default channel (for items that name none), and `None` for an unknown device.
/// Public for the fuzzer.
pub fn parse_body(
    body: &[u8],
    default_channel: impl Fn(&str) -> Option<SmolStr>,
    limit: impl Into<SampleLimit>,
    received: (SystemTime, Instant),
) -> Result<Vec<Sample>, ApiError> {
    let limit = limit.into();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let items: Vec<IngestSample> =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            ApiError::BadRequest(format!("samples{}: {}", path_of(&err), err.inner()))
        })?;
    deserializer
        .end()
        .map_err(|err| ApiError::BadRequest(format!("trailing data after the array: {err}")))?;
    if items.len() > limit.max {
        return Err(limit.refuse(items.len()));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let bad = |field: &str, why: String| {
                ApiError::BadRequest(format!("samples[{i}].{field}: {why}"))
            };
            let Some(default) = default_channel(&item.device) else {
                return Err(bad("device", format!("unknown device `{}`", item.device)));
            };
            if !valid_unit(item.unit.as_bytes()) {
                return Err(bad(
                    "unit",
                    "must be 1-16 characters of A-Z a-z 0-9 . _ / % -".to_owned(),
                ));
            }
            let channel = match item.channel {
                None => default,
                Some(channel) if valid_channel(channel.as_bytes()) => channel,
                Some(_) => {
                    return Err(bad(
                        "channel",
                        "must be 1-32 characters of A-Z a-z 0-9 _ . -".to_owned(),
                    ));
                }
            };
            let timestamp = match &item.timestamp {
                None => received.0,
                Some(text) => parse_timestamp(text)
                    .ok_or_else(|| bad("timestamp", "must be an RFC 3339 time".to_owned()))?,
            };
            Ok(Sample {
                device: item.device,
                seq: item.seq,
                value: item.value,
                unit: item.unit,
                channel,
                timestamp,
                received: received.1,
                order: 0,
                source: Source::Ingest,
            })
        })
        .collect()
}

fn path_of<E>(err: &serde_path_to_error::Error<E>) -> String {
    // `[3].value` reads well after "samples"; the root path prints as ".".
    let path = err.path().to_string();
    if path == "." { String::new() } else { path }
}

fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    // In UTC, "9999-12-31T23:59:59-23:59" is in year 10000, which no RFC 3339 time can show.
    let utc = t.checked_to_offset(time::UtcOffset::UTC)?;
    (0..=9999)
        .contains(&utc.year())
        .then(|| SystemTime::from(utc))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// How many items a JSON array holds, by scanning it without building them; `None` if the body
/// is not a JSON array.
fn count_items(body: &[u8]) -> Option<usize> {
    serde_json::from_slice::<Vec<IgnoredAny>>(body)
        .ok()
        .map(|items| items.len())
}

pub(super) async fn ingest(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match accept(&state, &headers, body) {
        Ok(orders) => {
            if let Some(uplink) = &state.uplink
                && let Err(err) = spooled(&uplink.stage, &orders).await
            {
                return err.into_response();
            }
            let accepted = orders.end - orders.start;
            (StatusCode::ACCEPTED, Json(json!({ "accepted": accepted }))).into_response()
        }
        Err(Refusal::Busy(why)) => with_retry_after(ApiError::Rejected(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{why}; retry shortly"),
        )),
        Err(Refusal::Error(err)) => err.into_response(),
    }
}

/// With an uplink, a 202 is a promise that the samples are in the spool (durable with
/// `fsync = "always"`): waits until the spool stage has settled every sample of `orders`.
async fn spooled(stage: &SpoolStage, orders: &Range<u64>) -> Result<(), ApiError> {
    let mut settled = stage.settled();
    let reached = match settled
        .wait_for(|s| s.through >= orders.end || s.closed)
        .await
    {
        Ok(s) => s.through >= orders.end,
        Err(_) => false,
    };
    if reached && !stage.failed(orders) {
        return Ok(());
    }
    Err(ApiError::Unavailable(
        "the samples were accepted but could not be written to the spool (shutdown or a \
         failed worker); they are counted as dropped: send them again"
            .to_owned(),
    ))
}

enum Refusal {
    /// Could succeed later: 429.
    Busy(PushError),
    Error(ApiError),
}

impl From<ApiError> for Refusal {
    fn from(err: ApiError) -> Self {
        Self::Error(err)
    }
}

fn accept(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Range<u64>, Refusal> {
    if !is_json(headers) {
        return Err(ApiError::Rejected(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected `Content-Type: application/json`".to_owned(),
        )
        .into());
    }
    let body =
        body.map_err(|rejection| ApiError::Rejected(rejection.status(), rejection.body_text()))?;
    let limit = SampleLimit::effective(state.ingest_max_samples, state.buffer.capacity());
    // Above the high watermark the answer is 429, unless the request could never succeed:
    // count its items without building them (most requests under overload end here).
    let depth = state.buffer.len();
    if depth >= state.high_watermark {
        return match count_items(&body) {
            Some(n) if n > limit.max => Err(limit.refuse(n).into()),
            _ => Err(Refusal::Busy(PushError::AboveWatermark {
                depth,
                high_watermark: state.high_watermark,
            })),
        };
    }
    let default_channel = |id: &str| {
        state
            .devices
            .iter()
            .find(|d| d.id() == id)
            .map(|d| d.channel().clone())
    };
    let samples = parse_body(
        &body,
        default_channel,
        limit,
        (SystemTime::now(), Instant::now()),
    )?;
    match state
        .buffer
        .try_push_all(Source::Ingest, samples, state.high_watermark)
    {
        Ok(orders) => Ok(orders),
        Err(why @ (PushError::AboveWatermark { .. } | PushError::NoRoom { .. })) => {
            Err(Refusal::Busy(why))
        }
        // `limit` is at most the capacity, so this cannot happen; answer it truthfully anyway.
        Err(PushError::TooLarge { n, capacity }) => {
            Err(SampleLimit::by_capacity(capacity).refuse(n).into())
        }
        Err(PushError::Closed) => {
            Err(ApiError::Unavailable("the gateway is shutting down".to_owned()).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Vec<Sample>, String> {
        parse_body(
            body.as_bytes(),
            |d| (d == "sim0").then(|| SmolStr::new("level")),
            3,
            (SystemTime::now(), Instant::now()),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_valid_batch_parses() {
        let samples = parse(
            r#"[{"device":"sim0","value":1.5,"unit":"V"},
                {"device":"sim0","value":-2,"unit":"degC","seq":7,"timestamp":"2026-11-26T23:00:00Z"}]"#,
        )
        .unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!((samples[1].seq, samples[1].value), (Some(7), -2.0));
        assert_eq!(samples[0].channel, "level", "the device's default channel");
        assert_eq!(
            samples[1].timestamp,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_734_000)
        );
    }

    #[test]
    fn errors_name_the_item_and_field() {
        let cases = [
            (
                r#"[{"device":"sim0","value":"x","unit":"V"}]"#,
                "samples[0].value",
            ),
            (
                r#"[{"device":"sim0","value":1,"unit":"V"},{"device":"sim0","unit":"V"}]"#,
                "samples[1]",
            ),
            (
                r#"[{"device":"nope","value":1,"unit":"V"}]"#,
                "samples[0].device",
            ),
            (
                r#"[{"device":"sim0","value":1,"unit":"bad unit"}]"#,
                "samples[0].unit",
            ),
            (
                r#"[{"device":"sim0","value":1,"unit":"V","channel":"bad channel"}]"#,
                "samples[0].channel",
            ),
            (
                r#"[{"device":"sim0","value":1,"unit":"V","channel":""}]"#,
                "samples[0].channel",
            ),
            (
                r#"[{"device":"sim0","value":1,"unit":"V","channel":7}]"#,
                "samples[0].channel",
            ),
            (
                r#"[{"device":"sim0","value":1,"unit":"V","seq":-1}]"#,
                "samples[0].seq",
            ),
            (
                r#"[{"device":"sim0","value":1,"unit":"V","timestamp":"yesterday"}]"#,
                "samples[0].timestamp",
            ),
            (
                r#"[{"device":"sim0","value":1,"unit":"V","extra":1}]"#,
                "samples[0]",
            ),
            (
                r#"[{"device":"sim0","value":1e999,"unit":"V"}]"#,
                "samples[0].value",
            ),
            (r#"{"device":"sim0"}"#, "samples"),
            (r#"[{"device":"sim0","value":1,"unit":"V"}"#, "samples"),
            (r#"[] []"#, "trailing"),
        ];
        for (body, expected) in cases {
            let err = parse(body).expect_err(body);
            assert!(err.starts_with(expected), "{body}: {err}");
        }
    }

    #[test]
    fn an_item_may_name_its_channel() {
        let samples = parse(
            r#"[{"device":"sim0","value":1,"unit":"V","channel":"rail_5v.max"},
                {"device":"sim0","value":2,"unit":"V"}]"#,
        )
        .unwrap();
        let channels: Vec<_> = samples.iter().map(|s| s.channel.as_str()).collect();
        assert_eq!(channels, ["rail_5v.max", "level"]);
        let long = "c".repeat(33);
        let err = parse(&format!(
            r#"[{{"device":"sim0","value":1,"unit":"V","channel":"{long}"}}]"#
        ))
        .unwrap_err();
        assert!(err.starts_with("samples[0].channel: must be 1-32"), "{err}");
    }

    #[test]
    fn too_many_samples_is_413() {
        let item = r#"{"device":"sim0","value":1,"unit":"V"}"#;
        let body = format!("[{item},{item},{item},{item}]");
        let err = parse_body(
            body.as_bytes(),
            |_| Some(SmolStr::new("value")),
            3,
            (SystemTime::now(), Instant::now()),
        )
        .unwrap_err();
        assert!(
            matches!(err, ApiError::Rejected(StatusCode::PAYLOAD_TOO_LARGE, _)),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "4 samples in one request; at most 3 (set by `http.ingest_max_samples`)"
        );
    }

    #[test]
    fn the_sample_limit_is_the_smaller_of_the_setting_and_the_capacity() {
        assert_eq!(
            SampleLimit::effective(10_000, 1000),
            SampleLimit {
                max: 1000,
                setting: "buffer.capacity"
            }
        );
        assert_eq!(SampleLimit::effective(500, 1000), SampleLimit::from(500));
        assert_eq!(SampleLimit::effective(1000, 1000), SampleLimit::from(1000));
    }

    #[test]
    fn count_items_counts_a_json_array_only() {
        assert_eq!(count_items(br#"[{"a":[1,2]},2,"x"]"#), Some(3));
        assert_eq!(count_items(b"[]"), Some(0));
        assert_eq!(count_items(br#"{"a":1}"#), None);
        assert_eq!(count_items(b"[1,"), None);
    }
}
