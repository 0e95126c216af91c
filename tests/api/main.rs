//! Integration tests: a real gateway on `127.0.0.1:0` driven over HTTP, and the real binary
//! driven through its command line and signals.
//!
//! One test binary (as in zero2prod) so the crate links once; each topic is a module, and
//! [`helpers`] holds `spawn_app` and the small tools every module uses.

mod accounting;
mod bad_input;
mod bench;
mod binary;
mod broker;
mod channels;
mod cli;
mod control;
mod devices;
mod errors;
mod faults;
mod health;
mod helpers;
mod http_layers;
mod ingest;
mod lifecycle;
mod metrics;
mod modbus;
mod modbus_pymodbus;
mod openapi;
mod reload;
mod resilience;
mod security;
mod serial;
mod shutdown;
mod shutdown_load;
mod status;
mod systemd;
mod uplink;
mod uplink_gateway;
