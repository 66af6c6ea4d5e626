//! Fleet-wide cleanup of expired sessions and cache entries.
//!
//! Every sidecar runs the loop, but a pass first takes the `cleanup` lease row with a conditional
//! UPDATE that only one sidecar can win while the lease is held. That works through transaction
//! poolers and on Postgres-compatible databases where session advisory locks do not. Rows go in
//! batches of `cleanup.batch_size`, each its own short statement, so no pass holds long locks.

use std::time::Duration;

use rand::RngExt;

use super::{DbError, Store};
use crate::metrics as m;
use crate::shutdown::Lifecycle;

/// What one pass did; `None` from [`Store::cleanup_pass`] means another sidecar holds the lease.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub sessions_deleted: u64,
    pub cache_deleted: u64,
}

/// Tables cleaned, with their key column.
const TABLES: [(&str, &str); 2] = [("sessions", "id"), ("cache", "key")];

/// The statement that deletes one batch of expired rows of `table`. `SKIP LOCKED` keeps the
/// pass from waiting on rows a client is writing right now. The batch size is written into the
/// statement, not bound: under the generic plans the pool's connections use (see
/// `start_up_options`), `LIMIT $1` is planned as a tenth of the expired rows, and with many of
/// them that can turn the index scan into a full one.
fn batch_statement(table: &str, key: &str, batch: u64) -> String {
    format!(
        "DELETE FROM {{schema}}.{table} WHERE {key} IN \
         (SELECT {key} FROM {{schema}}.{table} WHERE expires_at <= now() LIMIT {batch} \
          FOR UPDATE SKIP LOCKED)"
    )
}

impl Store {
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
        let result = self.delete_expired(holder, lifecycle).await;
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
        for (table, key) in TABLES {
            let sql = self
                .settings
                .schema
                .sql(&batch_statement(table, key, batch));
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
                    _ => report.cache_deleted += n,
                }
                if n < batch {
                    break;
                }
            }
        }
        Ok(report)
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
        if store.ensure_available().is_err() {
            continue;
        }
        match store.cleanup_pass(&holder, &lifecycle).await {
            Ok(Some(r)) if r.sessions_deleted + r.cache_deleted > 0 => tracing::info!(
                sessions_deleted = r.sessions_deleted,
                cache_deleted = r.cache_deleted,
                "cleanup pass deleted expired rows"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cleanup pass failed; will retry next interval"),
        }
    }
}
