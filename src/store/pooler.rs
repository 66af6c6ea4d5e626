//! How a statement runs, as the pooler in front of PostgreSQL needs it (`database.pooler`).
//!
//! Directly or through a session-mode pooler, a statement runs as it is, prepared once per
//! connection under a name and reused. Through a transaction-mode pooler (PgBouncer
//! `pool_mode = transaction`) each transaction may land on another server connection, and sqlx
//! sends a statement in two halves, each ending in a Sync (Parse/Describe/Sync, then
//! Bind/Execute/Sync): outside a transaction the pooler may hand the second half to another
//! server, where the statement was never parsed. So there every statement runs in its own
//! `BEGIN; SET LOCAL ...` ... `COMMIT` (the pooler keeps a transaction on one server connection),
//! and unnamed, since PgBouncer before 1.21 does not carry named prepared statements across
//! server connections (sqlx names every persistent statement, even with its statement cache
//! off). [`Scope`] opens and closes that transaction; [`Exec`] is the executor statements are
//! given, which makes them unnamed: one place, not one `.persistent(false)` per statement.

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use sqlx::postgres::{PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{
    AssertSqlSafe, Connection, Either, Execute, Executor, PgConnection, Postgres, SqlSafeStr,
};
use sqlx::{SqlStr, Transaction};

use crate::config::{DatabaseSettings, Pooler};

/// How every statement of a store runs.
#[derive(Clone, Debug)]
pub(crate) struct StatementMode {
    /// Sent before each statement (opening its transaction) under transaction pooling.
    begin: Option<SqlStr>,
    /// Statements are prepared under a name and reused per connection.
    named: bool,
}

impl StatementMode {
    pub fn new(d: &DatabaseSettings, operator_chose_plans: bool) -> Self {
        if d.pooler != Pooler::Transaction {
            return Self {
                begin: None,
                named: true,
            };
        }
        // One round trip opens the transaction and applies the settings that start-up options
        // carry on a direct connection (a pooler refuses those); SET LOCAL ends with the
        // transaction, so the next client of that server connection is not affected.
        let mut begin = format!(
            "BEGIN; SET LOCAL statement_timeout = {}",
            d.statement_timeout_ms
        );
        if d.pooler_prepared_statements && !operator_chose_plans {
            // Named statements are reused (PgBouncer >= 1.21 re-prepares them per server
            // connection): plan them once, as on a direct connection (see `pool.rs`). Unnamed
            // statements are planned at every execution whatever the mode.
            begin.push_str("; SET LOCAL plan_cache_mode = force_generic_plan");
        }
        Self {
            begin: Some(AssertSqlSafe(begin).into_sql_str()),
            named: d.pooler_prepared_statements,
        }
    }
}

/// One statement's scope on a held connection: the connection itself, or a transaction on it.
pub(crate) enum Scope<'c> {
    Plain(&'c mut PgConnection, bool),
    // sqlx's Transaction: if the statement's future is dropped halfway, its drop queues a
    // ROLLBACK that goes out before anything else on this connection.
    Tx(Transaction<'c, Postgres>, bool),
}

impl<'c> Scope<'c> {
    /// Opens the statement's transaction when the mode needs one (one round trip).
    pub async fn open(
        conn: &'c mut PgConnection,
        mode: &StatementMode,
    ) -> Result<Self, sqlx::Error> {
        Ok(match &mode.begin {
            None => Self::Plain(conn, mode.named),
            Some(begin) => Self::Tx(conn.begin_with(begin.clone()).await?, mode.named),
        })
    }

    /// The executor the statement runs on.
    pub fn exec(&mut self) -> Exec<'_> {
        match self {
            Self::Plain(conn, named) => Exec {
                conn,
                named: *named,
            },
            Self::Tx(tx, named) => Exec {
                conn: tx,
                named: *named,
            },
        }
    }

    /// Commits the statement's transaction when it succeeded, else rolls it back, so the
    /// connection is idle (and the pooler's server connection free) when this returns.
    pub async fn close<T>(self, out: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        match (self, out) {
            (Self::Plain(..), out) => out,
            (Self::Tx(tx, _), Ok(v)) => tx.commit().await.map(|()| v),
            // A failed rollback means the connection broke: report that, so it is not reused.
            (Self::Tx(tx, _), Err(e)) => tx.rollback().await.and(Err(e)),
        }
    }
}

/// The executor a statement is given (the `c` of `run!`): the connection, with statements
/// unnamed unless the mode keeps named ones.
#[derive(Debug)]
pub struct Exec<'c> {
    conn: &'c mut PgConnection,
    named: bool,
}

/// A statement whose `persistent` flag the mode may turn off.
struct Statement<E> {
    inner: E,
    named: bool,
}

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Statement<E> {
    fn sql(self) -> SqlStr {
        self.inner.sql()
    }
    fn statement(&self) -> Option<&PgStatement> {
        self.inner.statement()
    }
    fn take_arguments(
        &mut self,
    ) -> Result<Option<sqlx::postgres::PgArguments>, sqlx::error::BoxDynError> {
        self.inner.take_arguments()
    }
    fn persistent(&self) -> bool {
        self.named && self.inner.persistent()
    }
}

impl<'c> Executor<'c> for Exec<'c> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        self.conn.fetch_many(Statement {
            inner: query,
            named: self.named,
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        self.conn.fetch_optional(Statement {
            inner: query,
            named: self.named,
        })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'c: 'e,
    {
        self.conn.prepare_with(sql, parameters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn mode(pairs: &[(&str, &str)], operator_chose_plans: bool) -> StatementMode {
        let env: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let d = Settings::load_from(None, &env).unwrap().database;
        StatementMode::new(&d, operator_chose_plans)
    }

    #[test]
    fn only_transaction_pooling_wraps_and_unnames_statements() {
        for pooler in ["none", "session"] {
            let m = mode(&[("PGSIDECAR_DATABASE__POOLER", pooler)], false);
            assert!(m.begin.is_none() && m.named, "{pooler}");
        }
        let m = mode(&[("PGSIDECAR_DATABASE__POOLER", "transaction")], false);
        assert!(!m.named);
        assert_eq!(
            m.begin.unwrap().as_str(),
            "BEGIN; SET LOCAL statement_timeout = 2000"
        );
        let prepared = [
            ("PGSIDECAR_DATABASE__POOLER", "transaction"),
            ("PGSIDECAR_DATABASE__POOLER_PREPARED_STATEMENTS", "true"),
        ];
        let m = mode(&prepared, false);
        assert!(m.named);
        assert!(
            m.begin
                .unwrap()
                .as_str()
                .ends_with("; SET LOCAL plan_cache_mode = force_generic_plan")
        );
        let m = mode(&prepared, true);
        assert!(!m.begin.unwrap().as_str().contains("plan_cache_mode"));
    }
}
