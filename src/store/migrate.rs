//! Migrations: applying the embedded ones, or waiting until someone else has.

use sqlx::{AssertSqlSafe, Executor};

use super::{DbError, Store};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Store {
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
        let applied: Vec<i64> = sqlx::query_scalar(
            self.settings
                .schema
                .sql("SELECT version FROM {schema}._sqlx_migrations WHERE success"),
        )
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
}
