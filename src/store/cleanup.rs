//! Fleet-wide cleanup of expired sessions, cache entries and tag invalidation records, and the
//! cache's size cap.
//!
//! Every sidecar runs the loop, but a pass first takes the `cleanup` lease row with a conditional
//! UPDATE that only one sidecar can win while the lease is held. That works through transaction
//! poolers and on Postgres-compatible databases where session advisory locks do not. Rows go in
//! batches of `cleanup.batch_size`, each its own short statement, so no pass holds long locks.
//!
//! After the expired rows, a pass enforces `cache.max_bytes` the way Rails' Solid Cache bounds
//! its table: entries are weighed when written (the `byte_size` column, see the migration), the
//! weights summed, and the oldest entries evicted first until the cache fits. Solid Cache
//! estimates its size from a sample and takes random victims among the oldest, so that the
//! several processes that expire at once overlap less; here the lease makes one evictor at a
//! time, so the sum is exact (an index-only scan of `cache_updated_at_idx`) and the victims are
//! exactly the oldest. "Oldest" is by last write (`updated_at`), not first insertion: an entry
//! rewritten a second ago holds fresh data.

use std::time::Duration;

use rand::RngExt;

use super::{DbError, Store};
use crate::config::MAX_TTL_SECONDS;
use crate::metrics as m;
use crate::shutdown::Lifecycle;

/// What one pass did; `None` from [`Store::cleanup_pass`] means another sidecar holds the lease.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub sessions_deleted: u64,
    pub cache_deleted: u64,
    pub tags_deleted: u64,
    /// Live cache entries evicted to keep the cache within `cache.max_bytes`, and their weight.
    pub cache_evicted: u64,
    pub cache_evicted_bytes: u64,
}

/// Tables cleaned, with their key column and how long a row is kept after its `expires_at`.
const TABLES: [(&str, &str, u32); 4] = [
    ("sessions", "id", 0),
    ("cache", "key", 0),
    // A tag record matters while an entry written before its expiry may still live: at most the
    // longest TTL after it (and a day, for good measure). Then `_tags` answers null for the tag,
    // which no live entry can tell apart.
    ("cache_tags", "tag", MAX_TTL_SECONDS + 86_400),
    // An expired fill lease still lets its slow holder write while nobody has taken it over.
    ("cache_leases", "key", 3600),
];

/// The statement that deletes one batch of expired rows of `table`. `SKIP LOCKED` keeps the
/// pass from waiting on rows a client is writing right now. The batch size is written into the
/// statement, not bound: under the generic plans the pool's connections use (see
/// `start_up_options`), `LIMIT $1` is planned as a tenth of the expired rows, and with many of
/// them that can turn the index scan into a full one.
fn batch_statement(table: &str, key: &str, kept_seconds: u32, batch: u64) -> String {
    format!(
        "DELETE FROM {{schema}}.{table} WHERE {key} IN \
         (SELECT {key} FROM {{schema}}.{table} \
          WHERE expires_at <= now() - interval '{kept_seconds} seconds' LIMIT {batch} \
          FOR UPDATE SKIP LOCKED)"
    )
}

/// The statement that evicts the oldest entries while the cache is over its cap by `$1` bytes:
/// at most `batch` rows, and no more of them than needed (a running sum of their weights).
/// `SKIP LOCKED` keeps it from waiting on rows a client is writing, which also means it never
/// waits on a lock at all and so cannot deadlock with a batched write. Answers how many rows
/// went and what they weighed.
fn evict_statement(batch: u64) -> String {
    format!(
        "WITH oldest AS (\
             SELECT key, updated_at, byte_size + coalesce(raw_size, 0) AS byte_size \
             FROM {{schema}}.cache \
             ORDER BY updated_at LIMIT {batch} FOR UPDATE SKIP LOCKED), \
         victims AS (\
             SELECT key FROM (SELECT key, sum(byte_size) OVER \
                 (ORDER BY updated_at, key ROWS UNBOUNDED PRECEDING) - byte_size AS before \
                 FROM oldest) o WHERE before < $1), \
         gone AS (\
             DELETE FROM {{schema}}.cache c USING victims v WHERE c.key = v.key \
             RETURNING c.byte_size + coalesce(c.raw_size, 0) AS byte_size) \
         SELECT count(*), coalesce(sum(byte_size), 0)::int8 FROM gone"
    )
}

impl Store {
    /// The cache's weight: the sum of its entries' `byte_size`, plus the `raw_size` of those
    /// holding a value that is not JSON (see the migrations); two index-only scans.
    pub async fn cache_bytes(&self) -> Result<u64, DbError> {
        let total: i64 = run!(self.conns, "cache_size", |c| sqlx::query_scalar(
            self.settings.schema.sql(
                "SELECT coalesce(sum(byte_size), 0)::int8 \
                 + (SELECT coalesce(sum(raw_size), 0)::int8 FROM {schema}.cache WHERE raw_size > 0) \
                 FROM {schema}.cache"
            )
        )
        .fetch_one(c))
        .await?;
        Ok(total.max(0) as u64)
    }

    /// Runs one cleanup pass if this sidecar wins the lease. `holder` names this sidecar in the
    /// lease row. Stops between batches when `lifecycle` is stopped.
    pub async fn cleanup_pass(
        &self,
        holder: &str,
        lifecycle: &Lifecycle,
    ) -> Result<Option<PassReport>, DbError> {
        let won: Option<String> = run!(self.conns, "cleanup_lease", |c| sqlx::query_scalar(
            self.settings.schema.sql(
                "UPDATE {schema}.leases \
                 SET holder = $1, expires_at = now() + make_interval(secs => $2) \
                 WHERE name = 'cleanup' AND (expires_at <= now() OR holder = $1) RETURNING holder",
            ),
        )
        .bind(holder)
        .bind(self.settings.cleanup_lease_seconds as f64)
        .fetch_optional(c))
        .await?;
        if won.is_none() {
            return Ok(None);
        }
        let mut result = self.delete_expired(holder, lifecycle).await;
        if let Ok(report) = &mut result
            && self.settings.cache_max_bytes > 0
        {
            match self.evict_oldest(holder, lifecycle).await {
                Ok((n, bytes)) => {
                    report.cache_evicted = n;
                    report.cache_evicted_bytes = bytes;
                }
                Err(e) => result = Err(e),
            }
        }
        // Release the lease whatever happened, so the next pass need not wait for it to expire.
        let _ = run!(self.conns, "cleanup_lease", |c| {
            sqlx::query(self.settings.schema.sql(
                "UPDATE {schema}.leases SET expires_at = '-infinity' \
                 WHERE name = 'cleanup' AND holder = $1",
            ))
            .bind(holder)
            .execute(c)
        })
        .await;
        result.map(Some)
    }

    /// Extends our lease before each batch; false when another sidecar has taken it over (ours
    /// expired: this pass ran longer than cleanup.lease_seconds), so two passes never overlap.
    async fn renew_lease(&self, holder: &str) -> Result<bool, DbError> {
        let renewed: Option<String> = run!(self.conns, "cleanup_lease", |c| {
            sqlx::query_scalar(self.settings.schema.sql(
                "UPDATE {schema}.leases SET expires_at = now() + make_interval(secs => $2) \
                 WHERE name = 'cleanup' AND holder = $1 AND expires_at > now() RETURNING holder",
            ))
            .bind(holder)
            .bind(self.settings.cleanup_lease_seconds as f64)
            .fetch_optional(c)
        })
        .await?;
        Ok(renewed.is_some())
    }

    async fn delete_expired(
        &self,
        holder: &str,
        lifecycle: &Lifecycle,
    ) -> Result<PassReport, DbError> {
        let batch = self.settings.cleanup_batch_size as u64;
        let mut report = PassReport::default();
        for (table, key, kept_seconds) in TABLES {
            let sql = self
                .settings
                .schema
                .sql(&batch_statement(table, key, kept_seconds, batch));
            loop {
                if lifecycle.is_stopped() || !self.renew_lease(holder).await? {
                    return Ok(report);
                }
                let done = run!(self.conns, "cleanup_delete", |c| {
                    sqlx::query(sql.clone()).execute(c)
                })
                .await?;
                let n = done.rows_affected();
                metrics::counter!(m::EXPIRED_ROWS_DELETED, "table" => table).increment(n);
                match table {
                    "sessions" => report.sessions_deleted += n,
                    "cache" => report.cache_deleted += n,
                    "cache_tags" => report.tags_deleted += n,
                    _ => {}
                }
                if n < batch {
                    break;
                }
            }
        }
        Ok(report)
    }
}

impl Store {
    /// Evicts the oldest cache entries until the cache weighs at most `cache.max_bytes`, in
    /// batches of `cleanup.batch_size`, renewing the lease before each. Returns how many entries
    /// went and their weight.
    async fn evict_oldest(
        &self,
        holder: &str,
        lifecycle: &Lifecycle,
    ) -> Result<(u64, u64), DbError> {
        let max = self.settings.cache_max_bytes;
        let mut over = self.cache_bytes().await?.saturating_sub(max);
        let sql = self
            .settings
            .schema
            .sql(&evict_statement(self.settings.cleanup_batch_size as u64));
        let (mut entries, mut bytes) = (0, 0);
        while over > 0 {
            if lifecycle.is_stopped() || !self.renew_lease(holder).await? {
                break;
            }
            let (n, weight): (i64, i64) = run!(self.conns, "cache_evict", |c| {
                sqlx::query_as(sql.clone()).bind(over as i64).fetch_one(c)
            })
            .await?;
            let (n, weight) = (n.max(0) as u64, weight.max(0) as u64);
            metrics::counter!(m::CACHE_EVICTED).increment(n);
            entries += n;
            bytes += weight;
            if n == 0 {
                // Every candidate is being written right now: the next pass tries again.
                break;
            }
            over = over.saturating_sub(weight);
        }
        Ok((entries, bytes))
    }
}

/// The background loop: a pass every `interval` (plus up to 20% jitter, so a fleet started
/// together does not contend at the same instant), until shutdown.
pub async fn run(store: Store, holder: String, interval: Duration, lifecycle: Lifecycle) {
    loop {
        let jitter = rand::rng().random_range(0.0..0.2);
        let wait = interval.mul_f64(1.0 + jitter);
        tokio::select! {
            _ = lifecycle.stopped() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // Not `ensure_available`: a background pass must not take a trial request's place
        // while the circuit is open.
        if !store
            .status
            .migrated
            .load(std::sync::atomic::Ordering::Acquire)
            || store.status.circuit.is_open()
        {
            continue;
        }
        match store.cleanup_pass(&holder, &lifecycle).await {
            Ok(Some(r))
                if r.sessions_deleted + r.cache_deleted + r.tags_deleted + r.cache_evicted > 0 =>
            {
                tracing::info!(
                    sessions_deleted = r.sessions_deleted,
                    cache_deleted = r.cache_deleted,
                    tags_deleted = r.tags_deleted,
                    cache_evicted = r.cache_evicted,
                    cache_evicted_bytes = r.cache_evicted_bytes,
                    "cleanup pass deleted expired rows and evicted the oldest over cache.max_bytes"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cleanup pass failed; will retry next interval"),
        }
    }
}
