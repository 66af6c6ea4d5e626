//! Everything that speaks SQL: the pool, migrations, sessions, cache, batching and cleanup.
//!
//! The store never sees HTTP types. Its callers get plain records or a [`DbError`], which says
//! only whether the database was unavailable, too slow, or failed in some other way.
//!
//! # Layout
//! - [`error`]: [`DbError`], mapped from sqlx errors and SQLSTATEs.
//! - [`status`]: [`DbStatus`], what every store and the health monitor know of the database.
//! - [`circuit`]: the breaker that refuses data requests at once while Postgres is unreachable.
//! - [`pool`]: the sqlx pool and connection start-up options.
//! - [`conns`]: the free list of held connections in front of the pool.
//! - [`pooler`]: how a statement runs behind a pooler (PgBouncer), set by `database.pooler`.
//! - [`migrate`]: the embedded migrations.
//! - [`batch`]: coalescing concurrent calls into one statement.
//! - [`cache`] (with its writes in `cache_write`), [`sessions`]: the data, in SQL.
//! - [`cleanup`]: the fleet-wide deletion of expired rows and the cache's size cap.
//! - [`listen`]: the listening connection and its heartbeats; [`notify`]: what its change
//!   notifications drive; [`near`]: the near caches; [`leases`]: fill leases.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;

use crate::config::Settings;
use crate::metrics as m;
use circuit::Admission;

/// Batchers that share the pool: cache reads and writes, session reads and refreshes.
const BATCH_KINDS: usize = 4;

pub use cache::{CacheEntry, CacheKey, CacheValue};
pub use sessions::{ListPage, NewSession, SessionRecord, SessionsPage, TokenHash};

/// Runs one statement on a held connection (see [`conns`]), timed under `operation` and bounded
/// by the connection's deadline (see [`conns::Conns::deadline`]), without any retry:
/// `run_once!(self.conns, "cache_delete", |c| sqlx::query("...").execute(c))`.
/// `c` is a [`pooler::Exec`]; behind a transaction-mode pooler the statement runs in its own
/// transaction, unnamed (see [`pooler`]). A future of `Result<T, DbError>`. The batchers use it
/// and decide about retries themselves.
macro_rules! run_once {
    ($conns:expr, $op:expr, |$c:ident| $stmt:expr) => {
        async {
            let conns = &$conns;
            let attempt = async {
                match conns.get().await {
                    Ok(mut held) => {
                        let result = $crate::store::timed($op, async {
                            let mut scope = held.scope().await?;
                            let out = {
                                let $c = scope.exec();
                                $stmt.await
                            };
                            scope.close(out).await
                        })
                        .await;
                        held.finish(&result);
                        result
                    }
                    Err(e) => {
                        ::metrics::counter!($crate::metrics::DB_ERRORS, "operation" => $op)
                            .increment(1);
                        Err(e)
                    }
                }
            };
            match ::tokio::time::timeout(conns.deadline(), attempt).await {
                Ok(result) => result,
                Err(_) => Err(conns.no_answer($op)),
            }
        }
    };
}

/// [`run_once!`], run once more when Postgres rolled the statement back to break a deadlock
/// or a serialization conflict ([`DbError::RolledBack`]): nothing of it was committed, so the
/// second run is the statement's only effect. `$stmt` is evaluated again for that, so it must
/// not move what it binds.
macro_rules! run {
    ($conns:expr, $op:expr, |$c:ident| $stmt:expr) => {
        async {
            match run_once!($conns, $op, |$c| $stmt).await {
                Err($crate::store::DbError::RolledBack(_)) => {
                    run_once!($conns, $op, |$c| $stmt).await
                }
                other => other,
            }
        }
    };
}

pub mod batch;
pub mod cache;
mod cache_write;
pub mod circuit;
pub mod cleanup;
pub mod conns;
pub mod error;
pub mod leases;
pub mod listen;
pub mod migrate;
pub mod near;
pub mod notify;
pub mod pool;
pub mod pooler;
pub mod registry;
mod rows;
pub mod sessions;
mod sql;
pub mod status;

pub use error::DbError;
pub use migrate::MIGRATOR;
pub use status::DbStatus;

/// The store: one pool and the batchers in front of it. Cheap to clone.
///
/// Each data thread has its own store (see `app`), because a connection's socket belongs to
/// the runtime that opened it. A store is used only on the runtime that built it; its read-only
/// accessors (pool sizes, status) may be called from anywhere.
#[derive(Clone)]
pub struct Store {
    pub(crate) pool: PgPool,
    pub(crate) conns: Arc<conns::Conns>,
    pub(crate) status: Arc<DbStatus>,
    pub(crate) cache: Arc<cache::CacheBatchers>,
    pub(crate) sessions: Arc<sessions::SessionBatchers>,
    pub(crate) settings: Arc<StoreSettings>,
    /// The near caches, the feed and the lease waiters, shared by every data thread's store.
    pub(crate) notifier: Arc<notify::Notifier>,
}

/// The settings the store reads, copied out of [`Settings`].
#[derive(Clone, Debug)]
pub struct StoreSettings {
    pub connect_timeout: Duration,
    /// Connections this store opens at start and keeps (its share of `min_connections`).
    pub min_connections: u32,
    pub session_update_age_seconds: u32,
    /// `sessions.max_per_user`; 0 = no cap.
    pub session_max_per_user: u32,
    pub cleanup_batch_size: u32,
    pub cleanup_lease_seconds: u32,
    /// `cache.max_bytes` (0 = no cap).
    pub cache_max_bytes: u64,
    /// Qualifies the statements built outside the hot path (probe, cleanup, migrations check).
    pub(crate) schema: sql::Schema,
    /// Where and how migrations connect (`migrate_url`, `pooler`).
    pub(crate) database: crate::config::DatabaseSettings,
}

impl Store {
    /// Builds the pool (lazily: no connection is opened here) and the batchers.
    /// Must be called inside a tokio runtime.
    pub fn new(settings: &Settings) -> Result<Self, DbError> {
        let status = DbStatus::new(
            settings.database.circuit_failure_threshold,
            Duration::from_millis(settings.health.postgres_interval_ms),
        );
        Self::with_status(settings, Arc::new(status))
    }

    /// Like [`Store::new`], sharing `status` with other stores on the same database.
    pub fn with_status(settings: &Settings, status: Arc<DbStatus>) -> Result<Self, DbError> {
        let pool = pool::build_pool(settings)?;
        Ok(Self::with_pool(pool, status, settings))
    }

    pub fn with_pool(pool: PgPool, status: Arc<DbStatus>, settings: &Settings) -> Self {
        let b = &settings.batch;
        let d = &settings.database;
        let mode =
            pooler::StatementMode::new(d, pool::operator_chose_plans(&pool.connect_options()));
        let conns = Arc::new(conns::Conns::new(
            pool.clone(),
            settings.idle_timeout(),
            settings.max_lifetime(),
            mode,
            statement_deadline(settings),
            status.clone(),
        ));
        let schema = sql::Schema::new(&d.schema);
        let share = batch::Share::new(d.max_connections as usize, BATCH_KINDS, b.max_in_flight);
        let limits = batch::BatchLimits {
            max_size: b.max_size,
            max_in_flight: share.per_kind,
            reserved: share.reserved,
            shared: Arc::new(tokio::sync::Semaphore::new(share.shared)),
        };
        Self {
            cache: Arc::new(cache::CacheBatchers::new(
                conns.clone(),
                limits.clone(),
                &schema,
            )),
            sessions: Arc::new(sessions::SessionBatchers::new(
                conns.clone(),
                limits,
                settings.sessions.update_age_seconds,
                &schema,
            )),
            pool,
            conns,
            status,
            settings: Arc::new(StoreSettings {
                connect_timeout: Duration::from_secs(d.connect_timeout_seconds),
                min_connections: d.min_connections,
                session_update_age_seconds: settings.sessions.update_age_seconds,
                session_max_per_user: settings.sessions.max_per_user,
                cleanup_batch_size: settings.cleanup.batch_size,
                cleanup_lease_seconds: settings.cleanup.lease_seconds,
                cache_max_bytes: settings.cache.max_bytes,
                schema,
                database: d.clone(),
            }),
            notifier: Arc::new(notify::Notifier::off()),
        }
    }

    /// This store with `notifier` (shared by every data thread's store) in place of its own,
    /// which has notifications off.
    pub fn with_notifier(mut self, notifier: Arc<notify::Notifier>) -> Self {
        self.notifier = notifier;
        self
    }

    pub fn notifier(&self) -> &Arc<notify::Notifier> {
        &self.notifier
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn status(&self) -> &Arc<DbStatus> {
        &self.status
    }

    /// Fails fast when the database is known to be down (the circuit is open), instead of
    /// waiting out the acquire timeout; while open, one trial request per interval goes through.
    pub(crate) fn ensure_available(&self) -> Result<(), DbError> {
        if !self.status.migrated.load(Ordering::Acquire) {
            return Err(DbError::Unavailable(
                "database not ready (migrations not applied yet)".into(),
            ));
        }
        match self.status.circuit.admit() {
            Admission::Pass | Admission::Trial => Ok(()),
            Admission::Refuse => Err(DbError::CircuitOpen),
        }
    }

    /// Once migrations are applied, opens `min_connections` so the first requests find them
    /// ready (in the free list); then, every idle timeout, hands connections resting unused
    /// that long back to sqlx (which closes those above the minimum). A statement trims too,
    /// but a quiet data thread runs none. Runs until dropped.
    pub async fn keep_warm(&self) {
        self.status.wait_migrated().await;
        self.warm_up(self.settings.min_connections).await;
        loop {
            tokio::time::sleep(self.conns.idle_timeout()).await;
            self.conns.trim();
        }
    }

    /// Opens `n` connections so the first requests find them ready (in the free list).
    async fn warm_up(&self, n: u32) {
        let mut held = Vec::new();
        for _ in 0..n {
            match self.conns.get().await {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
        for c in held {
            c.finish::<()>(&Ok(()));
        }
    }

    /// Pooled connections: (open, idle). Held-but-free connections count as idle.
    pub fn pool_connections(&self) -> (u32, u32) {
        let open = self.pool.size();
        let idle = (self.pool.num_idle() + self.conns.idle()) as u32;
        (open, idle.min(open))
    }

    /// Hands every free connection back to the pool (at shutdown, before closing it).
    pub fn release_connections(&self) {
        self.conns.clear();
    }

    /// The health check's statement: one round trip; whether the sidecar's tables are present.
    fn check_sql(&self) -> sqlx::SqlStr {
        self.settings.schema.sql(
            "SELECT to_regclass('{schema}.sessions') IS NOT NULL \
             AND to_regclass('{schema}.cache') IS NOT NULL \
             AND to_regclass('{schema}.cache_tags') IS NOT NULL \
             AND to_regclass('{schema}.leases') IS NOT NULL",
        )
    }

    /// A health check on a pooled connection (a free one when there is one, as every statement
    /// takes them: connections resting in the free list are invisible to the sqlx pool, so a
    /// direct acquire could starve), within `timeout`. Returns whether the sidecar's tables are
    /// present. Errors come back as sqlx reported them, so the monitor can tell and name their
    /// kind.
    pub async fn check_pooled(&self, timeout: Duration) -> Result<bool, CheckError> {
        let start = Instant::now();
        let mut held = match tokio::time::timeout(timeout, self.conns.take()).await {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => return Err(CheckError::Db(e)),
            Err(_) => return Err(CheckError::NoConnection),
        };
        let left = timeout.saturating_sub(start.elapsed());
        let sql = self.check_sql();
        // Through the statement's scope like every statement (a transaction behind a
        // transaction-mode pooler; see `pooler`).
        let check = async {
            let mut scope = held.scope().await?;
            let out = sqlx::query_scalar(sql).fetch_one(scope.exec()).await;
            scope.close(out).await
        };
        let result = tokio::time::timeout(left, check).await;
        m::cached::record(
            m::DB_QUERY_DURATION,
            &[("operation", "health_probe")],
            start.elapsed().as_secs_f64(),
        );
        match result {
            Ok(Ok(present)) => {
                held.finish::<()>(&Ok(()));
                Ok(present)
            }
            Ok(Err(e)) => {
                metrics::counter!(m::DB_ERRORS, "operation" => "health_probe").increment(1);
                held.finish::<()>(&Err(DbError::of(&e)));
                Err(CheckError::Db(e))
            }
            // The connection is dropped unfinished: sqlx tests it before anyone reuses it.
            Err(_) => Err(CheckError::NoAnswer),
        }
    }

    /// A health check on a connection of its own, opened for it and closed after: what a new
    /// connection meets (refused, a failed login, a missing database) shows at once, where
    /// sqlx's pool retries a refused connection until its acquire timeout and then reports
    /// only the timeout. The health monitor uses it once something looks wrong.
    pub async fn check_fresh(&self, timeout: Duration) -> Result<bool, CheckError> {
        use sqlx::Connection;
        let check = async {
            let options = self.pool.connect_options();
            let mut conn = sqlx::PgConnection::connect_with(&options).await?;
            // In a scope of the store's statement mode, as on a pooled connection: unnamed and
            // in a transaction behind a transaction-mode pooler, where a named statement left
            // on the server connection would clash with another client's.
            let present = async {
                let mut scope = self.conns.scope_on(&mut conn).await?;
                let out = sqlx::query_scalar(self.check_sql())
                    .fetch_one(scope.exec())
                    .await;
                scope.close(out).await
            }
            .await;
            // Closed politely whatever the answer; a failure to close changes nothing.
            let _ = conn.close().await;
            present
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(result) => result.map_err(CheckError::Db),
            Err(_) => Err(CheckError::NoAnswer),
        }
    }
}

/// Why a health check of Postgres failed.
#[derive(Debug)]
pub enum CheckError {
    /// No pooled connection came within the timeout (all busy, or none could be opened).
    NoConnection,
    /// A connection, but no answer within the timeout.
    NoAnswer,
    /// Postgres or the connection failed, as sqlx reported it.
    Db(sqlx::Error),
}

/// How long one statement may take on the client side, its wait for a connection included:
/// the acquire timeout, then the statement timeout, then half a second for the round trip.
/// With the defaults (4.5 s) that is inside the request timeout (5 s), so a statement that
/// gets no answer at all (a stopped server, a partition) is seen and counted by the store
/// before the request gives up on it. Not capped by the request timeout: a statement may
/// legitimately wait on a lock for its whole statement timeout, and that is no outage.
fn statement_deadline(settings: &Settings) -> Duration {
    let d = &settings.database;
    Duration::from_millis(d.acquire_timeout_ms + d.statement_timeout_ms + 500)
}

/// Runs one query, recording its latency and any error under `operation`.
pub(crate) async fn timed<T, F>(operation: &'static str, fut: F) -> Result<T, DbError>
where
    F: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let start = Instant::now();
    let result = fut.await;
    m::cached::record(
        m::DB_QUERY_DURATION,
        &[("operation", operation)],
        start.elapsed().as_secs_f64(),
    );
    result.map_err(|e| {
        metrics::counter!(m::DB_ERRORS, "operation" => operation).increment(1);
        DbError::from(e)
    })
}
