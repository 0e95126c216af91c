//! Criterion benchmarks of the serial frame codec (`src/device/codec.rs`): encoding (what the
//! simulator does per frame) and decoding with checksum verification (one frame per call, and
//! as the device task does, a read's frames per call), in frames and in bytes per second.
//!
//! ```text
//! cargo bench --bench codec
//! ```
//!
//! The input is what the simulator sends: `$TH,<seq>,<42 + sin(seq/10) + noise>,arb.units*CC`;
//! `decode_channel` decodes the same frames naming a channel (`...,arb.units,temperature*CC`),
//! as a simulator with `channels` sends them.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use telemetryhub::device::codec::{
    Frame, FrameCodec, encode_channel_frame, encode_frame, parse_line,
};
use tokio_util::codec::Decoder;

/// Frames per iteration: a few reads' worth, like one `ready_chunks` batch of the device task.
const FRAMES: u32 = 4096;

/// Values like the simulator's.
fn value(seq: u32) -> f64 {
    42.0 + (f64::from(seq) / 10.0).sin() + f64::from(seq % 17) * 0.000_37
}

/// `FRAMES` encoded frames, back to back, as they sit in a link's read buffer.
fn wire() -> BytesMut {
    let mut buf = BytesMut::new();
    for seq in 0..FRAMES {
        encode_frame(seq, value(seq), "arb.units", &mut buf);
    }
    buf
}

/// The same frames, each naming channel `temperature`.
fn wire_with_channel() -> BytesMut {
    let mut buf = BytesMut::new();
    for seq in 0..FRAMES {
        encode_channel_frame(seq, value(seq), "arb.units", "temperature", &mut buf);
    }
    buf
}

fn encode(buf: &mut BytesMut) {
    buf.clear();
    for seq in 0..FRAMES {
        encode_frame(black_box(seq), black_box(value(seq)), "arb.units", buf);
    }
}

fn decode(mut src: BytesMut) -> u32 {
    let mut codec = FrameCodec::default();
    let mut n = 0;
    while let Some(frame) = codec.decode(&mut src).expect("decoding never fails") {
        if matches!(frame, Frame::Sample(_)) {
            n += 1;
        }
    }
    n
}

/// As the device task decodes: every complete frame of a read in one call, 256 at most per
/// call (its chunk size).
fn decode_batches(mut src: BytesMut) -> u32 {
    let mut codec = FrameCodec::default();
    let mut frames = Vec::with_capacity(256);
    let mut n = 0;
    loop {
        frames.clear();
        codec.decode_into(&mut src, &mut frames, 256);
        n += frames
            .iter()
            .filter(|f| matches!(f, Frame::Sample(_)))
            .count() as u32;
        if frames.len() < 256 {
            return n;
        }
    }
}

fn bench(c: &mut Criterion, unit: &str, throughput: impl Fn(u64) -> Throughput) {
    let wire = wire();
    let bytes = wire.len() as u64;
    let first_line = {
        let end = wire
            .iter()
            .position(|&b| b == b'\r')
            .expect("a frame ends in CRLF");
        wire[..end].to_vec()
    };
    assert_eq!(decode(wire.clone()), FRAMES, "every frame decodes");
    assert_eq!(decode_batches(wire.clone()), FRAMES, "every frame decodes");
    let named = wire_with_channel();
    assert_eq!(
        decode(named.clone()),
        FRAMES,
        "every frame naming a channel decodes"
    );

    let mut group = c.benchmark_group(format!("codec_{unit}"));
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    group.throughput(throughput(if unit == "frames" {
        u64::from(FRAMES)
    } else {
        bytes
    }));
    let mut out = BytesMut::with_capacity(wire.len());
    group.bench_function("encode", |b| b.iter(|| encode(&mut out)));
    group.bench_function("decode", |b| {
        b.iter_batched(|| wire.clone(), decode, BatchSize::SmallInput)
    });
    group.bench_function("decode_into", |b| {
        b.iter_batched(|| wire.clone(), decode_batches, BatchSize::SmallInput)
    });
    if unit == "frames" {
        // Per frame only: the frames are longer, so bytes per second would not compare.
        group.bench_function("decode_channel", |b| {
            b.iter_batched(|| named.clone(), decode, BatchSize::SmallInput)
        });
    }

    group.throughput(throughput(if unit == "frames" {
        1
    } else {
        first_line.len() as u64
    }));
    group.bench_function("parse_line", |b| {
        b.iter(|| parse_line(black_box(&first_line)).expect("the line is valid"))
    });
    group.finish();
}

fn frames(c: &mut Criterion) {
    bench(c, "frames", Throughput::Elements);
}

fn bytes(c: &mut Criterion) {
    bench(c, "bytes", Throughput::BytesDecimal);
}

criterion_group!(benches, frames, bytes);
criterion_main!(benches);
