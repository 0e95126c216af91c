//! The tower-http layers around the routes (the `Authorization` header hidden from every log,
//! response compression for the large bodies), the request ids and the request's tracing span.
//!
//! Every request gets an `x-request-id`: the client's own if it sent one of 1 to 128 visible
//! ASCII characters, or one made here ([`request_id`], called by the guard). The response
//! carries it back (the guard writes it there, on its own refusals too, see
//! `super::guard::GuardFuture`), the request's span records it (so every
//! log line written while serving the request names it, in the JSON logs under `span`), and
//! error bodies repeat it (see [`super::error`]).
//!
//! Request ids are not tower-http's `SetRequestIdLayer` and `PropagateRequestIdLayer`: those
//! keep any client id however long or odd (a layer of our own had to remove the bad ones
//! first), store a copy of the id in the request's and the response's extensions (a boxed
//! value and a map grown for it on every request), and wrap the future once more; with the
//! guard, which needs the id anyway for the error bodies and the span, a `GET /status` cost
//! about 2,000 instructions more (callgrind, docs/PERFORMANCE.md).
//!
//! The span is entered by the guard's service around the handler, not by tower-http's
//! `TraceLayer`: that layer wraps every response body in a body of its own, which axum then
//! boxes, and times every request, which together cost more than a tenth of a `GET /status`
//! (callgrind, docs/PERFORMANCE.md) for log lines the guard writes as well.
//!
//! Compression is negotiated from `Accept-Encoding` (gzip or zstd) and applied only where it
//! pays: on `/metrics`, `GET /samples` and `/openapi.json` (see [`compression`]), and there
//! only above [`MIN_COMPRESSED_BYTES`] and on successes. Every other route, `/status` among them, never meets
//! the compression layer, and `/events` (a never-ending event stream that must reach the
//! browser event by event) is not among them.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::http::{
    Extensions, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header,
};
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{DefaultPredicate, Predicate, SizeAbove};
use tracing::Span;

/// The request id header, read from requests and set on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request headers that no log line or trace may show: marked sensitive, they print as
/// `Sensitive` wherever a `HeaderMap` is formatted.
pub const SENSITIVE_HEADERS: [HeaderName; 2] = [header::AUTHORIZATION, header::COOKIE];

/// Bodies smaller than this are sent as they are: compressing a few hundred bytes saves less
/// than the encoder costs, and a `/samples?limit=1` stays plain.
pub const MIN_COMPRESSED_BYTES: u16 = 1024;

/// Longest client `x-request-id` kept; a longer one is replaced (it goes into every log line of
/// the request and into error bodies).
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a client's request id is kept: 1 to [`MAX_REQUEST_ID_LEN`] visible ASCII
/// characters (no spaces or controls, nothing a log reader could mistake for structure).
fn acceptable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=MAX_REQUEST_ID_LEN).contains(&bytes.len()) && bytes.iter().all(u8::is_ascii_graphic)
}

/// The request's id: the client's `x-request-id` if it sent exactly one and that one is
/// [acceptable](acceptable_request_id), else a new one from `ids`, which replaces whatever the
/// client sent everywhere the id goes (span, logs, error bodies, the response).
///
/// The request's own headers are left as they came: no handler reads the id from there (the
/// guard hands it to everything that needs it), and writing it in would cost a header-map
/// insert per request.
pub fn request_id(headers: &HeaderMap, ids: &RequestIds) -> HeaderValue {
    let mut sent = headers.get_all(REQUEST_ID).iter();
    // Several: which one would the logs show?
    if let (Some(id), None) = (sent.next(), sent.next())
        && acceptable_request_id(id)
    {
        return id.clone();
    }
    ids.make()
}

/// Makes request ids for requests that come without one: a prefix random per process (so ids
/// from two runs do not collide in one log store), then a counter. Cheaper than a random UUID
/// per request (no system call), and as unique within the process.
#[derive(Clone)]
pub struct RequestIds {
    /// The prefix as 16 hex digits and the dash, written once.
    prefix_text: [u8; 17],
    next: Arc<AtomicU64>,
}

impl RequestIds {
    /// A new sequence with a fresh random prefix.
    pub fn new() -> Self {
        // `RandomState` is seeded from the operating system's randomness once per process.
        let prefix = RandomState::new().hash_one(std::process::id());
        let mut prefix_text = [b'-'; 17];
        write_hex(prefix, &mut prefix_text[..16]);
        Self {
            prefix_text,
            next: Arc::new(AtomicU64::new(1)),
        }
    }

    /// The next id: `{prefix:016x}-{n}`.
    pub fn make(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // Not `format!`, which costs more than the rest of the id.
        let mut id = IdBytes {
            bytes: [0; 17 + 20],
            len: 0,
        };
        id.bytes[..17].copy_from_slice(&self.prefix_text);
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(n).as_bytes();
        id.bytes[17..17 + digits.len()].copy_from_slice(digits);
        id.len = 17 + digits.len();
        // One allocation, shared by its copies in the guard's record and on the response
        // (bytes from a slice would be copied into a buffer that the first clone allocates
        // again to share).
        HeaderValue::from_maybe_shared(Bytes::from_owner(id))
            .expect("hex digits, a dash and decimal digits are valid in a header")
    }
}

/// The bytes of a made request id.
struct IdBytes {
    bytes: [u8; 17 + 20],
    len: usize,
}

impl AsRef<[u8]> for IdBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// `value` as 16 lowercase hex digits into `out` (16 bytes).
fn write_hex(value: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = DIGITS[((value >> (60 - 4 * i)) & 0xf) as usize];
    }
}

/// The request's span: method, matched route (never the raw path) and request id.
///
/// At `info`, so that with the default log level every event logged while serving a request
/// (a 5xx's "Request failed.", say) carries the request id. Below that level it is disabled
/// and costs a level check (the fields are only computed for an enabled span).
pub fn request_span(method: &Method, route: &'static str, request_id: &HeaderValue) -> Span {
    tracing::info_span!(
        "request",
        method = %method,
        route,
        request_id = request_id.to_str().unwrap_or(""),
    )
}

/// Logs a request's arrival with its headers, at `debug`: `Authorization` shows as
/// `Sensitive` (see [`SENSITIVE_HEADERS`]).
pub fn log_request(headers: &HeaderMap) {
    tracing::debug!(headers = ?headers, "Request started.");
}

/// The compression layer of the large responses: gzip or zstd as the client accepts, above
/// [`MIN_COMPRESSED_BYTES`], never for event streams (tower-http's default predicate), and
/// only for successes: an error body is small in practice, and the guard writes it again
/// with the request id after this layer has run (see [`super::error`]), which would leave a
/// plain body under a `Content-Encoding` header.
pub fn compression() -> CompressionLayer<impl Predicate> {
    let success =
        |status: StatusCode, _: Version, _: &HeaderMap, _: &Extensions| status.is_success();
    CompressionLayer::new().compress_when(
        DefaultPredicate::new()
            .and(SizeAbove::new(MIN_COMPRESSED_BYTES))
            .and(success),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_visible_ascii_request_ids_are_acceptable() {
        let ok = |s: &str| acceptable_request_id(&HeaderValue::from_str(s).expect("a value"));
        assert!(ok("a"));
        assert!(ok(&"x".repeat(MAX_REQUEST_ID_LEN)));
        assert!(ok("7f3c-01:req/9"));
        assert!(!ok(""));
        assert!(!ok(&"x".repeat(MAX_REQUEST_ID_LEN + 1)));
        assert!(!ok("with space"));
        assert!(!ok("tab\there"));
        let high = HeaderValue::from_bytes(b"caf\xc3\xa9").expect("obs-text is allowed");
        assert!(!acceptable_request_id(&high));
    }

    #[test]
    fn made_request_ids_are_distinct_and_share_the_process_prefix() {
        let ids = RequestIds::new();
        let (a, b) = (ids.make(), ids.clone().make());
        let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.split('-').next(), b.split('-').next(), "{a} {b}");
        let (prefix, n) = a.split_once('-').expect("prefix-counter");
        assert_eq!(prefix.len(), 16, "{a}");
        assert!(prefix.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_eq!(n, "1", "{a}");
        assert_ne!(
            RequestIds::new().prefix_text,
            RequestIds::new().prefix_text,
            "each sequence has its own random prefix"
        );
    }

    #[test]
    fn one_acceptable_client_id_is_kept_and_anything_else_replaced() {
        let ids = RequestIds::new();
        let with = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(REQUEST_ID, HeaderValue::from_str(value).expect("a value"));
            }
            let id = request_id(&headers, &ids);
            id.to_str().expect("ASCII").to_owned()
        };
        assert_eq!(with(&["client-7"]), "client-7");
        for replaced in [&[][..], &["two words"], &["a", "b"], &[&"x".repeat(129)]] {
            let id = with(replaced);
            assert!(!replaced.contains(&id.as_str()), "{replaced:?} -> {id}");
            assert!(id.contains('-') && id.len() > 17, "a made id: {id}");
        }
    }
}
