//! Criterion benchmarks of the ring buffer (`src/buffer.rs`), in samples per second, for every
//! overflow policy:
//!
//! - `push_pop/<policy>`: a device-sized batch pushed into a buffer with room, then popped as
//!   one worker batch: the steady-state cost per sample of getting through the buffer.
//! - `push_full/<policy>`: a batch pushed into a full buffer, where the policy decides what
//!   gives (`drop_oldest` evicts, `drop_newest` discards). `block` would wait, so it has no
//!   such case.
//! - `try_push_all/<policy>`: HTTP ingest's all-or-nothing push of a 1,000-sample request,
//!   then a pop of the same size.
//!
//! ```text
//! cargo bench --bench buffer
//! ```
//!
//! Every call here completes without waiting, so the futures are polled once with
//! `now_or_never` instead of on a runtime: what is measured is the buffer, not a scheduler.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main,
};
use futures_util::FutureExt;
use telemetryhub::buffer::{OverflowPolicy, RingBuffer};
use telemetryhub::ledger::Source;
use telemetryhub::sample::{Labels, Sample};

/// Frames the device task pushes at most at once (`CHUNK_MAX` in `src/device/mod.rs`).
const DEVICE_BATCH: usize = 256;
/// Samples in one benchmark `POST /samples`.
const INGEST_BATCH: usize = 1000;
/// The benchmark gateway configuration's capacity.
const CAPACITY: usize = 100_000;

const POLICIES: [(OverflowPolicy, &str); 3] = [
    (OverflowPolicy::Block, "block"),
    (OverflowPolicy::DropOldest, "drop_oldest"),
    (OverflowPolicy::DropNewest, "drop_newest"),
];

fn samples(n: usize) -> Vec<Sample> {
    let (timestamp, received) = (SystemTime::now(), Instant::now());
    let labels = Labels::new("bench0", "arb.units", "value");
    (0..n)
        .map(|i| Sample {
            labels: labels.clone(),
            seq: Some(i as u32),
            value: 42.0 + i as f64 * 1e-3,
            timestamp,
            received,
            order: 0,
            source: Source::Device,
        })
        .collect()
}

fn push(buffer: &RingBuffer, batch: &mut VecDeque<Sample>) {
    buffer
        .push(Source::Device, batch)
        .now_or_never()
        .expect("a push into a buffer with room (or a dropping policy) never waits");
}

fn pop(buffer: &RingBuffer, max: usize) -> Vec<Sample> {
    buffer
        .pop(max)
        .now_or_never()
        .expect("a pop from a non-empty buffer never waits")
        .expect("the buffer is open")
}

/// A benchmark group counting `elements` per iteration, with short warm-up and measurement.
fn group<'a>(c: &'a mut Criterion, name: &str, elements: usize) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .throughput(Throughput::Elements(elements as u64))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    group
}

fn push_pop(c: &mut Criterion) {
    let template = samples(DEVICE_BATCH);
    let mut group = group(c, "push_pop", DEVICE_BATCH);
    for (policy, name) in POLICIES {
        let buffer = RingBuffer::new(CAPACITY, policy);
        group.bench_function(name, |b| {
            b.iter_batched(
                || VecDeque::from(template.clone()),
                |mut batch| {
                    push(&buffer, &mut batch);
                    pop(&buffer, DEVICE_BATCH)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn push_full(c: &mut Criterion) {
    let template = samples(DEVICE_BATCH);
    let mut group = group(c, "push_full", DEVICE_BATCH);
    for (policy, name) in POLICIES {
        if policy == OverflowPolicy::Block {
            continue;
        }
        let buffer = RingBuffer::new(CAPACITY, policy);
        // Filled as a device fills it, a batch at a time, so the queue's allocation grows as
        // in the gateway. (Filled in one push, the queue adopts that allocation and nothing
        // large is ever freed; glibc then keeps its default trim threshold and every
        // iteration's frees give pages back that the next iteration faults in again, which
        // doubled this benchmark's time.)
        for batch in samples(CAPACITY).chunks(DEVICE_BATCH) {
            push(&buffer, &mut VecDeque::from(batch.to_vec()));
        }
        assert_eq!(buffer.len(), CAPACITY);
        group.bench_function(name, |b| {
            b.iter_batched(
                || VecDeque::from(template.clone()),
                |mut batch| push(&buffer, &mut batch),
                BatchSize::SmallInput,
            )
        });
        assert_eq!(buffer.len(), CAPACITY, "{name} stays full");
    }
    group.finish();
}

fn try_push_all(c: &mut Criterion) {
    let mut template = samples(INGEST_BATCH);
    template.iter_mut().for_each(|s| s.source = Source::Ingest);
    let mut group = group(c, "try_push_all", INGEST_BATCH);
    for (policy, name) in POLICIES {
        let buffer = RingBuffer::new(CAPACITY, policy);
        group.bench_function(name, |b| {
            b.iter_batched(
                || template.clone(),
                |batch| {
                    buffer
                        .try_push_all(Source::Ingest, batch, CAPACITY * 8 / 10)
                        .expect("an empty buffer takes the batch");
                    pop(&buffer, INGEST_BATCH)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, push_pop, push_full, try_push_all);
criterion_main!(benches);
