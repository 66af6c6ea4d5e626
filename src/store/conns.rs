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
//!
//! Connections are not kept past `database.max_lifetime_seconds` (sqlx does not see this list),
//! nor after the server refused a write as read-only (a failover: a new connection may reach the
//! new primary). While PostgreSQL refuses new connections for lack of slots ("too many
//! clients"), statements wait for one of the connections already open instead of retrying
//! connects until the acquire timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use super::pooler::{Scope, StatementMode};
use super::{DbError, DbStatus};

/// How long a connection from the pool may take before the store asks PostgreSQL why (a
/// healthy connect takes a few milliseconds).
const DIAGNOSE_AFTER: Duration = Duration::from_millis(250);

/// A free connection: since when it rests there, and when the store first had it.
type Free = (PoolConnection<Postgres>, Instant, Instant);

pub struct Conns {
    pool: PgPool,
    /// Callers inside `pool.acquire()` right now.
    waiting: AtomicUsize,
    /// Where a statement's success and a lost connection are recorded, shared by every store.
    status: Arc<DbStatus>,
    /// `status.outages()` when this free list was last emptied for an outage.
    outages_seen: AtomicU64,
    free: Mutex<Vec<Free>>,
    idle_timeout: Duration,
    /// `database.max_lifetime_seconds`, counted from when the store first had a connection
    /// (sqlx, which opened it earlier, closes it when it comes back past its own count).
    max_lifetime: Option<Duration>,
    /// How statements run (directly, or each in a transaction behind a pooler).
    mode: StatementMode,
    /// One check at a time of why the pool could not open a connection.
    diagnosing: AtomicBool,
    /// Bounds one statement, its wait for a connection included, on the client side (see
    /// [`Conns::deadline`]).
    deadline: Duration,
}

impl Conns {
    pub(crate) fn new(
        pool: PgPool,
        idle_timeout: Duration,
        max_lifetime: Option<Duration>,
        mode: StatementMode,
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
            max_lifetime,
            mode,
            diagnosing: AtomicBool::new(false),
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

    fn free_list(&self) -> std::sync::MutexGuard<'_, Vec<Free>> {
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
                Some((_, since, _)) if since.elapsed() > self.idle_timeout => Some(free.remove(0)),
                _ => None,
            };
            drop(stale);
            free.pop().map(|(c, _, opened)| (c, opened))
        };
        let (conn, opened) = match reused {
            Some(c) => c,
            None => self.take_from_pool().await?,
        };
        Ok(Held {
            conn: Some(conn),
            opened,
            owner: self,
            clean: false,
        })
    }

    /// A connection from the sqlx pool: an idle one, or a new one. While PostgreSQL refuses new
    /// connections, only the ones already open (see [`Conns::wait_for_open`]). With when the
    /// store first had it.
    async fn take_from_pool(&self) -> Result<(PoolConnection<Postgres>, Instant), sqlx::Error> {
        if self.pool.size() > 0 && self.status.refusal().is_some() {
            return self.wait_for_open().await;
        }
        let max = self.pool.options().get_max_connections();
        let waiting = Waiting::enter(&self.waiting);
        // Boxed: sqlx's acquire future is about 8 KiB, and inline it would make every
        // statement's future (and every move of one) that large, though the free list above
        // serves almost every call.
        let mut acquire = Box::pin(self.pool.acquire());
        let acquired = tokio::select! {
            biased;
            acquired = &mut acquire => acquired,
            _ = tokio::time::sleep(DIAGNOSE_AFTER) => {
                // Nothing yet, and the pool has room: sqlx is opening a connection, and it
                // retries a refused connect (too many clients, or a server starting up) until
                // the acquire timeout without saying why. Find out meanwhile; when it is a
                // lack of slots, wait for a connection already open instead.
                if self.pool.size() < max {
                    self.diagnose().await;
                }
                if self.pool.size() > 0 && self.status.refusal().is_some() {
                    drop(acquire);
                    drop(waiting);
                    return self.wait_for_open().await;
                }
                acquire.await
            }
        };
        drop(waiting);
        match acquired {
            Ok(c) => Ok((c, Instant::now())),
            // The same, found only at the timeout (the refused connection would have been the
            // pool's last).
            Err(sqlx::Error::PoolTimedOut) if self.pool.size() < max => {
                self.diagnose().await;
                Err(sqlx::Error::PoolTimedOut)
            }
            Err(e) => Err(e),
        }
    }

    /// No connection could be had. That is a failure to reach Postgres, unless the pool is
    /// merely busy: it timed out while other statements were succeeding (also while PostgreSQL
    /// refuses new connections and statements share the ones already open).
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

    /// Waits, up to the acquire timeout, for a connection already open: one idle in sqlx's
    /// queue, or one a statement finishes with (it comes back to the free list, as nobody waits
    /// inside sqlx). Polls: this runs only while PostgreSQL refuses connections.
    async fn wait_for_open(&self) -> Result<(PoolConnection<Postgres>, Instant), sqlx::Error> {
        let deadline = Instant::now() + self.pool.options().get_acquire_timeout();
        loop {
            let freed = self.free_list().pop().map(|(c, _, opened)| (c, opened));
            let idle = || self.pool.try_acquire().map(|c| (c, Instant::now()));
            if let Some(c) = freed.or_else(idle) {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                return Err(sqlx::Error::PoolTimedOut);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Opens one connection with the pool's options to learn why the pool could not, and
    /// records a refusal for lack of slots (SQLSTATE 53300). One at a time per store.
    async fn diagnose(&self) {
        if self.diagnosing.swap(true, Ordering::AcqRel) {
            return;
        }
        let timeout = self.pool.options().get_acquire_timeout();
        diagnose_connect(&self.pool, &self.status, timeout).await;
        self.diagnosing.store(false, Ordering::Release);
    }

    /// Opens one statement's scope on `conn`, a connection outside the pool (see
    /// [`Held::scope`]).
    pub(crate) async fn scope_on<'c>(
        &self,
        conn: &'c mut PgConnection,
    ) -> Result<Scope<'c>, sqlx::Error> {
        Scope::open(conn, &self.mode).await
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
                .position(|(_, since, _)| since.elapsed() <= self.idle_timeout)
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
    /// When the store first had this connection.
    opened: Instant,
    owner: &'a Conns,
    clean: bool,
}

impl Held<'_> {
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("connection present until drop")
    }

    /// Opens one statement's scope on this connection (a transaction behind a
    /// transaction-mode pooler; see `pooler.rs`).
    pub(crate) async fn scope(&mut self) -> Result<Scope<'_>, sqlx::Error> {
        let mode = &self.owner.mode;
        let conn = self.conn.as_mut().expect("connection present until drop");
        Scope::open(conn, mode).await
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
            Err(DbError::ReadOnly(_)) => {
                // The server turned standby (a failover, or a demoted primary behind the same
                // address): this connection will not write again. Close it; a new one may
                // reach the new primary.
                if let Some(c) = self.conn.as_mut() {
                    c.close_on_drop();
                }
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
        let expired = self
            .owner
            .max_lifetime
            .is_some_and(|max| self.opened.elapsed() > max);
        if let Some(conn) = self.conn.take()
            && self.clean
            && !expired
            && self.owner.waiting.load(Ordering::Acquire) == 0
        {
            self.owner
                .free_list()
                .push((conn, Instant::now(), self.opened));
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

/// Opens one connection with `pool`'s options (within `timeout`) and records in `status`
/// whether PostgreSQL refuses new connections for lack of slots. The connection, if one opens,
/// is closed at once.
pub(crate) async fn diagnose_connect(pool: &PgPool, status: &DbStatus, timeout: Duration) {
    let options = pool.connect_options();
    match tokio::time::timeout(timeout, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => {
            status.clear_refusal();
            let _ = conn.close().await;
        }
        Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("53300") => {
            status.record_refusal(format!("{} (SQLSTATE 53300)", e.message()));
        }
        // Anything else (unreachable, slow) is the health probe's to report.
        _ => {}
    }
}
