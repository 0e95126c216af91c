//! `POST /-/reload`: re-reads the configuration and applies it (see [`crate::reload`]).
//! Protected like every `POST` by the guard (token, cross-site check).
//!
//! 200 with the report (what was applied, what needs a restart, what happened to each
//! device); 400 with the configuration error (the message `telemetryhub validate` gives) when
//! the file is refused, and then nothing changed; 503 while shutting down, or when the gateway
//! was started without a configuration source to re-read.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::reload::{ReloadError, ReloadReport, Trigger};

/// `POST /-/reload`.
#[utoipa::path(post, path = "/-/reload", tag = "control", responses(
    (status = 200, description = "The configuration was re-read: what was applied, what waits \
        for a restart, what happened to each device", body = ReloadReport),
    (status = 400, description = "The configuration is invalid (the message `telemetryhub \
        validate` gives); nothing changed", body = ErrorBody),
    (status = 503, description = "Shutting down, or started without a configuration file to \
        re-read", body = ErrorBody),
))]
pub(super) async fn reload(
    State(state): State<Arc<AppState>>,
) -> Result<Json<ReloadReport>, ApiError> {
    let Some(handle) = &state.reload else {
        return Err(ApiError::Unavailable(
            "live reload is not enabled: the gateway was started without a configuration source"
                .to_owned(),
        ));
    };
    match handle.reload(Trigger::Http).await {
        Ok(report) => Ok(Json(report)),
        Err(err @ (ReloadError::Config(_) | ReloadError::Uplink(_))) => {
            Err(ApiError::BadRequest(err.to_string()))
        }
        Err(err @ ReloadError::ShuttingDown) => Err(ApiError::Unavailable(err.to_string())),
    }
}
