//! The one error type of the HTTP API: every failure is a JSON body with the right status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::device::state::DeviceState;

/// An API failure. Client errors are not logged as errors; server errors are, once.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (bad query, bad body).
    #[error("{0}")]
    BadRequest(String),
    /// No such route or resource.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method.
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    /// A state transition the device refuses.
    #[error("{error}")]
    Conflict {
        /// Why it was refused.
        error: String,
        /// The (combined) state the device is in.
        state: DeviceState,
    },
    /// The gateway cannot serve this now (shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// A device did not answer in time.
    #[error("{0}")]
    Timeout(String),
    /// A device's link failed while we waited for it.
    #[error("{0}")]
    BadGateway(String),
    /// An extractor refused the request (wrong content type, bad JSON, ...), with its status.
    #[error("{1}")]
    Rejected(StatusCode, String),
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        Self::Rejected(rejection.status(), rejection.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::PathRejection) -> Self {
        Self::Rejected(rejection.status(), rejection.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::Rejected(status, _) => *status,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            // The C++ original's control routes answered `{"ok": false, ...}`; keep that shape.
            Self::Conflict { error, state } => {
                json!({ "ok": false, "error": error, "state": state })
            }
            other => json!({ "error": other.to_string() }),
        };
        // 503 is load shedding or shutdown: expected, and too frequent under overload to log.
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(status = status.as_u16(), error = %self, "Request failed.");
        }
        (status, Json(body)).into_response()
    }
}

/// A handler panicked: answer a JSON 500 (logged once) instead of dropping the connection.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    tracing::error!(panic = %detail, "A request handler panicked.");
    let body = json!({ "error": "internal error" });
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}
