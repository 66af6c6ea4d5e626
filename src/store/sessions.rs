//! Login sessions: tokens stored hashed, batched validation, sliding expiry on the database clock.

use foldhash::{HashMap, HashMapExt};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::sync::Arc;

use sqlx::postgres::PgRow;
use sqlx::{FromRow, SqlStr};
use uuid::Uuid;

use super::batch::{BatchLimits, BatchOp, Batcher};
use super::conns::Conns;
use super::rows::{Cols, decode_all};
use super::sql::Schema;
use super::{DbError, Store};
use crate::metrics as m;

/// Length of a token: 32 random bytes in URL-safe base64 without padding.
pub const TOKEN_LEN: usize = 43;

/// A fresh session token: 256 bits from the OS CSPRNG, URL-safe, no padding.
pub fn new_token() -> Result<String, DbError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| DbError::Other(format!("OS random source failed: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// SHA-256 of a well-formed token: all the database ever holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// `None` when `token` cannot be one of ours (wrong length or alphabet): such a token is
    /// answered as unknown without a database round trip.
    pub fn of(token: &str) -> Option<Self> {
        if token.len() != TOKEN_LEN || URL_SAFE_NO_PAD.decode(token).is_err() {
            return None;
        }
        Some(Self(Sha256::digest(token.as_bytes()).into()))
    }
}

/// A session as clients see it. It never holds the token.
#[derive(Clone, Debug, Serialize)]
pub struct SessionRecord {
    pub id: Uuid,
    pub user_id: String,
    #[serde(serialize_with = "timestamp")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    pub updated_at: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    pub expires_at: DateTime<Utc>,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    pub data: Box<RawValue>,
}

/// The same text as chrono's own `Serialize` (RFC 3339, `Z`, as many fractional digits as
/// needed), formatted at once: chrono's impl feeds serde_json one character at a time through
/// its escaping writer, which was a fifth of a session validation's CPU.
fn timestamp<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// A session row as read, columns in the order of `columns!()`.
#[derive(Clone)]
struct SessionRow {
    token_hash: Vec<u8>,
    id: Uuid,
    user_id: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    ip_address: Option<String>,
    user_agent: Option<String>,
    data: String,
}

impl SessionRow {
    /// Reads the columns of `columns!()`, in that order.
    fn read(cols: &mut Cols<'_>) -> Result<Self, sqlx::Error> {
        Ok(Self {
            token_hash: cols.next("token_hash")?,
            id: cols.next("id")?,
            user_id: cols.next("user_id")?,
            created_at: cols.next("created_at")?,
            updated_at: cols.next("updated_at")?,
            expires_at: cols.next("expires_at")?,
            ip_address: cols.next("ip_address")?,
            user_agent: cols.next("user_agent")?,
            data: cols.next("data")?,
        })
    }

    fn into_record(self) -> Result<SessionRecord, DbError> {
        let data = RawValue::from_string(self.data)
            .map_err(|e| DbError::Other(format!("stored session data is not JSON: {e}")))?;
        Ok(SessionRecord {
            id: self.id,
            user_id: self.user_id,
            created_at: self.created_at,
            updated_at: self.updated_at,
            expires_at: self.expires_at,
            ip_address: self.ip_address,
            user_agent: self.user_agent,
            data,
        })
    }
}

/// Which page of a user's sessions to read.
#[derive(Clone, Copy, Debug)]
pub struct ListPage {
    /// The (created_at, id) of the last session of the previous page.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: u32,
    pub max_bytes: usize,
}

/// A page of a user's sessions, and the position after its last one when there are more.
#[derive(Debug)]
pub struct SessionsPage {
    pub sessions: Vec<SessionRecord>,
    pub next: Option<(DateTime<Utc>, Uuid)>,
}

/// What creating a session needs; every field already validated by the caller.
#[derive(Debug)]
pub struct NewSession {
    pub user_id: String,
    pub ttl_seconds: u32,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    /// A JSON object, as text.
    pub data: String,
}

impl FromRow<'_, PgRow> for SessionRow {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Self::read(&mut Cols::checked(row))
    }
}

/// The columns a [`SessionRow`] is read from, as a literal for `concat!`.
macro_rules! columns {
    () => {
        "token_hash, id, user_id, created_at, updated_at, expires_at, ip_address, user_agent, data"
    };
}

/// The sessions' statements, their tables in the configured schema (see [`Schema`]).
pub(crate) struct SessionSql {
    read: SqlStr,
    refresh: SqlStr,
    create: SqlStr,
    update: SqlStr,
    revoke: SqlStr,
    revoke_id: SqlStr,
    list: SqlStr,
    revoke_user: SqlStr,
}

impl SessionSql {
    fn new(schema: &Schema) -> Self {
        Self {
            read: schema.sql(concat!(
                "SELECT ",
                columns!(),
                ", expires_at - make_interval(secs => ttl_seconds) \
                   + make_interval(secs => least($2, ttl_seconds * 0.5::float8)) <= now() AS needs_refresh \
                 FROM {schema}.sessions WHERE token_hash = ANY($1) AND expires_at > now()"
            )),
            refresh: schema.sql(concat!(
                "UPDATE {schema}.sessions \
                 SET expires_at = now() + make_interval(secs => ttl_seconds), updated_at = now() \
                 WHERE token_hash = ANY($1) AND expires_at > now() \
                   AND expires_at - make_interval(secs => ttl_seconds) \
                       + make_interval(secs => least($2, ttl_seconds * 0.5::float8)) <= now() \
                 RETURNING ",
                columns!()
            )),
            // One statement: the new session, and the user's least recently active live sessions
            // beyond the newest $8 (sessions.max_per_user - 1) revoked (the snapshot the DELETE
            // sees does not hold the new row). Concurrent sign-ins of one user may each keep $8
            // others, so the cap can be exceeded by those for a moment; the next sign-in trims.
            create: schema.sql(concat!(
                "WITH evicted AS (DELETE FROM {schema}.sessions WHERE id IN \
                   (SELECT id FROM {schema}.sessions WHERE user_id = $3 AND expires_at > now() \
                    ORDER BY updated_at DESC, created_at DESC, id OFFSET $8) RETURNING 1) \
                 INSERT INTO {schema}.sessions \
                   (id, token_hash, user_id, expires_at, ttl_seconds, ip_address, user_agent, data) \
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4), $4, $5, $6, $7) RETURNING ",
                columns!(),
                ", (SELECT count(*) FROM evicted) AS evicted"
            )),
            update: schema.sql(concat!(
                "UPDATE {schema}.sessions SET data = $2, updated_at = now() \
                 WHERE token_hash = $1 AND expires_at > now() RETURNING ",
                columns!()
            )),
            revoke: schema.sql("DELETE FROM {schema}.sessions WHERE token_hash = $1"),
            revoke_id: schema.sql("DELETE FROM {schema}.sessions WHERE id = $1 AND user_id = $2"),
            // One page, newest first, after the cursor ($2, $3) when given: at most $4 rows, and
            // of those only the ones that start within $5 bytes (so the first row past the
            // byte budget comes back too, telling the caller the page was cut there). `size`
            // is about the row's share of the JSON answer.
            list: schema.sql(concat!(
                "SELECT ",
                columns!(),
                ", size FROM (SELECT p.*, \
                   sum(size) OVER (ORDER BY created_at DESC, id ROWS UNBOUNDED PRECEDING) - size \
                     AS before \
                   FROM (SELECT ",
                columns!(),
                ", octet_length(data) + octet_length(user_id) + coalesce(octet_length(user_agent), 0) \
                       + coalesce(octet_length(ip_address), 0) + 256 AS size \
                     FROM {schema}.sessions WHERE user_id = $1 AND expires_at > now() \
                       AND ($2::timestamptz IS NULL OR created_at < $2 OR (created_at = $2 AND id > $3)) \
                     ORDER BY created_at DESC, id LIMIT $4) p) q \
                 WHERE before <= $5 ORDER BY created_at DESC, id"
            )),
            // Expired rows of the user go too, but only live ones count as revoked.
            revoke_user: schema.sql(
                "WITH gone AS (DELETE FROM {schema}.sessions \
                   WHERE user_id = $1 AND ($2::uuid IS NULL OR id <> $2) RETURNING expires_at) \
                 SELECT count(*) FILTER (WHERE expires_at > now()) FROM gone",
            ),
        }
    }
}

pub(crate) struct SessionBatchers {
    reads: Batcher<ReadBatch>,
    refreshes: Batcher<RefreshBatch>,
    sql: Arc<SessionSql>,
}

impl SessionBatchers {
    pub fn new(
        conns: Arc<Conns>,
        limits: BatchLimits,
        update_age_seconds: u32,
        schema: &Schema,
    ) -> Self {
        let sql = Arc::new(SessionSql::new(schema));
        Self {
            reads: Batcher::spawn(
                ReadBatch {
                    conns: conns.clone(),
                    sql: sql.clone(),
                    update_age_seconds: update_age_seconds as f64,
                },
                limits.clone(),
            ),
            refreshes: Batcher::spawn(
                RefreshBatch {
                    conns,
                    sql: sql.clone(),
                    update_age_seconds: update_age_seconds as f64,
                },
                limits,
            ),
            sql,
        }
    }
}

/// A validation read's row: the session, then whether it is due for sliding.
struct ReadRow {
    row: SessionRow,
    needs_refresh: bool,
}

/// Validation reads: one `token_hash = ANY($1)` query per batch. Each row also says whether it
/// is due for sliding, judged by the database clock: last refreshed (`expires_at - ttl`) at
/// least `sessions.update_age_seconds` ago, as BetterAuth's `updateAge`, or half its own TTL
/// ago when that is sooner (as ASP.NET Core's sliding expiration renews past the halfway mark).
/// Without that cap a session whose TTL is at most update_age would expire before it was ever
/// due, however active its user.
struct ReadBatch {
    conns: Arc<Conns>,
    sql: Arc<SessionSql>,
    update_age_seconds: f64,
}

/// A live session and whether it is due for sliding.
type ReadOutcome = Option<(SessionRow, bool)>;

impl BatchOp for ReadBatch {
    type Item = TokenHash;
    type Output = ReadOutcome;
    const NAME: &'static str = "session_get";
    const RETRY_ON_BROKEN_CONNECTION: bool = true;

    async fn run(&self, items: &[TokenHash]) -> Result<Vec<ReadOutcome>, DbError> {
        let hashes: Vec<&[u8]> = items.iter().map(|h| h.0.as_slice()).collect();
        let rows: Vec<PgRow> = run_once!(self.conns, Self::NAME, |c| sqlx::query(
            self.sql.read.clone()
        )
        .bind(&hashes)
        .bind(self.update_age_seconds)
        .fetch_all(c))
        .await?;
        let rows = decode_all(&rows, |cols| {
            Ok(ReadRow {
                row: SessionRow::read(cols)?,
                needs_refresh: cols.next("needs_refresh")?,
            })
        })?;
        let mut found: HashMap<[u8; 32], ReadRow> = rows
            .into_iter()
            .filter_map(|r| Some((<[u8; 32]>::try_from(&r.row.token_hash[..]).ok()?, r)))
            .collect();
        // A token asked for several times in one batch is fetched once: every asker but the
        // last takes a copy of the row, the last takes the row itself.
        let mut askers: HashMap<[u8; 32], usize> = HashMap::with_capacity(items.len());
        for h in items {
            *askers.entry(h.0).or_default() += 1;
        }
        let outcomes = items
            .iter()
            .map(|h| {
                let left = askers.get_mut(&h.0).map(|n| {
                    *n -= 1;
                    *n
                });
                if left == Some(0) {
                    found.remove(&h.0).map(|r| (r.row, r.needs_refresh))
                } else {
                    found.get(&h.0).map(|r| (r.row.clone(), r.needs_refresh))
                }
            })
            .collect();
        Ok(outcomes)
    }
}

/// Sliding writes: one UPDATE per batch. The refresh condition is repeated in the WHERE clause,
/// so a session refreshed concurrently by another caller (or another sidecar) is not written
/// twice; the caller then reads it again.
struct RefreshBatch {
    conns: Arc<Conns>,
    sql: Arc<SessionSql>,
    update_age_seconds: f64,
}

impl BatchOp for RefreshBatch {
    type Item = TokenHash;
    type Output = Option<SessionRow>;
    const NAME: &'static str = "session_refresh";
    // Conditional on the session still being due, so a second run writes nothing new.
    const RETRY_ON_BROKEN_CONNECTION: bool = true;

    async fn run(&self, items: &[TokenHash]) -> Result<Vec<Option<SessionRow>>, DbError> {
        let hashes: Vec<&[u8]> = items.iter().map(|h| h.0.as_slice()).collect();
        let rows: Vec<PgRow> = run_once!(self.conns, Self::NAME, |c| sqlx::query(
            self.sql.refresh.clone()
        )
        .bind(&hashes)
        .bind(self.update_age_seconds)
        .fetch_all(c))
        .await?;
        let found: HashMap<Vec<u8>, SessionRow> = decode_all(&rows, SessionRow::read)?
            .into_iter()
            .map(|r| (r.token_hash.clone(), r))
            .collect();
        Ok(items
            .iter()
            .map(|h| found.get(h.0.as_slice()).cloned())
            .collect())
    }
}

pub(crate) fn count_validation(valid: bool) {
    let result = if valid { "valid" } else { "not_found" };
    m::cached::increment(m::SESSION_VALIDATIONS, &[("result", result)], 1);
}

impl Store {
    /// Creates a session; returns its token (shown to the caller once) and the record.
    pub async fn session_create(
        &self,
        new: NewSession,
    ) -> Result<(String, SessionRecord), DbError> {
        self.ensure_available()?;
        let token = new_token()?;
        let hash = TokenHash::of(&token)
            .ok_or_else(|| DbError::Other("generated token is malformed".into()))?;
        let id = Uuid::new_v4();
        // Other live sessions the user keeps; 0 (no cap) keeps them all.
        let keep = match self.settings.session_max_per_user {
            0 => i64::MAX,
            cap => i64::from(cap) - 1,
        };
        let row: PgRow = run!(self.conns, "session_create", |c| sqlx::query(
            self.sessions.sql.create.clone()
        )
        .bind(id)
        .bind(hash.0.as_slice())
        .bind(&new.user_id)
        .bind(new.ttl_seconds as i32)
        .bind(&new.ip_address)
        .bind(&new.user_agent)
        .bind(&new.data)
        .bind(keep)
        .fetch_one(c))
        .await?;
        let (row, evicted) = decode_all(std::slice::from_ref(&row), |cols| {
            Ok((SessionRow::read(cols)?, cols.next::<i64>("evicted")?))
        })?
        .pop()
        .ok_or_else(|| DbError::Other("session insert returned no row".into()))?;
        metrics::counter!(m::SESSIONS_CREATED).increment(1);
        if evicted > 0 {
            metrics::counter!(m::SESSIONS_EVICTED).increment(evicted as u64);
        }
        Ok((token, row.into_record()?))
    }

    /// Validates a session and slides its expiry when it is due. `None`: unknown, expired or revoked.
    pub async fn session_validate(
        &self,
        hash: TokenHash,
    ) -> Result<Option<SessionRecord>, DbError> {
        self.ensure_available()?;
        let outcome = match self.sessions.reads.call(hash).await? {
            None => None,
            Some((row, false)) => Some(row),
            Some((row, true)) => match self.sessions.refreshes.call(hash).await? {
                Some(refreshed) => Some(refreshed),
                // Refreshed by someone else meanwhile, or revoked: read again to tell which.
                None => {
                    drop(row);
                    self.sessions.reads.call(hash).await?.map(|(r, _)| r)
                }
            },
        };
        count_validation(outcome.is_some());
        outcome.map(SessionRow::into_record).transpose()
    }

    /// Replaces a live session's data. `None` when there is no such live session.
    pub async fn session_update_data(
        &self,
        hash: TokenHash,
        data: String,
    ) -> Result<Option<SessionRecord>, DbError> {
        self.ensure_available()?;
        let row: Option<SessionRow> = run!(self.conns, "session_update", |c| sqlx::query_as(
            self.sessions.sql.update.clone()
        )
        .bind(hash.0.as_slice())
        .bind(&data)
        .fetch_optional(c))
        .await?;
        row.map(SessionRow::into_record).transpose()
    }

    /// Revokes a session; revoking one that is already gone is not an error.
    pub async fn session_revoke(&self, hash: TokenHash) -> Result<(), DbError> {
        self.ensure_available()?;
        let done = run!(self.conns, "session_revoke", |c| sqlx::query(
            self.sessions.sql.revoke.clone()
        )
        .bind(hash.0.as_slice())
        .execute(c))
        .await?;
        metrics::counter!(m::SESSIONS_REVOKED).increment(done.rows_affected());
        Ok(())
    }

    /// Revokes the session `id` when it belongs to `user_id`; one that is already gone (or
    /// another user's) is not an error.
    pub async fn session_revoke_id(&self, user_id: &str, id: Uuid) -> Result<(), DbError> {
        self.ensure_available()?;
        let done = run!(self.conns, "session_revoke", |c| sqlx::query(
            self.sessions.sql.revoke_id.clone()
        )
        .bind(id)
        .bind(user_id)
        .execute(c))
        .await?;
        metrics::counter!(m::SESSIONS_REVOKED).increment(done.rows_affected());
        Ok(())
    }

    /// One page of a user's live sessions, newest first: at most `page.limit` sessions of
    /// about `page.max_bytes` in all (at least one), and where the next page starts.
    pub async fn sessions_of_user(
        &self,
        user_id: &str,
        page: ListPage,
    ) -> Result<SessionsPage, DbError> {
        self.ensure_available()?;
        let (after_time, after_id) = page.after.unzip();
        let rows: Vec<PgRow> = run!(self.conns, "session_list", |c| {
            sqlx::query(self.sessions.sql.list.clone())
                .bind(user_id)
                .bind(after_time)
                .bind(after_id)
                // One more than the page: whether there is a next one.
                .bind(i64::from(page.limit) + 1)
                .bind(i64::try_from(page.max_bytes).unwrap_or(i64::MAX))
                .fetch_all(c)
        })
        .await?;
        let rows = decode_all(&rows, |cols| {
            Ok((SessionRow::read(cols)?, cols.next::<i32>("size")? as usize))
        })?;
        let more = rows.len();
        let mut sessions = Vec::new();
        let mut bytes = 0;
        for (row, size) in rows {
            if sessions.len() == page.limit as usize
                || (!sessions.is_empty() && bytes + size > page.max_bytes)
            {
                break;
            }
            bytes += size;
            sessions.push(row.into_record()?);
        }
        let next = (sessions.len() < more)
            .then(|| sessions.last().map(|s| (s.created_at, s.id)))
            .flatten();
        Ok(SessionsPage { sessions, next })
    }

    /// Revokes every live session of a user except `keep`; returns how many were revoked.
    pub async fn sessions_revoke_user(
        &self,
        user_id: &str,
        keep: Option<Uuid>,
    ) -> Result<u64, DbError> {
        self.ensure_available()?;
        let revoked: i64 = run!(self.conns, "session_revoke_user", |c| sqlx::query_scalar(
            self.sessions.sql.revoke_user.clone()
        )
        .bind(user_id)
        .bind(keep)
        .fetch_one(c))
        .await?;
        metrics::counter!(m::SESSIONS_REVOKED).increment(revoked as u64);
        Ok(revoked as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_serialize_like_chrono() {
        use chrono::TimeZone;
        for nanos in [0, 1_000_000, 120_000_000, 123_456_000, 123_456_789, 5] {
            let t = Utc.with_ymd_and_hms(2026, 11, 23, 1, 2, 3).unwrap()
                + chrono::Duration::nanoseconds(nanos);
            let mut ours = serde_json::Serializer::new(Vec::new());
            super::timestamp(&t, &mut ours).unwrap();
            assert_eq!(
                String::from_utf8(ours.into_inner()).unwrap(),
                serde_json::to_string(&t).unwrap()
            );
        }
    }

    #[test]
    fn tokens_are_256_bits_url_safe() {
        let t = new_token().unwrap();
        assert_eq!(t.len(), TOKEN_LEN);
        assert!(
            t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert!(TokenHash::of(&t).is_some());
        assert_ne!(t, new_token().unwrap());
    }

    #[test]
    fn malformed_tokens_have_no_hash() {
        assert!(TokenHash::of("short").is_none());
        assert!(TokenHash::of(&"+".repeat(TOKEN_LEN)).is_none());
        assert!(TokenHash::of(&"a".repeat(TOKEN_LEN + 1)).is_none());
    }
}
