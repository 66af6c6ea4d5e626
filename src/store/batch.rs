//! Coalescing: concurrent calls of one kind are served by one query per batch.
//!
//! Callers push a job on a channel and wait for their own answer. A dispatcher takes the first
//! job, waits for one of `max_in_flight` permits, yields once so connection tasks that are
//! already runnable can queue their jobs too, then drains whatever is queued (up to `max_size`,
//! and up to `MAX_BATCH_WEIGHT`) into the same batch. There is no timer: a lone request finds a
//! free permit and goes to the database at once; batches grow only while requests arrive faster
//! than single queries could serve them, which is exactly when one `= ANY($1)` query beats many
//! single-row ones.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::DbError;
use crate::metrics as m;

/// One kind of batched database work.
pub trait BatchOp: Send + Sync + 'static {
    type Item: Send + Sync + 'static;
    type Output: Send + 'static;
    /// Label for metrics.
    const NAME: &'static str;
    /// Whether a batch that failed because its connection broke may run again. True only for
    /// work whose repetition cannot undo a newer write (reads, conditional refreshes): a
    /// statement may have committed before its connection broke. (A batch Postgres rolled back,
    /// [`DbError::RolledBack`], always runs once more: nothing of it was committed.)
    const RETRY_ON_BROKEN_CONNECTION: bool;
    /// A batch is cut once its items weigh this much (see [`BatchOp::weight`]).
    const MAX_BATCH_WEIGHT: usize = usize::MAX;
    /// The weight of one item, e.g. its bytes.
    fn weight(_item: &Self::Item) -> usize {
        1
    }
    /// Runs one batch and returns exactly one output per item, in the items' order.
    fn run(
        &self,
        items: &[Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Output>, DbError>> + Send;
}

struct Job<O: BatchOp> {
    item: O::Item,
    reply: oneshot::Sender<Result<O::Output, DbError>>,
}

/// How batches are cut and bounded.
#[derive(Clone, Debug)]
pub struct BatchLimits {
    /// Most items per batch.
    pub max_size: usize,
    /// Batches of one kind running at once.
    pub max_in_flight: usize,
    /// Connections this kind has to itself (see [`Share`]).
    pub reserved: usize,
    /// Connections every kind may take beyond its reserved ones, shared by all batchers.
    /// (Each batch's statement is bounded by its connection's deadline, see `run_once!`.)
    pub shared: Arc<Semaphore>,
}

/// The handle callers use; cloning shares the dispatcher.
pub struct Batcher<O: BatchOp> {
    tx: mpsc::Sender<Job<O>>,
}

impl<O: BatchOp> Clone for Batcher<O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

/// Jobs that may wait for a batch; beyond this, callers wait to enqueue (the HTTP layer's
/// concurrency limit sheds load long before).
const QUEUE_CAPACITY: usize = 8192;

/// How the batchers of a store divide its pool (each data thread's store has its own: 10
/// connections each on two threads with the default 20; the figures below are for a pool of 20).
///
/// All batches together hold at most `pool - pool / 5` connections (16 of 20), so unbatched
/// statements (session create and revoke, deletes, cleanup, the health probe) are not queued
/// behind them, and nobody waits inside sqlx's pool (which would make `Conns` hand connections
/// back to sqlx, to be pinged). An eighth of that share is reserved per kind (2 of 16): writes
/// stuck on locks until their statement timeout cannot take every slot from the reads. The rest
/// is shared, first come, first served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Batches of one kind running at once: `max_in_flight`, at most what one kind can get.
    pub per_kind: usize,
    /// Slots each kind has to itself.
    pub reserved: usize,
    /// Slots all kinds take from.
    pub shared: usize,
}

impl Share {
    pub fn new(pool: usize, kinds: usize, max_in_flight: usize) -> Self {
        let total = (pool - pool / 5).max(1);
        let reserved = total / 8;
        let shared = total.saturating_sub(kinds * reserved).max(1);
        Self {
            per_kind: max_in_flight.clamp(1, reserved + shared),
            reserved,
            shared,
        }
    }
}

impl<O: BatchOp> Batcher<O> {
    /// Spawns the dispatcher on the current runtime. It ends when the last handle is dropped.
    pub fn spawn(op: O, limits: BatchLimits) -> Self {
        let BatchLimits {
            max_size,
            max_in_flight,
            reserved,
            shared,
        } = limits;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(dispatch(
            Arc::new(op),
            rx,
            max_size.max(1),
            Arc::new(Semaphore::new(max_in_flight.max(1))),
            Arc::new(Semaphore::new(reserved)),
            shared,
        ));
        Self { tx }
    }

    /// Queues `item` and waits for its answer.
    pub async fn call(&self, item: O::Item) -> Result<O::Output, DbError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { item, reply })
            .await
            .map_err(|_| DbError::Unavailable("the store is shutting down".into()))?;
        // The worker drops the reply unanswered only when its task ends early (a panic, the
        // runtime shutting down): nothing says the work failed for good, so 503, not 500.
        rx.await.unwrap_or_else(|_| {
            Err(DbError::Unavailable(format!(
                "{} batch worker ended without answering",
                O::NAME
            )))
        })
    }
}

async fn dispatch<O: BatchOp>(
    op: Arc<O>,
    mut rx: mpsc::Receiver<Job<O>>,
    max_size: usize,
    permits: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
    shared: Arc<Semaphore>,
) {
    while let Some(first) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // A connection slot: one of this kind's own if free, else one of the shared ones,
        // whichever frees first.
        let slot = tokio::select! {
            biased;
            p = reserved.clone().acquire_owned() => p,
            p = shared.clone().acquire_owned() => p,
        };
        let Ok(slot) = slot else {
            return;
        };
        // Let every connection task that is already runnable take its turn (and queue its
        // request) before the batch is cut. Not a timer: when nothing else is runnable this
        // returns at once, so a lone request still goes straight to the database.
        tokio::task::yield_now().await;
        let mut weight = O::weight(&first.item);
        let mut jobs = Vec::with_capacity(max_size.min(64));
        jobs.push(first);
        while jobs.len() < max_size && weight < O::MAX_BATCH_WEIGHT {
            match rx.try_recv() {
                Ok(job) => {
                    weight = weight.saturating_add(O::weight(&job.item));
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        // A caller that gave up (request timeout, client gone) needs no answer.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let op = op.clone();
        tokio::spawn(async move {
            let _permits = (permit, slot);
            m::cached::record(m::BATCH_SIZE, &[("operation", O::NAME)], jobs.len() as f64);
            let (items, replies): (Vec<_>, Vec<_>) =
                jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
            let expected = items.len();
            let mut result = op.run(&items).await;
            let retry = match &result {
                // Usually a connection that died with a Postgres restart: the held connections
                // were handed back, so the retry gets a fresh one (or fails the same way).
                Err(DbError::ConnectionLost(_)) => O::RETRY_ON_BROKEN_CONNECTION,
                // A deadlock victim: rolled back whole, so the retry is the batch's only effect.
                Err(DbError::RolledBack(_)) => true,
                _ => false,
            };
            if retry {
                result = op.run(&items).await;
            }
            match result {
                Ok(outputs) if outputs.len() == expected => {
                    for (reply, out) in replies.into_iter().zip(outputs) {
                        let _ = reply.send(Ok(out));
                    }
                }
                Ok(_) => {
                    for reply in replies {
                        let _ = reply.send(Err(DbError::Other(format!(
                            "{} batch answered the wrong number of items",
                            O::NAME
                        ))));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn share_of_the_pool() {
        let s = |pool| {
            let s = Share::new(pool, 4, 8);
            (s.per_kind, s.reserved, s.shared)
        };
        assert_eq!(s(20), (8, 2, 8), "16 of 20: 2 each reserved, 8 shared");
        assert_eq!(s(1), (1, 0, 1));
        assert_eq!(s(2), (2, 0, 2));
        assert_eq!(s(5), (4, 0, 4));
        assert_eq!(s(10), (5, 1, 4));
        assert_eq!(s(1000), (8, 100, 400));
        assert_eq!(Share::new(20, 4, 100).per_kind, 10);
    }

    /// Counts the batches running at once (all kinds together) and holds each until released.
    struct Held {
        running: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
        gate: Arc<Semaphore>,
    }

    impl BatchOp for Held {
        type Item = ();
        type Output = ();
        const NAME: &'static str = "test";
        const RETRY_ON_BROKEN_CONNECTION: bool = false;
        async fn run(&self, items: &[()]) -> Result<Vec<()>, DbError> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            let _ = self.gate.acquire().await.map(|p| p.forget());
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(vec![(); items.len()])
        }
    }

    /// Panics in its batch: a bug, as far as the callers can tell.
    struct Panics;

    impl BatchOp for Panics {
        type Item = ();
        type Output = ();
        const NAME: &'static str = "test";
        const RETRY_ON_BROKEN_CONNECTION: bool = false;
        async fn run(&self, _: &[()]) -> Result<Vec<()>, DbError> {
            panic!("a bug in a batch");
        }
    }

    #[tokio::test]
    async fn a_batch_that_ends_without_answering_is_unavailable_not_internal() {
        let limits = BatchLimits {
            max_size: 8,
            max_in_flight: 1,
            reserved: 1,
            shared: Arc::new(Semaphore::new(1)),
        };
        let b = Batcher::spawn(Panics, limits);
        let err = b.call(()).await.unwrap_err();
        assert!(matches!(err, DbError::Unavailable(_)), "{err:?}");
        let status = crate::error::ApiError::Db(err).status();
        assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        // The dispatcher survives and serves the next call the same way.
        assert!(matches!(b.call(()).await, Err(DbError::Unavailable(_))));
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn kinds_share_the_slots_but_keep_their_reserved_ones() {
        // Pool of 20: 2 slots reserved per kind, 8 shared, 8 per kind at most.
        let share = Share::new(20, 4, 8);
        let shared = Arc::new(Semaphore::new(share.shared));
        let all = Arc::new(AtomicUsize::new(0));
        let all_peak = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let mut kinds = Vec::new();
        for _ in 0..4 {
            let op = Held {
                running: all.clone(),
                peak: all_peak.clone(),
                gate: gate.clone(),
            };
            let limits = BatchLimits {
                max_size: 1,
                max_in_flight: share.per_kind,
                reserved: share.reserved,
                shared: shared.clone(),
            };
            kinds.push(Batcher::spawn(op, limits));
        }
        // Two kinds, each asked for 20 batches: the first gets its 2 reserved and 6 shared
        // (its own limit is 8), the second its 2 reserved and the 2 shared left.
        let mut calls = Vec::new();
        for (k, kind) in kinds.iter().enumerate().take(2) {
            for _ in 0..20 {
                let b = kind.clone();
                calls.push(tokio::spawn(async move { b.call(()).await }));
                if k == 0 {
                    settle().await;
                }
            }
        }
        settle().await;
        assert_eq!(all.load(Ordering::SeqCst), 12, "8 + 4 batches running");
        // The shared slots are gone, yet a third kind still runs on its reserved ones.
        for _ in 0..5 {
            let b = kinds[2].clone();
            calls.push(tokio::spawn(async move { b.call(()).await }));
        }
        settle().await;
        assert_eq!(
            all.load(Ordering::SeqCst),
            14,
            "2 more on the reserved slots"
        );
        assert_eq!(all_peak.load(Ordering::SeqCst), 14);
        // Let everything finish: every call is answered, and never more than 16 ran at once.
        gate.add_permits(1000);
        for c in calls {
            c.await.unwrap().unwrap();
        }
        assert!(all_peak.load(Ordering::SeqCst) <= 16);
    }
}
