//! The Modbus simulator: a small Modbus TCP and RTU server of our own (not tokio-modbus's, so
//! the gateway's client and this server do not share a parser and cannot hide each other's
//! bugs), serving a register bank with changing values and injected faults: exceptions, no
//! answer, dropped connections, invalid answers and, on RTU, a corrupted CRC. On RTU it paces
//! its line like a UART at the configured baud, 3.5-character gaps included.
//!
//! `telemetryhub simulate --modbus-tcp ADDR | --modbus-rtu PATH` runs it; the tests and
//! `telemetryhub bench --modbus` drive it in-process through a [`SimHandle`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::codec::{self, Raw};
use crate::config::{ByteOrder, DataType, Table};
use crate::device::sim::SplitMix64;

/// Items per table: reads beyond it are answered with exception 2 (illegal data address).
pub const BANK_SIZE: usize = 4096;
/// Longest request ADU read before the buffer is dropped as garbage.
const MAX_ADU: usize = 260;

mod serve;

pub use self::serve::{Line, crc16, serve_rtu, serve_tcp, serve_tcp_connection};

/// A fault the simulator can play on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this exception code (2 illegal address, 6 device busy, ...).
    Exception(u8),
    /// Read the request and never answer it.
    Silence,
    /// Close the connection instead of answering (TCP), or go quiet (RTU).
    Drop,
    /// Answer with a corrupted CRC (RTU) or a mismatched transaction id (TCP).
    Corrupt,
}

/// The probability, per request, of each random fault; all 0 by default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultRates {
    /// Exception 6 (server device busy).
    pub exception: f64,
    /// No answer.
    pub silence: f64,
    /// Dropped connection.
    pub drop: f64,
    /// Corrupted answer (CRC on RTU).
    pub corrupt: f64,
}

#[derive(Debug)]
struct State {
    holding: Vec<u16>,
    input: Vec<u16>,
    coils: Vec<bool>,
    discrete: Vec<bool>,
    queued: VecDeque<Fault>,
    rates: FaultRates,
    rng: SplitMix64,
    requests: u64,
    /// Holding registers that refuse writes with exception 4 (server device failure).
    protected: Vec<u16>,
}

/// A shared handle on the simulator's bank and faults: set registers, queue faults, count
/// requests. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SimHandle {
    state: Arc<Mutex<State>>,
}

impl Default for SimHandle {
    fn default() -> Self {
        Self::new(FaultRates::default(), 1)
    }
}

impl SimHandle {
    /// An all-zero bank with random faults at `rates`, seeded with `seed` (0: from the clock).
    pub fn new(rates: FaultRates, seed: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                holding: vec![0; BANK_SIZE],
                input: vec![0; BANK_SIZE],
                coils: vec![false; BANK_SIZE],
                discrete: vec![false; BANK_SIZE],
                queued: VecDeque::new(),
                rates,
                rng: SplitMix64::new(seed),
                requests: 0,
                protected: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `value` as `data_type` in `order` at `address` of `table` (a bool table takes
    /// 0 or 1). Panics on a value that does not fit: a test or start-up error.
    pub fn set(&self, table: Table, address: u16, data_type: DataType, order: ByteOrder, raw: Raw) {
        let mut s = self.lock();
        let at = usize::from(address);
        match (table, raw) {
            (Table::Coil, Raw::Bool(b)) => s.coils[at] = b,
            (Table::Discrete, Raw::Bool(b)) => s.discrete[at] = b,
            (Table::Holding | Table::Input, raw) => {
                let words = codec::encode(data_type, order, raw).expect("a value that fits");
                let bank = if table == Table::Holding {
                    &mut s.holding
                } else {
                    &mut s.input
                };
                bank[at..at + words.len()].copy_from_slice(&words);
            }
            _ => panic!("{raw:?} does not fit the {} table", table.as_str()),
        }
    }

    /// The registers at `address..address + n` of a register table.
    pub fn words(&self, table: Table, address: u16, n: usize) -> Vec<u16> {
        let s = self.lock();
        let bank = if table == Table::Holding {
            &s.holding
        } else {
            &s.input
        };
        bank[usize::from(address)..usize::from(address) + n].to_vec()
    }

    /// Plays `fault` on each of the next `count` requests.
    pub fn inject(&self, fault: Fault, count: usize) {
        self.lock().queued.extend(std::iter::repeat_n(fault, count));
    }

    /// Makes writes to holding register `address` fail with exception 4, as a device whose
    /// register is locked; reads still work.
    pub fn protect(&self, address: u16) {
        self.lock().protected.push(address);
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    /// Moves the example map's values (see `config/modbus-example.toml`), as a live device
    /// would: temperature, humidity, pressure and an energy counter.
    pub fn tick(&self, step: u64) {
        let t = step as f64 / 10.0;
        let temperature = (215.0 + 20.0 * t.sin()).round() as i64;
        let humidity = (455.0 + 50.0 * (t / 3.0).cos()).round() as u64;
        self.set(
            Table::Input,
            0,
            DataType::Int16,
            ByteOrder::Abcd,
            Raw::Int(temperature),
        );
        self.set(
            Table::Input,
            1,
            DataType::Uint16,
            ByteOrder::Abcd,
            Raw::Uint(humidity),
        );
        self.set(
            Table::Input,
            2,
            DataType::Float32,
            ByteOrder::Abcd,
            Raw::Float(1013.25 + (t / 7.0).sin()),
        );
        self.set(
            Table::Input,
            4,
            DataType::Uint32,
            ByteOrder::Cdab,
            // A meter that rolls over at 2^32.
            Raw::Uint(step.wrapping_mul(7).wrapping_add(100_000) % (1 << 32)),
        );
    }

    /// The fault for the request just received, if any, and counts it.
    pub(super) fn next_fault(&self) -> Option<Fault> {
        let mut s = self.lock();
        s.requests += 1;
        if let Some(fault) = s.queued.pop_front() {
            return Some(fault);
        }
        let rates = s.rates;
        let roll = s.rng.next_f64();
        let mut edge = 0.0;
        for (rate, fault) in [
            (rates.exception, Fault::Exception(6)),
            (rates.silence, Fault::Silence),
            (rates.drop, Fault::Drop),
            (rates.corrupt, Fault::Corrupt),
        ] {
            edge += rate;
            if roll < edge {
                return Some(fault);
            }
        }
        None
    }

    /// The answer PDU to a request PDU: the data asked for, or an exception.
    pub fn process(&self, pdu: &[u8]) -> Vec<u8> {
        let mut s = self.lock();
        match answer(&mut s, pdu) {
            Ok(response) => response,
            Err(code) => vec![pdu.first().copied().unwrap_or(0) | 0x80, code],
        }
    }
}

fn u16_at(pdu: &[u8], at: usize) -> Result<u16, u8> {
    pdu.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(3)
}

/// The answer to one request PDU, or an exception code.
fn answer(s: &mut State, pdu: &[u8]) -> Result<Vec<u8>, u8> {
    let function = *pdu.first().ok_or(1)?;
    let address = usize::from(u16_at(pdu, 1)?);
    let value = u16_at(pdu, 3)?;
    let quantity = usize::from(value);
    let in_bank = |n: usize| address + n <= BANK_SIZE;
    if matches!(function, 6 | 16) {
        let n = if function == 6 { 1 } else { quantity };
        if s.protected
            .iter()
            .any(|&p| (address..address + n).contains(&usize::from(p)))
        {
            return Err(4);
        }
    }
    match function {
        1 | 2 => {
            if !(1..=2000).contains(&quantity) {
                return Err(3);
            }
            if !in_bank(quantity) {
                return Err(2);
            }
            let bits = if function == 1 { &s.coils } else { &s.discrete };
            let mut out = vec![function, quantity.div_ceil(8) as u8];
            for chunk in bits[address..address + quantity].chunks(8) {
                out.push(
                    chunk
                        .iter()
                        .enumerate()
                        .fold(0u8, |byte, (i, &b)| byte | (u8::from(b) << i)),
                );
            }
            Ok(out)
        }
        3 | 4 => {
            if !(1..=125).contains(&quantity) {
                return Err(3);
            }
            if !in_bank(quantity) {
                return Err(2);
            }
            let words = if function == 3 { &s.holding } else { &s.input };
            let mut out = vec![function, (quantity * 2) as u8];
            for word in &words[address..address + quantity] {
                out.extend_from_slice(&word.to_be_bytes());
            }
            Ok(out)
        }
        5 => {
            if !in_bank(1) {
                return Err(2);
            }
            s.coils[address] = match value {
                0xFF00 => true,
                0x0000 => false,
                _ => return Err(3),
            };
            Ok(pdu[..5].to_vec())
        }
        6 => {
            if !in_bank(1) {
                return Err(2);
            }
            s.holding[address] = value;
            Ok(pdu[..5].to_vec())
        }
        15 | 16 => {
            let count = usize::from(*pdu.get(5).ok_or(3)?);
            let data = pdu.get(6..6 + count).ok_or(3)?;
            let fits = if function == 15 {
                (1..=1968).contains(&quantity) && count == quantity.div_ceil(8)
            } else {
                (1..=123).contains(&quantity) && count == quantity * 2
            };
            if !fits {
                return Err(3);
            }
            if !in_bank(quantity) {
                return Err(2);
            }
            if function == 15 {
                for i in 0..quantity {
                    s.coils[address + i] = data[i / 8] & (1 << (i % 8)) != 0;
                }
            } else {
                for (i, pair) in data.chunks_exact(2).enumerate() {
                    s.holding[address + i] = u16::from_be_bytes([pair[0], pair[1]]);
                }
            }
            Ok(pdu[..5].to_vec())
        }
        _ => Err(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_specifications_example() {
        // Read 2 holding registers from 0x0000 of unit 1: 01 03 00 00 00 02, CRC C4 0B.
        assert_eq!(
            crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x02]).to_le_bytes(),
            [0xC4, 0x0B]
        );
    }

    #[test]
    fn reads_writes_and_exceptions() {
        let sim = SimHandle::default();
        sim.set(
            Table::Holding,
            10,
            DataType::Uint32,
            ByteOrder::Abcd,
            Raw::Uint(0x0001_0002),
        );
        assert_eq!(sim.process(&[3, 0, 10, 0, 2]), [3, 4, 0, 1, 0, 2]);
        assert_eq!(sim.process(&[6, 0, 10, 0, 7]), [6, 0, 10, 0, 7]);
        assert_eq!(sim.words(Table::Holding, 10, 1), [7]);
        assert_eq!(sim.process(&[5, 0, 3, 0xFF, 0]), [5, 0, 3, 0xFF, 0]);
        assert_eq!(sim.process(&[1, 0, 0, 0, 9]), [1, 2, 0b1000, 0]);
        assert_eq!(
            sim.process(&[16, 0, 1, 0, 1, 2, 0xAB, 0xCD]),
            [16, 0, 1, 0, 1]
        );
        assert_eq!(sim.words(Table::Holding, 1, 1), [0xABCD]);
        // Past the bank: illegal data address; too many: illegal data value; unknown: 1.
        assert_eq!(sim.process(&[3, 0x0F, 0xFF, 0, 2]), [0x83, 2]);
        assert_eq!(sim.process(&[4, 0, 0, 0, 126]), [0x84, 3]);
        assert_eq!(sim.process(&[0x2B]), [0xAB, 3]);
        assert_eq!(sim.process(&[0x41, 0, 0, 0, 1]), [0xC1, 1]);
        assert_eq!(sim.process(&[]), [0x80, 1]);
        sim.protect(12);
        assert_eq!(sim.process(&[6, 0, 12, 0, 1]), [0x86, 4]);
        assert_eq!(sim.process(&[16, 0, 11, 0, 2, 4, 0, 1, 0, 2]), [0x90, 4]);
        assert_eq!(sim.process(&[3, 0, 12, 0, 1]), [3, 2, 0, 0]);
    }

    /// Feeds `bytes` to a server, then closes the stream; returns what the server wrote.
    fn serve_garbage(rtu: bool, bytes: Vec<u8>) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let sim = SimHandle::default();
            let serving = tokio::spawn(async move {
                if rtu {
                    serve_rtu(server, sim, 1, None).await
                } else {
                    serve_tcp_connection(server, sim).await
                }
            });
            let _ = client.write_all(&bytes).await;
            client.shutdown().await.ok();
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            // Its I/O result does not matter here; a panic would be a JoinError.
            let _ = serving.await.expect("the server does not panic");
            out
        })
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics_the_servers(
            rtu in proptest::bool::ANY,
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
        ) {
            serve_garbage(rtu, bytes);
        }
    }

    #[test]
    fn an_empty_mbap_frame_is_hung_up_on() {
        assert!(serve_garbage(false, vec![0, 1, 0, 0, 0, 0, 1, 3, 0, 0]).is_empty());
        let read = vec![0, 1, 0, 0, 0, 6, 1, 3, 0, 0, 0, 1];
        assert_eq!(
            serve_garbage(false, read),
            [0, 1, 0, 0, 0, 5, 1, 3, 2, 0, 0]
        );
    }

    #[test]
    fn line_rate_counts_the_gaps() {
        let line = Line {
            baud: 115_200,
            bits_per_char: 10,
        };
        // 8-byte request, 25-byte answer, two 3.5-character gaps: 40 characters, 400 bits.
        let polls = line.max_polls_per_sec(8, 25);
        assert!((polls - 288.0).abs() < 0.01, "{polls}");
    }
}
