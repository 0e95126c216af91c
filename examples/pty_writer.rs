//! Plays a fast serial device for the pty throughput measurement in `docs/PERFORMANCE.md`:
//! writes valid `$TH,<seq>,<value>,<unit>*CC\r\n` frames, sequence numbers 0, 1, 2, ..., to a
//! tty path (one end of a `socat` pty pair; the gateway reads the other end as a
//! `kind = "serial"` device) as fast as the tty takes them, then prints one JSON line.
//!
//! ```text
//! cargo run --release --example pty_writer -- --path /tmp/ttyDEV --frames 20000000
//! ```
//!
//! Frames are built by hand rather than with `telemetryhub::device::codec::encode_frame` so the
//! writer costs as little CPU as possible on a 2-core machine where it competes with the gateway
//! and socat: writing to /dev/null, about 60M frames/s this way against about 4M/s with
//! `encode_frame` (which formats an arbitrary f64), i.e. 2 % instead of 35 % of a core at the
//! gateway's 1.5M frames/s. A unit test checks they are byte-for-byte what the codec writes.

use std::io::Write;
use std::time::Instant;

/// Frames built per `write_all`.
const CHUNK_FRAMES: u64 = 2048;
/// The fixed part of every frame after the sequence number.
const TAIL: &[u8] = b",42.500000,arb.units";

struct Options {
    path: String,
    frames: u64,
}

fn parse_args() -> Result<Options, String> {
    let mut path = None;
    let mut frames = 10_000_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--path" => path = Some(value()?),
            "--frames" => frames = value()?.parse().map_err(|e| format!("--frames: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Options {
        path: path.ok_or("--path is required")?,
        frames,
    })
}

/// Appends frame `seq` to `out`: `$TH,<seq>,42.500000,arb.units*CC\r\n`.
fn push_frame(seq: u64, tail_sum: u8, out: &mut Vec<u8>) {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(seq).as_bytes();
    let sum = digits
        .iter()
        .fold(b'T' ^ b'H' ^ b',' ^ tail_sum, |a, &b| a ^ b);
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(b"$TH,");
    out.extend_from_slice(digits);
    out.extend_from_slice(TAIL);
    out.extend_from_slice(&[
        b'*',
        HEX[usize::from(sum >> 4)],
        HEX[usize::from(sum & 15)],
        b'\r',
        b'\n',
    ]);
}

fn main() {
    let options = match parse_args() {
        Ok(options) => options,
        Err(err) => {
            eprintln!("pty_writer: {err}");
            std::process::exit(2);
        }
    };
    let mut tty = match std::fs::OpenOptions::new().write(true).open(&options.path) {
        Ok(tty) => tty,
        Err(err) => {
            eprintln!("pty_writer: cannot open {}: {err}", options.path);
            std::process::exit(1);
        }
    };
    let tail_sum = TAIL.iter().fold(0, |a, &b| a ^ b);
    let mut buf = Vec::with_capacity(CHUNK_FRAMES as usize * 40);
    let mut bytes = 0u64;
    let started = Instant::now();
    let mut seq = 0;
    while seq < options.frames {
        buf.clear();
        let end = (seq + CHUNK_FRAMES).min(options.frames);
        for s in seq..end {
            // The gateway's sequence numbers are u32: wrap like a device would.
            push_frame(s & u64::from(u32::MAX), tail_sum, &mut buf);
        }
        if let Err(err) = tty.write_all(&buf) {
            eprintln!("pty_writer: write failed after {seq} frames: {err}");
            std::process::exit(1);
        }
        bytes += buf.len() as u64;
        seq = end;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{{\"frames\":{},\"bytes\":{bytes},\"seconds\":{seconds:.3},\"frames_per_sec\":{:.0}}}",
        options.frames,
        options.frames as f64 / seconds
    );
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use telemetryhub::device::codec::encode_frame;

    use super::*;

    #[test]
    fn frames_match_the_codec() {
        let tail_sum = TAIL.iter().fold(0, |a, &b| a ^ b);
        for seq in [0u32, 7, 42, 1_000_000, u32::MAX] {
            let mut ours = Vec::new();
            push_frame(u64::from(seq), tail_sum, &mut ours);
            let mut codec = BytesMut::new();
            encode_frame(seq, 42.5, "arb.units", &mut codec);
            assert_eq!(ours, &codec[..], "seq {seq}");
        }
    }
}
