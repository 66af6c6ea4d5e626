//! Held connections: a small LIFO free list in front of the sqlx pool.
//!
//! sqlx (0.9) pings every connection as it goes back into its pool, to catch connections left
//! mid-query by a cancelled future. On our hot path that is one extra round trip per statement,
//! and Postgres wakes twice per request instead of once. So the store keeps connections it has
//! finished with cleanly in its own list and hands them out again without that ping. A
//! connection whose statement did not finish cleanly (the future was dropped, or the connection
//! broke) is not kept: it goes back to sqlx, which pings it or closes it as before.
//!
//! Every connection still belongs to the sqlx pool, so `database.max_connections` holds. A
//! connection resting in the free list is invisible to callers already waiting inside sqlx's
//! `acquire()`; so while anyone waits there, finished connections go back to sqlx instead.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

use super::{DbError, DbStatus};

pub struct Conns {
    pool: PgPool,
    /// Callers inside `pool.acquire()` right now.
    waiting: AtomicUsize,
    /// Where a statement's success and a lost connection are recorded, shared by every store.
    status: Arc<DbStatus>,
    /// `status.outages()` when this free list was last emptied for an outage.
    outages_seen: AtomicU64,
    free: Mutex<Vec<(PoolConnection<Postgres>, Instant)>>,
    idle_timeout: Duration,
    /// Bounds one statement, its wait for a connection included, on the client side (see
    /// [`Conns::deadline`]).
    deadline: Duration,
}

impl Conns {
    pub fn new(
        pool: PgPool,
        idle_timeout: Duration,
        deadline: Duration,
        status: Arc<DbStatus>,
    ) -> Self {
        Self {
            pool,
            waiting: AtomicUsize::new(0),
            outages_seen: AtomicU64::new(status.outages()),
            status,
            free: Mutex::new(Vec::new()),
            idle_timeout,
            deadline,
        }
    }

    /// How long one statement may take, from asking for a connection to its answer, before
    /// it counts as unanswered. Postgres's statement_timeout cannot fire when the server or
    /// the network hangs (a SIGSTOP, a partition): this does.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// A statement of `operation` got no answer within the deadline: a failure to reach
    /// Postgres, for the circuit. Returns the error for the caller.
    pub fn no_answer(&self, operation: &'static str) -> DbError {
        metrics::counter!(crate::metrics::DB_ERRORS, "operation" => operation).increment(1);
        let cause = format!(
            "no answer from the database within {} ms",
            self.deadline.as_millis()
        );
        self.status.record_failure(&cause);
        DbError::Unavailable(cause)
    }

    fn free_list(&self) -> std::sync::MutexGuard<'_, Vec<(PoolConnection<Postgres>, Instant)>> {
        // A panic while holding this lock cannot leave the Vec inconsistent: keep using it.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection: the most recently used free one, else one from the pool. A failure to get
    /// one counts for the circuit (see `Conns::acquire_failed`).
    pub async fn get(&self) -> Result<Held<'_>, DbError> {
        self.take().await.map_err(|e| self.acquire_failed(e))
    }

    /// Like [`Conns::get`], but leaves judging a failure to the caller (the health monitor).
    pub async fn take(&self) -> Result<Held<'_>, sqlx::Error> {
        // Postgres was found gone since this list was last emptied (maybe by another store):
        // its connections are likely dead, so hand them to sqlx, which tests them.
        let outages = self.status.outages();
        if self.outages_seen.load(Ordering::Acquire) != outages {
            self.outages_seen.store(outages, Ordering::Release);
            self.clear();
        }
        let reused = {
            let mut free = self.free_list();
            // Trim one stale connection per call from the bottom (the least recently used).
            let stale = match free.first() {
                Some((_, since)) if since.elapsed() > self.idle_timeout => Some(free.remove(0)),
                _ => None,
            };
            drop(stale);
            free.pop().map(|(c, _)| c)
        };
        let conn = match reused {
            Some(c) => c,
            None => {
                let _waiting = Waiting::enter(&self.waiting);
                // Boxed: sqlx's acquire future is about 8 KiB, and inline it would make every
                // statement's future (and every move of one) that large, though the free list
                // above serves almost every call.
                Box::pin(self.pool.acquire()).await?
            }
        };
        Ok(Held {
            conn: Some(conn),
            owner: self,
            clean: false,
        })
    }

    /// No connection could be had. That is a failure to reach Postgres, unless the pool is
    /// merely busy: it timed out while other statements were succeeding.
    fn acquire_failed(&self, e: sqlx::Error) -> DbError {
        let waited = self.pool.options().get_acquire_timeout();
        let e = DbError::from(e);
        if matches!(e, DbError::PoolExhausted) && self.status.succeeded_within(waited) {
            return e;
        }
        match e {
            // sqlx retries a refused connection until its acquire timeout and then reports only
            // the timeout: name the cause the health monitor last saw, if any.
            DbError::PoolExhausted => {
                let plain = format!(
                    "could not open a database connection within database.acquire_timeout_ms ({} ms)",
                    waited.as_millis()
                );
                let seen = self.status.circuit.last_cause().filter(|c| *c != plain);
                self.status.record_failure(&plain);
                DbError::Unavailable(match seen {
                    Some(cause) => format!("{plain}; last error: {cause}"),
                    None => plain,
                })
            }
            other => {
                self.status.record_failure(&other.to_string());
                other
            }
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Connections waiting in the free list (they count as idle).
    pub fn idle(&self) -> usize {
        self.free_list().len()
    }

    /// Hands every free connection back to the pool (which tests or closes them).
    pub fn clear(&self) {
        let drained: Vec<_> = self.free_list().drain(..).collect();
        drop(drained);
    }

    /// Hands back connections idle for longer than the idle timeout.
    pub fn trim(&self) {
        let stale: Vec<_> = {
            let mut free = self.free_list();
            let keep_from = free
                .iter()
                .position(|(_, since)| since.elapsed() <= self.idle_timeout)
                .unwrap_or(free.len());
            free.drain(..keep_from).collect()
        };
        drop(stale);
    }
}

/// A connection on loan. Call [`Held::finish`] with the statement's result; if the loan is
/// dropped without it (a cancelled future), the connection is not reused.
pub struct Held<'a> {
    conn: Option<PoolConnection<Postgres>>,
    owner: &'a Conns,
    clean: bool,
}

impl Held<'_> {
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("connection present until drop")
    }

    /// Marks the connection reusable unless the statement failed because the connection or
    /// the server is gone.
    pub fn finish<T>(mut self, result: &Result<T, DbError>) {
        match result {
            // A TLS failure on an open connection (an alert from the server) breaks it too.
            Err(DbError::ConnectionLost(_) | DbError::Tls(_)) => {
                // The other free connections (of every data thread) are likely dead too. Not
                // a failure for the circuit (the connection is gone, maybe not Postgres): the
                // monitor checks with a fresh connection now.
                self.owner.status.record_outage();
                self.owner.status.circuit.suspect();
                self.owner.clear();
            }
            Ok(_) => {
                self.owner.status.record_success();
                self.clean = true;
            }
            Err(_) => self.clean = true,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.clean
            && self.owner.waiting.load(Ordering::Acquire) == 0
        {
            self.owner.free_list().push((conn, Instant::now()));
        }
        // Otherwise the connection drops here and returns to sqlx (which hands it to a waiter).
    }
}

/// Counts a caller waiting inside `pool.acquire()` for as long as it waits (also when the
/// wait is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
