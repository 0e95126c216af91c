//! Device control routes: `POST /start|stop|reset` for all devices (the C++ original's routes),
//! `GET /devices`, `GET /devices/{id}`, `POST /devices/{id}/start|stop|reset`, and
//! `POST /devices/{id}/command` (a line sent down the link, answered by the device).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use smol_str::SmolStr;

use super::{ApiError, AppState};
use crate::config::Table;
use crate::device::modbus::link::WriteRequest;
use crate::device::state::{Command, DeviceState};
use crate::device::{CommandError, CountersSnapshot, DeviceHandle, SendError, WriteError};
use crate::worker::DeviceStats;

/// One device as the API shows it.
#[derive(Debug, Serialize, PartialEq)]
pub struct DeviceView {
    id: SmolStr,
    kind: &'static str,
    state: DeviceState,
    consecutive_failures: u32,
    last_error: Option<String>,
    #[serde(flatten)]
    counters: CountersSnapshot,
    #[serde(flatten)]
    stats: DeviceStats,
}

impl DeviceView {
    pub(super) fn new(state: &AppState, device: &DeviceHandle) -> Self {
        let status = device.status();
        Self {
            id: device.id().clone(),
            kind: device.kind(),
            state: status.state,
            consecutive_failures: status.consecutive_failures,
            last_error: status.last_error,
            counters: device.counters(),
            stats: state.worker.stats(device.id()),
        }
    }
}

/// The state shown for several devices at once: the most severe one.
pub(super) fn combined_state(devices: &[DeviceHandle]) -> DeviceState {
    devices
        .iter()
        .map(DeviceHandle::state)
        .max_by_key(|s| s.severity())
        .unwrap_or_default()
}

pub(super) async fn start_all(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    command_all(&state, Command::Start).await
}

pub(super) async fn stop_all(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    command_all(&state, Command::Stop).await
}

pub(super) async fn reset_all(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    command_all(&state, Command::Reset).await
}

pub(super) async fn start_one(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id?;
    command_one(&state, &id, Command::Start).await
}

pub(super) async fn stop_one(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id?;
    command_one(&state, &id, Command::Stop).await
}

pub(super) async fn reset_one(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id?;
    command_one(&state, &id, Command::Reset).await
}

pub(super) async fn list_devices(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let devices: Vec<DeviceView> = state
        .devices
        .iter()
        .map(|d| DeviceView::new(&state, d))
        .collect();
    Json(json!({ "devices": devices }))
}

pub(super) async fn get_device(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let Path(id) = id?;
    let device = state.device(&id)?;
    Ok(Json(DeviceView::new(&state, device)))
}

/// Applies `command` to every device. All are tried; if any refuses, the answer is 409 naming
/// the devices that refused (the others did change).
async fn command_all(
    state: &AppState,
    command: Command,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut refusals = Vec::new();
    for device in state.devices.iter() {
        match run(state, device, command).await {
            Ok(_) => {}
            Err(CommandError::Illegal(err)) => {
                refusals.push(format!("device {}: {err}", device.id()))
            }
            Err(err @ CommandError::Unavailable(_)) => {
                return Err(ApiError::Unavailable(err.to_string()));
            }
        }
    }
    let combined = combined_state(&state.devices);
    if refusals.is_empty() {
        Ok(Json(json!({ "ok": true, "state": combined })))
    } else {
        Err(ApiError::Conflict {
            error: refusals.join("; "),
            state: combined,
        })
    }
}

async fn command_one(
    state: &AppState,
    id: &str,
    command: Command,
) -> Result<Json<serde_json::Value>, ApiError> {
    let device = state.device(id)?;
    run(state, device, command).await.map_err(|err| match err {
        CommandError::Illegal(err) => ApiError::Conflict {
            error: err.to_string(),
            state: device.state(),
        },
        CommandError::Unavailable(_) => ApiError::Unavailable(err.to_string()),
    })?;
    Ok(Json(
        json!({ "ok": true, "id": device.id(), "state": device.state() }),
    ))
}

async fn run(
    state: &AppState,
    device: &DeviceHandle,
    command: Command,
) -> Result<DeviceState, CommandError> {
    let next = device.command(command).await?;
    if command == Command::Reset {
        state.worker.reset_stats(device.id());
    }
    Ok(next)
}

/// Body of `POST /devices/{id}/command`: a command line for a frame device, or a register
/// write for a Modbus device.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CommandBody {
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    write: Option<WriteBody>,
}

/// `{"table": "holding", "address": 10, "value": 42}`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WriteBody {
    table: Table,
    address: u16,
    value: f64,
}

async fn write_register(
    device: &DeviceHandle,
    body: WriteBody,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = WriteRequest {
        table: body.table,
        address: body.address,
        value: body.value,
    };
    device.write(request).await.map_err(|err| match err {
        WriteError::NotModbus(_) => ApiError::BadRequest(err.to_string()),
        WriteError::Refused(_) => ApiError::Rejected(StatusCode::FORBIDDEN, err.to_string()),
        WriteError::NotConnected { state, .. } => ApiError::Conflict {
            error: err.to_string(),
            state,
        },
        WriteError::Timeout(_) => ApiError::Timeout(err.to_string()),
        WriteError::Exception { .. } | WriteError::Link(_) => ApiError::BadGateway(err.to_string()),
        WriteError::Unavailable(_) => ApiError::Unavailable(err.to_string()),
    })?;
    Ok(Json(
        json!({ "ok": true, "id": device.id(), "write": body }),
    ))
}

pub(super) async fn send_command(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<CommandBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id?;
    let device = state.device(&id)?;
    let Json(body) = body?;
    let command = match (body.command, body.write) {
        (Some(command), None) => command,
        (None, Some(write)) => return write_register(device, write).await,
        _ => {
            return Err(ApiError::BadRequest(
                "send exactly one of {\"command\": \"...\"} or {\"write\": {\"table\", \"address\", \"value\"}}"
                    .to_owned(),
            ));
        }
    };
    let reply = device.send(&command).await.map_err(|err| match err {
        SendError::Invalid | SendError::Unsupported(_) => ApiError::BadRequest(err.to_string()),
        SendError::NotConnected { .. } => ApiError::Conflict {
            error: err.to_string(),
            state: device.state(),
        },
        SendError::Timeout(_) => ApiError::Timeout(err.to_string()),
        SendError::Io(_) | SendError::LinkClosed => ApiError::BadGateway(err.to_string()),
        SendError::Busy(_) | SendError::Unavailable(_) => ApiError::Unavailable(err.to_string()),
    })?;
    let ok = !reply.starts_with("ERROR:");
    Ok(Json(
        json!({ "ok": ok, "id": device.id(), "command": command, "reply": reply }),
    ))
}
