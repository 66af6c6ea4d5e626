//! [`DbError`]: what a caller needs to know of a failed database call, mapped from sqlx's
//! errors and SQLSTATE codes in one place.

use crate::tls::TlsFailure;

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
    /// Refused without trying: Postgres is known to be unreachable (the circuit is open, see
    /// [`super::circuit`]).
    #[error("database unreachable (circuit open)")]
    CircuitOpen,
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
    /// Postgres rolled the statement back to break a deadlock (40P01) or a serialization
    /// conflict (40001). Nothing of it was committed, so running it again is safe (see
    /// `run!` and the batchers, which do so once).
    #[error("database rolled the statement back: {0}")]
    RolledBack(String),
    /// No connection could be opened for a TLS reason (untrusted certificate, wrong host name,
    /// no TLS offered, plaintext refused, client certificate refused). Retried like an outage,
    /// since the operator may fix the server, but reported as what it is.
    #[error("{0}")]
    Tls(TlsFailure),
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        Self::of(&e)
    }
}

impl DbError {
    /// What `e` means for a caller (the `From` conversion, from a borrowed error).
    pub fn of(e: &sqlx::Error) -> Self {
        if let Some(tls) = tls_failure(e) {
            return DbError::Tls(tls);
        }
        match e {
            sqlx::Error::PoolTimedOut => DbError::PoolExhausted,
            sqlx::Error::PoolClosed => DbError::Unavailable(e.to_string()),
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => DbError::ConnectionLost(e.to_string()),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("57014") => DbError::Timeout,
                Some("40P01" | "40001") => DbError::RolledBack(db_text(db.as_ref())),
                // read_only_sql_transaction: a write on a hot standby (or on a primary demoted
                // by a failover, or with default_transaction_read_only on).
                Some("25006") => DbError::ReadOnly(db_text(db.as_ref())),
                // 08xxx connection exceptions; 57P01-03 admin shutdown, crash shutdown, cannot
                // connect now: the session is gone.
                Some(c) if c.starts_with("08") || c.starts_with("57P") => {
                    DbError::ConnectionLost(db_text(db.as_ref()))
                }
                // Other conditions a retry may clear, answered 503 rather than 500: other 40xxx
                // transaction rollbacks; 55P03 lock not available; 53xxx insufficient
                // resources (53300 too many connections).
                Some(c) if c.starts_with("40") || c.starts_with("53") || c == "55P03" => {
                    DbError::Unavailable(db_text(db.as_ref()))
                }
                _ => DbError::Other(db_text(db.as_ref())),
            },
            _ => DbError::Other(e.to_string()),
        }
    }
}

/// A database error as text: its message and SQLSTATE. sqlx's own text (`PgDatabaseError`'s
/// `Display`) appends the line of PostgreSQL's C source that raised it ("at line 948"), which
/// tells an operator nothing and reads like a line of their input.
fn db_text(db: &dyn sqlx::error::DatabaseError) -> String {
    match db.code() {
        Some(code) => format!(
            "error returned from database: {} (SQLSTATE {code})",
            db.message()
        ),
        None => format!("error returned from database: {}", db.message()),
    }
}

/// `e` as text for a log line: like its `Display`, but a database error as message and
/// SQLSTATE (see [`db_text`]).
pub(crate) fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db_text(db.as_ref()),
        other => other.to_string(),
    }
}

/// The TLS reason a connection failed, if it was one.
fn tls_failure(e: &sqlx::Error) -> Option<TlsFailure> {
    match e {
        // rustls reports a failed handshake, and an alert the server sends after it (a refused
        // client certificate, under TLS 1.3), inside the socket's io::Error.
        sqlx::Error::Io(io) => TlsFailure::find(io),
        sqlx::Error::Tls(inner) => TlsFailure::find(inner.as_ref()).or_else(|| {
            // sqlx's own words when the server answers the SSLRequest with "no" (require and
            // stricter; connection/tls.rs). Any other is about setting up the handshake: the
            // certificate files (which `PgTls::check` tested at start-up) or the host name.
            Some(if inner.to_string() == "server does not support TLS" {
                TlsFailure::NotOffered
            } else {
                TlsFailure::Handshake("could not start: check the certificate files and host name")
            })
        }),
        // 28000 invalid_authorization_specification: pg_hba.conf refused the connection. Its
        // message (English unless lc_messages says otherwise) tells a TLS reason apart.
        sqlx::Error::Database(db) if db.code().as_deref() == Some("28000") => {
            let msg = db.message();
            if msg.contains("no encryption") {
                Some(TlsFailure::Required)
            } else if msg.contains("requires a valid client certificate") {
                Some(TlsFailure::ClientCertRefused("none sent"))
            } else if msg.contains("certificate") {
                // "certificate authentication failed for user", "certificate validation
                // (clientcert=verify-full) failed for user": its CN is not this user's.
                Some(TlsFailure::ClientCertRefused("not accepted for this user"))
            } else {
                None
            }
        }
        _ => None,
    }
}
