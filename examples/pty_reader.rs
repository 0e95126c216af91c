//! A bare reader of a tty, for bounding what a reader can reach on the pty pair of the serial
//! measurement in `docs/PERFORMANCE.md` ("Sixth pass"): it reads `--bytes` bytes from `--path`
//! and prints one JSON line (bytes, reads, seconds, CPU), doing no more with them than `--mode`
//! says:
//!
//! - `multi`: tokio-serial on a multi-thread runtime (the gateway's arrangement before its
//!   pipeline got a thread of its own), bytes dropped;
//! - `current`: the same on a current-thread runtime;
//! - `decode`: `current`, and every frame decoded with the gateway's `FrameCodec`;
//! - `blocking`: the serialport crate's blocking reads (`ppoll`, then `read`) on this thread.
//!
//! ```text
//! cargo run --release --example pty_reader -- --path /tmp/ttyGW --bytes 358888890 --mode current
//! ```

use std::io::Read;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use telemetryhub::device::codec::FrameCodec;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::io::poll_read_buf;

/// Room for one read: more than a tty hands out at once.
const ROOM: usize = 64 * 1024;

struct Options {
    path: String,
    bytes: u64,
    mode: String,
}

fn parse_args() -> Result<Options, String> {
    let (mut path, mut bytes, mut mode) = (None, None, "current".to_owned());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--path" => path = Some(value()?),
            "--bytes" => bytes = Some(value()?.parse().map_err(|e| format!("--bytes: {e}"))?),
            "--mode" => mode = value()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Options {
        path: path.ok_or("--path is required")?,
        bytes: bytes.ok_or("--bytes is required")?,
        mode,
    })
}

/// What a run read.
#[derive(Default)]
struct Count {
    bytes: u64,
    reads: u64,
    frames: u64,
}

fn main() -> Result<(), String> {
    let options = parse_args()?;
    let start = Instant::now();
    let count = match options.mode.as_str() {
        "blocking" => blocking(&options)?,
        "multi" => tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())?
            .block_on(readiness(&options, false))?,
        "current" | "decode" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(readiness(&options, options.mode == "decode"))?,
        other => return Err(format!("unknown mode {other}")),
    };
    let (user, system) =
        telemetryhub::metrics::process_cpu_times().ok_or("cannot read /proc/self/stat")?;
    println!(
        "{{\"mode\":\"{}\",\"bytes\":{},\"reads\":{},\"frames\":{},\"seconds\":{},\"user_s\":{user},\"system_s\":{system}}}",
        options.mode,
        count.bytes,
        count.reads,
        count.frames,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Reads as the gateway does: tokio-serial, readiness from the runtime's epoll.
async fn readiness(options: &Options, decode: bool) -> Result<Count, String> {
    let mut tty = tokio_serial::new(&options.path, 115_200)
        .open_native_async()
        .map_err(|e| format!("{}: {e}", options.path))?;
    let mut buf = BytesMut::with_capacity(ROOM);
    let mut codec = FrameCodec::new(256);
    let mut frames = Vec::new();
    let mut count = Count::default();
    while count.bytes < options.bytes {
        buf.reserve(ROOM);
        let read = std::future::poll_fn(|cx| poll_read_buf(Pin::new(&mut tty), cx, &mut buf));
        let n = read.await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        count.bytes += n as u64;
        count.reads += 1;
        if decode {
            codec.decode_into(&mut buf, &mut frames, usize::MAX);
            count.frames += frames.len() as u64;
            frames.clear();
        } else {
            buf.clear();
        }
    }
    Ok(count)
}

/// Blocking reads with a timeout, as the serialport crate does them.
fn blocking(options: &Options) -> Result<Count, String> {
    let mut tty = tokio_serial::new(&options.path, 115_200)
        .timeout(Duration::from_millis(100))
        .open_native()
        .map_err(|e| format!("{}: {e}", options.path))?;
    let mut buf = vec![0; ROOM];
    let mut count = Count::default();
    while count.bytes < options.bytes {
        match tty.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                count.bytes += n as u64;
                count.reads += 1;
            }
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {}
            Err(err) => return Err(err.to_string()),
        }
    }
    Ok(count)
}
