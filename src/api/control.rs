//! Device control routes: `POST /start|stop|reset` for all devices (the C++ original's routes),
//! `GET /devices`, `GET /devices/{id}`, `POST /devices/{id}/start|stop|reset`, and
//! `POST /devices/{id}/command` (a line sent down the link, answered by the device).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;
use utoipa::ToSchema;

use super::error::{ConflictBody, ErrorBody};
use super::{ApiError, AppState};
use crate::config::Table;
use crate::device::modbus::link::WriteRequest;
use crate::device::state::{Command, DeviceState};
use crate::device::{CommandError, CountersSnapshot, DeviceHandle, SendError, WriteError};
use crate::worker::DeviceStats;

/// One device as the API shows it.
#[derive(Debug, Serialize, PartialEq, ToSchema)]
pub struct DeviceView {
    /// The device's id.
    #[schema(value_type = String)]
    id: SmolStr,
    /// Its link: `simulated`, `serial`, `modbus_tcp` or `modbus_rtu`.
    #[schema(value_type = String)]
    kind: &'static str,
    /// The channel of samples that name none.
    #[schema(value_type = String)]
    default_channel: SmolStr,
    /// Its state.
    state: DeviceState,
    /// Failed reads since the last good frame (the circuit breaker trips at
    /// `failure_threshold`).
    consecutive_failures: u32,
    /// The last link error, if any.
    last_error: Option<String>,
    /// The device's counters.
    #[serde(flatten)]
    counters: CountersSnapshot,
    /// The device's statistics.
    #[serde(flatten)]
    stats: DeviceStats,
}

/// `GET /devices`.
#[derive(Serialize, ToSchema)]
pub(super) struct DeviceList {
    /// Every device, in configuration order.
    devices: Vec<DeviceView>,
}

/// The answer to a command on every device.
#[derive(Serialize, ToSchema)]
pub(super) struct AllCommanded {
    /// Always `true` (a refusal is a 409 [`ConflictBody`]).
    ok: bool,
    /// The combined state afterwards.
    state: DeviceState,
}

/// The answer to a command on one device.
#[derive(Serialize, ToSchema)]
pub(super) struct DeviceCommanded {
    /// Always `true` (a refusal is a 409 [`ConflictBody`]).
    ok: bool,
    /// The device.
    #[schema(value_type = String)]
    id: SmolStr,
    /// Its state afterwards.
    state: DeviceState,
}

/// The device's reply to `POST /devices/{id}/command`.
#[derive(Serialize, ToSchema)]
pub(super) struct CommandReply {
    /// Whether the device accepted the command (its reply does not start with `ERROR:`).
    ok: bool,
    /// The device.
    #[schema(value_type = String)]
    id: SmolStr,
    /// The command sent.
    command: String,
    /// The device's reply line.
    reply: String,
}

impl DeviceView {
    pub(super) fn new(state: &AppState, device: &DeviceHandle) -> Self {
        let status = device.status();
        Self {
            id: device.id().clone(),
            kind: device.kind(),
            default_channel: device.channel().clone(),
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

/// `POST /start`.
#[utoipa::path(post, path = "/start", tag = "control", responses(
    (status = 200, description = "Every device is measuring", body = AllCommanded),
    (status = 409, description = "Some device refused (the others did start)", body = ConflictBody),
    (status = 503, description = "A device task is gone (shutting down)", body = ErrorBody),
))]
pub(super) async fn start_all(
    State(state): State<Arc<AppState>>,
) -> Result<Json<AllCommanded>, ApiError> {
    command_all(&state, Command::Start).await
}

/// `POST /stop`.
#[utoipa::path(post, path = "/stop", tag = "control", responses(
    (status = 200, description = "Every device is idle", body = AllCommanded),
    (status = 409, description = "Some device refused (the others did stop)", body = ConflictBody),
    (status = 503, description = "A device task is gone (shutting down)", body = ErrorBody),
))]
pub(super) async fn stop_all(
    State(state): State<Arc<AppState>>,
) -> Result<Json<AllCommanded>, ApiError> {
    command_all(&state, Command::Stop).await
}

/// `POST /reset`.
#[utoipa::path(post, path = "/reset", tag = "control", responses(
    (status = 200, description = "Every device is reset", body = AllCommanded),
    (status = 409, description = "Some device refused, e.g. while measuring (the others were reset)", body = ConflictBody),
    (status = 503, description = "A device task is gone (shutting down)", body = ErrorBody),
))]
pub(super) async fn reset_all(
    State(state): State<Arc<AppState>>,
) -> Result<Json<AllCommanded>, ApiError> {
    command_all(&state, Command::Reset).await
}

/// `POST /devices/{id}/start`.
#[utoipa::path(post, path = "/devices/{id}/start", tag = "control",
    params(("id" = String, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device is started", body = DeviceCommanded),
        (status = 400, description = "The id is not valid UTF-8", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 409, description = "The device refused in its state", body = ConflictBody),
        (status = 503, description = "The device task is gone (shutting down)", body = ErrorBody),
))]
pub(super) async fn start_one(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceCommanded>, ApiError> {
    let Path(id) = id?;
    command_one(&state, &id, Command::Start).await
}

/// `POST /devices/{id}/stop`.
#[utoipa::path(post, path = "/devices/{id}/stop", tag = "control",
    params(("id" = String, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device is stopped", body = DeviceCommanded),
        (status = 400, description = "The id is not valid UTF-8", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 409, description = "The device refused in its state", body = ConflictBody),
        (status = 503, description = "The device task is gone (shutting down)", body = ErrorBody),
))]
pub(super) async fn stop_one(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceCommanded>, ApiError> {
    let Path(id) = id?;
    command_one(&state, &id, Command::Stop).await
}

/// `POST /devices/{id}/reset`.
#[utoipa::path(post, path = "/devices/{id}/reset", tag = "control",
    params(("id" = String, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device is reset", body = DeviceCommanded),
        (status = 400, description = "The id is not valid UTF-8", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 409, description = "The device refused in its state", body = ConflictBody),
        (status = 503, description = "The device task is gone (shutting down)", body = ErrorBody),
))]
pub(super) async fn reset_one(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceCommanded>, ApiError> {
    let Path(id) = id?;
    command_one(&state, &id, Command::Reset).await
}

/// `GET /devices`.
#[utoipa::path(get, path = "/devices", tag = "control", responses(
    (status = 200, description = "Every device", body = DeviceList),
))]
pub(super) async fn list_devices(State(state): State<Arc<AppState>>) -> Json<DeviceList> {
    let devices: Vec<DeviceView> = state
        .devices
        .load()
        .iter()
        .map(|d| DeviceView::new(&state, d))
        .collect();
    Json(DeviceList { devices })
}

/// `GET /devices/{id}`.
#[utoipa::path(get, path = "/devices/{id}", tag = "control",
    params(("id" = String, Path, description = "The device's id")),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = 400, description = "The id is not valid UTF-8", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
))]
pub(super) async fn get_device(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let Path(id) = id?;
    let device = state.device(&id)?;
    Ok(Json(DeviceView::new(&state, &device)))
}

/// Applies `command` to every device. All are tried; if any refuses, the answer is 409 naming
/// the devices that refused (the others did change).
///
/// A live reload may end a device's task between loading the list and commanding it: a
/// device it removed is skipped (it is no longer there to command), and one it restarted is
/// commanded through its new task (see [`command_current`]).
async fn command_all(state: &AppState, command: Command) -> Result<Json<AllCommanded>, ApiError> {
    let mut refusals = Vec::new();
    let devices = state.devices.load();
    for device in devices.iter() {
        match command_current(state, device, command).await {
            Ok(_) | Err(Retired::Removed) => {}
            Err(Retired::Failed(CommandError::Illegal(err))) => {
                refusals.push(format!("device {}: {err}", device.id()))
            }
            Err(Retired::Failed(err @ CommandError::Unavailable(_))) => {
                return Err(ApiError::Unavailable(err.to_string()));
            }
        }
    }
    let combined = combined_state(&state.devices.load());
    if refusals.is_empty() {
        Ok(Json(AllCommanded {
            ok: true,
            state: combined,
        }))
    } else {
        Err(ApiError::Conflict {
            error: refusals.join("; "),
            state: combined,
        })
    }
}

/// Why [`command_current`] did not apply a command.
enum Retired {
    /// A live reload removed the device meanwhile.
    Removed,
    /// The device refused, or its task is gone and no reload replaced it (shutdown).
    Failed(CommandError),
}

/// How many times a command follows a device to the new task a reload gave it. Reloads are
/// serialised and each one waits for the tasks it ends, so more than a couple in a row while
/// one command is in flight means they come faster than a command can follow.
const FOLLOW_RELOADS: usize = 3;

/// Applies `command` to `device`; if its task is gone, to the task a live reload started for
/// the same id instead (once the reload is done). Returns the device it was applied to, with its state afterwards.
async fn command_current(
    state: &AppState,
    device: &DeviceHandle,
    command: Command,
) -> Result<(DeviceHandle, DeviceState), Retired> {
    let mut device = device.clone();
    for _ in 0..FOLLOW_RELOADS {
        match run(state, &device, command).await {
            Ok(next) => return Ok((device, next)),
            Err(CommandError::Unavailable(id)) => {
                if state.shutdown.is_cancelled() {
                    return Err(Retired::Failed(CommandError::Unavailable(id)));
                }
                // A reload ended the task: let it finish and publish the devices it leaves.
                state.devices_settled.wait().await;
                let current = state.devices.load().iter().find(|d| d.id() == &id).cloned();
                match current {
                    None => return Err(Retired::Removed),
                    Some(current) if current.same_task(&device) => {
                        return Err(Retired::Failed(CommandError::Unavailable(id)));
                    }
                    Some(current) => device = current,
                }
            }
            Err(err) => return Err(Retired::Failed(err)),
        }
    }
    Err(Retired::Failed(CommandError::Unavailable(
        device.id().clone(),
    )))
}

async fn command_one(
    state: &AppState,
    id: &str,
    command: Command,
) -> Result<Json<DeviceCommanded>, ApiError> {
    let device = state.device(id)?;
    let (device, _) = command_current(state, &device, command)
        .await
        .map_err(|err| match err {
            Retired::Removed => ApiError::NotFound(format!("unknown device `{id}`")),
            Retired::Failed(CommandError::Illegal(err)) => ApiError::Conflict {
                error: err.to_string(),
                state: device.state(),
            },
            Retired::Failed(err @ CommandError::Unavailable(_)) => {
                ApiError::Unavailable(err.to_string())
            }
        })?;
    Ok(Json(DeviceCommanded {
        ok: true,
        id: device.id().clone(),
        state: device.state(),
    }))
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

/// Body of `POST /devices/{id}/command`: exactly one of a command line for a frame device, or
/// a register write for a Modbus device. Read as one struct, so that a body with neither or
/// both gets an error saying so; the document shows the two forms ([`CommandRequest`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CommandBody {
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    write: Option<WriteBody>,
}

/// Body of `POST /devices/{id}/command`, as the document shows it: one of two forms.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Only its schema is used: requests are read as a `CommandBody`.
pub(super) enum CommandRequest {
    /// A command line for a frame device.
    Line(CommandLine),
    /// A register write for a Modbus device.
    Write(WriteCommand),
}

/// `{"command": "STATUS"}`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Only its schema is used.
pub(super) struct CommandLine {
    /// One line for a frame device: 1 to 64 printable ASCII characters, e.g. `STATUS`. A
    /// Modbus device takes no command lines (403).
    #[schema(pattern = r"^[\x20-\x7e]{1,64}$", min_length = 1, max_length = 64)]
    command: String,
}

/// `{"write": {"table": "holding", "address": 10, "value": 42}}`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Only its schema is used.
pub(super) struct WriteCommand {
    /// A register write for a Modbus device: refused with 403, without reaching the device,
    /// unless the register map marks the address `writable` (a frame device has no registers).
    write: WriteBody,
}

/// `{"table": "holding", "address": 10, "value": 42}`: function 6 (or 16 for a register
/// wider than 16 bits) on a holding register, 5 on a coil.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct WriteBody {
    /// The table: `holding` or `coil` (the others are read-only).
    table: Table,
    /// The register's address, as in the register map (`7.0` is `7`, as in JSON Schema).
    #[serde(deserialize_with = "integral_u16")]
    #[schema(minimum = 0, maximum = 65535)]
    address: u16,
    /// The value in the register's units, before its scale and offset are undone.
    value: f64,
}

/// The answer to `POST /devices/{id}/command`.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub(super) enum CommandOutcome {
    /// A frame device's reply line.
    Reply(CommandReply),
    /// A Modbus device acknowledged the write.
    Written(WriteReply),
}

/// A Modbus device's acknowledgement of a write.
#[derive(Serialize, ToSchema)]
pub(super) struct WriteReply {
    /// Always true: a refused write is an error.
    ok: bool,
    /// The device.
    #[schema(value_type = String)]
    id: SmolStr,
    /// The write, as requested.
    write: WriteBody,
}

/// A u16 written as any JSON number with an integral value: JSON Schema's `integer` (what the
/// document promises) includes `7.0`.
fn integral_u16<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    let value = f64::deserialize(deserializer)?;
    if value.fract() == 0.0 && (0.0..=f64::from(u16::MAX)).contains(&value) {
        Ok(value as u16)
    } else {
        Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Float(value),
            &"an integer from 0 to 65535",
        ))
    }
}

async fn write_register(device: &DeviceHandle, body: WriteBody) -> Result<WriteReply, ApiError> {
    let request = WriteRequest {
        table: body.table,
        address: body.address,
        value: body.value,
    };
    device.write(request).await.map_err(|err| match err {
        // A frame device has no register map, so no address of it is writable.
        WriteError::NotModbus(_) => ApiError::Rejected(StatusCode::FORBIDDEN, err.to_string()),
        WriteError::Refused(_) => ApiError::Rejected(StatusCode::FORBIDDEN, err.to_string()),
        WriteError::NotConnected { state, .. } => ApiError::Conflict {
            error: err.to_string(),
            state,
        },
        WriteError::Timeout(_) => ApiError::Timeout(err.to_string()),
        WriteError::Exception { .. } | WriteError::Link(_) => ApiError::BadGateway(err.to_string()),
        WriteError::Unavailable(_) => ApiError::Unavailable(err.to_string()),
    })?;
    Ok(WriteReply {
        ok: true,
        id: device.id().clone(),
        write: body,
    })
}

/// `POST /devices/{id}/command`.
#[utoipa::path(post, path = "/devices/{id}/command", tag = "control",
    params(("id" = String, Path, description = "The device's id")),
    request_body = CommandRequest,
    responses(
        (status = 200, description = "The device's reply line, or a Modbus device's acknowledged write", body = CommandOutcome),
        (status = 400, description = "Malformed JSON, neither or both of `command` and `write`, or a command line that is not 1 to 64 printable characters", body = ErrorBody),
        (status = 403, description = "Refused without asking the device: a write the register map does not allow (not `writable`, a value the register cannot hold, or a device that is not Modbus), or a command line to a Modbus device", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 409, description = "The device is not connected", body = ConflictBody),
        (status = 413, description = "The body is larger than `http.body_limit_bytes`", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "JSON, but not a `CommandBody`", body = ErrorBody),
        (status = 502, description = "The link failed while waiting for the reply, or the Modbus device answered the write with an exception (named in the error)", body = ErrorBody),
        (status = 503, description = "Another command is in progress, or shutting down", body = ErrorBody),
        (status = 504, description = "The device did not answer in time", body = ErrorBody),
))]
pub(super) async fn send_command(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<CommandBody>, JsonRejection>,
) -> Result<Json<CommandOutcome>, ApiError> {
    let Path(id) = id?;
    let device = state.device(&id)?;
    let Json(body) = body?;
    let command = match (body.command, body.write) {
        (Some(command), None) => command,
        (None, Some(write)) => {
            let written = write_register(&device, write).await?;
            return Ok(Json(CommandOutcome::Written(written)));
        }
        _ => {
            return Err(ApiError::BadRequest(
                "send exactly one of {\"command\": \"...\"} or {\"write\": {\"table\", \"address\", \"value\"}}"
                    .to_owned(),
            ));
        }
    };
    let reply = device.send(&command).await.map_err(|err| match err {
        SendError::Invalid => ApiError::BadRequest(err.to_string()),
        // The request is understood; this device's link carries no command lines.
        SendError::Unsupported(_) => ApiError::Rejected(StatusCode::FORBIDDEN, err.to_string()),
        SendError::NotConnected { .. } => ApiError::Conflict {
            error: err.to_string(),
            state: device.state(),
        },
        SendError::Timeout(_) => ApiError::Timeout(err.to_string()),
        SendError::Io(_) | SendError::LinkClosed => ApiError::BadGateway(err.to_string()),
        SendError::Busy(_) | SendError::Unavailable(_) => ApiError::Unavailable(err.to_string()),
    })?;
    let ok = !reply.starts_with("ERROR:");
    Ok(Json(CommandOutcome::Reply(CommandReply {
        ok,
        id: device.id().clone(),
        command,
        reply,
    })))
}
