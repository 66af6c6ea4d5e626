//! Everything that speaks SQL: the pool, migrations, sessions, cache, batching and cleanup.
//!
//! The store never sees HTTP types. Its callers get plain records or a [`DbError`], which says
//! only whether the database was unavailable, too slow, or failed in some other way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Executor};

use crate::config::{DatabaseSettings, Settings};
use crate::metrics as m;

/// Batchers that share the pool: cache reads and writes, session reads and refreshes.
const BATCH_KINDS: usize = 4;

pub use cache::{CacheEntry, CacheKey};
pub use sessions::{NewSession, SessionRecord, TokenHash};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Runs one statement on a held connection (see [`conns`]), timed under `operation`:
/// `run!(self.conns, "cache_delete", |c| sqlx::query("...").execute(c))`.
/// A future of `Result<T, DbError>`.
macro_rules! run {
    ($conns:expr, $op:expr, |$c:ident| $stmt:expr) => {
        async {
        match $conns.get().await {
            Ok(mut held) => {
                let result = {
                    let $c = held.conn();
                    $crate::store::timed($op, $stmt).await
                };
                held.finish(&result);
                result
            }
            Err(e) => {
                ::metrics::counter!($crate::metrics::DB_ERRORS, "operation" => $op).increment(1);
                Err(e)
            }
        }
        }
    };
}
pub mod batch;
pub mod cache;
pub mod cleanup;
pub mod conns;
mod rows;
pub mod sessions;

/// Why a database call failed, as far as a caller needs to know.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DbError {
    /// The database refused or failed the work for a reason a retry later may clear
    /// (shutting down, deadlock, resources, read-only, no answer in time).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The connection broke (or none could be opened): Postgres went away or restarted.
    #[error("database connection lost: {0}")]
    ConnectionLost(String),
    /// Every pooled connection stayed busy for `database.acquire_timeout_ms`.
    #[error("no database connection free within the acquire timeout")]
    PoolExhausted,
    /// Postgres cancelled the statement (statement_timeout).
    #[error("database statement timed out")]
    Timeout,
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut => DbError::PoolExhausted,
            sqlx::Error::PoolClosed => DbError::Unavailable(e.to_string()),
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => DbError::ConnectionLost(e.to_string()),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("57014") => DbError::Timeout,
                // 08xxx connection exceptions; 57P01-03 admin shutdown, crash shutdown, cannot
                // connect now: the session is gone.
                Some(c) if c.starts_with("08") || c.starts_with("57P") => {
                    DbError::ConnectionLost(e.to_string())
                }
                // Other conditions a retry may clear, answered 503 rather than 500: 40001/40P01
                // serialization failure, deadlock; 55P03 lock not available; 53xxx insufficient
                // resources; 25006 read-only transaction (e.g. just after a failover).
                Some(c)
                    if c.starts_with("40")
                        || c.starts_with("53")
                        || c == "55P03"
                        || c == "25006" =>
                {
                    DbError::Unavailable(e.to_string())
                }
                _ => DbError::Other(e.to_string()),
            },
            _ => DbError::Other(e.to_string()),
        }
    }
}

/// What the stores know about the database, shared by every data thread's store and the
/// health probes.
pub struct DbStatus {
    /// Migrations are applied (set once by the bootstrap task, through [`DbStatus::mark_migrated`]).
    pub migrated: AtomicBool,
    migrated_signal: tokio::sync::watch::Sender<bool>,
    /// The last health probe reached Postgres.
    pub reachable: AtomicBool,
    /// Counts the times Postgres was found gone (a failed probe, a broken connection). Each
    /// store empties its free list when this moves: connections resting there are likely dead,
    /// also on the data threads that sent no statement during the outage.
    outages: AtomicU64,
    /// When a statement last succeeded on any store (milliseconds since `started`, 0 = never).
    last_ok_ms: AtomicU64,
    started: Instant,
}

impl Default for DbStatus {
    fn default() -> Self {
        Self {
            migrated: AtomicBool::new(false),
            migrated_signal: tokio::sync::watch::Sender::new(false),
            reachable: AtomicBool::new(false),
            outages: AtomicU64::new(0),
            last_ok_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
}

impl DbStatus {
    fn mark_migrated(&self) {
        self.migrated.store(true, Ordering::Release);
        self.migrated_signal.send_replace(true);
    }

    /// Returns once migrations are applied (at once if they already are).
    pub async fn wait_migrated(&self) {
        let _ = self.migrated_signal.subscribe().wait_for(|m| *m).await;
    }

    /// Records whether Postgres answered the health probe.
    pub fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Release);
        if !reachable {
            self.record_outage();
        }
    }

    pub(crate) fn record_outage(&self) {
        self.outages.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn outages(&self) -> u64 {
        self.outages.load(Ordering::Acquire)
    }

    pub(crate) fn record_success(&self) {
        // Every statement of every data thread passes here: write the shared line only when
        // the value changes (once a millisecond at most).
        let ms = (self.started.elapsed().as_millis() as u64).max(1);
        if self.last_ok_ms.load(Ordering::Relaxed) != ms {
            self.last_ok_ms.store(ms, Ordering::Release);
        }
    }

    /// Whether some statement succeeded within `window`: Postgres answered recently, even if
    /// every connection is busy right now.
    pub fn succeeded_within(&self, window: Duration) -> bool {
        let last = self.last_ok_ms.load(Ordering::Acquire);
        last > 0
            && (self.started.elapsed().as_millis() as u64).saturating_sub(last)
                <= window.as_millis() as u64
    }
}

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
}

/// The settings the store reads, copied out of [`Settings`].
#[derive(Clone, Debug)]
pub struct StoreSettings {
    pub connect_timeout: Duration,
    /// Connections this store opens at start and keeps (its share of `min_connections`).
    pub min_connections: u32,
    pub session_update_age_seconds: u32,
    pub cleanup_batch_size: u32,
    pub cleanup_lease_seconds: u32,
}

impl Store {
    /// Builds the pool (lazily: no connection is opened here) and the batchers.
    /// Must be called inside a tokio runtime.
    pub fn new(settings: &Settings) -> Result<Self, DbError> {
        Self::with_status(settings, Arc::new(DbStatus::default()))
    }

    /// Like [`Store::new`], sharing `status` with other stores on the same database.
    pub fn with_status(settings: &Settings, status: Arc<DbStatus>) -> Result<Self, DbError> {
        let pool = build_pool(settings)?;
        Ok(Self::with_pool(pool, status, settings))
    }

    pub fn with_pool(pool: PgPool, status: Arc<DbStatus>, settings: &Settings) -> Self {
        let b = &settings.batch;
        let conns = Arc::new(conns::Conns::new(
            pool.clone(),
            settings.idle_timeout(),
            status.clone(),
        ));
        let d = &settings.database;
        let share = batch::Share::new(d.max_connections as usize, BATCH_KINDS, b.max_in_flight);
        let limits = batch::BatchLimits {
            max_size: b.max_size,
            max_in_flight: share.per_kind,
            reserved: share.reserved,
            shared: Arc::new(tokio::sync::Semaphore::new(share.shared)),
            // Waiting for a connection, then the statement, then a margin for the round trip.
            deadline: Duration::from_millis(d.acquire_timeout_ms + d.statement_timeout_ms + 1000),
        };
        Self {
            cache: Arc::new(cache::CacheBatchers::new(conns.clone(), limits.clone())),
            sessions: Arc::new(sessions::SessionBatchers::new(
                conns.clone(),
                limits,
                settings.sessions.update_age_seconds,
            )),
            pool,
            conns,
            status,
            settings: Arc::new(StoreSettings {
                connect_timeout: Duration::from_secs(d.connect_timeout_seconds),
                min_connections: d.min_connections,
                session_update_age_seconds: settings.sessions.update_age_seconds,
                cleanup_batch_size: settings.cleanup.batch_size,
                cleanup_lease_seconds: settings.cleanup.lease_seconds,
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn status(&self) -> &Arc<DbStatus> {
        &self.status
    }

    /// Fails fast when the database is known to be down, instead of waiting out the acquire timeout.
    pub(crate) fn ensure_available(&self) -> Result<(), DbError> {
        if !self.status.migrated.load(Ordering::Acquire) {
            return Err(DbError::Unavailable(
                "database not ready (migrations not applied yet)".into(),
            ));
        }
        if !self.status.reachable.load(Ordering::Acquire) {
            return Err(DbError::Unavailable(
                "database unreachable at the last health probe".into(),
            ));
        }
        Ok(())
    }

    /// Creates the schema if needed and applies the embedded migrations.
    pub async fn migrate(&self, schema: &str) -> Result<(), DbError> {
        self.reach().await?;
        // `schema` is validated as a plain lower-case identifier in config, so quoting is enough.
        (&self.pool)
            .execute(AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
            )))
            .await?;
        // Every pooled connection has the schema first on its search_path, so the migrations
        // (and sqlx's ledger table) land in it.
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(inner) => DbError::from(inner),
            other => DbError::Other(other.to_string()),
        })?;
        self.status.mark_migrated();
        Ok(())
    }

    /// Makes sure a connection can be had within `database.connect_timeout_seconds`. Only this
    /// part is bounded: a migration that has started is never cut off halfway (it holds the
    /// migration lock until it finishes).
    async fn reach(&self) -> Result<(), DbError> {
        // The following statements go through the sqlx pool itself; hand it our free connections.
        self.conns.clear();
        let timeout = self.settings.connect_timeout;
        match tokio::time::timeout(timeout, self.pool.acquire()).await {
            Ok(conn) => conn.map(drop).map_err(DbError::from),
            Err(_) => Err(DbError::Unavailable(format!(
                "no connection within {} s (database.connect_timeout_seconds)",
                timeout.as_secs()
            ))),
        }
    }

    /// For `migrate_on_start = false`: succeeds once every embedded migration has been applied
    /// (by `pgsidecar migrate` or another sidecar).
    pub async fn check_migrated(&self) -> Result<(), DbError> {
        self.reach().await?;
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| match DbError::from(e) {
                    DbError::Other(_) => {
                        DbError::Other("migrations not applied; run `pgsidecar migrate`".into())
                    }
                    other => other,
                })?;
        if MIGRATOR.iter().any(|m| !applied.contains(&m.version)) {
            return Err(DbError::Other(
                "migrations not applied; run `pgsidecar migrate`".into(),
            ));
        }
        self.status.mark_migrated();
        Ok(())
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

    /// Whether any statement succeeded within `window`, on this store or another sharing its
    /// status (see [`DbStatus::succeeded_within`]).
    pub fn answered_within(&self, window: Duration) -> bool {
        self.status.succeeded_within(window)
    }

    /// Hands every free connection back to the pool (at shutdown, before closing it).
    pub fn release_connections(&self) {
        self.conns.clear();
    }

    /// One round trip; returns whether the sidecar's tables are present.
    pub async fn probe(&self) -> Result<bool, DbError> {
        // Through the held connections like every other statement: connections resting in
        // that free list are invisible to the sqlx pool, so a direct acquire could starve.
        let present: bool = run!(self.conns, "health_probe", |c| {
            sqlx::query_scalar(
                "SELECT to_regclass('sessions') IS NOT NULL AND to_regclass('cache') IS NOT NULL \
                 AND to_regclass('leases') IS NOT NULL",
            )
            .fetch_one(c)
        })
        .await?;
        Ok(present)
    }
}

fn build_pool(settings: &Settings) -> Result<PgPool, DbError> {
    let d = &settings.database;
    let opts: PgConnectOptions = d
        .url
        .expose()
        .parse::<PgConnectOptions>()
        .map_err(|e| {
            DbError::Other(format!(
                "invalid database url: {}",
                crate::config::redact_url(&e.to_string())
            ))
        })?
        .application_name("pgsidecar");
    Ok(PgPoolOptions::new()
        .max_connections(d.max_connections)
        .min_connections(d.min_connections)
        .idle_timeout(Some(settings.idle_timeout()))
        .acquire_timeout(Duration::from_millis(d.acquire_timeout_ms))
        // sqlx pings a connection from its idle queue before handing it out, so one left
        // there from before a Postgres restart is never given to a statement. The store's own
        // free list (conns.rs) serves almost every statement, without that ping.
        .test_before_acquire(true)
        .connect_lazy_with(start_up_options(opts, d)))
}

/// Settings every connection starts with, after the ones the operator gave in the URL's
/// `options` or in `PGOPTIONS` (sqlx appends ours, and the last `-c` of a name wins).
fn start_up_options(opts: PgConnectOptions, d: &DatabaseSettings) -> PgConnectOptions {
    let operator_chose_plans = opts
        .get_options()
        .is_some_and(|o| o.contains("plan_cache_mode"));
    let opts = opts.options([
        ("search_path", d.schema.clone()),
        ("statement_timeout", d.statement_timeout_ms.to_string()),
    ]);
    if operator_chose_plans {
        return opts;
    }
    // Plan each prepared statement once per connection (again only when Postgres invalidates
    // the plan). Left to choose, Postgres re-plans the batched `= ANY($1)` and `UNNEST`
    // statements on every execution: it costs their generic plan for ten elements and a custom
    // plan for the real count, so for small batches the custom one always looks cheaper. At one
    // connection that made a cache read cost Postgres about 100 µs of CPU instead of 55.
    // Every statement here keeps an index plan without its parameters' values: the prefix
    // delete is a key range and the cleanup's LIMIT a literal for that reason.
    // Needs PostgreSQL 12 or newer.
    opts.options([("plan_cache_mode", "force_generic_plan")])
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options_for(url: &str) -> String {
        let d = Settings::load_from(None, &[]).unwrap().database;
        let opts = start_up_options(url.parse().unwrap(), &d);
        opts.get_options().unwrap_or_default().to_string()
    }

    #[test]
    fn connections_use_generic_plans_unless_the_operator_chose() {
        let ours = options_for("postgres://u@db/app");
        assert!(
            ours.contains("plan_cache_mode=force_generic_plan"),
            "{ours}"
        );
        assert!(ours.contains("statement_timeout=2000"), "{ours}");
        let theirs = options_for("postgres://u@db/app?options=-c%20plan_cache_mode%3Dauto");
        assert!(theirs.contains("plan_cache_mode=auto"), "{theirs}");
        assert!(!theirs.contains("force_generic_plan"), "{theirs}");
        assert!(theirs.contains("statement_timeout=2000"), "{theirs}");
    }
}
