//! Request guards, applied to every route: load shedding (a bound on requests in progress,
//! refusing the excess at once with 503 and `Retry-After`), the request timeout (408), and
//! bearer-token authentication (401 with `WWW-Authenticate`) for state-changing routes, and
//! for reads too when `protect_reads` is set. The token is compared in constant time and
//! never logged.

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
}

impl Guard {
    /// A guard for these HTTP settings.
    pub fn new(http: &HttpSettings) -> Self {
        Self {
            in_progress: Arc::new(Semaphore::new(http.max_concurrent_requests)),
            timeout: http.request_timeout(),
            token: http.api_token.clone(),
            protect_reads: http.protect_reads,
        }
    }

    fn needs_token(&self, request: &Request) -> bool {
        let is_read = matches!(*request.method(), Method::GET | Method::HEAD);
        let is_probe = matches!(request.uri().path(), "/healthz" | "/readyz");
        self.token.is_some() && (!is_read || (self.protect_reads && !is_probe))
    }

    fn authorized(&self, request: &Request) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|candidate| token.matches(candidate))
    }
}

/// The middleware.
pub async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let Ok(_permit) = guard.in_progress.try_acquire() else {
        return with_retry_after(ApiError::Unavailable(
            "too many requests in progress; retry shortly".to_owned(),
        ));
    };
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
