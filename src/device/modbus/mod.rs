//! Modbus devices: a register map polled over Modbus TCP or RTU with `tokio-modbus`, each
//! register a named channel. [`codec`] turns registers into values, [`plan`] groups the map
//! into as few read requests as the protocol allows.

pub mod codec;
pub mod plan;
