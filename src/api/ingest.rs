//! `POST /samples`: HTTP ingest of a JSON array of samples into the same ring buffer as the
//! devices. All or nothing: a request is accepted whole (202) only if every sample fits in the
//! buffer beside what is queued, so the overflow policy never drops or evicts for it; otherwise
//! it is refused whole: 400 naming the item and field, 415, 413 when it can never succeed (more
//! samples than [`SampleLimit`]), 429 with `Retry-After` when it could later (the buffer is at
//! its high watermark, or has too little room for this batch).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;
use utoipa::ToSchema;

use std::ops::Range;

use super::error::ErrorBody;
use super::guard::with_retry_after;
use super::{ApiError, AppState};
use crate::buffer::PushError;
use crate::device::codec::{valid_channel, valid_unit};
use crate::ledger::Source;
use crate::sample::{LabelCache, Labels, Sample};
use crate::uplink::stage::SpoolStage;

/// One sample as a client posts it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct IngestSample {
    /// A configured device's id.
    #[schema(value_type = String)]
    device: SmolStr,
    /// The value, before calibration.
    value: f64,
    /// Unit token: 1-16 characters of `A-Z a-z 0-9 . _ / % -`.
    #[schema(value_type = String, pattern = r"^[A-Za-z0-9._/%-]{1,16}$")]
    unit: SmolStr,
    /// The quantity measured: 1-32 characters of `A-Z a-z 0-9 _ . -` (default: the device's
    /// default channel).
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = r"^[A-Za-z0-9_.-]{1,32}$")]
    channel: Option<SmolStr>,
    /// The client's sequence number, 0 to 2^32 - 1 (`7.0` is `7`, as in JSON Schema).
    #[serde(default, deserialize_with = "integral_u32")]
    #[schema(value_type = Option<u64>, maximum = 4294967295_u64)]
    seq: Option<u32>,
    /// When it was measured, RFC 3339 (default: when it was received).
    #[serde(default)]
    #[schema(format = DateTime)]
    timestamp: Option<String>,
}

/// `POST /samples` limits from the config; a live reload replaces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestLimits {
    /// Buffer depth at which `POST /samples` answers 429.
    pub high_watermark: usize,
    /// Most samples in one `POST /samples` (`http.ingest_max_samples`).
    pub ingest_max_samples: usize,
}

impl IngestLimits {
    /// The limits these settings set.
    pub fn new(settings: &crate::config::Settings) -> Self {
        Self {
            high_watermark: settings.buffer.high_watermark_samples(),
            ingest_max_samples: settings.http.ingest_max_samples,
        }
    }
}

/// An optional u32 written as any JSON number with an integral value: JSON has one number
/// type, and JSON Schema's `integer` (what the document promises) includes `7.0`, which some
/// encoders write for whole floats.
fn integral_u32<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = Option<u32>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer from 0 to 4294967295, or null")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            u32::try_from(v)
                .map(Some)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u32::try_from(v)
                .map(Some)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            // Every u32 is exact in an f64, so the round trip is the range and integrality test.
            let n = v as u32;
            if f64::from(n) == v {
                Ok(Some(n))
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    deserializer.deserialize_any(Visitor)
}

/// The answer to an accepted `POST /samples`.
#[derive(Serialize, ToSchema)]
pub(super) struct Accepted {
    /// Samples accepted: all of the request's.
    accepted: u64,
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

/// One sample as parsed on the fast path: the same fields and acceptance as [`IngestSample`]
/// (so a body parses here exactly when it parses there), with the strings borrowed from the
/// body when they hold no escapes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSample<'a> {
    #[serde(borrow)]
    device: Cow<'a, str>,
    value: f64,
    #[serde(borrow)]
    unit: Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "integral_u32")]
    seq: Option<u32>,
    #[serde(default, borrow)]
    timestamp: Option<Cow<'a, str>>,
}

impl From<IngestSample> for WireSample<'static> {
    fn from(item: IngestSample) -> Self {
        Self {
            device: Cow::Owned(item.device.into()),
            value: item.value,
            unit: Cow::Owned(item.unit.into()),
            channel: item.channel.map(|c| Cow::Owned(c.into())),
            seq: item.seq,
            timestamp: item.timestamp.map(Cow::Owned),
        }
    }
}

/// Deserializes the body's array. The fast path has no path tracking; only when it fails is
/// the body parsed again through `serde_path_to_error` into [`IngestSample`], which names the
/// item and field exactly as before.
fn parse_items(body: &[u8]) -> Result<Vec<WireSample<'_>>, ApiError> {
    if let Ok(items) = serde_json::from_slice::<Vec<WireSample<'_>>>(body) {
        return Ok(items);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let items: Vec<IngestSample> =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            ApiError::BadRequest(format!("samples{}: {}", path_of(&err), err.inner()))
        })?;
    deserializer
        .end()
        .map_err(|err| ApiError::BadRequest(format!("trailing data after the array: {err}")))?;
    // Both types accept the same bodies, so this is not reached; if it were, the slow parse
    // is the authority.
    Ok(items.into_iter().map(WireSample::from).collect())
}

/// The labels a batch's samples share, and the last sample's with its device's default
/// channel: a batch usually names one device and few units, so a sample like the last one is
/// neither looked up nor validated again, and equal labels are one `Arc`.
#[derive(Default)]
struct Interned {
    labels: LabelCache,
    last: Option<(Arc<Labels>, SmolStr)>,
}

impl Interned {
    /// Checks `item`'s device, unit and channel (what equals the last sample's was checked
    /// then); its labels, which become the last ones.
    fn check(
        &mut self,
        item: &WireSample<'_>,
        default_channel: impl Fn(&str) -> Option<SmolStr>,
        bad: impl Fn(&str, String) -> ApiError,
    ) -> Result<Arc<Labels>, ApiError> {
        let last = self.last.as_ref();
        if let Some((labels, default)) = last
            && labels.is(
                &item.device,
                &item.unit,
                item.channel.as_deref().unwrap_or(default),
            )
        {
            return Ok(labels.clone());
        }
        let default = match last {
            Some((labels, default)) if labels.device == *item.device => default.clone(),
            _ => default_channel(&item.device)
                .ok_or_else(|| bad("device", format!("unknown device `{}`", item.device)))?,
        };
        let unit_checked = last.is_some_and(|(labels, _)| labels.unit == *item.unit);
        if !unit_checked && !valid_unit(item.unit.as_bytes()) {
            return Err(bad(
                "unit",
                "must be 1-16 characters of A-Z a-z 0-9 . _ / % -".to_owned(),
            ));
        }
        let channel = match item.channel.as_deref() {
            None => default.as_str(),
            Some(channel) if valid_channel(channel.as_bytes()) => channel,
            Some(_) => {
                return Err(bad(
                    "channel",
                    "must be 1-32 characters of A-Z a-z 0-9 _ . -".to_owned(),
                ));
            }
        };
        let labels = self.labels.get(&item.device, &item.unit, channel);
        self.last = Some((labels.clone(), default));
        Ok(labels)
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
    let items = parse_items(body)?;
    if items.len() > limit.max {
        return Err(limit.refuse(items.len()));
    }
    let mut seen = Interned::default();
    let mut samples = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let bad =
            |field: &str, why: String| ApiError::BadRequest(format!("samples[{i}].{field}: {why}"));
        let labels = seen.check(&item, &default_channel, bad)?;
        let timestamp = match &item.timestamp {
            None => received.0,
            Some(text) => parse_timestamp(text)
                .ok_or_else(|| bad("timestamp", "must be an RFC 3339 time".to_owned()))?,
        };
        samples.push(Sample {
            labels,
            seq: item.seq,
            value: item.value,
            timestamp,
            received: received.1,
            order: 0,
            source: Source::Ingest,
        });
    }
    Ok(samples)
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

/// How many items the body holds if it is a JSON array: the commas outside strings at depth
/// one, plus one. For a valid non-empty array exactly [`count_items`] (1 for `[]`); otherwise a
/// number that means nothing, and only used where an invalid body gets the same answer anyway.
fn most_items(body: &[u8]) -> usize {
    let (mut depth, mut commas, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => commas += 1,
            _ => {}
        }
    }
    commas + 1
}

/// `POST /samples`.
#[utoipa::path(post, path = "/samples", tag = "samples",
    request_body(content = Vec<IngestSample>, content_type = "application/json",
        description = "A JSON array of samples, accepted whole or refused whole"),
    responses(
        (status = 202, description = "Every sample is in the buffer (with an uplink: in the spool)", body = Accepted),
        (status = 400, description = "Not a valid array of samples: the error names the item and field", body = ErrorBody),
        (status = 413, description = "More samples than `http.ingest_max_samples` or \
            `buffer.capacity`, or a body larger than `http.body_limit_bytes`", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
        (status = 429, description = "The buffer is at its high watermark or lacks room: retry \
            after `Retry-After` seconds", body = ErrorBody,
            headers(("retry-after" = String, description = "Seconds to wait"))),
        (status = 503, description = "Shutting down, or (with an uplink) the samples could not \
            be spooled", body = ErrorBody),
))]
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
            (StatusCode::ACCEPTED, Json(Accepted { accepted })).into_response()
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
/// An empty request promises nothing and waits for nothing (its range starts at the next
/// order, which overflow drops can put past every order a batch will ever end at).
async fn spooled(stage: &SpoolStage, orders: &Range<u64>) -> Result<(), ApiError> {
    if orders.is_empty() {
        return Ok(());
    }
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
    let limits = state.ingest.load();
    let high_watermark = limits.high_watermark;
    let limit = SampleLimit::effective(limits.ingest_max_samples, state.buffer.capacity());
    // Above the high watermark the answer is 429, unless the request could never succeed:
    // count its items without building them (most requests under overload end here).
    let depth = state.buffer.len();
    if depth >= high_watermark {
        // A byte scan bounds the count of a valid array from above; at or under the limit the
        // answer is 429 whatever the body holds, so the full parse is only for a body that
        // may be too large.
        if most_items(&body) <= limit.max {
            return Err(Refusal::Busy(PushError::AboveWatermark {
                depth,
                high_watermark,
            }));
        }
        return match count_items(&body) {
            Some(n) if n > limit.max => Err(limit.refuse(n).into()),
            _ => Err(Refusal::Busy(PushError::AboveWatermark {
                depth,
                high_watermark,
            })),
        };
    }
    let devices = state.devices.load();
    let default_channel = |id: &str| {
        devices
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
        .try_push_all(Source::Ingest, samples, high_watermark)
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
        assert_eq!(
            samples[0].labels.channel, "level",
            "the device's default channel"
        );
        // JSON has one number type: a whole float is an integer, as JSON Schema says.
        let whole = parse(
            r#"[{"device":"sim0","value":1,"unit":"V","seq":37500.0},
                {"device":"sim0","value":1,"unit":"V","seq":null},
                {"device":"sim0","value":1,"unit":"V","seq":4294967295}]"#,
        )
        .unwrap();
        let seqs: Vec<_> = whole.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, [Some(37500), None, Some(u32::MAX)]);
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
                r#"[{"device":"sim0","value":1,"unit":"V","seq":7.5}]"#,
                "samples[0].seq",
            ),
            (
                r#"[{"device":"sim0","value":1,"unit":"V","seq":4294967296.0}]"#,
                "samples[0].seq",
            ),
            (
                r#"[{"device":"sim0","value":1,"unit":"V","seq":"7"}]"#,
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
        let channels: Vec<_> = samples.iter().map(|s| s.labels.channel.as_str()).collect();
        assert_eq!(channels, ["rail_5v.max", "level"]);
        let long = "c".repeat(33);
        let err = parse(&format!(
            r#"[{{"device":"sim0","value":1,"unit":"V","channel":"{long}"}}]"#
        ))
        .unwrap_err();
        assert!(err.starts_with("samples[0].channel: must be 1-32"), "{err}");
    }

    #[test]
    fn devices_and_units_are_looked_up_per_item_even_when_they_alternate() {
        let body = r#"[{"device":"sim0","value":1,"unit":"V"},
            {"device":"sim1","value":2,"unit":"mA"},
            {"device":"sim0","value":3,"unit":"V"},
            {"device":"s\u0069m1","value":4,"unit":"m\u0041"}]"#;
        let samples = parse_body(
            body.as_bytes(),
            |d| match d {
                "sim0" => Some(SmolStr::new("level")),
                "sim1" => Some(SmolStr::new("current")),
                _ => None,
            },
            10,
            (SystemTime::now(), Instant::now()),
        )
        .unwrap();
        let got: Vec<_> = samples.iter().map(|s| s.labels.names()).collect();
        assert_eq!(
            got,
            [
                ("sim0", "V", "level"),
                ("sim1", "mA", "current"),
                ("sim0", "V", "level"),
                ("sim1", "mA", "current"),
            ]
        );
        // A bad unit after a run of good ones, and an unknown device after a known one, are
        // still caught on their own item.
        let err = parse(
            r#"[{"device":"sim0","value":1,"unit":"V"},{"device":"sim0","value":1,"unit":"V V"}]"#,
        )
        .unwrap_err();
        assert!(err.starts_with("samples[1].unit: must be"), "{err}");
        let err = parse(
            r#"[{"device":"sim0","value":1,"unit":"V"},{"device":"sim9","value":1,"unit":"V"}]"#,
        )
        .unwrap_err();
        assert_eq!(err, "samples[1].device: unknown device `sim9`");
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
    fn most_items_is_at_least_count_items_for_a_valid_array() {
        for body in [
            &br#"[{"a":[1,2]},2,"x"]"#[..],
            b"[]",
            br#"[ "a,b", "\",[", {"k":[1,{"x":","}]}, 7 ]"#,
            br#"[{"device":"sim0","value":1,"unit":"V"},{"device":"s\u0069m0","value":2,"unit":"V"}]"#,
        ] {
            let n = count_items(body).expect("a valid array");
            assert!(most_items(body) >= n, "{}", String::from_utf8_lossy(body));
            if n > 0 {
                assert_eq!(most_items(body), n, "{}", String::from_utf8_lossy(body));
            }
        }
    }

    #[test]
    fn count_items_counts_a_json_array_only() {
        assert_eq!(count_items(br#"[{"a":[1,2]},2,"x"]"#), Some(3));
        assert_eq!(count_items(b"[]"), Some(0));
        assert_eq!(count_items(br#"{"a":1}"#), None);
        assert_eq!(count_items(b"[1,"), None);
    }
}
