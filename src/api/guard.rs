//! Request guards, applied to every route: load shedding (a bound on requests in progress,
//! refusing the excess at once with 503 and `Retry-After`; probes are never shed), bearer-token
//! authentication (401 with `WWW-Authenticate`) for state-changing routes, and for reads too
//! when `protect_reads` is set, an early 413 for a declared body over the limit, and the
//! request timeout (408). The token is compared in constant time and never logged.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::ApiError;
use crate::config::{HttpSettings, Secret};

/// Seconds a shed or backpressured client is told to wait.
pub const RETRY_AFTER_SECONDS: &str = "1";

/// What the guard enforces.
#[derive(Clone)]
pub struct Guard {
    in_progress: Arc<Semaphore>,
    timeout: Duration,
    token: Option<Secret>,
    protect_reads: bool,
    body_limit: u64,
}

impl Guard {
    /// A guard for these HTTP settings.
    pub fn new(http: &HttpSettings) -> Self {
        Self {
            in_progress: Arc::new(Semaphore::new(http.max_concurrent_requests)),
            timeout: http.request_timeout(),
            token: http.api_token.clone(),
            protect_reads: http.protect_reads,
            body_limit: http.body_limit_bytes as u64,
        }
    }

    fn needs_token(&self, request: &Request) -> bool {
        let is_read = matches!(*request.method(), Method::GET | Method::HEAD);
        self.token.is_some() && (!is_read || (self.protect_reads && !is_probe(request)))
    }

    /// A body declared larger than the limit is refused before it is read, so a client cannot
    /// hold a request slot by announcing a huge body and sending nothing.
    fn declared_too_large(&self, request: &Request) -> bool {
        request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|length| length > self.body_limit)
    }

    fn authorized(&self, request: &Request) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| bearer_credentials(value.as_bytes()))
            .is_some_and(|candidate| token.matches(candidate))
    }
}

/// Orchestrators probe these; they are never shed or token-protected.
fn is_probe(request: &Request) -> bool {
    matches!(request.uri().path(), "/healthz" | "/readyz")
}

/// The credentials of `Bearer <credentials>`; the scheme name is case-insensitive (RFC 9110).
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    let (scheme, credentials) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then_some(credentials)
}

/// The middleware.
pub async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let permit = guard.in_progress.try_acquire();
    if permit.is_err() && !is_probe(&request) {
        return with_retry_after(ApiError::Unavailable(
            "too many requests in progress; retry shortly".to_owned(),
        ));
    }
    if guard.needs_token(&request) && !guard.authorized(&request) {
        let mut response = ApiError::Rejected(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".to_owned(),
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"telemetryhub\""),
        );
        return response;
    }
    if guard.declared_too_large(&request) {
        return ApiError::Rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {} bytes", guard.body_limit),
        )
        .into_response();
    }
    match tokio::time::timeout(guard.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Rejected(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request took longer than {:?}", guard.timeout),
        )
        .into_response(),
    }
}

/// An error response telling the client when to retry.
pub fn with_retry_after(error: ApiError) -> Response {
    let mut response = error.into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECONDS),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_is_not() {
        assert_eq!(bearer_credentials(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_credentials(b"Basic abcdef"), None);
        assert_eq!(bearer_credentials(b"Bearer"), None);
    }
}
