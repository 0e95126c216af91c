//! Modbus devices: a register map polled over Modbus TCP or RTU with `tokio-modbus`, each
//! register a named channel. [`codec`] turns registers into values, [`plan`] groups the map
//! into as few read requests as the protocol allows.

use tokio::net::TcpStream;

use super::Connector;

pub mod codec;
pub mod link;
pub mod plan;
pub mod sim;

/// Opens a Modbus TCP connection to `host:port`. Called again after every failure, so a PLC
/// that rebooted is reconnected with backoff.
pub struct TcpConnector {
    address: String,
}

impl TcpConnector {
    /// A connector to `address` (`host:port`, resolved at each connect).
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
        }
    }
}

impl Connector for TcpConnector {
    type Io = TcpStream;

    async fn connect(&mut self) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect(self.address.as_str()).await?;
        // Requests are small and each waits for its answer: Nagle would only add latency.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

#[cfg(test)]
mod tests;
