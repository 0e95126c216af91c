//! The device task polling a Modbus device: our simulator on the far end of an in-memory
//! duplex stream, in TCP and in RTU framing, with faults queued by the test. Time is paused:
//! timeouts and backoff are exact, and every wait is on a condition.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::DuplexStream;
use tokio_util::sync::CancellationToken;

use super::codec::Raw;
use super::sim::{Fault, SimHandle, serve_rtu, serve_tcp_connection};
use crate::buffer::{OverflowPolicy, RingBuffer};
use crate::config::{
    ByteOrder, DataType, DeviceKind, DeviceSettings, RegisterSettings, SerialSettings, Table,
};
use crate::device::state::DeviceState;
use crate::device::{Connector, DeviceHandle, DeviceTask, FailureCounts};
use crate::sample::Sample;

const DEADLINE: Duration = Duration::from_secs(600);

/// Opens a duplex stream to a fresh session of the simulator, as a TCP connect or a tty open.
struct SimLink {
    sim: SimHandle,
    rtu: bool,
    connects: Arc<AtomicUsize>,
}

impl Connector for SimLink {
    type Io = DuplexStream;

    async fn connect(&mut self) -> std::io::Result<DuplexStream> {
        self.connects.fetch_add(1, Ordering::Relaxed);
        let (gateway, device) = tokio::io::duplex(4096);
        let sim = self.sim.clone();
        if self.rtu {
            tokio::spawn(serve_rtu(device, sim, 1, None));
        } else {
            tokio::spawn(serve_tcp_connection(device, sim));
        }
        Ok(gateway)
    }
}

struct Running {
    handle: DeviceHandle,
    buffer: Arc<RingBuffer>,
    connects: Arc<AtomicUsize>,
    _cancel: tokio_util::sync::DropGuard,
}

impl Running {
    async fn take(&self, n: usize) -> Vec<Sample> {
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, async {
            while got.len() < n {
                got.extend(self.buffer.pop(n - got.len()).await.expect("open"));
            }
        })
        .await
        .expect("samples arrive");
        got
    }

    async fn wait(&self, what: &str, pred: impl Fn(&DeviceHandle) -> bool) {
        tokio::time::timeout(DEADLINE, async {
            while !pred(&self.handle) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: {:?}", self.handle.status()));
    }
}

fn device(kind: DeviceKind, registers: Vec<RegisterSettings>) -> DeviceSettings {
    let mut d = DeviceSettings::modbus_tcp("m", "127.0.0.1:1", registers);
    if kind == DeviceKind::ModbusRtu {
        d.kind = kind;
        d.address = None;
        d.serial = Some(SerialSettings::new("/dev/null"));
    }
    d.poll_interval_ms = Some(100);
    d.timeout_ms = Some(200);
    d.failure_threshold = 3;
    d
}

fn run(settings: &DeviceSettings, sim: &SimHandle) -> Running {
    let buffer = Arc::new(RingBuffer::new(10_000, OverflowPolicy::DropOldest));
    let cancel = CancellationToken::new();
    let connects = Arc::new(AtomicUsize::new(0));
    let link = SimLink {
        sim: sim.clone(),
        rtu: settings.kind == DeviceKind::ModbusRtu,
        connects: connects.clone(),
    };
    let (task, handle) = DeviceTask::new(settings, "modbus", link, buffer.clone(), cancel.clone());
    tokio::spawn(task.run());
    Running {
        handle,
        buffer,
        connects,
        _cancel: cancel.drop_guard(),
    }
}

fn reg(
    channel: &str,
    table: Table,
    address: u16,
    t: DataType,
    order: ByteOrder,
) -> RegisterSettings {
    RegisterSettings {
        byte_order: order,
        ..RegisterSettings::new(channel, table, address, t)
    }
}

/// Eight channels of every width and byte order, in one input block, one coil, one holding.
fn mixed_map(sim: &SimHandle) -> Vec<RegisterSettings> {
    use ByteOrder::*;
    use DataType::*;
    let rows = [
        ("t", Table::Input, 0, Int16, Abcd, Raw::Int(-215)),
        ("h", Table::Input, 1, Uint16, Badc, Raw::Uint(455)),
        ("p", Table::Input, 2, Float32, Abcd, Raw::Float(1013.25)),
        ("e", Table::Input, 4, Uint32, Cdab, Raw::Uint(3_000_000_000)),
        (
            "i64",
            Table::Input,
            6,
            Int64,
            Dcba,
            Raw::Int(-1_234_567_890_123),
        ),
        (
            "f64",
            Table::Input,
            10,
            Float64,
            Badc,
            Raw::Float(-0.000_123_456_789),
        ),
        ("pump", Table::Coil, 3, Bool, Abcd, Raw::Bool(true)),
        ("sp", Table::Holding, 20, Int32, Cdab, Raw::Int(-7)),
    ];
    rows.iter()
        .map(|&(channel, table, address, t, order, raw)| {
            sim.set(table, address, t, order, raw);
            reg(channel, table, address, t, order)
        })
        .collect()
}

async fn every_channel_decodes(kind: DeviceKind) {
    let sim = SimHandle::default();
    let mut registers = mixed_map(&sim);
    registers[0].scale = 0.1;
    registers[0].unit = "degC".to_owned();
    let dev = run(&device(kind, registers), &sim);
    let samples = dev.take(8).await;
    let got: Vec<(&str, f64, &str)> = samples
        .iter()
        .map(|s| (s.labels.channel.as_str(), s.value, s.labels.unit.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("t", -21.5, "degC"),
            ("h", 455.0, "arb.units"),
            ("p", 1013.25, "arb.units"),
            ("e", 3_000_000_000.0, "arb.units"),
            ("i64", -1_234_567_890_123.0, "arb.units"),
            ("f64", -0.000_123_456_789, "arb.units"),
            ("pump", 1.0, "arb.units"),
            ("sp", -7.0, "arb.units"),
        ]
    );
    assert!(
        samples
            .iter()
            .all(|s| s.labels.device == "m" && s.seq.is_none())
    );
    // The planner: holding 20..22, input 0..14, coil 3: three round trips for eight channels.
    assert_eq!(sim.requests(), 3);
    assert_eq!(dev.handle.state(), DeviceState::Measuring);
    // The next poll comes one interval later, with the same three requests.
    dev.take(8).await;
    assert_eq!(sim.requests(), 6);
}

#[tokio::test(start_paused = true)]
async fn every_channel_decodes_over_tcp_framing() {
    every_channel_decodes(DeviceKind::ModbusTcp).await;
}

#[tokio::test(start_paused = true)]
async fn every_channel_decodes_over_rtu_framing() {
    every_channel_decodes(DeviceKind::ModbusRtu).await;
}

#[tokio::test(start_paused = true)]
async fn ten_contiguous_channels_are_one_round_trip() {
    let sim = SimHandle::default();
    let registers = (0..10)
        .map(|a| {
            reg(
                &format!("c{a}"),
                Table::Holding,
                a,
                DataType::Uint16,
                ByteOrder::Abcd,
            )
        })
        .collect();
    let dev = run(&device(DeviceKind::ModbusTcp, registers), &sim);
    for poll in 1..=3 {
        dev.take(10).await;
        assert_eq!(sim.requests(), poll);
    }
}

async fn faults_feed_the_breaker(kind: DeviceKind) {
    let sim = SimHandle::default();
    let mut settings = device(kind, mixed_map(&sim));
    settings.retries = Some(0);
    let dev = run(&settings, &sim);
    dev.take(8).await;

    // Each fault is one failure of its kind; the next good poll recovers.
    for (fault, expected) in [
        (
            Fault::Exception(2),
            FailureCounts {
                exception: 1,
                ..Default::default()
            },
        ),
        (
            Fault::Exception(6),
            FailureCounts {
                exception: 2,
                ..Default::default()
            },
        ),
        (
            Fault::Silence,
            FailureCounts {
                exception: 2,
                timeout: 1,
                ..Default::default()
            },
        ),
        (
            Fault::Corrupt,
            FailureCounts {
                exception: 2,
                timeout: 1,
                invalid: 1,
                ..Default::default()
            },
        ),
    ] {
        sim.inject(fault, 1);
        dev.wait(&format!("{fault:?} counted"), |h| {
            h.counters().link_failures == expected
        })
        .await;
        let status = dev.handle.status();
        assert_eq!(status.state, DeviceState::Error, "{fault:?}");
        assert!(status.last_error.is_some());
        dev.wait("recovery", |h| h.state() == DeviceState::Measuring)
            .await;
    }
    if kind == DeviceKind::ModbusTcp {
        sim.inject(Fault::Drop, 1);
        dev.wait("drop counted", |h| h.counters().link_failures.closed == 1)
            .await;
        dev.wait("recovery", |h| h.state() == DeviceState::Measuring)
            .await;
    }

    // failure_threshold (3) failures in a row trip the breaker, and it stays tripped.
    sim.inject(Fault::Exception(6), 3);
    dev.wait("breaker trips", |h| h.state() == DeviceState::SafeState)
        .await;
    assert_eq!(dev.handle.status().consecutive_failures, 3);
    let polled = sim.requests();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(sim.requests(), polled, "a tripped device does not poll");
}

#[tokio::test(start_paused = true)]
async fn tcp_exceptions_timeouts_invalid_answers_and_drops_feed_the_breaker() {
    faults_feed_the_breaker(DeviceKind::ModbusTcp).await;
}

#[tokio::test(start_paused = true)]
async fn rtu_exceptions_timeouts_and_crc_errors_feed_the_breaker() {
    faults_feed_the_breaker(DeviceKind::ModbusRtu).await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_request_is_retried_on_a_new_connection() {
    let sim = SimHandle::default();
    let mut settings = device(DeviceKind::ModbusRtu, mixed_map(&sim));
    settings.retries = Some(2);
    let dev = run(&settings, &sim);
    dev.take(8).await;
    assert_eq!(dev.connects.load(Ordering::Relaxed), 1);
    // Two lost answers are absorbed by two retries, each on a rebuilt connection.
    sim.inject(Fault::Silence, 2);
    dev.take(8).await;
    assert_eq!(dev.connects.load(Ordering::Relaxed), 3);
    assert_eq!(
        dev.handle.counters().link_failures,
        FailureCounts::default()
    );
    assert_eq!(dev.handle.state(), DeviceState::Measuring);
}

#[tokio::test(start_paused = true)]
async fn writes_reach_writable_registers_only() {
    use crate::device::WriteError;
    use crate::device::modbus::link::{WriteRefused, WriteRequest};
    let sim = SimHandle::default();
    let mut registers = mixed_map(&sim);
    registers[6].writable = true; // coil 3
    registers[7].writable = true; // holding 20, int32 CDAB
    let dev = run(&device(DeviceKind::ModbusTcp, registers), &sim);
    dev.take(8).await;

    let write = |table, address, value| WriteRequest {
        table,
        address,
        value,
    };
    dev.handle
        .write(write(Table::Holding, 20, -100_000.0))
        .await
        .unwrap();
    // CDAB: low register first. -100000 = 0xFFFE7960.
    assert_eq!(sim.words(Table::Holding, 20, 2), [0x7960, 0xFFFE]);
    dev.handle.write(write(Table::Coil, 3, 0.0)).await.unwrap();
    let samples = dev.take(16).await;
    let last = |channel: &str| {
        samples
            .iter()
            .rev()
            .find(|s| s.labels.channel == channel)
            .unwrap()
            .value
    };
    assert_eq!((last("sp"), last("pump")), (-100_000.0, 0.0));

    // Refused without a request: not writable, not the start of a register, not a fit.
    let before = sim.requests();
    for (w, refused) in [
        (write(Table::Input, 0, 1.0), true),
        (write(Table::Holding, 21, 1.0), true),
        (write(Table::Holding, 20, 1.5), false),
        (write(Table::Coil, 3, 2.0), false),
    ] {
        let err = dev.handle.write(w).await.unwrap_err();
        match err {
            WriteError::Refused(WriteRefused::NotWritable { .. }) => assert!(refused, "{w:?}"),
            WriteError::Refused(WriteRefused::Value(_)) => assert!(!refused, "{w:?}"),
            other => panic!("{w:?}: {other}"),
        }
    }
    assert_eq!(sim.requests(), before);

    // The device's exception is its answer: reported, and the link keeps measuring.
    sim.inject(Fault::Exception(4), 1);
    let err = dev
        .handle
        .write(write(Table::Holding, 20, 1.0))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WriteError::Exception { code: 4, .. }),
        "{err}"
    );
    assert_eq!(dev.handle.state(), DeviceState::Measuring);
    assert_eq!(
        dev.handle.counters().link_failures,
        FailureCounts::default()
    );
}

/// Answers every request on the far end of a duplex stream with fixed bytes, then closes.
struct GarbageLink {
    answer: Vec<u8>,
}

impl Connector for GarbageLink {
    type Io = DuplexStream;

    async fn connect(&mut self) -> std::io::Result<DuplexStream> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (gateway, mut device) = tokio::io::duplex(4096);
        let answer = self.answer.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 256];
            if device.read(&mut request).await.is_ok() {
                let _ = device.write_all(&answer).await;
            }
            // Dropped: the gateway sees the end of the stream after the answer.
        });
        Ok(gateway)
    }
}

/// Polls a map of every width once against a device that answers `answer`: the outcome must be
/// samples or a failure, never a panic. This runs tokio-modbus's own response parser (RTU: CRC
/// check, resynchronisation, PDU decoding; TCP: MBAP header, PDU decoding), then our block
/// decoder on whatever it accepted.
fn poll_against(rtu: bool, answer: Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a test runtime");
    runtime.block_on(async move {
        use super::link::{ModbusLink, ModbusMap};
        let kind = if rtu {
            DeviceKind::ModbusRtu
        } else {
            DeviceKind::ModbusTcp
        };
        let registers = vec![
            reg("a", Table::Holding, 0, DataType::Int16, ByteOrder::Abcd),
            reg("b", Table::Holding, 1, DataType::Float64, ByteOrder::Dcba),
            reg("c", Table::Holding, 5, DataType::Uint32, ByteOrder::Cdab),
        ];
        let mut settings = device(kind, registers);
        settings.retries = Some(1);
        let map = ModbusMap::for_device(&settings).expect("a Modbus device");
        let mut link = GarbageLink { answer };
        let io = link.connect().await.expect("duplex");
        let mut modbus = ModbusLink::attach(io, map);
        if let Ok(samples) = modbus.poll(&mut link).await {
            assert_eq!(samples.len(), 3);
        }
    });
}

fn with_crc(body: &[u8]) -> Vec<u8> {
    let mut frame = body.to_vec();
    frame.extend_from_slice(&super::sim::crc16(body).to_le_bytes());
    frame
}

mod garbage {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn rtu_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            poll_against(true, bytes);
        }

        /// Frames that pass the CRC, so the PDU parser itself sees the garbage: any function
        /// code, any byte count, truncated or too long.
        #[test]
        fn rtu_garbage_with_a_valid_crc_never_panics(
            function in prop::sample::select(vec![3u8, 0x83, 4, 1, 6, 16, 0x2B, 0]),
            body in prop::collection::vec(any::<u8>(), 0..260),
        ) {
            let mut frame = vec![1, function];
            frame.extend_from_slice(&body);
            poll_against(true, with_crc(&frame));
        }

        #[test]
        fn tcp_garbage_never_panics(
            header in prop::collection::vec(any::<u8>(), 0..8),
            body in prop::collection::vec(any::<u8>(), 0..260),
        ) {
            let mut answer = header;
            answer.extend_from_slice(&body);
            poll_against(false, answer);
        }

        /// Well-formed MBAP headers (transaction 1, the first request's) around garbage PDUs.
        #[test]
        fn tcp_garbage_pdus_never_panic(
            function in prop::sample::select(vec![3u8, 0x83, 4, 6, 0]),
            body in prop::collection::vec(any::<u8>(), 0..254),
        ) {
            let len = (body.len() + 2) as u16;
            let mut answer = vec![0, 1, 0, 0];
            answer.extend_from_slice(&len.to_be_bytes());
            answer.extend_from_slice(&[1, function]);
            answer.extend_from_slice(&body);
            poll_against(false, answer);
        }
    }

    #[test]
    fn a_short_answer_is_a_failure_not_a_panic() {
        // A valid read answer with fewer registers than asked for: tokio-modbus hands it over
        // (its debug_assert aside), and our decoder must refuse it.
        poll_against(true, with_crc(&[1, 3, 2, 0, 1]));
    }
}

/// Opens links whose device first sends `stale` (a late answer to an earlier request) a few
/// milliseconds after the open, then serves normally.
struct StaleLink {
    sim: SimHandle,
    stale: Vec<u8>,
    opened: usize,
}

impl Connector for StaleLink {
    type Io = DuplexStream;

    async fn connect(&mut self) -> std::io::Result<DuplexStream> {
        use tokio::io::AsyncWriteExt;
        self.opened += 1;
        let (gateway, mut device) = tokio::io::duplex(4096);
        let (sim, stale, first) = (self.sim.clone(), self.stale.clone(), self.opened == 1);
        tokio::spawn(async move {
            if !first {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = device.write_all(&stale).await;
            }
            let _ = serve_rtu(device, sim, 1, None).await;
        });
        Ok(gateway)
    }
}

#[tokio::test(start_paused = true)]
async fn an_rtu_retry_waits_out_a_late_answer() {
    use super::link::{ModbusLink, ModbusMap};
    let sim = SimHandle::default();
    let registers = vec![
        reg("a", Table::Holding, 0, DataType::Uint16, ByteOrder::Abcd),
        reg("b", Table::Holding, 1, DataType::Uint16, ByteOrder::Abcd),
    ];
    sim.set(
        Table::Holding,
        1,
        DataType::Uint16,
        ByteOrder::Abcd,
        Raw::Uint(7),
    );
    let mut settings = device(DeviceKind::ModbusRtu, registers);
    settings.retries = Some(1);
    let map = ModbusMap::for_device(&settings).expect("modbus");
    // A late answer of the same function with one register: taken for the retry's answer, it
    // would be refused as short (or, worse, decoded).
    let stale = with_crc(&[1, 3, 2, 0x12, 0x34]);
    let mut link = StaleLink {
        sim: sim.clone(),
        stale,
        opened: 0,
    };
    let io = link.connect().await.unwrap();
    let mut modbus = ModbusLink::attach(io, map);
    sim.inject(Fault::Silence, 1);
    let samples = modbus.poll(&mut link).await.expect("the retry succeeds");
    assert_eq!(
        samples.iter().map(|s| s.value).collect::<Vec<_>>(),
        [0.0, 7.0]
    );
    assert_eq!(link.opened, 2);
}
