//! Real serial ports: a [`Connector`] that opens a tty with `tokio-serial`.
//!
//! The device task reads it through the same codec as the simulator. Opening is retried by the
//! device task with backoff, so a USB adapter that is unplugged and plugged back in (its path
//! disappearing and reappearing) resumes by itself.

use tokio_serial::{DataBits, FlowControl, SerialPortBuilderExt, SerialStream, StopBits};

use super::Connector;
use crate::config::{Parity, SerialSettings};

/// Opens the configured tty.
pub struct SerialConnector {
    settings: SerialSettings,
}

impl SerialConnector {
    /// A connector for these line settings.
    pub fn new(settings: SerialSettings) -> Self {
        Self { settings }
    }
}

impl Connector for SerialConnector {
    type Io = SerialStream;

    async fn connect(&mut self) -> std::io::Result<SerialStream> {
        let s = &self.settings;
        let data_bits = match s.data_bits {
            5 => DataBits::Five,
            6 => DataBits::Six,
            7 => DataBits::Seven,
            _ => DataBits::Eight,
        };
        let parity = match s.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Odd => tokio_serial::Parity::Odd,
            Parity::Even => tokio_serial::Parity::Even,
        };
        let stop_bits = if s.stop_bits == 2 {
            StopBits::Two
        } else {
            StopBits::One
        };
        let port = tokio_serial::new(s.path.to_string_lossy(), s.baud)
            .data_bits(data_bits)
            .parity(parity)
            .stop_bits(stop_bits)
            .flow_control(FlowControl::None)
            .open_native_async()?;
        Ok(port)
    }
}
