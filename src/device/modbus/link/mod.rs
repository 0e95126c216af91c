//! An open Modbus link: a `tokio-modbus` client context over the byte stream the device's
//! [`Connector`](crate::device::Connector) opened (a TCP connection, a tty), polled for the
//! register map on the device's interval. The device task drives it exactly as it drives a
//! frame link: each poll yields samples or a [`ModbusFailure`], which feeds the shared state
//! machine, breaker, backoff and counters.
//!
//! tokio-modbus has no request timeout (its issue #113): every call here is wrapped in the
//! device's `timeout_ms`. After any failed request the context is rebuilt on a fresh
//! connection, since a late answer would otherwise be taken for the next request's.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tracing::debug;

use super::codec::{self, Raw};
use super::plan::{ReadBlock, plan};
use crate::config::{DataType, DeviceKind, DeviceSettings, RegisterSettings, Table};
use crate::device::Connector;
use crate::ledger::Source;
use crate::sample::{Labels, Sample};

mod transport;

use self::transport::{Closed, Seen, Transport};

/// A device's register map and polling, from its settings.
#[derive(Debug)]
pub struct ModbusMap {
    rtu: bool,
    unit_id: u8,
    /// The registers, in configuration order.
    pub registers: Vec<RegisterSettings>,
    /// The requests one poll makes.
    pub blocks: Vec<ReadBlock>,
    /// The labels of each register's samples, in configuration order.
    channels: Vec<Arc<Labels>>,
    timeout: Duration,
    retries: u32,
    interval: Duration,
}

impl ModbusMap {
    /// The map of a Modbus device; `None` for other kinds.
    pub fn for_device(settings: &DeviceSettings) -> Option<Arc<Self>> {
        if !settings.is_modbus() {
            return None;
        }
        Some(Arc::new(Self {
            rtu: settings.kind == DeviceKind::ModbusRtu,
            unit_id: settings.modbus_unit_id(),
            blocks: plan(&settings.registers),
            channels: settings
                .registers
                .iter()
                .map(|r| Labels::new(&settings.id, &r.unit, &r.channel))
                .collect(),
            registers: settings.registers.clone(),
            timeout: settings.modbus_timeout(),
            retries: settings.modbus_retries(),
            interval: settings.interval(),
        }))
    }

    /// Round trips one poll makes.
    pub fn requests_per_poll(&self) -> usize {
        self.blocks.len()
    }
}

/// Why a Modbus request failed, for the breaker and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModbusFailure {
    /// No answer within `timeout_ms`.
    Timeout,
    /// The device answered with a Modbus exception.
    Exception(ExceptionCode),
    /// An answer that does not decode (CRC, garbage, a mismatched header or function). On
    /// RTU, tokio-modbus skips a frame whose CRC fails and waits on: a request that times out
    /// after answer bytes arrived counts here, not as a timeout.
    Invalid,
    /// The other end closed the connection.
    Closed,
    /// Another I/O error.
    Io,
}

/// The outcome of one request, after its retries.
pub type Outcome<T> = Result<T, (ModbusFailure, String)>;

/// A write asked for by an operator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteRequest {
    /// `holding` or `coil`.
    pub table: Table,
    /// The register's (first) address.
    pub address: u16,
    /// The value, before encoding to the register's data type.
    pub value: f64,
}

/// Why a write was refused before reaching the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteRefused {
    /// No writable register starts at that address.
    #[error(
        "{table} {address} is not a writable register of this device (the register map must mark it writable = true)"
    )]
    NotWritable {
        /// The table.
        table: &'static str,
        /// The address.
        address: u16,
    },
    /// The value does not fit the register's type.
    #[error("{0}")]
    Value(String),
}

impl ModbusMap {
    /// The registers a write to `table`/`address` of `value` becomes, or why it is refused:
    /// only the start of a register the map marks writable is accepted, and the value must
    /// fit its data type.
    pub fn check_write(&self, w: &WriteRequest) -> Result<(DataType, Vec<u16>), WriteRefused> {
        let reg = self
            .registers
            .iter()
            .find(|r| r.writable && r.table == w.table && r.address == u32::from(w.address))
            .ok_or(WriteRefused::NotWritable {
                table: w.table.as_str(),
                address: w.address,
            })?;
        let raw = codec::from_f64(reg.data_type, w.value)
            .map_err(|e| WriteRefused::Value(e.to_string()))?;
        let words = match raw {
            Raw::Bool(b) => vec![u16::from(b)],
            raw => codec::encode(reg.data_type, reg.byte_order, raw)
                .map_err(|e| WriteRefused::Value(e.to_string()))?,
        };
        Ok((reg.data_type, words))
    }
}

/// An open Modbus link.
pub struct ModbusLink {
    ctx: Context,
    /// What the current connection's transport saw.
    seen: Arc<Seen>,
    map: Arc<ModbusMap>,
    next_poll: Instant,
    /// Round trips made, for the benchmark's round trips per poll.
    pub requests: u64,
    /// A request is on the wire. Still set at the next call, the request's future was dropped
    /// before its answer came (the device task serves a command in the middle of a poll):
    /// its answer may still arrive and be taken for the next request's, so the connection is
    /// rebuilt first.
    in_flight: bool,
}

impl ModbusLink {
    /// A client context on `io`, speaking TCP or RTU framing as the device's kind says; the
    /// first poll is due at once.
    pub fn attach<Io>(io: Io, map: Arc<ModbusMap>) -> Self
    where
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let seen = Arc::new(Seen::default());
        Self {
            ctx: context(io, &map, &seen),
            seen,
            map,
            next_poll: Instant::now(),
            requests: 0,
            in_flight: false,
        }
    }

    /// When the next poll is due.
    pub fn next_poll(&self) -> Instant {
        self.next_poll
    }

    /// Reads every block of the map once, retrying a failed request on a new connection from
    /// `reconnect`, and returns the samples, one per register, stamped with one time.
    pub async fn poll<C: Connector>(&mut self, connector: &mut C) -> Outcome<Vec<Sample>> {
        self.resync(connector).await?;
        let now = Instant::now();
        // Fixed rate, but a poll that overran does not cause a burst of catch-up polls.
        self.next_poll = (self.next_poll + self.map.interval).max(now);
        let map = self.map.clone();
        let mut values = vec![0.0; map.registers.len()];
        for block in &map.blocks {
            let answer = self.read_block(block, connector).await?;
            decode_block(&map, block, &answer, &mut values)
                .map_err(|e| (ModbusFailure::Invalid, e))?;
        }
        let (timestamp, received) = (SystemTime::now(), std::time::Instant::now());
        Ok(values
            .into_iter()
            .zip(&map.channels)
            .map(|(value, labels)| Sample {
                labels: labels.clone(),
                seq: None,
                value,
                timestamp,
                received,
                order: 0,
                source: Source::Device,
            })
            .collect())
    }

    async fn read_block<C: Connector>(
        &mut self,
        block: &ReadBlock,
        connector: &mut C,
    ) -> Outcome<Answer> {
        let mut attempt = 0;
        loop {
            self.requests += 1;
            let (start, count) = (block.start, block.count);
            let ctx = &mut self.ctx;
            self.in_flight = true;
            // `Client::call`, not the `Reader` helpers: those `debug_assert` the answer's
            // length, so a short answer from a device would panic a debug build. The block
            // decoder checks lengths instead.
            let request = match block.table {
                Table::Holding => Request::ReadHoldingRegisters(start, count),
                Table::Input => Request::ReadInputRegisters(start, count),
                Table::Coil => Request::ReadCoils(start, count),
                Table::Discrete => Request::ReadDiscreteInputs(start, count),
            };
            let result = call(self.map.timeout, ctx.call(request))
                .await
                .and_then(|response| match response {
                    Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words) => {
                        Ok(Answer::Words(words))
                    }
                    Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => {
                        Ok(Answer::Bits(bits))
                    }
                    other => Err(unexpected(&other)),
                });
            self.in_flight = false;
            let result = result.map_err(|(failure, message)| {
                let answered = self.seen.answer_bytes.load(Ordering::Relaxed);
                if self.seen.eof.load(Ordering::Relaxed) {
                    let message = "connection closed by the device".to_owned();
                    (ModbusFailure::Closed, message)
                } else if failure == ModbusFailure::Timeout && answered > 0 {
                    let message = format!(
                        "{answered} bytes of answer that never decoded (a CRC error, or garbage)"
                    );
                    (ModbusFailure::Invalid, message)
                } else {
                    (failure, message)
                }
            });
            match result {
                Ok(answer) => return Ok(answer),
                // An exception is the device's considered answer: asking again will not change it.
                Err(failure @ (ModbusFailure::Exception(_), _)) => return Err(failure),
                Err(failure) if attempt >= self.map.retries => return Err(failure),
                Err(_) => {
                    attempt += 1;
                    self.rebuild(connector).await?;
                }
            }
        }
    }

    /// Rebuilds the connection if a request was abandoned on it.
    async fn resync<C: Connector>(&mut self, connector: &mut C) -> Outcome<()> {
        if self.in_flight {
            debug!("A Modbus request was abandoned; reconnecting before the next one.");
            self.rebuild(connector).await?;
            self.in_flight = false;
        }
        Ok(())
    }

    /// A fresh connection and context, after a failed request.
    async fn rebuild<C: Connector>(&mut self, connector: &mut C) -> Outcome<()> {
        // Drop the old connection first: a serial port may be opened only once.
        self.ctx = context(Closed, &self.map, &self.seen);
        self.seen = Arc::new(Seen::default());
        match tokio::time::timeout(self.map.timeout, connector.connect()).await {
            Ok(Ok(mut io)) => {
                if self.map.rtu {
                    // RTU has no transaction ids: a late answer to the failed request, still on
                    // the line, would be taken for the retry's. Wait for the line to go quiet.
                    drain_until_quiet(&mut io, self.map.timeout).await;
                }
                self.ctx = context(io, &self.map, &self.seen);
                Ok(())
            }
            Ok(Err(err)) => Err((ModbusFailure::Io, format!("reconnecting: {err}"))),
            Err(_) => Err((ModbusFailure::Timeout, "reconnecting timed out".to_owned())),
        }
    }

    /// Writes `words` (or one coil) to the register `w` names; the caller checked it against
    /// the map with [`ModbusMap::check_write`]. Not retried: a write that timed out may have
    /// been carried out.
    pub async fn write<C: Connector>(
        &mut self,
        connector: &mut C,
        w: &WriteRequest,
        data_type: DataType,
        words: &[u16],
    ) -> Outcome<()> {
        self.resync(connector).await?;
        self.requests += 1;
        let timeout = self.map.timeout;
        let ctx = &mut self.ctx;
        // The task runs a write to its end (it is not a select! branch): no in-flight mark.
        // `Client::call` and our own check of the echo: the `Writer` helpers `debug_assert` it.
        let (request, echo) = match (data_type, words) {
            (DataType::Bool, [bit]) => (
                Request::WriteSingleCoil(w.address, *bit != 0),
                Response::WriteSingleCoil(w.address, *bit != 0),
            ),
            (_, [word]) => (
                Request::WriteSingleRegister(w.address, *word),
                Response::WriteSingleRegister(w.address, *word),
            ),
            _ => (
                Request::WriteMultipleRegisters(w.address, Cow::Borrowed(words)),
                Response::WriteMultipleRegisters(w.address, words.len() as u16),
            ),
        };
        let response = call(timeout, ctx.call(request)).await?;
        if response == echo {
            Ok(())
        } else {
            Err(unexpected(&response))
        }
    }
}

/// How long an RTU line must stay silent before a retry: well past a late answer's bytes.
const RTU_QUIET: Duration = Duration::from_millis(20);

/// Reads and discards until the line has been silent for [`RTU_QUIET`], at most `limit`.
async fn drain_until_quiet<Io: AsyncRead + Unpin>(io: &mut Io, limit: Duration) {
    use tokio::io::AsyncReadExt;
    let mut scratch = [0u8; 256];
    let drain = async {
        while let Ok(Ok(n)) = tokio::time::timeout(RTU_QUIET, io.read(&mut scratch)).await {
            if n == 0 {
                break;
            }
            debug!(bytes = n, "Discarded a late answer before retrying.");
        }
    };
    let _ = tokio::time::timeout(limit, drain).await;
}

fn unexpected(response: &Response) -> (ModbusFailure, String) {
    (
        ModbusFailure::Invalid,
        format!("unexpected answer {response:?}"),
    )
}

/// A block's answer.
enum Answer {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

fn context<Io>(io: Io, map: &ModbusMap, seen: &Arc<Seen>) -> Context
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slave = Slave(map.unit_id);
    let io = Transport {
        io,
        seen: seen.clone(),
    };
    if map.rtu {
        tokio_modbus::client::rtu::attach_slave(io, slave)
    } else {
        tokio_modbus::client::tcp::attach_slave(io, slave)
    }
}

/// One tokio-modbus call, bounded by `timeout`, its three layers of result folded into one.
async fn call<T>(
    timeout: Duration,
    request: impl Future<Output = tokio_modbus::Result<T>>,
) -> Outcome<T> {
    match tokio::time::timeout(timeout, request).await {
        Err(_) => Err((
            ModbusFailure::Timeout,
            format!("no answer within {timeout:?}"),
        )),
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(code))) => Err((
            ModbusFailure::Exception(code),
            format!("modbus exception: {code}"),
        )),
        Ok(Err(tokio_modbus::Error::Protocol(err))) => {
            Err((ModbusFailure::Invalid, err.to_string()))
        }
        Ok(Err(tokio_modbus::Error::Transport(err))) => {
            use std::io::ErrorKind::*;
            let failure = match err.kind() {
                UnexpectedEof | BrokenPipe | ConnectionReset | ConnectionAborted | NotConnected => {
                    ModbusFailure::Closed
                }
                InvalidData => ModbusFailure::Invalid,
                _ => ModbusFailure::Io,
            };
            Err((failure, err.to_string()))
        }
    }
}

/// Decodes each register of `block` from its answer into `values` (scaled and offset).
fn decode_block(
    map: &ModbusMap,
    block: &ReadBlock,
    answer: &Answer,
    values: &mut [f64],
) -> Result<(), String> {
    for &i in &block.members {
        let reg = &map.registers[i];
        let at = block.offset(reg.start());
        let width = usize::from(reg.data_type.width());
        let raw = match answer {
            Answer::Words(words) => {
                let slice = words
                    .get(at..at + width)
                    .ok_or_else(|| short(block, words.len()))?;
                codec::decode(reg.data_type, reg.byte_order, slice).map_err(|e| e.to_string())?
            }
            Answer::Bits(bits) => Raw::Bool(*bits.get(at).ok_or_else(|| short(block, bits.len()))?),
        };
        values[i] = raw.as_f64() * reg.scale + reg.offset;
    }
    Ok(())
}

fn short(block: &ReadBlock, got: usize) -> String {
    format!(
        "asked for {} {} items from {}, got {got}",
        block.count,
        block.table.as_str(),
        block.start
    )
}
