//! `[http]`: the API's listen address, bearer token and request limits.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, MAX_MS, check_range};

/// The HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on. Loopback by default.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// When set, every `POST` needs `Authorization: Bearer <token>`: 1 to 256 visible ASCII
    /// characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token: Option<Secret>,
    /// With a token set, also require it for reads (except `/healthz` and `/readyz`).
    #[serde(default)]
    pub protect_reads: bool,
    /// Largest accepted request body, 1 byte to 256 MiB; larger ones get 413.
    #[serde(default = "default_body_limit_bytes")]
    pub body_limit_bytes: usize,
    /// Most samples in one `POST /samples`, 1 to 1 000 000; more get 413.
    #[serde(default = "default_ingest_max_samples")]
    pub ingest_max_samples: usize,
    /// A request that takes longer than this gets 408 (`POST /-/reload` excepted: it always
    /// answers with its outcome); 1 to 3 600 000 ms (one hour).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// A client must send a request's headers within this time, or the connection is closed;
    /// 1 to 3 600 000 ms (one hour).
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Requests handled at once, 1 to 1 000 000; more are refused at once with 503 and
    /// `Retry-After`.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Host names, besides IP addresses and `localhost`, under which a browser may send
    /// state-changing requests (the live page's buttons behind a reverse proxy, say).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            api_token: None,
            protect_reads: false,
            body_limit_bytes: default_body_limit_bytes(),
            ingest_max_samples: default_ingest_max_samples(),
            request_timeout_ms: default_request_timeout_ms(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            max_concurrent_requests: default_max_concurrent_requests(),
            allowed_hosts: Vec::new(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_body_limit_bytes() -> usize {
    1 << 20
}
fn default_ingest_max_samples() -> usize {
    // The default buffer's capacity: a larger POST could never fit in it.
    1000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_max_concurrent_requests() -> usize {
    1024
}

/// The largest request body: 256 MiB, far above any sane `POST /samples`, and small enough that
/// a few concurrent uploads cannot exhaust an edge box's memory.
const MAX_BODY_LIMIT_BYTES: usize = 256 << 20;
/// Most samples in one `POST /samples`.
const MAX_INGEST_SAMPLES: usize = 1_000_000;
/// Most requests in flight: well above what a gateway's file-descriptor limit allows, and far
/// below tokio's `Semaphore::MAX_PERMITS` (the guard's semaphore panics above it).
const MAX_CONCURRENT_REQUESTS: usize = 1_000_000;

/// A DNS host name as `Host` headers carry it, without a port.
fn is_host_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A secret string: compared in constant time, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Whether `candidate` equals the secret. Takes the same time for every candidate of the
    /// secret's length, so response times do not reveal how much of a guess was right.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let secret = self.0.as_bytes();
        if candidate.len() != secret.len() {
            return false;
        }
        candidate
            .iter()
            .zip(secret)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }

    /// Whether a client can send the secret as a bearer token: 1 to 256 visible ASCII
    /// characters. HTTP trims the spaces around a header value and clients refuse control
    /// characters, so a token with those could never match.
    fn is_sendable(&self) -> bool {
        (1..=256).contains(&self.0.len()) && self.0.bytes().all(|b| b.is_ascii_graphic())
    }

    /// The secret itself, for the one place that must send it (never for logs).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl HttpSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.api_token.as_ref().is_some_and(|t| !t.is_sendable()) {
            return Err(ConfigError::invalid(
                "http.api_token",
                "must be 1 to 256 visible ASCII characters (no spaces or control characters), \
                 or no client could send it in an `Authorization: Bearer` header",
            ));
        }
        if self.protect_reads && self.api_token.is_none() {
            return Err(ConfigError::invalid(
                "http.protect_reads",
                "needs http.api_token to be set",
            ));
        }
        check_range(
            "http.body_limit_bytes",
            self.body_limit_bytes,
            1..=MAX_BODY_LIMIT_BYTES,
        )?;
        check_range(
            "http.ingest_max_samples",
            self.ingest_max_samples,
            1..=MAX_INGEST_SAMPLES,
        )?;
        check_range(
            "http.request_timeout_ms",
            self.request_timeout_ms,
            1..=MAX_MS,
        )?;
        check_range(
            "http.header_read_timeout_ms",
            self.header_read_timeout_ms,
            1..=MAX_MS,
        )?;
        check_range(
            "http.max_concurrent_requests",
            self.max_concurrent_requests,
            1..=MAX_CONCURRENT_REQUESTS,
        )?;
        if let Some(bad) = self.allowed_hosts.iter().find(|h| !is_host_name(h)) {
            return Err(ConfigError::invalid(
                "http.allowed_hosts",
                format!("`{bad}` is not a host name (letters, digits, `-` and `.`; no port)"),
            ));
        }
        Ok(())
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The header-read timeout.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
}
