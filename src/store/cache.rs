//! The shared cache table: batched reads (plain and tag-checked), deletes by key, prefix and
//! tag, and tag invalidation records. Writes are in [`super::cache_write`].

use foldhash::{HashMap, HashMapExt, HashSet};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::SqlStr;
use sqlx::postgres::PgRow;
use std::sync::Arc;

use super::batch::{BatchLimits, BatchOp, Batcher};
use super::cache_write::WriteBatch;
pub use super::cache_write::{CachePut, EtagSet, Precondition, PutValue, Written};
use super::conns::Conns;
use super::rows::{Cols, decode_all};
use super::sql::Schema;
use super::{DbError, Store};
use crate::metrics as m;

/// A cache key: 1 to 512 bytes of UTF-8, no control characters, not starting with `_`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    pub const MAX_BYTES: usize = 512;

    pub fn parse(raw: String) -> Result<Self, &'static str> {
        if raw.is_empty() || raw.len() > Self::MAX_BYTES {
            return Err("a key is 1 to 512 bytes");
        }
        if raw.starts_with('_') {
            return Err("keys starting with '_' are reserved");
        }
        if raw.chars().any(char::is_control) {
            return Err("a key must not contain control characters");
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A tag: 1 to 256 bytes, no commas or control characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    pub const MAX_BYTES: usize = 256;
    /// Most tags one entry may carry.
    pub const MAX_PER_ENTRY: usize = 64;

    pub fn parse(raw: String) -> Result<Self, &'static str> {
        if raw.is_empty() || raw.len() > Self::MAX_BYTES {
            return Err("a tag is 1 to 256 bytes");
        }
        if raw.contains(',') || raw.chars().any(char::is_control) {
            return Err("a tag must not contain commas or control characters");
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a stored value reads: validated JSON text, or any bytes with their media type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheValue {
    /// JSON text, validated on write and passed through without re-parsing.
    Json(Bytes),
    /// Bytes stored exactly as sent, with the `Content-Type` they were sent with.
    Raw { content_type: String, bytes: Bytes },
}

impl CacheValue {
    /// Bytes of the value itself (a batch's weight, a size limit).
    pub fn len(&self) -> usize {
        match self {
            Self::Json(b) | Self::Raw { bytes: b, .. } => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A live entry as read.
#[derive(Clone, Debug)]
pub struct CacheEntry {
    pub value: CacheValue,
    pub expires_at: DateTime<Utc>,
    /// Which version this is, and when it was written.
    pub version: Version,
    /// A tag-checked read found a tag invalidated after the entry was written (serve, but
    /// revalidate). Always false for plain reads.
    pub stale: bool,
    /// Served from this sidecar's near cache (see `near`), not read from Postgres.
    pub near: bool,
    /// On a tag-checked read that found the entry fresh: the next moment a tag's delayed
    /// expiry (`_invalidate` with `expire_seconds`) turns it expired, if any.
    pub tag_expiry: Option<DateTime<Utc>>,
}

/// What a read asks for: keys, and for a tag-checked read the tags to check besides each
/// entry's own (`None`: a plain read, no tag record is looked at).
#[derive(Debug)]
pub struct CacheRead {
    pub keys: Vec<CacheKey>,
    pub check_tags: Option<Vec<Tag>>,
}

/// The value of `value` that marks a row whose value is in `bytes` / `content_type` (see the
/// second migration): a JSON null with a leading space, which no sidecar ever stores as JSON
/// because every version trims the JSON it stores, and which an older sidecar serves as null.
macro_rules! raw_marker {
    () => {
        " null"
    };
}
pub(crate) const RAW_MARKER: &str = raw_marker!();

/// The entity tag of a row version: its `xmin` and its `updated_at` in microseconds since the
/// Unix epoch (hex), as `{xmin}-{micros}`. Every writer changes both (an older sidecar's upsert
/// and a bare `UPDATE` as well: a new row version has a new `xmin`), so a tag never survives a
/// write; `updated_at` tells apart versions whose 32-bit transaction ids are equal after
/// wraparound. Both are in the row already: nothing to store, no hashing of values on reads.
/// Reads format it here from the two columns; conditional writes compute the same text in SQL
/// ([`etag!`]), and a test checks that both agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    /// The row version's transaction id.
    pub xmin: u32,
    /// When the entry was last written (the row's `updated_at`, database clock).
    pub written_at: DateTime<Utc>,
}

impl Version {
    /// Reads `xmin` (as text) and `updated_at`, the columns of `version_columns!()`.
    pub(crate) fn read(cols: &mut Cols<'_>) -> Result<Self, sqlx::Error> {
        let written_at = cols.next("updated_at")?;
        let xmin: &str = cols.next("xmin")?;
        let xmin = xmin.parse().map_err(|_| sqlx::Error::ColumnDecode {
            index: "xmin".into(),
            source: format!("xmin {xmin:?} is not a transaction id").into(),
        })?;
        Ok(Self { xmin, written_at })
    }

    /// The tag, unquoted.
    pub fn etag(&self) -> String {
        let mut out = Vec::with_capacity(28);
        self.write_etag(&mut out);
        // Only ASCII digits, hex digits and '-' were written.
        String::from_utf8(out).unwrap_or_default()
    }

    /// Appends the tag, unquoted, to `out`. By hand: `format!` cost a GET about a thousand
    /// instructions.
    pub fn write_etag(&self, out: &mut Vec<u8>) {
        let mut buf = [0u8; 27];
        let mut i = buf.len();
        let mut micros = self.written_at.timestamp_micros() as u64;
        loop {
            i -= 1;
            buf[i] = b"0123456789abcdef"[(micros & 0xf) as usize];
            micros >>= 4;
            if micros == 0 {
                break;
            }
        }
        i -= 1;
        buf[i] = b'-';
        let mut xmin = self.xmin;
        loop {
            i -= 1;
            buf[i] = b'0' + (xmin % 10) as u8;
            xmin /= 10;
            if xmin == 0 {
                break;
            }
        }
        out.extend_from_slice(&buf[i..]);
    }
}

/// The columns [`Version::read`] reads, for table alias `$t`.
macro_rules! version_columns {
    ($t:literal) => {
        concat!($t, ".updated_at, ", $t, ".xmin::text AS xmin")
    };
}

/// [`Version::etag`] of the row `$t`, in SQL, for the conditions of conditional writes. The
/// microseconds are computed exactly on every supported PostgreSQL (`date_part` is a double
/// before version 14): whole seconds, then the microseconds within the second.
macro_rules! etag {
    ($t:literal) => {
        concat!(
            $t,
            ".xmin::text || '-' || to_hex(date_part('epoch', date_trunc('second', ",
            $t,
            ".updated_at))::int8 * 1000000 + date_part('microseconds', ",
            $t,
            ".updated_at)::int8 % 1000000)"
        )
    };
}

/// The columns an entry is read from (table alias `c`), in the order [`read_entry`] reads them.
macro_rules! entry_columns {
    () => {
        concat!(
            "c.value, CASE WHEN c.value = '",
            raw_marker!(),
            "' THEN c.content_type END AS content_type, CASE WHEN c.value = '",
            raw_marker!(),
            "' THEN c.bytes END AS bytes, c.expires_at, ",
            version_columns!("c")
        )
    };
}

/// A comma-joined tag list (`''`: none) as a `text[]`, for the column `$t`.
macro_rules! tag_array {
    ($t:literal) => {
        concat!(
            "CASE WHEN ",
            $t,
            " = '' THEN '{}'::text[] ELSE string_to_array(",
            $t,
            ", ',') END"
        )
    };
}
pub(crate) use {etag, tag_array, version_columns};

/// Reads the columns of `entry_columns!()`.
fn read_entry(cols: &mut Cols<'_>) -> Result<CacheEntry, sqlx::Error> {
    let value: String = cols.next("value")?;
    let content_type: Option<String> = cols.next("content_type")?;
    let bytes: Option<&[u8]> = cols.next("bytes")?;
    let value = match (content_type, bytes) {
        (Some(content_type), Some(bytes)) => CacheValue::Raw {
            content_type,
            bytes: Bytes::copy_from_slice(bytes),
        },
        _ => CacheValue::Json(Bytes::from(value)),
    };
    Ok(CacheEntry {
        value,
        expires_at: cols.next("expires_at")?,
        version: Version::read(cols)?,
        stale: false,
        near: false,
        tag_expiry: None,
    })
}

/// When a tag was last invalidated, and from when entries written before that count as expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagRecord {
    pub invalidated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// What `_invalidate` did.
#[derive(Clone, Copy, Debug)]
pub struct Invalidated {
    /// Entries deleted (0 when their expiry was moved instead).
    pub deleted: u64,
    /// The invalidation time recorded for every tag.
    pub at: DateTime<Utc>,
}

/// One key's answer in a bounded batch read ([`Store::cache_mget_bounded`]).
#[derive(Clone, Debug)]
pub enum MgetSlot {
    Hit(CacheEntry),
    Miss,
    /// Present, but past the answer's byte budget: not read.
    Unprocessed,
}

/// The cache's statements, their tables in the configured schema (see [`Schema`]).
pub(crate) struct CacheSql {
    read: SqlStr,
    read_checked: SqlStr,
    read_bounded: SqlStr,
    pub(super) write: SqlStr,
    pub(super) write_if: SqlStr,
    pub(super) update_if: SqlStr,
    delete: SqlStr,
    delete_if: SqlStr,
    delete_range: SqlStr,
    delete_from: SqlStr,
    invalidate: SqlStr,
    invalidate_later: SqlStr,
    tags: SqlStr,
}

impl CacheSql {
    fn new(schema: &Schema) -> Self {
        Self {
            read: schema.sql(concat!(
                "SELECT c.key, ",
                entry_columns!(),
                " FROM {schema}.cache AS c WHERE c.key = ANY($1) AND c.expires_at > now()"
            )),
            // One row per (key, tags to check) asked, numbered by `i`. `tag_state`: 0 fresh,
            // 1 stale (a tag invalidated after the write), 2 expired (a tag's expiry passed
            // after the write). The tag records are found through their primary key.
            // `tag_expiry`: the next moment a tag's delayed expiry turns a fresh entry expired
            // (for the near cache: how long a fresh answer stays true without a notification).
            read_checked: schema.sql(concat!(
                "SELECT u.i, ",
                entry_columns!(),
                ", coalesce(s.state, 0) AS tag_state, s.tag_expiry \
                 FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS u(k, t, i) \
                 JOIN {schema}.cache AS c ON c.key = u.k \
                 LEFT JOIN LATERAL ( \
                   SELECT max(CASE WHEN r.expires_at > c.updated_at AND r.expires_at <= now() THEN 2 \
                                   WHEN r.invalidated_at > c.updated_at THEN 1 ELSE 0 END) AS state, \
                          min(r.expires_at) FILTER (WHERE r.expires_at > c.updated_at \
                                                      AND r.expires_at > now()) AS tag_expiry \
                   FROM {schema}.cache_tags AS r \
                   WHERE u.t IS NOT NULL AND r.tag = ANY(c.tags || ",
                tag_array!("u.t"),
                ")) AS s ON true WHERE c.expires_at > now()"
            )),
            // The keys in the order asked, with the running total of their sizes in the answer
            // (a value that is not JSON travels in base64, with its media type): values past
            // the budget stay in Postgres (NULL columns), so an _mget never loads more than its
            // budget. The first hit always comes back (the budget holds one largest value).
            // octet_length does not detoast the value it measures.
            read_bounded: schema.sql(concat!(
                "SELECT key, CASE WHEN n = 1 OR total <= $2 THEN value END AS value, \
                        CASE WHEN n = 1 OR total <= $2 THEN content_type END AS content_type, \
                        CASE WHEN n = 1 OR total <= $2 THEN bytes END AS bytes, \
                        expires_at, updated_at, xmin \
                 FROM (SELECT c.key, c.value, c.expires_at, \
                         CASE WHEN c.value = '",
                raw_marker!(),
                "' THEN c.content_type END AS content_type, \
                         CASE WHEN c.value = '",
                raw_marker!(),
                "' THEN c.bytes END AS bytes, ",
                version_columns!("c"),
                ", row_number() OVER w AS n, \
                         sum(octet_length(c.key) + 4 + CASE WHEN c.value = '",
                raw_marker!(),
                "' THEN (octet_length(c.bytes) + 2) / 3 * 4 + octet_length(c.content_type) + 40 \
                             ELSE octet_length(c.value) END) OVER w AS total \
                       FROM unnest($1::text[]) WITH ORDINALITY AS k(key, ord) \
                       JOIN {schema}.cache c ON c.key = k.key \
                       WHERE c.expires_at > now() \
                       WINDOW w AS (ORDER BY k.ord ROWS UNBOUNDED PRECEDING)) s"
            )),
            // Unconditional JSON writes, the common case; `write_if` and `update_if` (in
            // cache_write) serve the rest.
            write: schema.sql(concat!(
                "INSERT INTO {schema}.cache AS c (key, value, tags, expires_at) \
                 SELECT k, v, ",
                tag_array!("t"),
                ", now() + make_interval(secs => s) \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[]) AS u(k, v, t, s) \
                 ON CONFLICT (key) DO UPDATE \
                 SET value = EXCLUDED.value, content_type = NULL, bytes = NULL, raw_size = NULL, \
                     tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at, updated_at = now() \
                 RETURNING c.key, ",
                version_columns!("c")
            )),
            write_if: schema.sql(super::cache_write::WRITE_IF),
            update_if: schema.sql(super::cache_write::UPDATE_IF),
            // A delete voids the key's fill lease (see `leases`).
            delete: schema.sql(
                "WITH lease AS (DELETE FROM {schema}.cache_leases WHERE key = $1) \
                 DELETE FROM {schema}.cache WHERE key = $1",
            ),
            // A conditional delete: the row is locked first, so the verdict and the delete see
            // the same version. $2 / $4: If-Match / If-None-Match, 0 absent, 1 `*`, 2 the
            // tags in $3 / $5. An absent or expired entry fails If-Match and passes
            // If-None-Match. Answers whether the preconditions held.
            delete_if: schema.sql(concat!(
                "WITH cur AS ( \
                   SELECT c.key, c.expires_at > now() AS live, ",
                etag!("c"),
                " AS etag FROM {schema}.cache AS c WHERE c.key = $1 FOR UPDATE \
                 ), verdict AS ( \
                   SELECT cur.key, CASE WHEN cur.live IS NOT TRUE THEN $2 = 0 \
                     ELSE ($2 <> 2 OR cur.etag = ANY($3::text[])) \
                      AND CASE $4 WHEN 0 THEN true WHEN 2 THEN cur.etag <> ALL($5::text[]) ELSE false END \
                     END AS ok \
                   FROM (VALUES (1)) AS one LEFT JOIN cur ON true \
                 ), gone AS ( \
                   DELETE FROM {schema}.cache AS c USING verdict \
                   WHERE verdict.ok AND c.key = verdict.key RETURNING 1 \
                 ), lease AS ( \
                   DELETE FROM {schema}.cache_leases AS l USING verdict \
                   WHERE verdict.ok AND l.key = $1 \
                 ) SELECT ok FROM verdict"
            )),
            // starts_with keeps a database that is not UTF8 (unsupported), where byte order is
            // not code point order, from deleting keys outside the prefix; it cannot find keys
            // the range misses there.
            // The triggers announce it as one prefix delete (see the migration), and the keys'
            // fill leases are voided.
            delete_range: schema.sql(
                "WITH op AS MATERIALIZED (SELECT set_config('pgsidecar.op', 'prefix', true), \
                   set_config('pgsidecar.arg', $1, true)), \
                 lease AS (DELETE FROM {schema}.cache_leases \
                   WHERE key >= $1 AND key < $2 AND starts_with(key, $1)) \
                 DELETE FROM {schema}.cache WHERE key >= $1 AND key < $2 AND starts_with(key, $1) \
                   AND EXISTS (SELECT 1 FROM op)",
            ),
            delete_from: schema.sql(
                "WITH op AS MATERIALIZED (SELECT set_config('pgsidecar.op', 'prefix', true), \
                   set_config('pgsidecar.arg', $1, true)), \
                 lease AS (DELETE FROM {schema}.cache_leases WHERE key >= $1 AND starts_with(key, $1)) \
                 DELETE FROM {schema}.cache WHERE key >= $1 AND starts_with(key, $1) \
                   AND EXISTS (SELECT 1 FROM op)",
            ),
            // Records the tags (in key order, like the writes, so two invalidations cannot
            // deadlock on them), then deletes. The cardinality condition matches the partial GIN
            // index's predicate, so the index is used.
            // The triggers announce the deleted (or expiring) entries as dropped by an
            // invalidation, not as deletes (see the migration). `keys`: the keys touched, for
            // this sidecar's near cache.
            invalidate: schema.sql(
                "WITH op AS MATERIALIZED (SELECT set_config('pgsidecar.op', 'invalidate', true)), \
                 rec AS ( \
                   INSERT INTO {schema}.cache_tags AS r (tag, invalidated_at, expires_at) \
                   SELECT t, now(), now() FROM UNNEST($1::text[]) AS t \
                   ON CONFLICT (tag) DO UPDATE \
                   SET invalidated_at = EXCLUDED.invalidated_at, expires_at = EXCLUDED.expires_at \
                 ), gone AS ( \
                   DELETE FROM {schema}.cache WHERE tags && $1::text[] AND cardinality(tags) > 0 \
                     AND EXISTS (SELECT 1 FROM op) \
                   RETURNING key \
                 ) SELECT count(*) AS n, now() AS at, \
                   array_agg(key) FILTER (WHERE $2) AS keys FROM gone",
            ),
            // Stale-while-revalidate: the entries stay, their expiry moves to at most now + $2.
            // `updated_at` is left alone: it is when the value was written, which is what
            // the tag records are compared with.
            invalidate_later: schema.sql(
                "WITH op AS MATERIALIZED (SELECT set_config('pgsidecar.op', 'invalidate', true)), \
                 rec AS ( \
                   INSERT INTO {schema}.cache_tags AS r (tag, invalidated_at, expires_at) \
                   SELECT t, now(), now() + make_interval(secs => $2) FROM UNNEST($1::text[]) AS t \
                   ON CONFLICT (tag) DO UPDATE \
                   SET invalidated_at = EXCLUDED.invalidated_at, expires_at = EXCLUDED.expires_at \
                 ), moved AS ( \
                   UPDATE {schema}.cache SET expires_at = now() + make_interval(secs => $2) \
                   WHERE tags && $1::text[] AND cardinality(tags) > 0 \
                     AND expires_at > now() + make_interval(secs => $2) \
                     AND EXISTS (SELECT 1 FROM op) \
                   RETURNING key \
                 ) SELECT count(*) AS n, now() AS at, \
                   array_agg(key) FILTER (WHERE $3) AS keys FROM moved",
            ),
            tags: schema.sql(
                "SELECT tag, invalidated_at, expires_at FROM {schema}.cache_tags WHERE tag = ANY($1)",
            ),
        }
    }
}

pub(crate) struct CacheBatchers {
    reads: Batcher<ReadBatch>,
    writes: Batcher<WriteBatch>,
    sql: Arc<CacheSql>,
}

impl CacheBatchers {
    pub fn new(conns: Arc<Conns>, limits: BatchLimits, schema: &Schema) -> Self {
        let sql = Arc::new(CacheSql::new(schema));
        Self {
            reads: Batcher::spawn(
                ReadBatch {
                    conns: conns.clone(),
                    sql: sql.clone(),
                },
                limits.clone(),
            ),
            writes: Batcher::spawn(
                WriteBatch {
                    conns,
                    sql: sql.clone(),
                },
                limits,
            ),
            sql,
        }
    }
}

/// Reads of one or more keys. A batch of plain reads is one `key = ANY($1)` query, a key asked
/// for by several callers fetched once (single flight). A batch with any tag-checked read is
/// one query over (key, tags) pairs instead, so plain reads keep their query and its speed.
struct ReadBatch {
    conns: Arc<Conns>,
    sql: Arc<CacheSql>,
}

impl BatchOp for ReadBatch {
    type Item = CacheRead;
    type Output = Vec<Option<CacheEntry>>;
    const NAME: &'static str = "cache_get";
    const RETRY_ON_BROKEN_CONNECTION: bool = true;

    async fn run(&self, items: &[Self::Item]) -> Result<Vec<Self::Output>, DbError> {
        if items.iter().any(|r| r.check_tags.is_some()) {
            return self.run_checked(items).await;
        }
        let mut unique: Vec<&str> = Vec::new();
        let mut seen = HashSet::default();
        for key in items.iter().flat_map(|r| &r.keys) {
            if seen.insert(key.as_str()) {
                unique.push(key.as_str());
            }
        }
        let rows: Vec<PgRow> = run_once!(self.conns, Self::NAME, |c| sqlx::query(
            self.sql.read.clone()
        )
        .bind(&unique)
        .fetch_all(c))
        .await?;
        let found: HashMap<&str, CacheEntry> = decode_all(&rows, |cols| {
            Ok((cols.next::<&str>("key")?, read_entry(cols)?))
        })?
        .into_iter()
        .collect();
        Ok(items
            .iter()
            .map(|r| {
                r.keys
                    .iter()
                    .map(|k| found.get(k.as_str()).cloned())
                    .collect()
            })
            .collect())
    }
}

impl ReadBatch {
    async fn run_checked(
        &self,
        items: &[CacheRead],
    ) -> Result<Vec<Vec<Option<CacheEntry>>>, DbError> {
        // One slot per distinct (key, tags to check); tags travel comma-joined (they cannot
        // contain commas), NULL for a plain read.
        let mut slots: HashMap<(&str, Option<String>), usize> = HashMap::new();
        let mut keys: Vec<&str> = Vec::new();
        let mut checks: Vec<Option<String>> = Vec::new();
        let mut asked: Vec<Vec<usize>> = Vec::with_capacity(items.len());
        for r in items {
            let check = r
                .check_tags
                .as_ref()
                .map(|t| t.iter().map(Tag::as_str).collect::<Vec<_>>().join(","));
            let mut mine = Vec::with_capacity(r.keys.len());
            for k in &r.keys {
                let next = keys.len();
                let slot = *slots.entry((k.as_str(), check.clone())).or_insert_with(|| {
                    keys.push(k.as_str());
                    checks.push(check.clone());
                    next
                });
                mine.push(slot);
            }
            asked.push(mine);
        }
        let rows: Vec<PgRow> = run_once!(self.conns, Self::NAME, |c| sqlx::query(
            self.sql.read_checked.clone()
        )
        .bind(&keys)
        .bind(&checks)
        .fetch_all(c))
        .await?;
        let mut found: Vec<Option<CacheEntry>> = vec![None; keys.len()];
        for (i, entry, state) in decode_all(&rows, |cols| {
            let i: i64 = cols.next("i")?;
            let entry = read_entry(cols)?;
            let state = cols.next::<i32>("tag_state")?;
            let tag_expiry: Option<DateTime<Utc>> = cols.next("tag_expiry")?;
            Ok((
                i,
                CacheEntry {
                    tag_expiry,
                    ..entry
                },
                state,
            ))
        })? {
            let Some(slot) = usize::try_from(i - 1).ok().filter(|&s| s < found.len()) else {
                return Err(DbError::Other(format!("cache read answered row {i}")));
            };
            // Expired by a tag: a miss, as if the entry had expired on its own.
            if state < 2 {
                found[slot] = Some(CacheEntry {
                    stale: state == 1,
                    ..entry
                });
            }
        }
        Ok(asked
            .into_iter()
            .map(|mine| mine.into_iter().map(|s| found[s].clone()).collect())
            .collect())
    }
}

/// The least string above every string that starts with `prefix`, in byte order (the key
/// column's "C" collation, which for UTF-8 is code point order): the prefix with its last
/// character stepped up, after dropping trailing U+10FFFF. None when every character is U+10FFFF.
///
/// `key >= prefix AND key < end` is then exactly "starts with prefix", and unlike `LIKE $1` it
/// is an index range under a generic plan (see `start_up_options`). The key column's "C"
/// collation, which the first migration chose for `LIKE` prefixes, serves the range as well.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'), // skip the surrogates, which are not chars
            c => char::from_u32(c as u32 + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn count_hits(operation: &'static str, hits: usize, misses: usize) {
    let counter = |result, n: usize| {
        if n > 0 {
            m::cached::increment(
                m::CACHE_REQUESTS,
                &[("operation", operation), ("result", result)],
                n as u64,
            );
        }
    };
    counter("hit", hits);
    counter("miss", misses);
}

fn count_near(cache: &'static str, result: &'static str, n: u64) {
    if n > 0 {
        m::cached::increment(m::NEAR_REQUESTS, &[("cache", cache), ("result", result)], n);
    }
}

/// Bytes a hit adds to an `_mget` answer, as `read_bounded` counts them.
fn mget_size(key: &str, e: &CacheEntry) -> usize {
    key.len()
        + 4
        + match &e.value {
            CacheValue::Json(b) => b.len(),
            CacheValue::Raw {
                content_type,
                bytes,
            } => bytes.len().div_ceil(3) * 4 + content_type.len() + 40,
        }
}

impl Store {
    /// Reads one key; with `check_tags`, a tag-checked read (see [`CacheRead`]). With the near
    /// cache on, answered from memory when it can be, unless `no_cache` (`Cache-Control:
    /// no-cache`: read Postgres, and keep what it answered).
    pub async fn cache_get(
        &self,
        key: CacheKey,
        check_tags: Option<Vec<Tag>>,
        no_cache: bool,
    ) -> Result<Option<CacheEntry>, DbError> {
        if let Some(near) = &self.notifier.cache {
            return self.cache_get_near(near, key, check_tags, no_cache).await;
        }
        self.ensure_available()?;
        let read = CacheRead {
            keys: vec![key],
            check_tags,
        };
        let entry = self.cache.reads.call(read).await?.pop().flatten();
        count_hits("get", entry.is_some() as usize, entry.is_none() as usize);
        Ok(entry)
    }

    async fn cache_get_near(
        &self,
        near: &super::near::NearCache,
        key: CacheKey,
        check_tags: Option<Vec<Tag>>,
        no_cache: bool,
    ) -> Result<Option<CacheEntry>, DbError> {
        use super::near::Lookup;
        let check = check_tags
            .as_ref()
            .map(|t| t.iter().map(Tag::as_str).collect::<Vec<_>>().join(","));
        let lookup = if no_cache {
            Lookup::Bypass
        } else {
            near.get(key.as_str(), check.as_deref(), super::near::now_ns())
        };
        match lookup {
            Lookup::Hit(e) => {
                count_near("cache", "hit", 1);
                count_hits("get", 1, 0);
                return Ok(Some(e));
            }
            Lookup::Miss => count_near("cache", "miss", 1),
            Lookup::Bypass => count_near("cache", "bypass", 1),
        }
        self.ensure_available()?;
        let ticket = near.ticket(key.as_str());
        let read = CacheRead {
            keys: vec![key.clone()],
            check_tags,
        };
        let entry = self.cache.reads.call(read).await?.pop().flatten();
        count_hits("get", entry.is_some() as usize, entry.is_none() as usize);
        #[cfg(debug_assertions)]
        super::near::test_fill_delay().await;
        if let Some(e) = &entry {
            match &check {
                None => near.fill(key.as_str(), e, None, ticket),
                Some(tags) if !e.stale => {
                    near.fill(key.as_str(), e, Some((tags, e.tag_expiry)), ticket)
                }
                Some(_) => near.fill(key.as_str(), e, None, ticket),
            }
        }
        Ok(entry)
    }

    /// Reads many keys; the answer has one slot per key asked, in order.
    pub async fn cache_mget(
        &self,
        keys: Vec<CacheKey>,
    ) -> Result<Vec<Option<CacheEntry>>, DbError> {
        self.ensure_available()?;
        let read = CacheRead {
            keys,
            check_tags: None,
        };
        let entries = self.cache.reads.call(read).await?;
        let hits = entries.iter().filter(|e| e.is_some()).count();
        count_hits("mget", hits, entries.len() - hits);
        Ok(entries)
    }

    /// Reads many distinct keys, their values together at most `max_bytes` (past it, keys in
    /// the order asked are [`MgetSlot::Unprocessed`]); one slot per key, in order. Not batched
    /// with other reads: its budget is its own.
    pub async fn cache_mget_bounded(
        &self,
        keys: &[CacheKey],
        max_bytes: usize,
        no_cache: bool,
    ) -> Result<Vec<MgetSlot>, DbError> {
        let Some(near) = &self.notifier.cache else {
            return self.mget_bounded_db(keys, max_bytes).await;
        };
        use super::near::Lookup;
        // Hits from memory first, within the budget; the rest from Postgres, with what is left.
        let now = super::near::now_ns();
        let mut slots: Vec<Option<MgetSlot>> = vec![None; keys.len()];
        let mut left = max_bytes;
        let mut rest = Vec::new();
        let (mut hits, mut misses, mut bypassed) = (0, 0, 0);
        for (i, k) in keys.iter().enumerate() {
            let lookup = if no_cache {
                Lookup::Bypass
            } else {
                near.get(k.as_str(), None, now)
            };
            match lookup {
                Lookup::Hit(e) if mget_size(k.as_str(), &e) <= left => {
                    left -= mget_size(k.as_str(), &e);
                    slots[i] = Some(MgetSlot::Hit(e));
                    hits += 1;
                }
                Lookup::Bypass => {
                    bypassed += 1;
                    rest.push(i);
                }
                _ => {
                    misses += 1;
                    rest.push(i);
                }
            }
        }
        count_near("cache", "hit", hits);
        count_near("cache", "miss", misses);
        count_near("cache", "bypass", bypassed);
        count_hits("mget", hits as usize, 0);
        if !rest.is_empty() {
            let asked: Vec<CacheKey> = rest.iter().map(|&i| keys[i].clone()).collect();
            let tickets: Vec<_> = asked.iter().map(|k| near.ticket(k.as_str())).collect();
            let read = self.mget_bounded_db(&asked, left).await?;
            for (((&i, slot), k), t) in rest.iter().zip(read).zip(&asked).zip(tickets) {
                if let MgetSlot::Hit(e) = &slot {
                    near.fill(k.as_str(), e, None, t);
                }
                slots[i] = Some(slot);
            }
        }
        Ok(slots
            .into_iter()
            .map(|s| s.unwrap_or(MgetSlot::Miss))
            .collect())
    }

    async fn mget_bounded_db(
        &self,
        keys: &[CacheKey],
        max_bytes: usize,
    ) -> Result<Vec<MgetSlot>, DbError> {
        self.ensure_available()?;
        let names: Vec<&str> = keys.iter().map(CacheKey::as_str).collect();
        let rows: Vec<PgRow> = run!(self.conns, "cache_mget", |c| sqlx::query(
            self.cache.sql.read_bounded.clone()
        )
        .bind(&names)
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
        .fetch_all(c))
        .await?;
        let mut found: HashMap<String, MgetSlot> = decode_all(&rows, |cols| {
            let key: String = cols.next("key")?;
            let value: Option<String> = cols.next("value")?;
            let content_type: Option<String> = cols.next("content_type")?;
            let bytes: Option<&[u8]> = cols.next("bytes")?;
            let expires_at = cols.next("expires_at")?;
            let version = Version::read(cols)?;
            let value = match (value, content_type, bytes) {
                (None, _, _) => return Ok((key, MgetSlot::Unprocessed)),
                (Some(_), Some(content_type), Some(bytes)) => CacheValue::Raw {
                    content_type,
                    bytes: Bytes::copy_from_slice(bytes),
                },
                (Some(text), _, _) => CacheValue::Json(Bytes::from(text)),
            };
            Ok((
                key,
                MgetSlot::Hit(CacheEntry {
                    value,
                    expires_at,
                    version,
                    stale: false,
                    near: false,
                    tag_expiry: None,
                }),
            ))
        })?
        .into_iter()
        .collect();
        let slots: Vec<MgetSlot> = keys
            .iter()
            .map(|k| found.remove(k.as_str()).unwrap_or(MgetSlot::Miss))
            .collect();
        let hits = slots
            .iter()
            .filter(|s| matches!(s, MgetSlot::Hit(_)))
            .count();
        let misses = slots.iter().filter(|s| matches!(s, MgetSlot::Miss)).count();
        count_hits("mget", hits, misses);
        Ok(slots)
    }

    /// Writes one entry when its preconditions hold: what it wrote, or `None` when a
    /// precondition failed (nothing written).
    pub async fn cache_put(&self, put: CachePut) -> Result<Option<Written>, DbError> {
        self.ensure_available()?;
        let Some(near) = &self.notifier.cache else {
            return self.cache.writes.call(put).await?;
        };
        let key = put.key.clone();
        let written = self.cache.writes.call(put).await;
        // Whatever the outcome (a failure may have committed): read back from Postgres next.
        near.invalidate(key.as_str());
        written?
    }

    /// Deletes one entry when the preconditions hold (there is nothing to delete when it is
    /// absent); false when they did not (nothing deleted).
    pub async fn cache_delete(
        &self,
        key: &CacheKey,
        precondition: &Precondition,
    ) -> Result<bool, DbError> {
        self.ensure_available()?;
        let done = self.cache_delete_db(key, precondition).await;
        if let Some(near) = &self.notifier.cache {
            near.invalidate(key.as_str());
        }
        done
    }

    async fn cache_delete_db(
        &self,
        key: &CacheKey,
        precondition: &Precondition,
    ) -> Result<bool, DbError> {
        let sql = &self.cache.sql;
        if precondition.is_none() {
            run!(self.conns, "cache_delete", |c| sqlx::query(
                sql.delete.clone()
            )
            .bind(key.as_str())
            .execute(c))
            .await?;
            return Ok(true);
        }
        let (mk, ml) = EtagSet::bind(&precondition.if_match);
        let (nk, nl) = EtagSet::bind(&precondition.if_none_match);
        let ml: Vec<&str> = ml.split(' ').filter(|t| !t.is_empty()).collect();
        let nl: Vec<&str> = nl.split(' ').filter(|t| !t.is_empty()).collect();
        run!(self.conns, "cache_delete", |c| sqlx::query_scalar(
            sql.delete_if.clone()
        )
        .bind(key.as_str())
        .bind(mk)
        .bind(&ml)
        .bind(nk)
        .bind(&nl)
        .fetch_one(c))
        .await
    }

    /// Deletes every key starting with `prefix` (taken literally); returns how many went.
    pub async fn cache_delete_prefix(&self, prefix: &str) -> Result<u64, DbError> {
        self.ensure_available()?;
        let end = prefix_end(prefix);
        let sql = &self.cache.sql;
        let done = run!(self.conns, "cache_delete_prefix", |c| match &end {
            Some(end) => sqlx::query(sql.delete_range.clone())
                .bind(prefix)
                .bind(end)
                .execute(c),
            None => sqlx::query(sql.delete_from.clone()).bind(prefix).execute(c),
        })
        .await;
        if let Some(near) = &self.notifier.cache {
            near.invalidate_prefix(prefix);
        }
        Ok(done?.rows_affected())
    }

    /// Records the invalidation of `tags` (now; entries written before it are stale) and
    /// either deletes every entry carrying any of them (`expire_seconds` 0) or moves their
    /// expiry to at most now + `expire_seconds` (entries written before then count as expired
    /// once it has passed).
    pub async fn cache_invalidate(
        &self,
        tags: &[Tag],
        expire_seconds: u32,
    ) -> Result<Invalidated, DbError> {
        self.ensure_available()?;
        // Sorted and distinct: the records are upserted in one statement, in key order.
        let mut tags: Vec<&str> = tags.iter().map(Tag::as_str).collect();
        tags.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        tags.dedup();
        let sql = &self.cache.sql;
        let near = self.notifier.cache.as_ref();
        // Rows touched, the invalidation's time, the keys deleted (asked for by a near cache).
        type Done = (i64, DateTime<Utc>, Option<Vec<String>>);
        let done: Result<Done, DbError> =
            run!(self.conns, "cache_invalidate", |c| if expire_seconds == 0 {
                sqlx::query_as(sql.invalidate.clone())
                    .bind(&tags)
                    .bind(near.is_some())
                    .fetch_one(c)
            } else {
                sqlx::query_as(sql.invalidate_later.clone())
                    .bind(&tags)
                    .bind(expire_seconds as f64)
                    .bind(near.is_some())
                    .fetch_one(c)
            })
            .await;
        if let Some(near) = near {
            // The entries it deleted or made expire, and every tag-checked answer known.
            near.invalidate_tags();
            match &done {
                Ok((_, _, Some(keys))) => keys.iter().for_each(|k| near.invalidate(k)),
                Ok(_) => {}
                Err(_) => near.clear(),
            }
        }
        let (n, at, _) = done?;
        Ok(Invalidated {
            deleted: if expire_seconds == 0 { n as u64 } else { 0 },
            at,
        })
    }

    /// The invalidation records of `tags`, one slot per tag asked (`None`: never invalidated).
    pub async fn cache_tag_records(&self, tags: &[Tag]) -> Result<Vec<Option<TagRecord>>, DbError> {
        self.ensure_available()?;
        let names: Vec<&str> = tags.iter().map(Tag::as_str).collect();
        let rows: Vec<(String, DateTime<Utc>, DateTime<Utc>)> =
            run!(self.conns, "cache_tags", |c| sqlx::query_as(
                self.cache.sql.tags.clone()
            )
            .bind(&names)
            .fetch_all(c))
            .await?;
        let found: HashMap<String, TagRecord> = rows
            .into_iter()
            .map(|(tag, invalidated_at, expires_at)| {
                (
                    tag,
                    TagRecord {
                        invalidated_at,
                        expires_at,
                    },
                )
            })
            .collect();
        Ok(tags
            .iter()
            .map(|t| found.get(t.as_str()).copied())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(CacheKey::parse("user/42".into()).is_ok());
        assert!(CacheKey::parse("é 😀 %".into()).is_ok());
        assert!(CacheKey::parse("x".repeat(512)).is_ok());
        assert!(CacheKey::parse("x".repeat(513)).is_err());
        assert!(CacheKey::parse(String::new()).is_err());
        assert!(CacheKey::parse("_mget".into()).is_err());
        assert!(CacheKey::parse("a\nb".into()).is_err());
        assert!(CacheKey::parse("a\u{0}b".into()).is_err());
    }

    #[test]
    fn tags() {
        assert!(Tag::parse("product:42".into()).is_ok());
        assert!(Tag::parse("a,b".into()).is_err());
        assert!(Tag::parse(String::new()).is_err());
        assert!(Tag::parse("t".repeat(257)).is_err());
    }

    #[test]
    fn version_tags() {
        use chrono::TimeZone;
        for (xmin, micros) in [
            (0u32, 0i64),
            (7, 1),
            (4_294_967_295, 1_795_985_954_157_673),
            (1234, 15),
            (1234, 16),
            (99, -1_000_001),
        ] {
            let v = Version {
                xmin,
                written_at: Utc.timestamp_micros(micros).unwrap(),
            };
            assert_eq!(v.etag(), format!("{xmin}-{:x}", micros as u64));
        }
    }

    #[test]
    fn prefix_ranges() {
        let end = |p: &str| prefix_end(p);
        assert_eq!(end("user:").as_deref(), Some("user;"));
        assert_eq!(end("a%").as_deref(), Some("a&"));
        assert_eq!(end("é").as_deref(), Some("ê"));
        assert_eq!(end("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(end("ab\u{10FFFF}\u{10FFFF}").as_deref(), Some("ac"));
        assert_eq!(end("\u{10FFFF}"), None);
        // Every key that starts with the prefix sorts inside [prefix, end), byte-wise.
        for p in ["a", "z\u{10FFFF}", "\u{D7FF}", "\u{7F}"] {
            let e = end(p).unwrap();
            for tail in ["", "\u{0}", "~", "\u{10FFFF}\u{10FFFF}", "ÿ"] {
                let k = format!("{p}{tail}");
                assert!(
                    p.as_bytes() <= k.as_bytes() && k.as_bytes() < e.as_bytes(),
                    "{k:?}"
                );
            }
        }
    }
}
