//! Everything that speaks SQL: the pool, migrations, sessions, cache, batching and cleanup.
//!
//! The store never sees HTTP types. Its callers get plain records or a [`DbError`], which says
//! only whether the database was unavailable, too slow, or failed in some other way.
//!
//! # Layout
//! - [`error`]: [`DbError`], mapped from sqlx errors and SQLSTATEs.
//! - [`status`]: [`DbStatus`], what every store and the health probes know of the database.
//! - [`pool`]: the sqlx pool and connection start-up options.
//! - [`conns`]: the free list of held connections in front of the pool.
//! - [`migrate`]: the embedded migrations.
//! - [`batch`]: coalescing concurrent calls into one statement.
//! - [`cache`] (with its writes in `cache_write`), [`sessions`]: the data, in SQL.
//! - [`cleanup`]: the fleet-wide deletion of expired rows.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;

use crate::config::Settings;
use crate::metrics as m;

/// Batchers that share the pool: cache reads and writes, session reads and refreshes.
const BATCH_KINDS: usize = 4;

pub use cache::{CacheEntry, CacheKey, CacheValue};
pub use sessions::{NewSession, SessionRecord, TokenHash};

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
mod cache_write;
pub mod cleanup;
pub mod conns;
pub mod error;
pub mod migrate;
pub mod pool;
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
    /// Qualifies the statements built outside the hot path (probe, cleanup, migrations check).
    pub(crate) schema: sql::Schema,
}

impl Store {
    /// Builds the pool (lazily: no connection is opened here) and the batchers.
    /// Must be called inside a tokio runtime.
    pub fn new(settings: &Settings) -> Result<Self, DbError> {
        Self::with_status(settings, Arc::new(DbStatus::default()))
    }

    /// Like [`Store::new`], sharing `status` with other stores on the same database.
    pub fn with_status(settings: &Settings, status: Arc<DbStatus>) -> Result<Self, DbError> {
        let pool = pool::build_pool(settings)?;
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
        let schema = sql::Schema::new(&d.schema);
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
                cleanup_batch_size: settings.cleanup.batch_size,
                cleanup_lease_seconds: settings.cleanup.lease_seconds,
                schema,
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
            sqlx::query_scalar(self.settings.schema.sql(
                "SELECT to_regclass('{schema}.sessions') IS NOT NULL \
                 AND to_regclass('{schema}.cache') IS NOT NULL \
                 AND to_regclass('{schema}.cache_tags') IS NOT NULL \
                 AND to_regclass('{schema}.leases') IS NOT NULL",
            ))
            .fetch_one(c)
        })
        .await?;
        Ok(present)
    }
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
