//! TelemetryHub: an edge telemetry gateway.
//!
//! Devices send framed telemetry over a serial link (the embedded simulator's in-memory duplex
//! stream by default); the gateway decodes it, buffers it with an explicit overflow policy,
//! processes it in batches on a bounded blocking worker stage, and serves control, status and
//! Prometheus metrics over HTTP.
//!
//! # Layout
//!
//! Data flows one way, and so do the modules:
//!
//! ```text
//! device (link: simulated duplex stream) --frames--> device::codec --samples-->
//! buffer (bounded, overflow policy, ledger) --> dispatch --batches--> worker (spawn_blocking,
//! semaphore) --> statistics and history --> api (axum: control, status, /metrics)
//! ```
//!
//! - [`config`]: typed settings, defaults, environment overrides, validation.
//! - [`app`]: the gateway: the pipeline plus the HTTP API, on one `TaskTracker` and one root
//!   `CancellationToken`, shut down in order.
//! - [`pipeline`]: the data path without HTTP (devices → buffer → dispatcher → workers); also
//!   what `telemetryhub bench` drives.
//! - [`device`]: the device task and its state machine ([`device::state`]), the frame codec
//!   ([`device::codec`]) and the simulator ([`device::sim`]); Modbus devices
//!   ([`device::modbus`]: register codec, read planner, link, simulator).
//! - [`buffer`]: the ring buffer; [`ledger`]: the sample accounting it keeps.
//! - [`dispatch`]: buffer → semaphore permit → worker batch.
//! - [`worker`]: pure processing functions and the worker's shared statistics.
//! - [`metrics`]: every metric name and how it is recorded.
//! - [`api`]: the HTTP routes; it sees the pipeline only through the stages' handle types.
//! - [`telemetry`]: logging set-up; [`notify`]: systemd readiness, reload and watchdog
//!   notifications.
//! - [`reload`]: live reload (`SIGHUP`, `POST /-/reload`): re-reads the config and applies
//!   what can change without a restart; [`swap`] is the cell the live settings sit in.
//! - [`bench`]: the end-to-end pipeline benchmark behind `telemetryhub bench`.
//! - [`cli`]: the binary's helper subcommands (`healthcheck`, `simulate`).

pub mod api;
pub mod app;
pub mod bench;
pub mod buffer;
pub mod cli;
pub mod config;
pub mod device;
pub mod dispatch;
pub mod ledger;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod reload;
pub mod sample;
pub mod spool;
pub mod swap;
pub mod telemetry;
pub mod uplink;
pub mod worker;
