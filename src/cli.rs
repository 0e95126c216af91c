//! The work behind the binary's helper subcommands: `healthcheck` (probe a URL without curl,
//! for container health checks) and `simulate` (play a simulated device on a tty).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::SimulatorSettings;
use crate::device::sim::Simulator;

/// `GET url` over plain HTTP/1.1; success is a 200 status line. Dependency-free and blocking,
/// so a container health check needs nothing but this binary.
pub fn probe(url: &str, timeout: Duration) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("bad address {authority}: {e}"))?
        .next()
        .ok_or("the address resolves to nothing")?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).map_err(|e| e.to_string())?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    match status_line.split(' ').nth(1) {
        Some("200") => Ok(()),
        Some(code) => Err(format!("status {code}")),
        None => Err("no HTTP status line".to_owned()),
    }
}

/// Runs the embedded simulator on the tty at `path` until the tty fails or goes away.
/// `baud`, when not 0, is both the line speed and the simulator's UART pacing.
pub async fn simulate(path: &Path, interval: Duration, baud: u32) -> std::io::Result<()> {
    let line_speed = if baud == 0 { 115_200 } else { baud };
    let port =
        tokio_serial::SerialStream::open(&tokio_serial::new(path.to_string_lossy(), line_speed))?;
    let settings = SimulatorSettings {
        baud,
        ..Default::default()
    };
    Simulator::new(settings, interval).run(port).await
}

/// What `simulate --modbus-tcp/--modbus-rtu` serves.
#[derive(Debug, Clone, Default)]
pub struct ModbusSim {
    /// Serve Modbus TCP on this address.
    pub tcp: Option<String>,
    /// Serve Modbus RTU on this tty.
    pub rtu: Option<PathBuf>,
    /// Probability per request of a fault, spread evenly over the four kinds.
    pub fault_rate: f64,
}

impl ModbusSim {
    /// Whether a Modbus simulator was asked for.
    pub fn is_some(&self) -> bool {
        self.tcp.is_some() || self.rtu.is_some()
    }
}

/// Serves the example register map over Modbus TCP or RTU until the listener or tty fails,
/// moving its values every `interval`; `baud` paces RTU like a UART (8N1) when not 0.
pub async fn simulate_modbus(
    sim: &ModbusSim,
    interval: Duration,
    baud: u32,
) -> std::io::Result<()> {
    use crate::device::modbus::sim::{FaultRates, Line, SimHandle, serve_rtu, serve_tcp};
    if !(0.0..=1.0).contains(&sim.fault_rate) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "--fault-rate must be between 0 and 1",
        ));
    }
    let each = sim.fault_rate / 4.0;
    let handle = SimHandle::new(
        FaultRates {
            exception: each,
            silence: each,
            drop: each,
            corrupt: each,
        },
        0,
    );
    let ticker = {
        let handle = handle.clone();
        let period = interval.max(Duration::from_millis(10));
        async move {
            let mut tick = tokio::time::interval(period);
            for step in 0.. {
                tick.tick().await;
                handle.tick(step);
            }
        }
    };
    let serve = async {
        if let Some(address) = &sim.tcp {
            let listener = tokio::net::TcpListener::bind(address).await?;
            eprintln!("Serving Modbus TCP on {}.", listener.local_addr()?);
            serve_tcp(
                listener,
                handle.clone(),
                tokio_util::sync::CancellationToken::new(),
            )
            .await;
            Ok(())
        } else {
            let path = sim.rtu.clone().unwrap_or_default();
            let port = tokio_serial::SerialStream::open(&tokio_serial::new(
                path.to_string_lossy(),
                if baud == 0 { 115_200 } else { baud },
            ))?;
            let line = (baud != 0).then_some(Line {
                baud,
                bits_per_char: 10,
            });
            eprintln!("Serving Modbus RTU, unit 1, on {}.", path.display());
            serve_rtu(port, handle.clone(), 1, line).await
        }
    };
    tokio::select! {
        result = serve => result,
        () = ticker => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_refuses_what_it_cannot_speak() {
        let timeout = Duration::from_millis(200);
        assert!(
            probe("https://127.0.0.1:1/", timeout)
                .unwrap_err()
                .contains("http://")
        );
        assert!(probe("http://no port here/", timeout).is_err());
    }

    #[tokio::test]
    async fn probe_reports_the_status() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 256];
                let _ = stream.read(&mut request).await.unwrap();
                let response = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let url = format!("http://{addr}/healthz");
        let timeout = Duration::from_secs(5);
        let first = tokio::task::spawn_blocking({
            let url = url.clone();
            move || probe(&url, timeout)
        });
        assert_eq!(first.await.unwrap(), Ok(()));
        let second = tokio::task::spawn_blocking(move || probe(&url, timeout));
        assert_eq!(second.await.unwrap(), Err("status 503".to_owned()));
    }
}
