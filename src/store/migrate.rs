//! Migrations: applying the embedded ones, or waiting until someone else has.
//!
//! Migrations are additive (new tables, new nullable columns, new indexes; nothing renamed or
//! dropped while a released binary still reads it), so during a rolling deploy an older binary
//! serves on a schema a newer one has migrated: the ledger may hold versions this binary does
//! not know, which it accepts and reports in one log line.

use sqlx::migrate::{MigrateError, Migration, MigrationType, Migrator};
use std::borrow::Cow;
use std::sync::LazyLock;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, Row, SqlSafeStr};

use super::{DbError, Store, pool};

/// Every file of `migrations/`, embedded in the binary, oldest first (a unit test checks that
/// none is left out).
macro_rules! embed {
    ($($file:literal),* $(,)?) => {
        [$(($file, include_str!(concat!("../../migrations/", $file)))),*]
    };
}
const FILES: [(&str, &str); 4] = embed![
    "20261123000001_init.sql",
    "20261124160001_cache_byte_size.sql",
    "20261129001400_cache_values_and_tag_records.sql",
    "20261130000001_notifications_and_leases.sql",
];

/// The embedded migrations, as `sqlx::migrate!("./migrations")` would make them: version and
/// description from the file name, sqlx's checksum of the text (what the ledger of a database
/// migrated by any earlier binary holds). Built here rather than by the macro, whose crate
/// compiles sqlx, tokio and rustls a second time for the build host (about 30 s of CPU in each
/// build, CI's included).
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    Migrator::with_migrations(
        FILES
            .iter()
            .map(|(file, sql)| {
                let (version, rest) = file.split_once('_').expect("VERSION_DESCRIPTION.sql");
                let kind = MigrationType::from_filename(rest);
                Migration::new(
                    version.parse().expect("a numeric migration version"),
                    Cow::Owned(rest.trim_end_matches(kind.suffix()).replace('_', " ")),
                    kind,
                    AssertSqlSafe(*sql).into_sql_str(),
                    sql.starts_with("-- no-transaction"),
                )
            })
            .collect(),
    )
});

/// The embedded migrations as this binary applies them: creating the schema under the
/// migration lock (so sidecars starting together do not race on it), and accepting versions in
/// the ledger that it does not know (applied by a newer binary).
fn migrator(schema: &str) -> Migrator {
    let mut m = Migrator::with_migrations(MIGRATOR.iter().cloned().collect());
    m.set_ignore_missing(true);
    // `schema` is validated as a plain lower-case identifier in config; quoted, a reserved word works too.
    m.create_schema(format!("\"{schema}\""));
    m
}

impl Store {
    /// Creates the schema if needed and applies the embedded migrations, on a connection of its
    /// own (`database.migrate_url` when set, else `database.url`) that holds sqlx's migration
    /// lock, a session advisory lock: one sidecar migrates while the others wait, then find
    /// nothing left to do.
    pub async fn migrate(&self, schema: &str) -> Result<(), DbError> {
        let mut conn = self.migration_connection().await?;
        let migrator = migrator(schema);
        // `run_direct` on the connection itself: `run` takes it through `Acquire`, whose
        // future is not Send here (the bootstrap task must be).
        let result = migrator.run_direct(None, &mut conn, false).await;
        let result = match result {
            Ok(()) => self.report_newer_schema(&mut conn).await,
            Err(MigrateError::Execute(inner)) => Err(DbError::from(inner)),
            Err(other) => Err(DbError::Other(other.to_string())),
        };
        let _ = conn.close().await;
        result?;
        self.status.mark_migrated();
        Ok(())
    }

    /// The connection migrations run on, opened within `database.connect_timeout_seconds`.
    /// Only the connecting is bounded: a migration that has started is never cut off halfway
    /// (it holds the migration lock until it finishes).
    async fn migration_connection(&self) -> Result<PgConnection, DbError> {
        let (options, after_connect) = pool::migration_options(&self.settings.database)?;
        let mut conn = connect(&options, self.settings.connect_timeout).await?;
        if let Some(set) = after_connect {
            conn.execute(AssertSqlSafe(set)).await?;
        }
        Ok(conn)
    }

    /// For `migrate_on_start = false`, and behind a transaction-mode pooler without
    /// `database.migrate_url`: succeeds once every embedded migration has been applied (by
    /// `pgsidecar migrate` or another sidecar).
    pub async fn check_migrated(&self) -> Result<(), DbError> {
        self.reach().await?;
        let mut conn = self.pool.acquire().await?;
        let applied = applied_versions(&mut conn, &self.settings.schema)
            .await
            .map_err(|e| match e {
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
        log_newer(&applied);
        self.status.mark_migrated();
        Ok(())
    }

    /// Makes sure a pooled connection can be had within `database.connect_timeout_seconds`.
    async fn reach(&self) -> Result<(), DbError> {
        // The following statements go through the sqlx pool itself; hand it our free connections.
        self.conns.clear();
        let timeout = self.settings.connect_timeout;
        // First a connection of its own, to name the cause when there is none: sqlx's pool
        // retries a refused connection until its acquire timeout and then reports only that.
        let _ = connect(&self.pool.connect_options(), timeout)
            .await?
            .close()
            .await;
        match tokio::time::timeout(timeout, self.pool.acquire()).await {
            Ok(conn) => conn.map(drop).map_err(DbError::from),
            Err(_) => Err(DbError::Unavailable(format!(
                "no connection within {} s (database.connect_timeout_seconds)",
                timeout.as_secs()
            ))),
        }
    }

    /// Logs the versions in the ledger this binary does not know, if any.
    async fn report_newer_schema(&self, conn: &mut PgConnection) -> Result<(), DbError> {
        log_newer(&applied_versions(conn, &self.settings.schema).await?);
        Ok(())
    }
}

/// One connection with `options`, within `timeout` (`database.connect_timeout_seconds`). A
/// failure names the server and the cause; a TLS failure keeps its own kind and fixed text (see
/// `tls::TlsFailure`).
async fn connect(options: &PgConnectOptions, timeout: Duration) -> Result<PgConnection, DbError> {
    let at = format!("{}:{}", options.get_host(), options.get_port());
    match tokio::time::timeout(timeout, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(match DbError::of(&e) {
            tls @ DbError::Tls(_) => tls,
            _ => DbError::Unavailable(format!(
                "cannot connect to PostgreSQL at {at}: {}",
                super::error::describe(&e)
            )),
        }),
        Err(_) => Err(DbError::Unavailable(format!(
            "cannot connect to PostgreSQL at {at}: no answer within {} s \
             (database.connect_timeout_seconds)",
            timeout.as_secs()
        ))),
    }
}

/// The versions the ledger records as applied. One simple-protocol statement (no prepared
/// statement, one round trip), so it works through any pooler.
async fn applied_versions(
    conn: &mut PgConnection,
    schema: &super::sql::Schema,
) -> Result<Vec<i64>, DbError> {
    let rows = sqlx::raw_sql(
        schema.sql("SELECT version FROM {schema}._sqlx_migrations WHERE success ORDER BY version"),
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| r.try_get::<i64, _>(0).map_err(DbError::from))
        .collect()
}

/// One log line when the schema was migrated by a newer binary (versions this one lacks).
fn log_newer(applied: &[i64]) {
    let unknown: Vec<i64> = applied
        .iter()
        .copied()
        .filter(|v| !MIGRATOR.version_exists(*v))
        .collect();
    if let Some(newest) = unknown.last() {
        tracing::warn!(
            unknown_versions = ?unknown,
            schema_version = newest,
            binary_version = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0),
            "the schema has migrations this binary does not know (applied by a newer pgsidecar); \
             serving with the tables and columns it knows (migrations are additive)"
        );
    }
}

#[cfg(test)]
mod tests {
    use sqlx::migrate::Migrator;

    /// What is embedded is what `sqlx::migrate!("./migrations")` would embed: sqlx resolving the
    /// directory itself (the resolver behind the macro) gives the same files, in the same order,
    /// with the same description, type, text and checksum (the ledger's).
    #[tokio::test]
    async fn the_embedded_migrations_are_what_sqlx_resolves_from_the_directory() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"));
        let resolved = Migrator::new(dir).await.unwrap();
        let fields = |m: &sqlx::migrate::Migration| {
            (
                m.version,
                m.description.to_string(),
                m.migration_type,
                m.sql.as_str().to_string(),
                m.checksum.to_vec(),
                m.no_tx,
            )
        };
        let resolved: Vec<_> = resolved.iter().map(fields).collect();
        let embedded: Vec<_> = super::MIGRATOR.iter().map(fields).collect();
        assert_eq!(
            resolved.len(),
            embedded.len(),
            "a file of migrations/ is not in FILES"
        );
        assert_eq!(resolved, embedded);
    }
}
