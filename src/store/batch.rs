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
use std::time::Duration;

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
    /// work whose repetition cannot undo a newer write (reads, conditional refreshes).
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
    /// Batches of every kind running at once: one permit per batch, shared by all batchers,
    /// so that together they leave connections for unbatched statements. A pool with nobody
    /// waiting in it also lets `Conns` keep reusing connections without sqlx's ping.
    pub shared: Arc<Semaphore>,
    /// Bounds one batch statement on the client side: the server's statement_timeout cannot
    /// fire when the connection itself hangs (a dead host, a partition).
    pub deadline: Duration,
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

impl<O: BatchOp> Batcher<O> {
    /// Spawns the dispatcher on the current runtime. It ends when the last handle is dropped.
    pub fn spawn(op: O, limits: BatchLimits) -> Self {
        let BatchLimits {
            max_size,
            max_in_flight,
            shared,
            deadline,
        } = limits;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(dispatch(
            Arc::new(op),
            rx,
            max_size.max(1),
            Arc::new(Semaphore::new(max_in_flight.max(1))),
            shared,
            deadline,
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
        rx.await.unwrap_or_else(|_| {
            Err(DbError::Other(format!(
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
    shared: Arc<Semaphore>,
    deadline: Duration,
) {
    while let Some(first) = rx.recv().await {
        // Always this kind's permit first, then the shared one: one order for every dispatcher.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Ok(shared_permit) = shared.clone().acquire_owned().await else {
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
            let _permits = (permit, shared_permit);
            m::cached::record(m::BATCH_SIZE, &[("operation", O::NAME)], jobs.len() as f64);
            let (items, replies): (Vec<_>, Vec<_>) =
                jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
            let expected = items.len();
            let run = || async {
                tokio::time::timeout(deadline, op.run(&items))
                    .await
                    .unwrap_or_else(|_| {
                        Err(DbError::Unavailable(format!(
                            "{} batch got no answer within {} ms",
                            O::NAME,
                            deadline.as_millis()
                        )))
                    })
            };
            let mut result = run().await;
            if O::RETRY_ON_BROKEN_CONNECTION && matches!(result, Err(DbError::Unavailable(_))) {
                // Usually a connection that died with a Postgres restart: the held connections
                // were handed back, so the retry gets a fresh one (or fails the same way).
                result = run().await;
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
