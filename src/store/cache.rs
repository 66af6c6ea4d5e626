//! The shared cache table: batched reads and upserts, deletes by key, prefix and tag.

use foldhash::{HashMap, HashMapExt, HashSet};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Arguments, SqlStr};
use std::sync::Arc;

use super::batch::{BatchLimits, BatchOp, Batcher};
use super::conns::Conns;
use super::rows::decode_all;
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

/// A cached value as stored: validated JSON text, passed through without re-parsing.
#[derive(Clone, Debug)]
pub struct CacheEntry {
    pub value: Bytes,
    pub expires_at: DateTime<Utc>,
}

/// One key's answer in a bounded batch read ([`Store::cache_mget_bounded`]).
#[derive(Clone, Debug)]
pub enum MgetSlot {
    Hit(CacheEntry),
    Miss,
    /// Present, but past the answer's byte budget: not read.
    Unprocessed,
}

/// One write: the value must already be validated JSON.
#[derive(Debug)]
pub struct CachePut {
    pub key: CacheKey,
    pub value: String,
    pub ttl_seconds: u32,
    pub tags: Vec<Tag>,
}

/// The cache's statements, their tables in the configured schema (see [`Schema`]).
pub(crate) struct CacheSql {
    read: SqlStr,
    read_bounded: SqlStr,
    write: SqlStr,
    delete: SqlStr,
    delete_range: SqlStr,
    delete_from: SqlStr,
    invalidate: SqlStr,
}

impl CacheSql {
    fn new(schema: &Schema) -> Self {
        Self {
            read: schema.sql(
                "SELECT key, value, expires_at FROM {schema}.cache \
                 WHERE key = ANY($1) AND expires_at > now()",
            ),
            // The keys in the order asked, with the running total of their sizes: values past
            // the budget stay in Postgres (a NULL value), so an _mget never loads more than its
            // budget. The first hit always comes back (the budget holds one largest value).
            // octet_length does not detoast the value it measures.
            read_bounded: schema.sql(
                "SELECT key, CASE WHEN n = 1 OR total <= $2 THEN value END AS value, expires_at \
                 FROM (SELECT c.key, c.value, c.expires_at, \
                         row_number() OVER w AS n, \
                         sum(octet_length(c.key) + octet_length(c.value) + 4) OVER w AS total \
                       FROM unnest($1::text[]) WITH ORDINALITY AS k(key, ord) \
                       JOIN {schema}.cache c ON c.key = k.key \
                       WHERE c.expires_at > now() \
                       WINDOW w AS (ORDER BY k.ord ROWS UNBOUNDED PRECEDING)) s",
            ),
            write: schema.sql(
                "INSERT INTO {schema}.cache (key, value, tags, expires_at) \
                 SELECT k, v, CASE WHEN t = '' THEN '{}'::text[] ELSE string_to_array(t, ',') END, \
                        now() + make_interval(secs => s) \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[]) AS u(k, v, t, s) \
                 ON CONFLICT (key) DO UPDATE \
                 SET value = EXCLUDED.value, tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at, \
                     updated_at = now()",
            ),
            delete: schema.sql("DELETE FROM {schema}.cache WHERE key = $1"),
            // starts_with keeps a database that is not UTF8 (unsupported), where byte order is
            // not code point order, from deleting keys outside the prefix; it cannot find keys
            // the range misses there.
            delete_range: schema.sql(
                "DELETE FROM {schema}.cache WHERE key >= $1 AND key < $2 AND starts_with(key, $1)",
            ),
            delete_from: schema
                .sql("DELETE FROM {schema}.cache WHERE key >= $1 AND starts_with(key, $1)"),
            // The cardinality condition matches the partial GIN index's predicate, so the index
            // is used.
            invalidate: schema.sql(
                "DELETE FROM {schema}.cache WHERE tags && $1::text[] AND cardinality(tags) > 0",
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

/// Reads of one or more keys, served by one `key = ANY($1)` query per batch. A key asked for by
/// several callers in the same batch is fetched once (single flight).
struct ReadBatch {
    conns: Arc<Conns>,
    sql: Arc<CacheSql>,
}

impl BatchOp for ReadBatch {
    type Item = Vec<CacheKey>;
    type Output = Vec<Option<CacheEntry>>;
    const NAME: &'static str = "cache_get";
    const RETRY_ON_BROKEN_CONNECTION: bool = true;

    async fn run(&self, items: &[Self::Item]) -> Result<Vec<Self::Output>, DbError> {
        let mut unique: Vec<&str> = Vec::new();
        let mut seen = HashSet::default();
        for key in items.iter().flatten() {
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
            Ok((
                cols.next::<&str>("key")?,
                CacheEntry {
                    value: Bytes::from(cols.next::<String>("value")?),
                    expires_at: cols.next("expires_at")?,
                },
            ))
        })?
        .into_iter()
        .collect();
        Ok(items
            .iter()
            .map(|keys| {
                keys.iter()
                    .map(|k| found.get(k.as_str()).cloned())
                    .collect()
            })
            .collect())
    }
}

/// Upserts, written with one multi-row `INSERT ... SELECT FROM UNNEST ... ON CONFLICT` per
/// batch. Within a batch the last write of a key wins (Postgres refuses to update one row twice
/// in a statement); every caller is answered only after the statement commits.
struct WriteBatch {
    conns: Arc<Conns>,
    sql: Arc<CacheSql>,
}

impl BatchOp for WriteBatch {
    type Item = CachePut;
    type Output = ();
    const NAME: &'static str = "cache_put";
    // The upsert may have committed before the connection broke; running it again could put
    // back a value another batch has since replaced.
    const RETRY_ON_BROKEN_CONNECTION: bool = false;
    /// About 4 MiB of values per statement, so one batch of large values stays well inside
    /// the statement timeout.
    const MAX_BATCH_WEIGHT: usize = 4 << 20;
    fn weight(item: &CachePut) -> usize {
        item.key.as_str().len() + item.value.len()
    }

    async fn run(&self, items: &[Self::Item]) -> Result<Vec<()>, DbError> {
        let n = items.len();
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(n);
        for (i, item) in items.iter().enumerate() {
            last.insert(item.key.as_str(), i);
        }
        // Rows in key order (byte order, as the column's "C" collation sorts): two batches
        // writing overlapping keys then lock them in the same order and cannot deadlock.
        let mut rows: Vec<&CachePut> = last.values().map(|&i| &items[i]).collect();
        rows.sort_unstable_by(|a, b| a.key.as_str().as_bytes().cmp(b.key.as_str().as_bytes()));
        let mut keys = Vec::with_capacity(rows.len());
        let mut values = Vec::with_capacity(rows.len());
        let mut tags = Vec::with_capacity(rows.len());
        let mut ttls = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        for item in rows {
            // Tags cannot contain commas, so one comma-joined string per row carries the list.
            let tag_list = item
                .tags
                .iter()
                .map(Tag::as_str)
                .collect::<Vec<_>>()
                .join(",");
            bytes += item.key.as_str().len() + item.value.len() + tag_list.len();
            keys.push(item.key.as_str());
            values.push(item.value.as_str());
            tags.push(tag_list);
            ttls.push(item.ttl_seconds as i32);
        }
        // Room for all four arrays at once (binary format: a 4-byte length before each
        // element, a header per array). Grown by doubling instead, sqlx's buffer copied each
        // batch's values several times: about 1k of a PUT's 41k instructions (callgrind).
        let mut args = PgArguments::default();
        args.reserve(4, bytes + 24 * keys.len() + 128);
        let bound = args
            .add(&keys)
            .and_then(|()| args.add(&values))
            .and_then(|()| args.add(&tags))
            .and_then(|()| args.add(&ttls));
        bound.map_err(|e| DbError::Other(format!("encoding a cache write: {e}")))?;
        run_once!(self.conns, Self::NAME, |c| sqlx::query_with(
            self.sql.write.clone(),
            args
        )
        .execute(c))
        .await?;
        Ok(vec![(); n])
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

impl Store {
    pub async fn cache_get(&self, key: CacheKey) -> Result<Option<CacheEntry>, DbError> {
        self.ensure_available()?;
        let entry = self.cache.reads.call(vec![key]).await?.pop().flatten();
        count_hits("get", entry.is_some() as usize, entry.is_none() as usize);
        Ok(entry)
    }

    /// Reads many keys; the answer has one slot per key asked, in order.
    pub async fn cache_mget(
        &self,
        keys: Vec<CacheKey>,
    ) -> Result<Vec<Option<CacheEntry>>, DbError> {
        self.ensure_available()?;
        let entries = self.cache.reads.call(keys).await?;
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
            let expires_at = cols.next("expires_at")?;
            Ok((
                key,
                match value {
                    Some(v) => MgetSlot::Hit(CacheEntry {
                        value: Bytes::from(v),
                        expires_at,
                    }),
                    None => MgetSlot::Unprocessed,
                },
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

    pub async fn cache_put(&self, put: CachePut) -> Result<(), DbError> {
        self.ensure_available()?;
        self.cache.writes.call(put).await
    }

    pub async fn cache_delete(&self, key: &CacheKey) -> Result<(), DbError> {
        self.ensure_available()?;
        run!(self.conns, "cache_delete", |c| sqlx::query(
            self.cache.sql.delete.clone()
        )
        .bind(key.as_str())
        .execute(c))
        .await?;
        Ok(())
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
        .await?;
        Ok(done.rows_affected())
    }

    /// Deletes every entry carrying any of `tags`; returns how many went.
    pub async fn cache_invalidate(&self, tags: &[Tag]) -> Result<u64, DbError> {
        self.ensure_available()?;
        let tags: Vec<&str> = tags.iter().map(Tag::as_str).collect();
        let done = run!(self.conns, "cache_invalidate", |c| sqlx::query(
            self.cache.sql.invalidate.clone()
        )
        .bind(&tags)
        .execute(c))
        .await?;
        Ok(done.rows_affected())
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
