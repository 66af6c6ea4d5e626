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

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// From the hex text notifications carry.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let b = hex.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(Self(out))
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

/// A validated session as the store answers it: the record, or (from the near cache, or to be
/// kept there) its JSON already.
pub enum SessionAnswer {
    Record(SessionRecord),
    Json(bytes::Bytes),
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
                ", ttl_seconds, expires_at - make_interval(secs => ttl_seconds) \
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
                    ORDER BY updated_at DESC, created_at DESC, id OFFSET $8) RETURNING token_hash) \
                 INSERT INTO {schema}.sessions \
                   (id, token_hash, user_id, expires_at, ttl_seconds, ip_address, user_agent, data) \
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4), $4, $5, $6, $7) RETURNING ",
                columns!(),
                ", (SELECT count(*) FROM evicted) AS evicted, \
                   (SELECT array_agg(token_hash) FROM evicted) AS evicted_hashes"
            )),
            update: schema.sql(concat!(
                "UPDATE {schema}.sessions SET data = $2, updated_at = now() \
                 WHERE token_hash = $1 AND expires_at > now() RETURNING ",
                columns!()
            )),
            revoke: schema.sql("DELETE FROM {schema}.sessions WHERE token_hash = $1"),
            revoke_id: schema.sql(
                "DELETE FROM {schema}.sessions WHERE id = $1 AND user_id = $2 RETURNING token_hash",
            ),
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
            // Announced by the triggers as one revoke-all (see the migration); the live
            // sessions' token hashes come back for this sidecar's near cache.
            revoke_user: schema.sql(
                "WITH op AS MATERIALIZED (SELECT set_config('pgsidecar.op', 'revoke_user', true), \
                   set_config('pgsidecar.arg', $1, true)), \
                 gone AS (DELETE FROM {schema}.sessions \
                   WHERE user_id = $1 AND ($2::uuid IS NULL OR id <> $2) AND EXISTS (SELECT 1 FROM op) \
                   RETURNING expires_at, token_hash) \
                 SELECT count(*) FILTER (WHERE expires_at > now()), \
                   array_agg(token_hash) FILTER (WHERE expires_at > now()) FROM gone",
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

/// A validation read's row: the session, its TTL, then whether it is due for sliding.
struct ReadRow {
    row: SessionRow,
    ttl_seconds: i32,
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

/// A live session, whether it is due for sliding, and its TTL.
type ReadOutcome = Option<(SessionRow, bool, i32)>;

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
                ttl_seconds: cols.next("ttl_seconds")?,
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
                    found
                        .remove(&h.0)
                        .map(|r| (r.row, r.needs_refresh, r.ttl_seconds))
                } else {
                    found
                        .get(&h.0)
                        .map(|r| (r.row.clone(), r.needs_refresh, r.ttl_seconds))
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
        let (row, evicted, evicted_hashes) = decode_all(std::slice::from_ref(&row), |cols| {
            Ok((
                SessionRow::read(cols)?,
                cols.next::<i64>("evicted")?,
                cols.next::<Option<Vec<Vec<u8>>>>("evicted_hashes")?,
            ))
        })?
        .pop()
        .ok_or_else(|| DbError::Other("session insert returned no row".into()))?;
        self.near_sessions_drop(evicted_hashes.iter().flatten());
        metrics::counter!(m::SESSIONS_CREATED).increment(1);
        if evicted > 0 {
            metrics::counter!(m::SESSIONS_EVICTED).increment(evicted as u64);
        }
        Ok((token, row.into_record()?))
    }

    /// Validates a session and slides its expiry when it is due. `None`: unknown, expired or
    /// revoked. With the sessions' near cache on, answered from memory when it can be (the
    /// answer is then its JSON), unless `no_cache`.
    pub async fn session_validate(
        &self,
        hash: TokenHash,
        no_cache: bool,
    ) -> Result<Option<SessionAnswer>, DbError> {
        if let Some(near) = &self.notifier.sessions {
            return self.session_validate_near(near, hash, no_cache).await;
        }
        self.ensure_available()?;
        let outcome = self.session_validate_db(hash).await?;
        count_validation(outcome.is_some());
        outcome
            .map(|(row, _)| row.into_record().map(SessionAnswer::Record))
            .transpose()
    }

    /// The validation in Postgres; with the session, when it was read without sliding, its
    /// TTL (for the near cache).
    async fn session_validate_db(
        &self,
        hash: TokenHash,
    ) -> Result<Option<(SessionRow, Option<i32>)>, DbError> {
        Ok(match self.sessions.reads.call(hash).await? {
            None => None,
            Some((row, false, ttl)) => Some((row, Some(ttl))),
            Some((row, true, _)) => {
                let refreshed = self.sessions.refreshes.call(hash).await;
                // Slid (or maybe slid): any copy in memory is older.
                self.near_sessions_drop([hash.0.to_vec()].iter());
                match refreshed? {
                    Some(refreshed) => Some((refreshed, None)),
                    // Refreshed by someone else meanwhile, or revoked: read again to tell which.
                    None => {
                        drop(row);
                        self.sessions
                            .reads
                            .call(hash)
                            .await?
                            .map(|(r, _, _)| (r, None))
                    }
                }
            }
        })
    }

    async fn session_validate_near(
        &self,
        near: &super::near::NearSessions,
        hash: TokenHash,
        no_cache: bool,
    ) -> Result<Option<SessionAnswer>, DbError> {
        use super::near::Lookup;
        let lookup = if no_cache {
            Lookup::Bypass
        } else {
            near.get(&hash, super::near::now_ns())
        };
        let count = |result| {
            m::cached::increment(
                m::NEAR_REQUESTS,
                &[("cache", "sessions"), ("result", result)],
                1,
            )
        };
        match lookup {
            Lookup::Hit(json) => {
                count("hit");
                count_validation(true);
                return Ok(Some(SessionAnswer::Json(json)));
            }
            Lookup::Miss => count("miss"),
            Lookup::Bypass => count("bypass"),
        }
        self.ensure_available()?;
        let ticket = near.ticket(&hash);
        let outcome = self.session_validate_db(hash).await?;
        count_validation(outcome.is_some());
        #[cfg(debug_assertions)]
        super::near::test_fill_delay().await;
        let Some((row, ttl)) = outcome else {
            return Ok(None);
        };
        let record = row.into_record()?;
        let json = bytes::Bytes::from(
            serde_json::to_vec(&record)
                .map_err(|e| DbError::Other(format!("cannot encode a session: {e}")))?,
        );
        if let Some(ttl) = ttl {
            // Due for sliding at (expires_at - ttl) + min(update_age, ttl / 2), as the read
            // judges it: served from memory only until then.
            let ttl = chrono::Duration::seconds(i64::from(ttl));
            let age =
                chrono::Duration::seconds(i64::from(self.settings.session_update_age_seconds))
                    .min(ttl / 2);
            near.fill(
                &hash,
                json.clone(),
                record.expires_at,
                record.expires_at - ttl + age,
                ticket,
            );
        }
        Ok(Some(SessionAnswer::Json(json)))
    }

    /// Drops sessions from this sidecar's near cache (changed through it).
    fn near_sessions_drop<'a>(&self, hashes: impl Iterator<Item = &'a Vec<u8>>) {
        if let Some(near) = &self.notifier.sessions {
            for h in hashes {
                if let Ok(h) = <[u8; 32]>::try_from(&h[..]) {
                    near.invalidate(&h);
                }
            }
        }
    }

    /// Replaces a live session's data. `None` when there is no such live session.
    pub async fn session_update_data(
        &self,
        hash: TokenHash,
        data: String,
    ) -> Result<Option<SessionRecord>, DbError> {
        self.ensure_available()?;
        let row: Result<Option<SessionRow>, DbError> =
            run!(self.conns, "session_update", |c| sqlx::query_as(
                self.sessions.sql.update.clone()
            )
            .bind(hash.0.as_slice())
            .bind(&data)
            .fetch_optional(c))
            .await;
        self.near_sessions_drop([hash.0.to_vec()].iter());
        row?.map(SessionRow::into_record).transpose()
    }

    /// Revokes a session; revoking one that is already gone is not an error.
    pub async fn session_revoke(&self, hash: TokenHash) -> Result<(), DbError> {
        self.ensure_available()?;
        let done = run!(self.conns, "session_revoke", |c| sqlx::query(
            self.sessions.sql.revoke.clone()
        )
        .bind(hash.0.as_slice())
        .execute(c))
        .await;
        self.near_sessions_drop([hash.0.to_vec()].iter());
        metrics::counter!(m::SESSIONS_REVOKED).increment(done?.rows_affected());
        Ok(())
    }

    /// Revokes the session `id` when it belongs to `user_id`; one that is already gone (or
    /// another user's) is not an error.
    pub async fn session_revoke_id(&self, user_id: &str, id: Uuid) -> Result<(), DbError> {
        self.ensure_available()?;
        let gone: Vec<Vec<u8>> = run!(self.conns, "session_revoke", |c| sqlx::query_scalar(
            self.sessions.sql.revoke_id.clone()
        )
        .bind(id)
        .bind(user_id)
        .fetch_all(c))
        .await?;
        self.near_sessions_drop(gone.iter());
        metrics::counter!(m::SESSIONS_REVOKED).increment(gone.len() as u64);
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
        let (revoked, hashes): (i64, Option<Vec<Vec<u8>>>) =
            run!(self.conns, "session_revoke_user", |c| sqlx::query_as(
                self.sessions.sql.revoke_user.clone()
            )
            .bind(user_id)
            .bind(keep)
            .fetch_one(c))
            .await?;
        self.near_sessions_drop(hashes.iter().flatten());
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
