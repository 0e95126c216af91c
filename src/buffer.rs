//! The bounded ring buffer between the sources (device tasks, HTTP ingest) and the dispatcher.
//!
//! Producers push batches; the dispatcher pops batches. When the buffer is full, the configured
//! [`OverflowPolicy`] decides what gives. Waiters are woken through [`Notify`], never by polling.
//! The buffer also owns the [`Ledger`], updated under the same lock as the queue, so the sample
//! accounting is exact at every moment.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::ledger::{BatchOutcome, DropReason, Ledger, Source};
use crate::sample::Sample;

/// What happens to a sample that arrives when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Evict the oldest queued sample to make room. Keeps the freshest data and never slows a
    /// device down; loses history under sustained overload (counted as `overflow`).
    #[default]
    DropOldest,
    /// Discard the arriving sample. Keeps what is queued intact; loses the newest data under
    /// overload (counted as `overflow`).
    DropNewest,
    /// Make the producer wait for room. Loses nothing, but a slow worker stage backs up into
    /// the device link (a UART's FIFO then overruns in hardware, outside our counters).
    Block,
}

impl OverflowPolicy {
    /// The policy's name, as in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DropOldest => "drop_oldest",
            Self::DropNewest => "drop_newest",
            Self::Block => "block",
        }
    }
}

impl std::fmt::Display for OverflowPolicy {
    /// The name as in the config (`drop_oldest`), so logs show what users write.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why [`RingBuffer::try_push_all`] refused a batch. Nothing of a refused batch is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The buffer is closed for shutdown.
    #[error("the buffer is closed")]
    Closed,
    /// The batch is larger than the buffer's capacity: it can never be taken.
    #[error("{n} samples can never fit in a buffer of {capacity}")]
    TooLarge {
        /// Samples in the batch.
        n: usize,
        /// The buffer's capacity.
        capacity: usize,
    },
    /// The buffer holds its high watermark or more; retry once it has drained.
    #[error("the buffer holds {depth} samples, at or above its high watermark of {high_watermark}")]
    AboveWatermark {
        /// Samples queued.
        depth: usize,
        /// The depth at which batches are refused.
        high_watermark: usize,
    },
    /// The batch does not fit beside what is queued; retry once it has drained.
    #[error("the buffer has room for {room} samples, not {n}")]
    NoRoom {
        /// Samples in the batch.
        n: usize,
        /// Free places in the buffer.
        room: usize,
    },
}

struct Inner {
    queue: VecDeque<Sample>,
    closed: bool,
    ledger: Ledger,
}

/// Removes up to `n` of the oldest samples read from devices; samples accepted over HTTP stay.
/// Returns how many were removed. Touches only the queue up to the `n`-th device sample (and
/// in the usual case of a front made of device samples only, just drains it).
fn evict_device_samples(queue: &mut VecDeque<Sample>, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    if queue.iter().take(n).all(|s| s.source == Source::Device) {
        let n = n.min(queue.len());
        queue.drain(..n);
        return n;
    }
    // Where the n-th device sample is: only the queue up to there is rebuilt.
    let Some(end) = queue
        .iter()
        .enumerate()
        .filter(|(_, s)| s.source == Source::Device)
        .map(|(i, _)| i + 1)
        .take(n)
        .last()
    else {
        return 0;
    };
    // Taking from the front of a ring buffer and putting back there is O(end), not O(len).
    let mut front: Vec<Sample> = queue.drain(..end).collect();
    front.retain(|s| s.source != Source::Device);
    let removed = end - front.len();
    for sample in front.into_iter().rev() {
        queue.push_front(sample);
    }
    removed
}

/// A whole queue as a batch: its allocation becomes the `Vec` (a move of the samples only when
/// the ring had wrapped), given back down to size when a past backlog left it much larger.
fn whole_queue(queue: VecDeque<Sample>) -> Vec<Sample> {
    let mut batch = Vec::from(queue);
    if batch.capacity() > 4 * batch.len().max(64) {
        batch.shrink_to_fit();
    }
    batch
}

/// A bounded, multi-producer sample queue with an overflow policy and exact accounting.
pub struct RingBuffer {
    inner: Mutex<Inner>,
    capacity: usize,
    policy: OverflowPolicy,
    /// Signalled when samples arrive or the buffer closes.
    readable: Notify,
    /// Signalled when room appears (for `Block`) or the buffer closes.
    writable: Notify,
}

impl RingBuffer {
    /// An empty buffer holding at most `capacity` samples.
    ///
    /// Memory follows the queue, never beyond `capacity` samples: it grows with the queue (or
    /// is a producer's batch, handed over whole when it is at most `capacity` samples), a pop
    /// that takes everything queued takes the allocation along, and nothing is reserved up
    /// front: a generous capacity costs nothing until it is used (reserving 1e9 samples aborted
    /// on a 104 GB allocation).
    pub fn new(capacity: usize, policy: OverflowPolicy) -> Self {
        assert!(capacity > 0, "capacity is validated to be at least 1");
        Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                closed: false,
                ledger: Ledger::default(),
            }),
            capacity,
            policy,
            readable: Notify::new(),
            writable: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No code panics while holding this lock, so poisoning cannot happen; recover anyway.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most samples the buffer holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The overflow policy.
    pub fn policy(&self) -> OverflowPolicy {
        self.policy
    }

    /// Samples waiting now.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether no sample is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A consistent copy of the accounting.
    pub fn ledger(&self) -> Ledger {
        self.lock().ledger
    }

    /// Moves samples from the front of `samples` into the buffer, applying the overflow policy.
    ///
    /// With `Block`, waits for room. Cancel-safe: whatever is still in `samples` when the future
    /// is dropped was not accepted, and the caller must account for it with [`Self::discard`].
    /// If the buffer closes, the rest is counted as accepted and dropped for `shutdown`.
    pub async fn push(&self, source: Source, samples: &mut VecDeque<Sample>) {
        loop {
            let mut writable = pin!(self.writable.notified());
            writable.as_mut().enable();
            {
                let mut inner = self.lock();
                if inner.closed {
                    let n = samples.drain(..).count() as u64;
                    inner.ledger.arrive(source, n);
                    inner.ledger.discard(n, DropReason::Shutdown);
                    return;
                }
                self.push_locked(&mut inner, source, samples);
            }
            self.readable.notify_one();
            if samples.is_empty() {
                return;
            }
            writable.await;
        }
    }

    /// Pushes all of `samples` if they fit beside what is queued, without evicting or dropping
    /// any sample, whatever the overflow policy, and only while the buffer holds less than
    /// `high_watermark`; otherwise takes none of them. Used by HTTP ingest, which turns refusal
    /// into backpressure for its client instead of waiting: the overflow policy is for sources
    /// that cannot be pushed back (device links).
    ///
    /// So the largest batch that can ever be taken is [`Self::capacity`] (into an empty buffer,
    /// which is always below its high watermark of at least 1).
    pub fn try_push_all(
        &self,
        source: Source,
        samples: Vec<Sample>,
        high_watermark: usize,
    ) -> Result<std::ops::Range<u64>, PushError> {
        let n = samples.len();
        let orders = {
            let mut inner = self.lock();
            if inner.closed {
                return Err(PushError::Closed);
            }
            if n > self.capacity {
                return Err(PushError::TooLarge {
                    n,
                    capacity: self.capacity,
                });
            }
            let depth = inner.queue.len();
            if depth >= high_watermark {
                return Err(PushError::AboveWatermark {
                    depth,
                    high_watermark,
                });
            }
            let room = self.capacity - depth;
            if n > room {
                return Err(PushError::NoRoom { n, room });
            }
            let mut samples = VecDeque::from(samples);
            let first = self.push_locked(&mut inner, source, &mut samples);
            debug_assert!(
                samples.is_empty(),
                "the batch fits, so every policy takes it"
            );
            first..first + n as u64
        };
        self.readable.notify_one();
        Ok(orders)
    }

    /// Makes room in the queue's allocation for `n` more samples: by doubling, as `VecDeque`
    /// would, so growth is amortised, but never past `capacity` samples.
    fn grow_for(&self, queue: &mut VecDeque<Sample>, n: usize) {
        let needed = queue.len() + n;
        if needed > queue.capacity() {
            let target = needed.max(queue.capacity() * 2).min(self.capacity);
            queue.reserve_exact(target.max(needed) - queue.len());
        }
    }

    /// Moves the first `n` of `samples` (all of them, or as many as fit) to the back of `queue`.
    ///
    /// All of them into an empty queue (the usual case: the dispatcher takes everything queued,
    /// allocation included) is a swap: the producer's allocation becomes the queue, and then the
    /// batch, with no copy, no reallocation and no fresh pages to fault in. Taken only when that
    /// allocation is within `capacity` samples, so memory stays within it. Otherwise all of them
    /// as a block copy (`VecDeque::append`: two `memcpy`s), or one move per sample.
    fn move_front(&self, queue: &mut VecDeque<Sample>, samples: &mut VecDeque<Sample>, n: usize) {
        let all = n == samples.len();
        if all && queue.is_empty() && samples.capacity() <= self.capacity {
            std::mem::swap(queue, samples);
            return;
        }
        self.grow_for(queue, n);
        if all {
            queue.append(samples);
        } else {
            queue.extend(samples.drain(..n));
        }
    }

    /// Pushes what fits under the policy; with `Block`, leaves the rest in `samples`.
    ///
    /// Returns the arrival order given to the first sample (each next one gets the next).
    fn push_locked(
        &self,
        inner: &mut Inner,
        source: Source,
        samples: &mut VecDeque<Sample>,
    ) -> u64 {
        let first = inner.ledger.pushed + inner.ledger.dropped.overflow;
        for (i, sample) in samples.iter_mut().enumerate() {
            sample.order = first + i as u64;
            debug_assert_eq!(
                sample.source, source,
                "the ledger counts what statistics show"
            );
        }
        let room = self.capacity - inner.queue.len();
        match self.policy {
            OverflowPolicy::Block => {
                let n = room.min(samples.len());
                self.move_front(&mut inner.queue, samples, n);
                inner.ledger.arrive(source, n as u64);
                inner.ledger.enqueue(n as u64);
            }
            OverflowPolicy::DropNewest => {
                let n = room.min(samples.len());
                self.move_front(&mut inner.queue, samples, n);
                let dropped = samples.drain(..).count() as u64;
                inner.ledger.arrive(source, n as u64 + dropped);
                inner.ledger.enqueue(n as u64);
                inner.ledger.discard(dropped, DropReason::Overflow);
            }
            OverflowPolicy::DropOldest => {
                let n = samples.len() as u64;
                // Samples that would be evicted by later ones in the same batch never enter.
                let skip = samples.len().saturating_sub(self.capacity);
                samples.drain(..skip);
                let evict = (inner.queue.len() + samples.len()).saturating_sub(self.capacity);
                let evicted = evict_device_samples(&mut inner.queue, evict);
                // Queued HTTP samples were promised (202) and are never evicted: when they
                // leave too little room, the oldest arriving samples give way instead.
                let short = evict - evicted;
                samples.drain(..short);
                let kept = samples.len();
                self.move_front(&mut inner.queue, samples, kept);
                let lost = (skip + short) as u64;
                inner.ledger.arrive(source, n);
                inner.ledger.discard(lost, DropReason::Overflow);
                inner.ledger.enqueue(n - lost);
                inner.ledger.evict(evicted as u64, DropReason::Overflow);
            }
        }
        first
    }

    /// Waits until samples are available and takes up to `max` of them, oldest first.
    /// Returns `None` once the buffer is closed and empty. Cancel-safe.
    pub async fn pop(&self, max: usize) -> Option<Vec<Sample>> {
        loop {
            let mut readable = pin!(self.readable.notified());
            readable.as_mut().enable();
            {
                let mut inner = self.lock();
                if !inner.queue.is_empty() {
                    let n = max.min(inner.queue.len());
                    inner.ledger.dequeue(n as u64);
                    // Everything queued: the queue's allocation leaves with it (no copy under
                    // the lock; the next push brings its own, see `move_front`). Else the
                    // oldest `n`, one by one.
                    let batch = if n == inner.queue.len() {
                        let queue = std::mem::take(&mut inner.queue);
                        drop(inner);
                        whole_queue(queue)
                    } else {
                        let batch = inner.queue.drain(..n).collect();
                        drop(inner);
                        batch
                    };
                    if self.policy == OverflowPolicy::Block {
                        self.writable.notify_waiters();
                    }
                    return Some(batch);
                }
                if inner.closed {
                    return None;
                }
            }
            readable.await;
        }
    }

    /// Records a worker batch's outcome.
    pub fn settle(&self, outcome: &BatchOutcome) {
        self.lock().ledger.settle(outcome);
    }

    /// Records a worker batch's outcome whose processed samples go on to the spool.
    pub fn settle_to_spool(&self, outcome: &BatchOutcome) {
        self.lock().ledger.settle_to_spool(outcome);
    }

    /// Records samples that left the spool queue: written, or lost on the way.
    pub fn spool_settled(&self, spooled: u64, unspooled: u64) {
        self.lock().ledger.spool_settled(spooled, unspooled);
    }

    /// Records that an in-flight batch of `n` samples was lost.
    pub fn abort_in_flight(&self, n: u64, reason: DropReason) {
        self.lock().ledger.abort_in_flight(n, reason);
    }

    /// Counts samples a producer had accepted but could not hand over.
    pub fn discard(&self, source: Source, n: u64, reason: DropReason) {
        let mut inner = self.lock();
        inner.ledger.arrive(source, n);
        inner.ledger.discard(n, reason);
    }

    /// Refuses further pushes; the dispatcher drains what is queued, then sees the end.
    pub fn close(&self) {
        self.lock().closed = true;
        self.readable.notify_waiters();
        self.writable.notify_waiters();
    }

    /// Empties the queue, counting every sample in it as dropped for `shutdown`.
    pub fn abandon(&self) -> u64 {
        let mut inner = self.lock();
        let n = inner.queue.len() as u64;
        inner.queue.clear();
        inner.ledger.evict(n, DropReason::Shutdown);
        n
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn samples(range: std::ops::Range<u32>) -> VecDeque<Sample> {
        range.map(|i| Sample::test(i, f64::from(i))).collect()
    }

    /// Like [`samples`], posted over HTTP.
    fn ingested(range: std::ops::Range<u32>) -> VecDeque<Sample> {
        let mut samples = samples(range);
        samples.iter_mut().for_each(|s| s.source = Source::Ingest);
        samples
    }

    fn seqs(batch: &[Sample]) -> Vec<u32> {
        batch.iter().map(|s| s.seq.unwrap()).collect()
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_newest() {
        let buffer = RingBuffer::new(3, OverflowPolicy::DropOldest);
        buffer.push(Source::Device, &mut samples(0..2)).await;
        buffer.push(Source::Device, &mut samples(2..5)).await;
        assert_eq!(seqs(&buffer.pop(10).await.unwrap()), [2, 3, 4]);
        let ledger = buffer.ledger();
        assert_eq!(ledger.read, 5);
        assert_eq!(ledger.dropped.overflow, 2);
        assert_eq!(ledger.in_flight, 3);
        assert!(ledger.balanced(), "{ledger:?}");
    }

    #[tokio::test]
    async fn drop_oldest_with_a_batch_larger_than_capacity() {
        let buffer = RingBuffer::new(3, OverflowPolicy::DropOldest);
        buffer.push(Source::Device, &mut samples(0..2)).await;
        buffer.push(Source::Device, &mut samples(2..10)).await;
        assert_eq!(seqs(&buffer.pop(10).await.unwrap()), [7, 8, 9]);
        let ledger = buffer.ledger();
        assert_eq!((ledger.read, ledger.dropped.overflow), (10, 7));
        assert!(ledger.balanced(), "{ledger:?}");
    }

    #[tokio::test]
    async fn drop_newest_keeps_the_oldest() {
        let buffer = RingBuffer::new(3, OverflowPolicy::DropNewest);
        buffer.push(Source::Device, &mut samples(0..2)).await;
        buffer.push(Source::Device, &mut samples(2..5)).await;
        assert_eq!(seqs(&buffer.pop(10).await.unwrap()), [0, 1, 2]);
        let ledger = buffer.ledger();
        assert_eq!((ledger.read, ledger.dropped.overflow), (5, 2));
        assert!(ledger.balanced(), "{ledger:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn block_waits_for_room_and_loses_nothing() {
        let buffer = Arc::new(RingBuffer::new(2, OverflowPolicy::Block));
        let producer = {
            let buffer = buffer.clone();
            tokio::spawn(async move { buffer.push(Source::Device, &mut samples(0..5)).await })
        };
        // The producer fills the buffer and waits.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!producer.is_finished());
        assert_eq!(buffer.len(), 2);
        let mut got = Vec::new();
        while got.len() < 5 {
            got.extend(seqs(&buffer.pop(1).await.unwrap()));
        }
        producer.await.unwrap();
        assert_eq!(got, [0, 1, 2, 3, 4]);
        let ledger = buffer.ledger();
        assert_eq!((ledger.read, ledger.dropped.total()), (5, 0));
        assert!(ledger.balanced(), "{ledger:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_consumer_is_woken_by_a_push() {
        let buffer = Arc::new(RingBuffer::new(4, OverflowPolicy::DropOldest));
        let consumer = {
            let buffer = buffer.clone();
            tokio::spawn(async move { buffer.pop(10).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!consumer.is_finished());
        buffer.push(Source::Ingest, &mut ingested(0..1)).await;
        let batch = tokio::time::timeout(Duration::from_secs(1), consumer)
            .await
            .expect("consumer must be woken")
            .unwrap()
            .unwrap();
        assert_eq!(seqs(&batch), [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn close_wakes_the_consumer_after_draining() {
        let buffer = Arc::new(RingBuffer::new(4, OverflowPolicy::DropOldest));
        buffer.push(Source::Device, &mut samples(0..2)).await;
        buffer.close();
        assert_eq!(seqs(&buffer.pop(10).await.unwrap()), [0, 1]);
        assert!(buffer.pop(10).await.is_none());
        let consumer = {
            let buffer = buffer.clone();
            tokio::spawn(async move { buffer.pop(10).await })
        };
        assert!(consumer.await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn close_releases_a_blocked_producer_and_counts_its_samples() {
        let buffer = Arc::new(RingBuffer::new(1, OverflowPolicy::Block));
        let producer = {
            let buffer = buffer.clone();
            tokio::spawn(async move { buffer.push(Source::Device, &mut samples(0..3)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        buffer.close();
        producer.await.unwrap();
        assert_eq!(buffer.abandon(), 1);
        let ledger = buffer.ledger();
        assert_eq!((ledger.read, ledger.dropped.shutdown), (3, 3));
        assert!(ledger.balanced(), "{ledger:?}");
    }

    #[test]
    fn try_push_all_refuses_at_the_watermark_without_half_accepting() {
        let buffer = RingBuffer::new(10, OverflowPolicy::DropOldest);
        assert_eq!(
            buffer.try_push_all(Source::Ingest, ingested(0..8).into(), 8),
            Ok(0..8)
        );
        assert_eq!(
            buffer.try_push_all(Source::Ingest, ingested(8..9).into(), 8),
            Err(PushError::AboveWatermark {
                depth: 8,
                high_watermark: 8
            })
        );
        assert_eq!(buffer.ledger().ingested, 8);
        buffer.close();
        assert_eq!(
            buffer.try_push_all(Source::Ingest, ingested(0..1).into(), 8),
            Err(PushError::Closed)
        );
    }

    #[test]
    fn try_push_all_takes_a_batch_only_if_it_fits_whole_under_every_policy() {
        for policy in [
            OverflowPolicy::DropOldest,
            OverflowPolicy::DropNewest,
            OverflowPolicy::Block,
        ] {
            let buffer = RingBuffer::new(10, policy);
            assert_eq!(
                buffer.try_push_all(Source::Ingest, ingested(0..6).into(), 10),
                Ok(0..6)
            );
            // Room for 4: five would evict (or drop) one.
            assert_eq!(
                buffer.try_push_all(Source::Ingest, ingested(6..11).into(), 10),
                Err(PushError::NoRoom { n: 5, room: 4 }),
                "{policy:?}"
            );
            assert_eq!(
                buffer.try_push_all(Source::Ingest, ingested(6..10).into(), 10),
                Ok(6..10)
            );
            // Larger than the buffer: it could never fit.
            let empty = RingBuffer::new(10, policy);
            assert_eq!(
                empty.try_push_all(Source::Ingest, ingested(0..11).into(), 10),
                Err(PushError::TooLarge {
                    n: 11,
                    capacity: 10
                }),
                "{policy:?}"
            );
            for (buffer, ingested) in [(&buffer, 10), (&empty, 0)] {
                let ledger = buffer.ledger();
                assert_eq!(ledger.ingested, ingested, "{policy:?}: {ledger:?}");
                assert_eq!(ledger.dropped.total(), 0, "{policy:?}: {ledger:?}");
                assert!(ledger.balanced(), "{ledger:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_new_buffer_reserves_nothing_and_grows_with_use_up_to_its_capacity() {
        // Reserving the capacity up front made a capacity of 1e9 abort on a 104 GB allocation.
        let big = RingBuffer::new(1 << 30, OverflowPolicy::DropOldest);
        assert_eq!(big.lock().queue.capacity(), 0);

        let buffer = RingBuffer::new(1000, OverflowPolicy::DropOldest);
        buffer
            .try_push_all(Source::Ingest, ingested(0..600).into(), 1000)
            .unwrap();
        assert!((600..=1000).contains(&buffer.lock().queue.capacity()));
        // Doubling would reserve 1,200.
        buffer
            .try_push_all(Source::Ingest, ingested(0..400).into(), 1000)
            .unwrap();
        assert_eq!(buffer.lock().queue.capacity(), 1000);
        buffer.push(Source::Device, &mut samples(0..500)).await;
        assert_eq!(
            buffer.lock().queue.capacity(),
            1000,
            "evicting needs no more"
        );
    }

    #[tokio::test]
    async fn a_push_into_an_empty_buffer_hands_its_allocation_through_to_the_batch() {
        for policy in [
            OverflowPolicy::Block,
            OverflowPolicy::DropNewest,
            OverflowPolicy::DropOldest,
        ] {
            let buffer = RingBuffer::new(100, policy);
            let mut pushed = VecDeque::with_capacity(20);
            pushed.extend(samples(0..10));
            let allocation = pushed.as_slices().0.as_ptr();
            buffer.push(Source::Device, &mut pushed).await;
            assert!(pushed.is_empty(), "{policy:?}");
            // Queued behind the first push: copied into the room it has.
            buffer.push(Source::Device, &mut samples(10..15)).await;
            let batch = buffer.pop(100).await.unwrap();
            assert_eq!(seqs(&batch), (0..15).collect::<Vec<_>>(), "{policy:?}");
            assert_eq!(batch.as_ptr(), allocation, "{policy:?}: no copy");
            assert_eq!(
                batch.iter().map(|s| s.order).collect::<Vec<_>>(),
                (0..15).collect::<Vec<_>>(),
                "{policy:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_allocation_larger_than_the_capacity_is_copied_not_adopted() {
        let buffer = RingBuffer::new(100, OverflowPolicy::Block);
        let mut pushed = VecDeque::with_capacity(1000);
        pushed.extend(samples(0..10));
        buffer.push(Source::Device, &mut pushed).await;
        assert!(pushed.is_empty());
        let capacity = buffer.lock().queue.capacity();
        assert!((10..=100).contains(&capacity), "{capacity}");
        assert_eq!(
            seqs(&buffer.pop(100).await.unwrap()),
            (0..10).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn settle_and_abort_keep_the_ledger_balanced() {
        let buffer = RingBuffer::new(10, OverflowPolicy::DropOldest);
        buffer.push(Source::Device, &mut samples(0..6)).await;
        let a = buffer.pop(4).await.unwrap();
        let b = buffer.pop(4).await.unwrap();
        let mut outcome = BatchOutcome {
            processed: 3,
            ..Default::default()
        };
        outcome
            .rejected
            .add(crate::ledger::RejectReason::NonFinite, 1);
        assert_eq!(outcome.size(), a.len() as u64);
        buffer.settle(&outcome);
        buffer.abort_in_flight(b.len() as u64, DropReason::WorkerPanic);
        let ledger = buffer.ledger();
        assert_eq!(ledger.processed, 3);
        assert_eq!(ledger.dropped.worker_panic, 2);
        assert_eq!(ledger.in_flight, 0);
        assert!(ledger.balanced(), "{ledger:?}");
    }

    #[tokio::test]
    async fn drop_oldest_evicts_device_samples_and_never_accepted_http_samples() {
        let buffer = RingBuffer::new(10, OverflowPolicy::DropOldest);
        let device = |range: std::ops::Range<u32>| -> VecDeque<Sample> {
            range.map(|i| Sample::test(i, 1.0)).collect()
        };
        buffer.push(Source::Device, &mut device(0..3)).await;
        let orders = buffer
            .try_push_all(Source::Ingest, ingested(100..105).into(), 10)
            .unwrap();
        assert_eq!(orders, 3..8);
        buffer.push(Source::Device, &mut device(3..5)).await;
        // Full (3 device, 5 http, 2 device). Four more device samples evict the four oldest
        // device samples, skipping the http ones in between.
        buffer.push(Source::Device, &mut device(5..9)).await;
        let ledger = buffer.ledger();
        assert_eq!(ledger.dropped.overflow, 4);
        // Now 5 http and 5 device samples: ten more device samples can evict only five, so
        // the five oldest arriving ones give way too.
        buffer.push(Source::Device, &mut device(9..19)).await;
        let batch = buffer.pop(100).await.unwrap();
        let http: Vec<u32> = batch
            .iter()
            .filter(|s| s.source == Source::Ingest)
            .map(|s| s.seq.unwrap())
            .collect();
        assert_eq!(
            http,
            [100, 101, 102, 103, 104],
            "no accepted http sample is lost"
        );
        let seqs: Vec<u32> = batch
            .iter()
            .filter(|s| s.source == Source::Device)
            .map(|s| s.seq.unwrap())
            .collect();
        assert_eq!(
            seqs,
            [14, 15, 16, 17, 18],
            "the newest device samples are kept"
        );
        let ledger = buffer.ledger();
        assert_eq!(ledger.dropped.overflow, 14);
        buffer.settle(&crate::ledger::BatchOutcome {
            processed: 10,
            ..Default::default()
        });
        assert!(buffer.ledger().balanced(), "{:?}", buffer.ledger());
    }
}
