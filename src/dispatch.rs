//! The dispatcher: takes batches from the ring buffer and runs them on the worker stage.
//!
//! It first acquires a permit from a semaphore of `workers` permits, then pops up to
//! `batch_max` samples, then runs [`Worker::process`] with `spawn_blocking` on the app's
//! `TaskTracker`. Blocking work cannot be aborted, so the semaphore bounds how much of it runs;
//! waiting for a permit *before* popping keeps the backlog in the buffer, where the overflow
//! policy and the depth gauge see it. A batch that panics is caught through its `JoinError`,
//! counted as dropped for `worker_panic`, logged once, and the pipeline goes on.
//! The dispatcher ends when the buffer is closed and drained and every batch has finished.

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
use crate::sample::Sample;
use crate::worker::Worker;

/// A processing function; the worker's `process` in production, a faulty one in tests.
pub type ProcessFn = Arc<dyn Fn(&Worker, Vec<Sample>) -> BatchOutcome + Send + Sync>;

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
            process: Arc::new(|worker, batch| worker.process(batch)),
            permits: Arc::new(Semaphore::new(workers)),
            batch_max,
            tracker,
            gauges: Arc::new(PoolGauges::default()),
        }
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
                Some((size, result)) = running.next(), if !running.is_empty() => {
                    self.settle(size, result);
                }
                next = self.next_batch() => match next {
                    Some((permit, batch)) => running.push(self.spawn(permit, batch)),
                    None => break,
                },
            }
        }
        while let Some((size, result)) = running.next().await {
            self.settle(size, result);
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
    ) -> impl std::future::Future<Output = (u64, Result<BatchOutcome, JoinError>)> + use<> {
        let size = batch.len() as u64;
        let worker = self.worker.clone();
        let process = self.process.clone();
        let gauges = self.gauges.clone();
        gauges.queued.fetch_add(1, Ordering::Relaxed);
        let handle = self.tracker.spawn_blocking(move || {
            let _permit = permit;
            gauges.queued.fetch_sub(1, Ordering::Relaxed);
            gauges.running.fetch_add(1, Ordering::Relaxed);
            // Decrement `running` even if `process` panics.
            let _running = DecrementOnDrop(&gauges.running);
            process(&worker, batch)
        });
        async move { (size, handle.await) }
    }

    fn settle(&self, size: u64, result: Result<BatchOutcome, JoinError>) {
        match result {
            Ok(outcome) => {
                debug_assert_eq!(
                    outcome.size(),
                    size,
                    "a worker must account for every sample"
                );
                self.buffer.settle(&outcome);
            }
            Err(err) => {
                self.buffer.abort_in_flight(size, DropReason::WorkerPanic);
                error!(samples = size, error = %err, "Worker batch failed; its samples are counted as dropped.");
            }
        }
    }
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
        let process: ProcessFn = Arc::new(|worker, batch| {
            assert!(
                !batch.iter().any(|s| s.seq == Some(13)),
                "injected worker fault"
            );
            worker.process(batch)
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
