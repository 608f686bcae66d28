//! Back-pressure for uploads. Bodies are held in memory while they are checked, so only
//! [`UploadQueueLimits::concurrent`] are received at once. An upload that finds every slot taken
//! waits in a bounded queue for one; when the queue is full, or the wait passes its deadline, the
//! upload is deferred: its trainer is told when to send it again, and its task stays open.
//! Finished work is never refused for being busy.
//!
//! A waiting upload costs the bytes QUIC has already buffered for its stream (at most the stream
//! receive window), so the queue is bounded in bytes as well as in count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Limits of the upload queue; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadQueueLimits {
    /// Uploads received and checked at once, across all connections. Each holds its body in
    /// memory (up to the experiment's upload limit).
    pub concurrent: usize,
    /// Uploads waiting for a slot at once.
    pub max_waiting: usize,
    /// Bytes the waiting uploads may have buffered in QUIC, in total.
    pub max_waiting_bytes: u64,
    /// Longest wait for a slot before the upload is deferred.
    pub max_wait: Duration,
}

impl Default for UploadQueueLimits {
    fn default() -> Self {
        Self {
            concurrent: 64,
            max_waiting: 4096,
            max_waiting_bytes: 256 << 20,
            max_wait: Duration::from_secs(30),
        }
    }
}

/// Shortest retry delay handed out.
const MIN_RETRY: Duration = Duration::from_millis(250);
/// Longest retry delay handed out.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The shared queue; see the module docs.
#[derive(Debug)]
pub struct UploadQueue {
    limits: UploadQueueLimits,
    slots: Arc<Semaphore>,
    waiting: AtomicU64,
    waiting_bytes: AtomicU64,
    metrics: Arc<Metrics>,
}

/// A receive slot; dropping it frees the slot.
#[derive(Debug)]
pub struct UploadSlot {
    _permit: OwnedSemaphorePermit,
}

impl UploadQueue {
    /// A queue with `limits`, counting into `metrics`.
    pub fn new(limits: UploadQueueLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limits.concurrent.max(1))),
            limits,
            waiting: AtomicU64::new(0),
            waiting_bytes: AtomicU64::new(0),
            metrics,
        }
    }

    /// Waits for a receive slot for an upload that may buffer `buffered_bytes` while it waits.
    /// `Err` carries how long the trainer should wait before sending the upload again.
    pub async fn admit(&self, buffered_bytes: u64) -> Result<UploadSlot, Duration> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(UploadSlot { _permit: permit });
        }
        let Some(_waiter) = self.enqueue(buffered_bytes) else {
            self.metrics.count_limit("upload_queue_full");
            return Err(self.defer());
        };
        match tokio::time::timeout(self.limits.max_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(UploadSlot { _permit: permit }),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => {
                self.metrics.count_limit("upload_queue_wait");
                Err(self.defer())
            }
        }
    }

    /// The longest an upload waits for a slot.
    pub fn max_wait(&self) -> Duration {
        self.limits.max_wait
    }

    /// Uploads waiting now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Registers a waiter if the queue has room in count and bytes.
    fn enqueue(&self, bytes: u64) -> Option<Waiter<'_>> {
        let count = self.waiting.fetch_add(1, Ordering::AcqRel) + 1;
        let total = self.waiting_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let waiter = Waiter { queue: self, bytes };
        if count > self.limits.max_waiting as u64 || total > self.limits.max_waiting_bytes {
            return None; // `waiter` drops here and undoes the counts
        }
        Metrics::set(&self.metrics.uploads_waiting, count);
        Some(waiter)
    }

    /// Counts a deferral and picks its retry delay: longer the longer the queue, with jitter so
    /// that deferred trainers do not all come back at once.
    fn defer(&self) -> Duration {
        Metrics::add(&self.metrics.uploads_deferred, 1);
        let backlog = self.waiting() as f64 / self.limits.concurrent.max(1) as f64;
        let base = MIN_RETRY.mul_f64(1.0 + backlog).min(MAX_RETRY);
        base.mul_f64(0.75 + 0.5 * rand::random::<f64>())
    }
}

/// A place in the queue, released on drop.
struct Waiter<'a> {
    queue: &'a UploadQueue,
    bytes: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let left = self.queue.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        self.queue
            .waiting_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
        Metrics::set(&self.queue.metrics.uploads_waiting, left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(concurrent: usize, max_waiting: usize, max_waiting_bytes: u64) -> Arc<UploadQueue> {
        Arc::new(UploadQueue::new(
            UploadQueueLimits {
                concurrent,
                max_waiting,
                max_waiting_bytes,
                max_wait: Duration::from_secs(5),
            },
            Arc::new(Metrics::default()),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_upload_gets_the_next_free_slot() {
        let queue = queue(1, 4, 1 << 20);
        let first = queue.admit(10).await.unwrap();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.admit(10).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(queue.waiting(), 1);
        drop(first);
        assert!(waiting.await.unwrap().is_ok());
        assert_eq!(queue.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_defers_at_once_and_a_long_wait_defers_at_its_deadline() {
        let queue = queue(1, 1, 1 << 20);
        let _slot = queue.admit(10).await.unwrap();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.admit(10).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        // The queue holds one: the next is deferred without waiting.
        let retry = queue.admit(10).await.unwrap_err();
        assert!((MIN_RETRY.mul_f64(0.75)..=MAX_RETRY).contains(&retry));
        assert_eq!(queue.metrics.limited("upload_queue_full"), 1);
        // The waiter gives up after max_wait (virtual time) with a retry delay.
        let retry = waiting.await.unwrap().unwrap_err();
        assert!(retry >= MIN_RETRY.mul_f64(0.75));
        assert_eq!(queue.metrics.limited("upload_queue_wait"), 1);
        assert_eq!(queue.waiting(), 0);
        assert_eq!(queue.metrics.uploads_deferred.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded_in_bytes() {
        let queue = queue(1, 100, 1000);
        let _slot = queue.admit(10).await.unwrap();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.admit(900).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert!(queue.admit(200).await.is_err(), "900 + 200 bytes > 1000");
        assert_eq!(queue.waiting(), 1);
        waiting.abort();
    }
}
