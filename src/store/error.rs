//! [`DbError`]: what a caller needs to know of a failed database call, mapped from sqlx's
//! errors and SQLSTATE codes in one place.

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
    /// The server accepts no writes: a standby, or a primary demoted by a failover (SQLSTATE
    /// 25006). The connection is closed, not reused: a new one may reach the new primary.
    #[error("database is read-only: {0}")]
    ReadOnly(String),
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
                // read_only_sql_transaction: a write on a hot standby (or on a primary demoted
                // by a failover, or with default_transaction_read_only on).
                Some("25006") => DbError::ReadOnly(e.to_string()),
                // 08xxx connection exceptions; 57P01-03 admin shutdown, crash shutdown, cannot
                // connect now: the session is gone.
                Some(c) if c.starts_with("08") || c.starts_with("57P") => {
                    DbError::ConnectionLost(e.to_string())
                }
                // Other conditions a retry may clear, answered 503 rather than 500: 40001/40P01
                // serialization failure, deadlock; 55P03 lock not available; 53xxx insufficient
                // resources (53300 too many connections).
                Some(c) if c.starts_with("40") || c.starts_with("53") || c == "55P03" => {
                    DbError::Unavailable(e.to_string())
                }
                _ => DbError::Other(e.to_string()),
            },
            _ => DbError::Other(e.to_string()),
        }
    }
}
