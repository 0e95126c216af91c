//! Modbus benchmarks (a plain program, `harness = false`), for docs/PERFORMANCE.md:
//!
//! - `tcp`: one device's register-block reads per second over Modbus TCP on loopback against
//!   our simulator, back to back (the device task's poll, without its sleep between polls).
//!   The simulator runs in a child process, so the two do not share a runtime.
//! - `fleet`: 100 Modbus TCP devices polled at 10 Hz by the real pipeline (device tasks,
//!   buffer, workers), the simulator in a child process; the gateway process's CPU time over
//!   the run, as a share of one core.
//! - `rtu`: polls per second over RTU at a paced 115 200 baud (the simulator paces its line
//!   like a UART, 8N1, 3.5-character gaps), against what the line allows for the request and
//!   answer sizes.
//!
//! Each prints the median of `MODBUS_BENCH_RUNS` runs (default 5) and every run, and round
//! trips per poll for ten contiguous channels.
//!
//! ```text
//! scripts/bench-modbus.sh          # = cargo bench --bench modbus
//! ```

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use telemetryhub::config::{
    ByteOrder, DataType, DeviceKind, DeviceSettings, RegisterSettings, SerialSettings, Settings,
    Table,
};
use telemetryhub::device::Connector;
use telemetryhub::device::modbus::TcpConnector;
use telemetryhub::device::modbus::link::{ModbusLink, ModbusMap};
use telemetryhub::device::modbus::sim::{Line, SimHandle, serve_rtu, serve_tcp};
use telemetryhub::pipeline::Pipeline;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Ten contiguous holding registers, one channel each: one request per poll.
fn ten_channels() -> Vec<RegisterSettings> {
    (0..10)
        .map(|a| RegisterSettings {
            unit: "u".to_owned(),
            byte_order: ByteOrder::Abcd,
            ..RegisterSettings::new(&format!("c{a}"), Table::Holding, a, DataType::Uint16)
        })
        .collect()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let mut fields = stat[close + 2..].split(' ').skip(11);
    let mut next = || {
        fields
            .next()
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (next() + next()) / 100.0
}

/// The child: serves Modbus TCP on 127.0.0.1:0, prints the port, exits when stdin closes.
fn serve_child() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("{}", listener.local_addr().expect("addr").port());
        std::io::stdout().flush().ok();
        let cancel = CancellationToken::new();
        tokio::spawn(serve_tcp(listener, SimHandle::default(), cancel.clone()));
        tokio::task::spawn_blocking(|| std::io::stdin().lines().count())
            .await
            .ok();
        cancel.cancel();
    });
}

/// A simulator in a child process; stops when dropped.
struct Child {
    child: std::process::Child,
    port: u16,
}

impl Child {
    fn spawn() -> Self {
        let mut child = Command::new(std::env::current_exe().expect("this program"))
            .arg("--serve-sim")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the simulator child starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the child prints its port");
        let port = line.trim().parse().expect("a port");
        Self { child, port }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn tcp_device(id: &str, port: u16) -> DeviceSettings {
    let mut device = DeviceSettings::modbus_tcp(id, &format!("127.0.0.1:{port}"), ten_channels());
    device.timeout_ms = Some(1000);
    device
}

/// Back-to-back polls of ten contiguous registers for `length`: (polls/s, requests per poll,
/// gateway CPU microseconds per poll).
async fn tcp_run(port: u16, length: Duration) -> (f64, f64, f64) {
    let settings = tcp_device("bench", port);
    let map = ModbusMap::for_device(&settings).expect("modbus");
    let mut connector = TcpConnector::new(format!("127.0.0.1:{port}"));
    let io = connector.connect().await.expect("connect");
    let mut link = ModbusLink::attach(io, map);
    let (start, cpu) = (Instant::now(), cpu_seconds());
    let mut polls = 0u64;
    while start.elapsed() < length {
        link.poll(&mut connector).await.expect("a poll");
        polls += 1;
    }
    let rate = polls as f64 / start.elapsed().as_secs_f64();
    let cpu_us = (cpu_seconds() - cpu) * 1e6 / polls as f64;
    (rate, link.requests as f64 / polls as f64, cpu_us)
}

/// 100 devices at 10 Hz through the real pipeline for `length`: (CPU share of one core,
/// samples read per second).
async fn fleet_run(port: u16, length: Duration) -> (f64, f64) {
    let mut settings = Settings::default();
    settings.buffer.capacity = 100_000;
    settings.devices = (0..100)
        .map(|i| {
            let mut d = tcp_device(&format!("plc{i}"), port);
            d.poll_interval_ms = Some(100);
            d
        })
        .collect();
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let pipeline = Pipeline::start(&settings, &tracker, &cancel, None, None);
    let read = |p: &Pipeline| {
        p.devices
            .load()
            .iter()
            .map(|d| d.counters().samples_read)
            .sum::<u64>()
    };
    tokio::time::sleep(Duration::from_secs(1)).await; // Connections open.
    let (cpu0, read0, t0) = (cpu_seconds(), read(&pipeline), Instant::now());
    tokio::time::sleep(length).await;
    let (cpu1, read1, elapsed) = (cpu_seconds(), read(&pipeline), t0.elapsed().as_secs_f64());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    pipeline.drain(deadline).await;
    ((cpu1 - cpu0) / elapsed, (read1 - read0) as f64 / elapsed)
}

/// A link that cannot be reopened: the RTU benchmark must not need to.
struct NoReconnect;

impl Connector for NoReconnect {
    type Io = tokio::io::DuplexStream;
    async fn connect(&mut self) -> std::io::Result<Self::Io> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Polls over RTU at `baud` (paced by the simulator on its own thread) for `length`.
fn rtu_run(baud: u32, length: Duration) -> (f64, f64) {
    let (gateway, device) = tokio::io::duplex(4096);
    let cancel = CancellationToken::new();
    let server = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            runtime.block_on(async move {
                let line = Line {
                    baud,
                    bits_per_char: 10,
                };
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = serve_rtu(device, SimHandle::default(), 1, Some(line)) => {}
                }
            });
        })
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let result = runtime.block_on(async move {
        let mut settings = tcp_device("rtu", 1);
        settings.kind = DeviceKind::ModbusRtu;
        settings.address = None;
        settings.serial = Some(SerialSettings::new("/dev/null"));
        let map = ModbusMap::for_device(&settings).expect("modbus");
        let mut link = ModbusLink::attach(gateway, map);
        let start = Instant::now();
        let mut polls = 0u64;
        while start.elapsed() < length {
            link.poll(&mut NoReconnect).await.expect("a poll");
            polls += 1;
        }
        (
            polls as f64 / start.elapsed().as_secs_f64(),
            link.requests as f64 / polls as f64,
        )
    });
    cancel.cancel();
    server.join().ok();
    result
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-sim") {
        return serve_child();
    }
    // `cargo bench` passes --bench. Test runners (`cargo test --all-targets`, nextest) run
    // bench targets too, asking for a `--list` of tests first: this program has none.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let runs: usize = std::env::var("MODBUS_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let only = std::env::var("MODBUS_BENCH").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    println!(
        "modbus benchmarks: median of {runs} runs (shared 2-core machine: wall-clock numbers are noisy)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");

    if want("tcp") {
        let sim = Child::spawn();
        // One device is one task: a current-thread runtime, as a device task would run alone.
        let single = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (mut rates, mut cpus) = (Vec::new(), Vec::new());
        let mut per_poll = 0.0;
        for _ in 0..runs {
            let (rate, rt, cpu) = single.block_on(tcp_run(sim.port, Duration::from_secs(2)));
            rates.push(rate);
            cpus.push(cpu);
            per_poll = rt;
        }
        let runs_text: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        let m = median(&mut rates);
        let cpu = median(&mut cpus);
        println!(
            "tcp: {m:.0} register-block reads/s from one device (10 registers each; target >= 20000: {}); gateway CPU {cpu:.1} us per read (a ceiling of {:.0} reads/s per core); round trips per poll {per_poll:.2}; runs {}",
            if m >= 20_000.0 { "met" } else { "NOT met" },
            1e6 / cpu,
            runs_text.join(" ")
        );
    }

    if want("fleet") {
        let sim = Child::spawn();
        let mut shares = Vec::new();
        let mut rate = 0.0;
        for _ in 0..runs.min(3) {
            let (share, read) = runtime.block_on(fleet_run(sim.port, Duration::from_secs(10)));
            shares.push(share * 100.0);
            rate = read;
        }
        let runs_text: Vec<String> = shares.iter().map(|s| format!("{s:.2}")).collect();
        let m = median(&mut shares);
        println!(
            "fleet: 100 devices x 10 Hz x 10 channels: gateway CPU {m:.2} % of one core (target < 5: {}); {rate:.0} samples/s read (expected 10000); runs {} %",
            if m < 5.0 { "met" } else { "NOT met" },
            runs_text.join(" ")
        );
    }

    if want("rtu") {
        let baud = 115_200;
        let line = Line {
            baud,
            bits_per_char: 10,
        };
        // Read 10 holding registers: request 8 bytes; answer 1 + 1 + 1 + 20 + 2 = 25 bytes.
        let allowed = line.max_polls_per_sec(8, 25);
        let mut rates = Vec::new();
        let mut per_poll = 0.0;
        for _ in 0..runs {
            let (rate, rt) = rtu_run(baud, Duration::from_secs(3));
            rates.push(rate);
            per_poll = rt;
        }
        let runs_text: Vec<String> = rates.iter().map(|r| format!("{r:.1}")).collect();
        let m = median(&mut rates);
        println!(
            "rtu: {m:.1} polls/s at {baud} baud 8N1; the line allows {allowed:.1} (8-byte request + 25-byte answer + 2 x 3.5-character gaps = 40 characters); {:.1} % (target >= 90: {}); round trips per poll {per_poll:.2}; runs {}",
            100.0 * m / allowed,
            if m >= 0.9 * allowed { "met" } else { "NOT met" },
            runs_text.join(" ")
        );
    }
}
