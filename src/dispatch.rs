//! The dispatcher: takes batches from the ring buffer and runs them on the worker stage.
//!
//! It first acquires a permit from a semaphore of `workers` permits, then pops up to
//! `batch_max` samples, then runs [`Worker::process`] with `spawn_blocking` on the app's
//! `TaskTracker`. Blocking work cannot be aborted, so the semaphore bounds how much of it runs;
//! waiting for a permit *before* popping keeps the backlog in the buffer, where the overflow
//! policy and the depth gauge see it. A batch that panics is caught through its `JoinError`,
//! counted as dropped for `worker_panic`, logged once, and the pipeline goes on.
//! The dispatcher ends when the buffer is closed and drained and every batch has finished.
//!
//! With an uplink, each batch gets a sequence number as it leaves the buffer, and its worker
//! hands the processed samples to the [`SpoolStage`], which writes batches in that order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::Semaphore;
use tokio::task::JoinError;
use tokio_util::task::TaskTracker;
use tracing::error;

use crate::buffer::RingBuffer;
use crate::ledger::{BatchOutcome, DropReason};
use crate::sample::{ProcessedSample, Sample};
use crate::uplink::stage::SpoolStage;
use crate::worker::Worker;

/// A processing function: the worker's `process_into` in production, a faulty one in tests.
/// With `Some(all)`, every processed sample is also appended to `all` (for the uplink).
pub type ProcessFn = Arc<
    dyn Fn(&Worker, Vec<Sample>, Option<&mut Vec<ProcessedSample>>) -> BatchOutcome + Send + Sync,
>;

/// Counts of batches between the dispatcher and the blocking threads.
#[derive(Debug, Default)]
pub struct PoolGauges {
    queued: AtomicU64,
    running: AtomicU64,
}

impl PoolGauges {
    /// Batches handed to `spawn_blocking` that have not started on a thread yet.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Batches being processed right now.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }
}

/// Moves batches from the buffer to the worker stage.
pub struct Dispatcher {
    buffer: Arc<RingBuffer>,
    worker: Arc<Worker>,
    process: ProcessFn,
    permits: Arc<Semaphore>,
    batch_max: usize,
    tracker: TaskTracker,
    gauges: Arc<PoolGauges>,
    stage: Option<SpoolStage>,
    next_seq: AtomicU64,
}

/// A batch as it leaves the buffer.
struct Taken {
    seq: u64,
    orders: std::ops::Range<u64>,
    size: u64,
}

impl Dispatcher {
    /// A dispatcher running at most `workers` batches of at most `batch_max` samples at once.
    pub fn new(
        buffer: Arc<RingBuffer>,
        worker: Arc<Worker>,
        workers: usize,
        batch_max: usize,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            buffer,
            worker,
            process: Arc::new(|worker, batch, all| worker.process_into(batch, all)),
            permits: Arc::new(Semaphore::new(workers)),
            batch_max,
            tracker,
            gauges: Arc::new(PoolGauges::default()),
            stage: None,
            next_seq: AtomicU64::new(0),
        }
    }

    /// Hands every processed batch on to the uplink's spool stage.
    pub fn with_stage(mut self, stage: SpoolStage) -> Self {
        self.stage = Some(stage);
        self
    }

    /// Replaces the processing function (fault injection in tests).
    pub fn with_process(mut self, process: ProcessFn) -> Self {
        self.process = process;
        self
    }

    /// The batch gauges, for the API.
    pub fn gauges(&self) -> Arc<PoolGauges> {
        self.gauges.clone()
    }

    /// Runs until the buffer is closed and empty and every batch has finished.
    pub async fn run(self) {
        let mut running = FuturesUnordered::new();
        loop {
            tokio::select! {
                Some((taken, result)) = running.next(), if !running.is_empty() => {
                    self.settle(taken, result);
                }
                next = self.next_batch() => match next {
                    Some((permit, batch)) => running.push(self.spawn(permit, batch)),
                    None => break,
                },
            }
        }
        while let Some((taken, result)) = running.next().await {
            self.settle(taken, result);
        }
    }

    /// A permit, then a batch. Cancel-safe: dropping it releases the permit and takes nothing.
    async fn next_batch(&self) -> Option<(tokio::sync::OwnedSemaphorePermit, Vec<Sample>)> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let batch = self.buffer.pop(self.batch_max).await?;
        Some((permit, batch))
    }

    fn spawn(
        &self,
        permit: tokio::sync::OwnedSemaphorePermit,
        batch: Vec<Sample>,
    ) -> impl std::future::Future<Output = (Taken, Result<(), JoinError>)> + use<> {
        let taken = Taken {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            orders: match (batch.first(), batch.last()) {
                (Some(first), Some(last)) => first.order..last.order + 1,
                _ => 0..0,
            },
            size: batch.len() as u64,
        };
        let (seq, orders) = (taken.seq, taken.orders.clone());
        let worker = self.worker.clone();
        let process = self.process.clone();
        let gauges = self.gauges.clone();
        let buffer = self.buffer.clone();
        let stage = self.stage.clone();
        gauges.queued.fetch_add(1, Ordering::Relaxed);
        let handle = self.tracker.spawn_blocking(move || {
            let _permit = permit;
            gauges.queued.fetch_sub(1, Ordering::Relaxed);
            gauges.running.fetch_add(1, Ordering::Relaxed);
            // Decrement `running` even if `process` panics.
            let _running = DecrementOnDrop(&gauges.running);
            let size = batch.len() as u64;
            match &stage {
                None => {
                    let outcome = process(&worker, batch, None);
                    check_outcome(&outcome, size);
                    buffer.settle(&outcome);
                }
                Some(stage) => {
                    let mut all = Vec::with_capacity(batch.len());
                    let outcome = process(&worker, batch, Some(&mut all));
                    check_outcome(&outcome, size);
                    // Counted as processed and queued for the spool in one step, so the
                    // ledger balances at every moment.
                    buffer.settle_to_spool(&outcome);
                    stage.submit(seq, orders, &all);
                }
            }
        });
        async move { (taken, handle.await) }
    }

    fn settle(&self, taken: Taken, result: Result<(), JoinError>) {
        if let Err(err) = result {
            self.buffer
                .abort_in_flight(taken.size, DropReason::WorkerPanic);
            if let Some(stage) = &self.stage {
                stage.skip(taken.seq, taken.orders);
            }
            error!(samples = taken.size, error = %err, "Worker batch failed; its samples are counted as dropped.");
        }
    }
}

fn check_outcome(outcome: &BatchOutcome, size: u64) {
    debug_assert_eq!(
        outcome.size(),
        size,
        "a worker must account for every sample"
    );
}

struct DecrementOnDrop<'a>(&'a AtomicU64);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::buffer::OverflowPolicy;
    use crate::config::Settings;
    use crate::ledger::Source;

    fn parts(capacity: usize) -> (Arc<RingBuffer>, Arc<Worker>, TaskTracker) {
        let settings = Settings::default();
        let buffer = Arc::new(RingBuffer::new(capacity, OverflowPolicy::Block));
        let worker = Arc::new(Worker::new(&settings.processing, &settings.devices, 100));
        (buffer, worker, TaskTracker::new())
    }

    #[tokio::test]
    async fn drains_everything_then_ends_when_closed() {
        let (buffer, worker, tracker) = parts(64);
        let dispatcher = Dispatcher::new(buffer.clone(), worker.clone(), 2, 7, tracker.clone());
        let task = tokio::spawn(dispatcher.run());
        let mut samples: VecDeque<_> = (0..1000).map(|i| Sample::test(i, 1.0)).collect();
        buffer.push(Source::Device, &mut samples).await;
        buffer.close();
        task.await.unwrap();
        let ledger = buffer.ledger();
        assert_eq!(
            (ledger.read, ledger.processed, ledger.in_flight),
            (1000, 1000, 0)
        );
        assert!(ledger.batches >= 1000 / 7);
        assert!(ledger.balanced(), "{ledger:?}");
    }

    #[tokio::test]
    async fn a_panicking_batch_is_counted_and_the_pipeline_goes_on() {
        let (buffer, worker, tracker) = parts(1000);
        let process: ProcessFn = Arc::new(|worker, batch, all| {
            assert!(
                !batch.iter().any(|s| s.seq == Some(13)),
                "injected worker fault"
            );
            worker.process_into(batch, all)
        });
        let dispatcher =
            Dispatcher::new(buffer.clone(), worker, 1, 10, tracker).with_process(process);
        let task = tokio::spawn(dispatcher.run());
        let mut samples: VecDeque<_> = (0..100).map(|i| Sample::test(i, 1.0)).collect();
        buffer.push(Source::Device, &mut samples).await;
        buffer.close();
        task.await.unwrap();
        let ledger = buffer.ledger();
        assert!(ledger.dropped.worker_panic > 0, "{ledger:?}");
        assert_eq!(
            ledger.processed + ledger.dropped.worker_panic,
            100,
            "{ledger:?}"
        );
        assert!(ledger.balanced(), "{ledger:?}");
    }
}
