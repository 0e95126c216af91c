//! The simulator's servers: Modbus TCP (MBAP framing) and Modbus RTU (CRC framing, UART
//! pacing) around the register bank and faults of [`SimHandle`].

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::{Fault, MAX_ADU, SimHandle};

/// Serves Modbus TCP on `listener` until `cancel`, one task per connection.
pub async fn serve_tcp(listener: TcpListener, sim: SimHandle, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        let (sim, cancel) = (sim.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = serve_tcp_connection(stream, sim) => {}
            }
        });
    }
}

/// Serves one Modbus TCP connection until the client closes it or a `Drop` fault.
pub async fn serve_tcp_connection<Io: AsyncRead + AsyncWrite + Unpin>(
    mut io: Io,
    sim: SimHandle,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(MAX_ADU);
    loop {
        // MBAP header: transaction, protocol, length (of unit id + PDU), unit id.
        while buf.len() < 7 || buf.len() < 6 + usize::from(u16::from_be_bytes([buf[4], buf[5]])) {
            if buf.len() >= 6 && usize::from(u16::from_be_bytes([buf[4], buf[5]])) > MAX_ADU {
                return Ok(()); // Not Modbus: hang up, as a device would.
            }
            if io.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let len = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
        if len < 2 {
            return Ok(()); // No unit id and function code: not Modbus.
        }
        let adu = buf.split_to(6 + len);
        let (header, pdu) = (&adu[..7], &adu[7..]);
        let fault = sim.next_fault();
        let response = match fault {
            Some(Fault::Silence) => continue,
            Some(Fault::Drop) => return Ok(()),
            Some(Fault::Exception(code)) => vec![pdu.first().copied().unwrap_or(0) | 0x80, code],
            Some(Fault::Corrupt) | None => sim.process(pdu),
        };
        let mut out = Vec::with_capacity(7 + response.len());
        out.extend_from_slice(&header[..4]);
        if fault == Some(Fault::Corrupt) {
            // An answer to another transaction: the client must not take it for this one.
            out[0] ^= 0xFF;
        }
        out.extend_from_slice(&(response.len() as u16 + 1).to_be_bytes());
        out.push(header[6]);
        out.extend_from_slice(&response);
        io.write_all(&out).await?;
    }
}

/// The CRC of Modbus RTU (CRC-16/MODBUS), sent low byte first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// The length of the RTU request ADU at the start of `buf` (unit id, PDU, CRC), once its
/// function code (and for writes of several items, its byte count) has arrived.
fn rtu_request_len(buf: &[u8]) -> Option<usize> {
    match *buf.get(1)? {
        1..=6 => Some(8),
        15 | 16 => Some(9 + usize::from(*buf.get(6)?)),
        // Unknown: the whole burst is one frame (a client writes a request at once).
        _ => Some(buf.len()),
    }
}

/// A UART's timing: `bits` per character at `baud`.
#[derive(Debug, Clone, Copy)]
pub struct Line {
    /// Bits per second.
    pub baud: u32,
    /// Bits per character: start, data, parity, stop (10 for 8N1).
    pub bits_per_char: u32,
}

impl Line {
    /// The time `chars` characters take on the line.
    pub fn chars(&self, chars: f64) -> Duration {
        Duration::from_secs_f64(chars * f64::from(self.bits_per_char) / f64::from(self.baud))
    }

    /// The most request/response transactions per second the line carries, with a 3.5-character
    /// silence before each frame.
    pub fn max_polls_per_sec(&self, request: usize, response: usize) -> f64 {
        1.0 / self
            .chars(request as f64 + response as f64 + 7.0)
            .as_secs_f64()
    }
}

/// Waits until `deadline` with sub-millisecond precision: the timer for the bulk, then yields
/// (tokio's timer ticks in whole milliseconds, a long way at 115 200 baud).
async fn wait_until_precise(deadline: Instant) {
    if let Some(early) = deadline.checked_sub(Duration::from_millis(1)) {
        tokio::time::sleep_until(early).await;
    }
    while Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

/// Serves Modbus RTU as unit `unit_id` on `io` (a tty, a duplex stream) until it closes,
/// paced like a UART when `line` is given. Frames with a bad CRC or for another unit get no
/// answer, as on a real bus.
pub async fn serve_rtu<Io: AsyncRead + AsyncWrite + Unpin>(
    mut io: Io,
    sim: SimHandle,
    unit_id: u8,
    line: Option<Line>,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(MAX_ADU);
    let mut line_free = Instant::now();
    loop {
        let len = loop {
            if let Some(len) = rtu_request_len(&buf).filter(|&n| n <= buf.len()) {
                break len;
            }
            if buf.len() > MAX_ADU {
                buf.clear();
            }
            if io.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let received = Instant::now();
        let adu = buf.split_to(len);
        let (body, crc) = adu.split_at(len.saturating_sub(2));
        if crc.len() != 2 || crc16(body) != u16::from_le_bytes([crc[0], crc[1]]) {
            // Noise on the line: drop what we have, as a slave waits for silence.
            buf.clear();
            continue;
        }
        if body[0] != unit_id {
            continue;
        }
        let pdu = &body[1..];
        let fault = sim.next_fault();
        let response = match fault {
            Some(Fault::Silence | Fault::Drop) => continue,
            Some(Fault::Exception(code)) => vec![pdu[0] | 0x80, code],
            Some(Fault::Corrupt) | None => sim.process(pdu),
        };
        let mut out = Vec::with_capacity(response.len() + 3);
        out.push(unit_id);
        out.extend_from_slice(&response);
        let mut crc = crc16(&out);
        if fault == Some(Fault::Corrupt) {
            crc ^= 0x5A5A;
        }
        out.extend_from_slice(&crc.to_le_bytes());
        if let Some(line) = line {
            // The request crosses the line, a 3.5-character silence, the answer crosses it.
            let start = received.max(line_free);
            let done = start + line.chars(len as f64 + 3.5 + out.len() as f64);
            wait_until_precise(done).await;
            line_free = done + line.chars(3.5);
        }
        io.write_all(&out).await?;
        io.flush().await?;
    }
}
