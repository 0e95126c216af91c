//! Probes: `GET /healthz` (the process serves) and `GET /readyz` (it should get traffic: not
//! shutting down, no stale measuring device, not every device in SafeState).

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use crate::device::state::DeviceState;

/// Liveness: 200 while the process serves requests.
pub(super) async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Readiness: 503 while shutting down, when a Measuring device has gone stale, or when every
/// device is in SafeState. `?verbose` lists each check; machines read only the status code.
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
    let mut body = json!({ "status": if ready { "ready" } else { "not_ready" } });
    if !ready {
        body["error"] = json!(if state.shutdown.is_cancelled() {
            "the gateway is shutting down"
        } else if all_safe {
            "every device is in SafeState"
        } else {
            "a measuring device has sent no valid frame for too long"
        });
    }
    if verbose {
        body["checks"] = json!(checks);
    }
    (status, axum::Json(body)).into_response()
}
