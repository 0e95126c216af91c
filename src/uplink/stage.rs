//! The spool stage: processed batches from the worker threads become uplink messages and are
//! appended to the spool, in the order the dispatcher took them from the buffer.
//!
//! Workers encode their own batch (in parallel, on their blocking threads) and hand it over
//! with the sequence number the dispatcher gave it. One writer thread puts batches back in that
//! order, appends every batch that is ready in one call (group commit: one write, and with
//! `fsync = "always"` one `fdatasync`, for all of them), and then publishes how far the spool
//! is settled, as a watermark on the buffer's arrival order. `POST /samples` waits on that
//! watermark, so its 202 means "in the spool" (durable, with `"always"`).
//!
//! Backpressure: at most `capacity` encoded batches wait for the writer; a worker that would
//! exceed it waits, so a spool that is full (`when_full = "block"`) backs up into the worker
//! stage and from there into the ring buffer, whose own overflow policy applies.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, warn};

use super::payload::{Encoder, envelope};
use crate::buffer::RingBuffer;
use crate::sample::ProcessedSample;
use crate::spool::record::HEADER_LEN;
use crate::spool::{Append, Fsync, SpoolError, SpoolWriter};

/// Longest wait of the writer between looks at its work, to keep syncing on time.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// How many ranges of orders that failed to reach the spool are remembered for waiters
/// (adjacent failures merge into one range, so this is many failed batches).
const FAILURES_KEPT: usize = 65_536;

/// One batch, encoded.
struct Encoded {
    /// Envelopes, back to back.
    bytes: Vec<u8>,
    /// Each record: (end in `bytes`, samples in it).
    records: Vec<(usize, u32)>,
    /// Samples in all records.
    samples: u64,
}

enum Item {
    Encoded(Encoded),
    /// The batch's worker panicked: nothing to write, but the order moves on.
    Lost,
}

struct Queue {
    /// The sequence number the writer needs next.
    next: u64,
    /// Batches that arrived, by sequence number, with the buffer orders they covered.
    waiting: BTreeMap<u64, (Range<u64>, Item)>,
    closed: bool,
}

/// How far the spool is settled, for `POST /samples`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Every sample with a buffer order below this has been spooled or has failed.
    pub through: u64,
    /// The stage stopped: nothing more will settle.
    pub closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The writer waits here for the next batch.
    ready: Condvar,
    /// Workers wait here for room.
    room: Condvar,
    capacity: usize,
    encoder: Encoder,
    max_batch: usize,
    buffer: Arc<RingBuffer>,
    settled: watch::Sender<Settled>,
    /// Order ranges whose samples did not reach the spool (newest last).
    failures: Mutex<VecDeque<Range<u64>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; recover from poisoning anyway.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The workers' handle on the stage.
#[derive(Clone)]
pub struct SpoolStage {
    shared: Arc<Shared>,
}

/// The writer thread, joined at shutdown.
pub struct StageWriter {
    thread: std::thread::JoinHandle<SpoolWriter>,
}

impl SpoolStage {
    /// Starts the writer thread on `writer`.
    pub fn start(
        writer: SpoolWriter,
        fsync: Fsync,
        encoder: Encoder,
        max_batch: u32,
        capacity: usize,
        buffer: Arc<RingBuffer>,
    ) -> std::io::Result<(SpoolStage, StageWriter)> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                next: 0,
                waiting: BTreeMap::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
            capacity: capacity.max(1),
            encoder,
            max_batch: max_batch.max(1) as usize,
            buffer,
            settled: watch::channel(Settled::default()).0,
            failures: Mutex::new(VecDeque::new()),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".to_owned())
            .spawn(move || write_loop(&thread_shared, writer, fsync))?;
        Ok((SpoolStage { shared }, StageWriter { thread }))
    }

    /// Encodes a processed batch and hands it to the writer; blocks while the writer has
    /// `capacity` batches waiting. Call it from the worker's blocking thread.
    pub fn submit(&self, seq: u64, orders: Range<u64>, processed: &[ProcessedSample]) {
        let encoded = self.encode(processed);
        self.put(seq, orders, Item::Encoded(encoded));
    }

    /// Marks a batch whose worker failed: it settles with nothing written.
    pub fn skip(&self, seq: u64, orders: Range<u64>) {
        self.put(seq, orders, Item::Lost);
    }

    fn put(&self, seq: u64, orders: Range<u64>, item: Item) {
        let mut queue = self.shared.lock();
        // The batch the writer needs next always gets in, or nothing could ever move; so does
        // a lost batch, which holds nothing and is settled from the async dispatcher, which
        // must never wait here.
        let lost = matches!(item, Item::Lost);
        while !lost
            && queue.waiting.len() >= self.shared.capacity
            && seq != queue.next
            && !queue.closed
        {
            queue = self
                .shared
                .room
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
        }
        queue.waiting.insert(seq, (orders, item));
        drop(queue);
        self.shared.ready.notify_one();
    }

    fn encode(&self, processed: &[ProcessedSample]) -> Encoded {
        let mut encoded = Encoded {
            bytes: Vec::with_capacity(processed.len() * 96),
            records: Vec::new(),
            samples: processed.len() as u64,
        };
        let mut push = |device: &str, samples: &[ProcessedSample]| {
            let topic = self.shared.encoder.topic(device);
            for chunk in samples.chunks(self.shared.max_batch) {
                envelope(&topic, &mut encoded.bytes, |out| {
                    self.shared.encoder.payload(device, chunk, out)
                });
                encoded
                    .records
                    .push((encoded.bytes.len(), chunk.len() as u32));
            }
        };
        // Batches come in runs of one device; each run is one or more messages.
        let mut start = 0;
        while start < processed.len() {
            let device = &processed[start].labels.device;
            let end = processed[start..]
                .iter()
                .position(|s| s.labels.device != *device)
                .map_or(processed.len(), |i| start + i);
            push(device, &processed[start..end]);
            start = end;
        }
        encoded
    }

    /// How far the spool is settled, to wait on.
    pub fn settled(&self) -> watch::Receiver<Settled> {
        self.shared.settled.subscribe()
    }

    /// Whether any sample with an order in `orders` failed to reach the spool (its worker
    /// panicked, or the spool was closed or failed). Valid once `orders` has settled.
    pub fn failed(&self, orders: &Range<u64>) -> bool {
        let failures = self
            .shared
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failures
            .iter()
            .any(|f| f.start < orders.end && orders.start < f.end)
    }

    /// Stops taking batches once the ones already submitted are written.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        self.shared.room.notify_all();
    }
}

impl StageWriter {
    /// Waits for the writer thread to finish (after [`SpoolStage::close`]) and hands back the
    /// spool's writer, for a last sync once the forwarder has stopped.
    pub fn join(self) -> Option<SpoolWriter> {
        match self.thread.join() {
            Ok(writer) => Some(writer),
            Err(_) => {
                error!("The spool writer thread panicked.");
                None
            }
        }
    }
}

/// Tells `POST /samples` waiters that nothing more will settle, however the writer ends (a
/// panic included), so none of them waits for good.
struct ClosedOnDrop<'a>(&'a watch::Sender<Settled>);

impl Drop for ClosedOnDrop<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|s| s.closed = true);
    }
}

fn write_loop(shared: &Shared, mut writer: SpoolWriter, fsync: Fsync) -> SpoolWriter {
    let _closed = ClosedOnDrop(&shared.settled);
    let interval = match fsync {
        Fsync::Always => IDLE_TICK,
        Fsync::Interval(every) => every,
    };
    let mut last_sync = Instant::now();
    loop {
        let (batch, closed) = take_ready(shared, last_sync + interval);
        if !batch.is_empty() {
            write(shared, &mut writer, batch, closed);
        }
        if last_sync.elapsed() >= interval || closed {
            if let Err(err) = writer.sync() {
                error!(error = %err, "Cannot sync the spool.");
            }
            last_sync = Instant::now();
        }
        if closed {
            break;
        }
    }
    writer
}

/// Waits until the next batch is there (or `until`), then takes every batch that is ready in
/// order. Also says whether the stage is closed and drained.
fn take_ready(shared: &Shared, until: Instant) -> (Vec<(Range<u64>, Item)>, bool) {
    let mut queue = shared.lock();
    loop {
        let next = queue.next;
        if queue.waiting.contains_key(&next) {
            break;
        }
        if queue.closed {
            // Whatever waits is written now, past any batch that never came (a worker still
            // busy when shutdown stopped waiting): `write` marks that one's orders failed.
            let rest: Vec<_> = std::mem::take(&mut queue.waiting).into_values().collect();
            return (rest, true);
        }
        let now = Instant::now();
        if now >= until {
            return (Vec::new(), false);
        }
        queue = shared
            .ready
            .wait_timeout(queue, (until - now).min(IDLE_TICK))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    let mut taken = Vec::new();
    loop {
        let next = queue.next;
        let Some(item) = queue.waiting.remove(&next) else {
            break;
        };
        taken.push(item);
        queue.next += 1;
    }
    drop(queue);
    shared.room.notify_all();
    (taken, false)
}

/// Appends `records` in groups of at most one segment's worth each (one write and, with
/// `"always"`, one `fdatasync` per group).
fn append_in_groups(writer: &mut SpoolWriter, records: &[Append<'_>]) -> Result<(), SpoolError> {
    let max = writer.max_append_bytes();
    let mut start = 0;
    while start < records.len() {
        let mut bytes = 0;
        let mut end = start;
        while end < records.len()
            && (end == start || bytes + records[end].payload.len() + HEADER_LEN <= max)
        {
            bytes += records[end].payload.len() + HEADER_LEN;
            end += 1;
        }
        writer.append(&records[start..end])?;
        start = end;
    }
    Ok(())
}

/// Writes `batch` (in order) and settles it. `closing`: the last write, which may pass over
/// batches that were never submitted; the orders between one written batch and the next are
/// then marked failed, so that no request whose samples were in a missing batch is told they
/// are in the spool. (Between batches otherwise lie only the orders of samples dropped for
/// overflow, which no request waits for.)
fn write(shared: &Shared, writer: &mut SpoolWriter, batch: Vec<(Range<u64>, Item)>, closing: bool) {
    let mut appends = Vec::new();
    let mut samples = 0u64;
    let mut through = 0u64;
    let mut lost = Vec::new();
    let mut written_through = shared.settled.borrow().through;
    for (orders, item) in &batch {
        if closing && orders.start > written_through {
            lost.push(written_through..orders.start);
        }
        written_through = written_through.max(orders.end);
        through = through.max(orders.end);
        match item {
            Item::Encoded(e) => {
                let mut start = 0;
                for &(end, count) in &e.records {
                    appends.push(Append {
                        payload: &e.bytes[start..end],
                        count,
                    });
                    start = end;
                }
                samples += e.samples;
            }
            Item::Lost => lost.push(orders.clone()),
        }
    }
    match append_in_groups(writer, &appends) {
        Ok(()) => shared.buffer.spool_settled(samples, 0),
        Err(err) => {
            match &err {
                SpoolError::Closed => {
                    warn!(
                        samples,
                        "The spool closed before these samples were written."
                    )
                }
                other => error!(samples, error = %other, "Cannot write to the spool."),
            }
            shared.buffer.spool_settled(0, samples);
            lost.extend(batch.iter().map(|(orders, _)| orders.clone()));
        }
    }
    if !lost.is_empty() {
        lost.sort_by_key(|range| range.start);
        let mut failures = shared.failures.lock().unwrap_or_else(|e| e.into_inner());
        for range in lost {
            match failures.back_mut() {
                // Batches settle in order: a failure right after the last one extends it.
                Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                _ => failures.push_back(range),
            }
        }
        while failures.len() > FAILURES_KEPT {
            failures.pop_front();
        }
    }
    shared
        .settled
        .send_modify(|s| s.through = s.through.max(through));
}
