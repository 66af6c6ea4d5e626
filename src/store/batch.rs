//! Coalescing: concurrent calls of one kind are served by one query per batch.
//!
//! Callers push a job on a channel and wait for their own answer. A dispatcher takes the first
//! job, waits for one of `max_in_flight` permits, then drains whatever else is already queued
//! (up to `max_size`) into the same batch. There is no timer: a lone request finds a free permit
//! and goes to the database at once; batches grow only while every permit is busy, which is
//! exactly when one `= ANY($1)` query beats many single-row ones.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::DbError;
use crate::metrics as m;

/// One kind of batched database work.
pub trait BatchOp: Send + Sync + 'static {
    type Item: Send + 'static;
    type Output: Send + 'static;
    /// Label for metrics.
    const NAME: &'static str;
    /// Runs one batch and returns exactly one output per item, in the items' order.
    /// Must be safe to run twice (it is retried once when the connection broke).
    fn run(
        &self,
        items: &[Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Output>, DbError>> + Send;
}

struct Job<O: BatchOp> {
    item: O::Item,
    reply: oneshot::Sender<Result<O::Output, DbError>>,
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
    pub fn spawn(op: O, max_size: usize, max_in_flight: usize) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(dispatch(
            Arc::new(op),
            rx,
            max_size.max(1),
            Arc::new(Semaphore::new(max_in_flight.max(1))),
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
) {
    while let Some(first) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // Let every connection task that is already runnable take its turn (and queue its
        // request) before the batch is cut. Not a timer: when nothing else is runnable this
        // returns at once, so a lone request still goes straight to the database.
        tokio::task::yield_now().await;
        let mut jobs = Vec::with_capacity(max_size.min(64));
        jobs.push(first);
        while jobs.len() < max_size {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
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
            let _permit = permit;
            metrics::histogram!(m::BATCH_SIZE, "operation" => O::NAME).record(jobs.len() as f64);
            let (items, replies): (Vec<_>, Vec<_>) =
                jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
            let expected = items.len();
            let mut result = op.run(&items).await;
            if matches!(result, Err(DbError::Unavailable(_))) {
                // Usually a connection that died with a Postgres restart: the held connections
                // were handed back, so the retry gets a fresh one (or fails the same way).
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
