//! The uplink: processed samples leave the gateway through the [spool](crate::spool) to an
//! MQTT broker, at least once and in order per device.
//!
//! ```text
//! worker batches --> stage (encode messages, append to the spool, group commit)
//!                --> spool (disk) --> forwarder (QoS 1 publish; PUBACK acknowledges) --> broker
//! ```
//!
//! - [`payload`]: topics, payload formats (`json`, `thingsboard`) and the spool envelope.
//! - [`forwarder`]: the MQTT side; it knows records and topics, no devices and no formats.

pub mod forwarder;
pub mod payload;
pub mod stage;

pub use self::forwarder::{Forwarder, ForwarderOptions, UplinkError, UplinkSnapshot, UplinkStatus};
