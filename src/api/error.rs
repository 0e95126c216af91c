//! The one error type of the HTTP API: every failure is a JSON body with the right status.
//!
//! The body is an [`ErrorBody`] (a [`ConflictBody`] for a refused state transition). The
//! request's id is not known where an error is made, so the response also carries its body as
//! an extension, and the guard, which sees the request, writes it again with the id
//! ([`stamp_request_id`]): every error the router answers names its request.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::device::state::DeviceState;

/// The body of every error response but a 409 from a state transition.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person to read.
    pub error: String,
    /// The request's `x-request-id` (the client's, or one the gateway made): the same id is
    /// on the response's header and on the request's log lines. Always present in the
    /// gateway's answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The body of a 409 from a state transition (the C++ original's `{"ok": false, ...}`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConflictBody {
    /// Always `false`.
    pub ok: bool,
    /// Why the transition was refused.
    pub error: String,
    /// The (combined) state the device is in.
    pub state: DeviceState,
    /// The request's `x-request-id`, as in [`ErrorBody`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// An error body kept on its response until the request id is known.
#[derive(Debug, Clone)]
enum PendingBody {
    Error(ErrorBody),
    Conflict(ConflictBody),
}

impl PendingBody {
    fn into_json(self, request_id: Option<String>) -> Vec<u8> {
        // Serialising these plain structs into memory cannot fail.
        match self {
            Self::Error(body) => serde_json::to_vec(&ErrorBody { request_id, ..body }),
            Self::Conflict(body) => serde_json::to_vec(&ConflictBody { request_id, ..body }),
        }
        .expect("an error body serialises")
    }
}

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
        // 503 is load shedding or shutdown: expected, and too frequent under overload to log.
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(status = status.as_u16(), error = %self, "Request failed.");
        }
        let body = match self {
            // The C++ original's control routes answered `{"ok": false, ...}`; keep that shape.
            Self::Conflict { error, state } => PendingBody::Conflict(ConflictBody {
                ok: false,
                error,
                state,
                request_id: None,
            }),
            other => PendingBody::Error(ErrorBody {
                error: other.to_string(),
                request_id: None,
            }),
        };
        error_response(status, body)
    }
}

/// A JSON error response without a request id, carrying its body for [`stamp_request_id`].
fn error_response(status: StatusCode, body: PendingBody) -> Response {
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    let mut response = (status, content_type, body.clone().into_json(None)).into_response();
    response.extensions_mut().insert(body);
    response
}

/// Writes an error response's body again with `request_id` in it; other responses are left
/// as they are, and so is an error a layer has already encoded (compression never encodes an
/// error, see `layers::compression`, but a plain body under `Content-Encoding` would be
/// unreadable, so this does not rely on it).
pub(super) fn stamp_request_id(response: &mut Response, request_id: &HeaderValue) {
    let Some(body) = response.extensions_mut().remove::<PendingBody>() else {
        return;
    };
    if response.headers().contains_key(header::CONTENT_ENCODING) {
        return;
    }
    let id = String::from_utf8_lossy(request_id.as_bytes()).into_owned();
    *response.body_mut() = Body::from(body.into_json(Some(id)));
    // The length changed; hyper sets it again from the new body.
    response.headers_mut().remove(header::CONTENT_LENGTH);
}

/// A handler panicked: answer a JSON 500 (logged once) instead of dropping the connection.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    tracing::error!(panic = %detail, "A request handler panicked.");
    let body = PendingBody::Error(ErrorBody {
        error: "internal error".to_owned(),
        request_id: None,
    });
    error_response(StatusCode::INTERNAL_SERVER_ERROR, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(response: Response) -> Vec<u8> {
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("an in-memory body")
            .to_vec()
    }

    #[tokio::test]
    async fn the_request_id_is_stamped_on_plain_errors_and_never_on_encoded_ones() {
        let id = HeaderValue::from_static("req-1");
        let mut plain = ApiError::BadRequest("bad".to_owned()).into_response();
        stamp_request_id(&mut plain, &id);
        let body: serde_json::Value = serde_json::from_slice(&body_of(plain).await).expect("JSON");
        assert_eq!(body["request_id"], "req-1");

        // A layer encoded the body: writing plain JSON under its header would corrupt it.
        let mut encoded = ApiError::BadRequest("bad".to_owned()).into_response();
        encoded
            .headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        *encoded.body_mut() = Body::from(&b"\x1f\x8b compressed"[..]);
        stamp_request_id(&mut encoded, &id);
        assert_eq!(body_of(encoded).await, b"\x1f\x8b compressed");
    }
}
