//! Probes: `GET /healthz` (the process serves) and `GET /readyz` (it should get traffic: not
//! shutting down, no stale measuring device, not every device in SafeState).

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use super::AppState;
use crate::device::state::DeviceState;

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub(super) struct Healthz {
    /// Always `ok`.
    #[schema(value_type = String)]
    status: &'static str,
}

/// `GET /readyz`.
#[derive(Serialize, ToSchema)]
pub(super) struct ReadyBody {
    /// `ready` or `not_ready`.
    #[schema(value_type = String)]
    status: &'static str,
    /// Why not ready (only when not ready).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    error: Option<&'static str>,
    /// With `?verbose`: every check, each with `check` (its name) and `ok`, and its details.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    checks: Option<Vec<serde_json::Value>>,
}

/// Liveness: 200 while the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "health", responses(
    (status = 200, description = "The process serves requests", body = Healthz),
))]
pub(super) async fn healthz() -> impl IntoResponse {
    axum::Json(Healthz { status: "ok" })
}

/// Readiness: 503 while shutting down, when a Measuring device has gone stale, or when every
/// device is in SafeState. `?verbose` lists each check; machines read only the status code.
#[utoipa::path(get, path = "/readyz", tag = "health",
    params(("verbose" = Option<String>, Query, description = "Present (any value): list every check")),
    responses(
        (status = 200, description = "Ready for traffic", body = ReadyBody),
        (status = 503, description = "Shutting down, a measuring device is stale, or every \
            device is in SafeState", body = ReadyBody),
))]
pub(super) async fn readyz(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Response {
    let verbose = query.as_deref().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "verbose" || p.starts_with("verbose="))
    });
    let mut checks = vec![json!({
        "check": "accepting",
        "ok": !state.shutdown.is_cancelled(),
    })];
    let mut ready = !state.shutdown.is_cancelled();
    let mut all_safe = true;
    for device in state.devices.load().iter() {
        let f = device.freshness();
        all_safe &= f.state == DeviceState::SafeState;
        ready &= !f.stale;
        checks.push(json!({
            "check": format!("device:{}", device.id()),
            "ok": !f.stale && f.state != DeviceState::SafeState,
            "state": f.state,
            "ms_since_valid_frame": f.since_good.as_millis() as u64,
            "stale_after_ms": f.stale_after.as_millis() as u64,
        }));
    }
    ready &= !all_safe;
    if let Some(uplink) = &state.uplink {
        // Informational: buffering through a broker outage is what the spool is for, so a
        // disconnected uplink never makes the gateway unready.
        let view = uplink.view();
        checks.push(json!({
            "check": "uplink",
            "ok": true,
            "connected": view.connected,
            "broker": view.broker,
            "pending_samples": view.pending_samples,
            "oldest_pending_age_seconds": view.oldest_pending_age_seconds,
            "last_error": view.last_error,
        }));
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let error = (!ready).then(|| {
        if state.shutdown.is_cancelled() {
            "the gateway is shutting down"
        } else if all_safe {
            "every device is in SafeState"
        } else {
            "a measuring device has sent no valid frame for too long"
        }
    });
    let body = ReadyBody {
        status: if ready { "ready" } else { "not_ready" },
        error,
        checks: verbose.then_some(checks),
    };
    (status, axum::Json(body)).into_response()
}
