//! Cache writes: batched upserts, values of any type, and conditional (`If-Match` /
//! `If-None-Match`) writes evaluated inside the statements, per row.
//!
//! A batch is cut into rounds so that no statement writes one key twice (Postgres refuses to
//! update a row twice in one statement): a run of unconditional writes of one key collapses
//! into its last write, as before; a conditional write of a key already in the batch goes to
//! the next round, after the writes it follows, so it sees them. Nearly every batch is one
//! round. Each round is one statement, or two when it holds `If-Match` writes, which are an
//! `UPDATE` (an absent key must not be inserted) while the rest is an upsert. Every statement
//! writes its rows in key order, so concurrent batches cannot deadlock.

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};
use sqlx::Arguments;
use sqlx::postgres::{PgArguments, PgRow};
use std::sync::Arc;

use super::DbError;
use super::batch::BatchOp;
use super::cache::{
    CacheKey, CacheSql, RAW_MARKER, Tag, Version, etag, tag_array, version_columns,
};
use super::conns::Conns;
use super::rows::decode_all;

/// Entity tags a precondition names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EtagSet {
    /// `*`: any live entry.
    Any,
    /// These opaque tags (unquoted). Each is one or more visible ASCII characters other than
    /// `"` (the only ones our tags are made of); the caller drops anything else.
    Tags(Vec<String>),
}

impl EtagSet {
    /// As the statements take it: a kind (0 absent, 1 `*`, 2 tags) and the tags, space-joined
    /// (a space is not allowed inside an entity tag).
    pub(crate) fn bind(set: &Option<EtagSet>) -> (i32, String) {
        match set {
            None => (0, String::new()),
            Some(EtagSet::Any) => (1, String::new()),
            Some(EtagSet::Tags(tags)) => (2, tags.join(" ")),
        }
    }
}

/// The preconditions of a write or delete (RFC 9110, section 13.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Precondition {
    /// Only over a live entry whose tag is one of these (strong comparison: the caller keeps
    /// strong tags only); `*`: over any live entry.
    pub if_match: Option<EtagSet>,
    /// Only when no live entry's tag is one of these (weak comparison); `*`: only when there
    /// is no live entry.
    pub if_none_match: Option<EtagSet>,
}

impl Precondition {
    pub fn is_none(&self) -> bool {
        self.if_match.is_none() && self.if_none_match.is_none()
    }
}

/// A value to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutValue {
    /// JSON text, already validated (and trimmed) by the caller.
    Json(String),
    /// Any bytes, with the `Content-Type` they were sent with.
    Raw { content_type: String, bytes: Bytes },
}

impl PutValue {
    fn len(&self) -> usize {
        match self {
            Self::Json(text) => text.len(),
            Self::Raw { bytes, .. } => bytes.len(),
        }
    }
}

/// One write: the key, the value, its lifetime, tags and preconditions.
#[derive(Debug)]
pub struct CachePut {
    pub key: CacheKey,
    pub value: PutValue,
    pub ttl_seconds: u32,
    pub tags: Vec<Tag>,
    pub precondition: Precondition,
}

impl CachePut {
    fn is_plain_json(&self) -> bool {
        self.precondition.is_none() && matches!(self.value, PutValue::Json(_))
    }
}

/// Upserts of any value, with `If-None-Match` per row: $7 its kind, $8 its tags (see
/// [`EtagSet::bind`]), looked up by the row's key. A live entry is replaced only without
/// If-None-Match, or when its tag is none of the listed ones; an expired one always.
pub(crate) const WRITE_IF: &str = concat!(
    "INSERT INTO {schema}.cache AS c (key, value, content_type, bytes, raw_size, tags, expires_at) \
     SELECT k, v, ct, b, octet_length(b) + octet_length(ct), ",
    tag_array!("t"),
    ", now() + make_interval(secs => s) \
     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::int4[]) \
       AS u(k, v, ct, b, t, s) \
     ON CONFLICT (key) DO UPDATE \
     SET value = EXCLUDED.value, content_type = EXCLUDED.content_type, bytes = EXCLUDED.bytes, \
         raw_size = EXCLUDED.raw_size, tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at, \
         updated_at = now() \
     WHERE c.expires_at <= now() \
        OR CASE ($7::int4[])[array_position($1::text[], c.key)] \
             WHEN 0 THEN true \
             WHEN 2 THEN ",
    etag!("c"),
    " <> ALL(string_to_array(($8::text[])[array_position($1::text[], c.key)], ' ')) \
             ELSE false END \
     RETURNING c.key, ",
    version_columns!("c")
);

/// `If-Match` writes: an UPDATE of a live entry whose tag is listed in $7 (NULL: `*`), and
/// that passes If-None-Match ($8, $9) as well. An absent or expired key is not written.
pub(crate) const UPDATE_IF: &str = concat!(
    "UPDATE {schema}.cache AS c \
     SET value = u.v, content_type = u.ct, bytes = u.b, \
         raw_size = octet_length(u.b) + octet_length(u.ct), tags = ",
    tag_array!("u.t"),
    ", expires_at = now() + make_interval(secs => u.s), updated_at = now() \
     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::int4[], \
                 $7::text[], $8::int4[], $9::text[]) AS u(k, v, ct, b, t, s, ml, nk, nl) \
     WHERE c.key = u.k AND c.expires_at > now() \
       AND (u.ml IS NULL OR ",
    etag!("c"),
    " = ANY(string_to_array(u.ml, ' '))) \
       AND CASE u.nk WHEN 0 THEN true WHEN 2 THEN ",
    etag!("c"),
    " <> ALL(string_to_array(u.nl, ' ')) ELSE false END \
     RETURNING c.key, ",
    version_columns!("c")
);

/// One write of a round, with the earlier unconditional writes of the same key in the batch
/// that it overwrites at once (collapsed into it).
#[derive(Debug, PartialEq, Eq)]
struct Step {
    item: usize,
    superseded: Vec<usize>,
}

/// Cuts a batch into rounds in which every key appears once, each round in key order (byte
/// order, as the column's "C" collation sorts).
fn rounds(items: &[CachePut]) -> Vec<Vec<Step>> {
    let key = |s: &Step| items[s.item].key.as_str().as_bytes();
    if items.iter().all(|i| i.precondition.is_none()) {
        // The common case, one round: the last write of each key, the others collapsed into it.
        let mut last: HashMap<&str, Step> = HashMap::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let step = last.entry(item.key.as_str()).or_insert(Step {
                item: i,
                superseded: Vec::new(),
            });
            if step.item != i {
                step.superseded.push(step.item);
                step.item = i;
            }
        }
        let mut round: Vec<Step> = last.into_values().collect();
        round.sort_unstable_by(|a, b| key(a).cmp(key(b)));
        return vec![round];
    }
    let mut per_key: HashMap<&str, Vec<Step>> = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let steps = per_key.entry(item.key.as_str()).or_default();
        match steps.last_mut() {
            Some(last)
                if item.precondition.is_none() && items[last.item].precondition.is_none() =>
            {
                last.superseded.push(last.item);
                last.item = i;
            }
            _ => steps.push(Step {
                item: i,
                superseded: Vec::new(),
            }),
        }
    }
    let depth = per_key.values().map(Vec::len).max().unwrap_or(0);
    let mut rounds: Vec<Vec<Step>> = (0..depth).map(|_| Vec::new()).collect();
    for steps in per_key.into_values() {
        for (r, step) in steps.into_iter().enumerate() {
            rounds[r].push(step);
        }
    }
    for round in &mut rounds {
        round.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    }
    rounds
}

/// The columns one row binds, borrowed from its item.
struct Row<'a> {
    key: &'a str,
    /// JSON text, or the marker for a value in `bytes`.
    value: &'a str,
    content_type: Option<&'a str>,
    bytes: Option<&'a [u8]>,
    /// Comma-joined (tags cannot contain commas).
    tags: String,
    ttl: i32,
}

impl<'a> Row<'a> {
    fn of(item: &'a CachePut) -> Self {
        let (value, content_type, bytes) = match &item.value {
            PutValue::Json(text) => (text.as_str(), None, None),
            PutValue::Raw {
                content_type,
                bytes,
            } => (RAW_MARKER, Some(content_type.as_str()), Some(&bytes[..])),
        };
        Self {
            key: item.key.as_str(),
            value,
            content_type,
            bytes,
            tags: item
                .tags
                .iter()
                .map(Tag::as_str)
                .collect::<Vec<_>>()
                .join(","),
            ttl: item.ttl_seconds as i32,
        }
    }

    /// Bytes this row adds to the bound arguments, beyond per-element headers.
    fn size(&self) -> usize {
        self.key.len()
            + self.value.len()
            + self.content_type.map_or(0, str::len)
            + self.bytes.map_or(0, <[u8]>::len)
            + self.tags.len()
    }
}

/// Encodes one statement's arrays, with room for all of them reserved at once (binary format:
/// a 4-byte length before each element, a header per array). Grown by doubling instead, sqlx's
/// buffer copied each batch's values several times: about 1k of a PUT's 41k instructions
/// (callgrind).
struct Args {
    args: PgArguments,
    result: Result<(), sqlx::error::BoxDynError>,
}

impl Args {
    fn new(arrays: usize, rows: &[Row<'_>], extra: usize) -> Self {
        let mut args = PgArguments::default();
        let bytes: usize = rows.iter().map(Row::size).sum();
        args.reserve(
            arrays,
            bytes + extra + 4 * arrays * rows.len() + 32 * arrays,
        );
        Self {
            args,
            result: Ok(()),
        }
    }

    fn add<'t, T>(&mut self, value: T) -> &mut Self
    where
        T: sqlx::Encode<'t, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        if self.result.is_ok() {
            self.result = self.args.add(value);
        }
        self
    }

    fn finish(self) -> Result<PgArguments, DbError> {
        self.result
            .map(|()| self.args)
            .map_err(|e| DbError::Other(format!("encoding a cache write: {e}")))
    }
}

/// Upserts and conditional writes (see the module documentation). Every caller is answered
/// only after the statement that carries its write commits.
pub(crate) struct WriteBatch {
    pub conns: Arc<Conns>,
    pub sql: Arc<CacheSql>,
}

/// The version a write made. A write that another write of the same key in the same batch
/// replaced at once (collapsed into it) shares its version, marked by its place among them:
/// its tag then matches no stored version, so a conditional write based on it fails, as it
/// must (it was overwritten before anyone could read it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub version: Version,
    /// 0 for the write that was stored; n for the n-th one it replaced in its batch.
    pub superseded: usize,
}

impl Written {
    /// Appends the entity tag, unquoted, to `out`.
    pub fn write_etag(&self, out: &mut Vec<u8>) {
        self.version.write_etag(out);
        if self.superseded > 0 {
            out.push(b'.');
            out.extend_from_slice(self.superseded.to_string().as_bytes());
        }
    }
}

/// A write's answer: what it wrote, or `None` when a precondition failed.
pub(crate) type WriteOutcome = Result<Option<Written>, DbError>;

impl BatchOp for WriteBatch {
    type Item = CachePut;
    type Output = WriteOutcome;
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

    async fn run(&self, items: &[CachePut]) -> Result<Vec<WriteOutcome>, DbError> {
        let mut out: Vec<Option<WriteOutcome>> = (0..items.len()).map(|_| None).collect();
        for round in rounds(items) {
            let (matching, rest): (Vec<&Step>, Vec<&Step>) = round
                .iter()
                .partition(|s| items[s.item].precondition.if_match.is_some());
            for (steps, update) in [(rest, false), (matching, true)] {
                if steps.is_empty() {
                    continue;
                }
                let written = match self.write(items, &steps, update).await {
                    Ok(written) => written,
                    // Later rounds would most likely fail the same way; their callers get
                    // this error too.
                    Err(e) => {
                        return Ok(out
                            .into_iter()
                            .map(|o| o.unwrap_or_else(|| Err(e.clone())))
                            .collect());
                    }
                };
                for (step, version) in steps.into_iter().zip(written) {
                    let item = &items[step.item];
                    if version.is_none() && item.precondition.is_none() {
                        out[step.item] = Some(Err(DbError::Other(format!(
                            "an unconditional cache write of {:?} wrote no row",
                            item.key.as_str()
                        ))));
                        continue;
                    }
                    if let Some(version) = version {
                        for (n, &i) in step.superseded.iter().enumerate() {
                            out[i] = Some(Ok(Some(Written {
                                version,
                                superseded: n + 1,
                            })));
                        }
                    }
                    out[step.item] = Some(Ok(version.map(|version| Written {
                        version,
                        superseded: 0,
                    })));
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(DbError::Other("a cache write was lost".into()))))
            .collect())
    }
}

impl WriteBatch {
    /// Runs one statement for `steps` (distinct keys, in key order); returns, for each step, the
    /// version it wrote, or `None` when its row was not written (a precondition failed).
    async fn write(
        &self,
        items: &[CachePut],
        steps: &[&Step],
        update: bool,
    ) -> Result<Vec<Option<Version>>, DbError> {
        let rows: Vec<Row<'_>> = steps.iter().map(|s| Row::of(&items[s.item])).collect();
        let keys: Vec<&str> = rows.iter().map(|r| r.key).collect();
        let values: Vec<&str> = rows.iter().map(|r| r.value).collect();
        let tags: Vec<&str> = rows.iter().map(|r| r.tags.as_str()).collect();
        let ttls: Vec<i32> = rows.iter().map(|r| r.ttl).collect();
        let plain = !update && steps.iter().all(|s| items[s.item].is_plain_json());
        let sql = match (plain, update) {
            (true, _) => &self.sql.write,
            (false, false) => &self.sql.write_if,
            (false, true) => &self.sql.update_if,
        };
        // The other columns, for the statements that take them.
        let pre = |s: &&Step| &items[s.item].precondition;
        let (mut types, mut bytes, mut nk, mut nl, mut ml) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        if !plain {
            types = rows
                .iter()
                .map(|r| r.content_type)
                .collect::<Vec<Option<&str>>>();
            bytes = rows.iter().map(|r| r.bytes).collect::<Vec<Option<&[u8]>>>();
            for s in steps {
                let (k, l) = EtagSet::bind(&pre(s).if_none_match);
                nk.push(k);
                nl.push(l);
            }
        }
        if update {
            // NULL: If-Match: *.
            ml = steps
                .iter()
                .map(|s| match &pre(s).if_match {
                    Some(EtagSet::Tags(t)) => Some(t.join(" ")),
                    _ => None,
                })
                .collect::<Vec<Option<String>>>();
        }
        let extra = nl.iter().map(String::len).sum::<usize>()
            + ml.iter().flatten().map(String::len).sum::<usize>();
        // Built again for a second run: binding moves the arguments into the statement.
        let args = || {
            let mut a = Args::new(if plain { 4 } else { 9 }, &rows, extra);
            a.add(&keys);
            a.add(&values);
            if !plain {
                a.add(&types);
                a.add(&bytes);
            }
            a.add(&tags);
            a.add(&ttls);
            if update {
                a.add(&ml);
            }
            if !plain {
                a.add(&nk);
                a.add(&nl);
            }
            a.finish()
        };
        let execute = |args: PgArguments| {
            run_once!(self.conns, Self::NAME, |c| sqlx::query_with(
                sql.clone(),
                args
            )
            .fetch_all(c))
        };
        // A statement Postgres rolled back (a deadlock victim) committed nothing: once more.
        let mut result = execute(args()?).await;
        if let Err(DbError::RolledBack(_)) = result {
            result = execute(args()?).await;
        }
        let result: Vec<PgRow> = result?;
        let written: HashMap<&str, Version> = decode_all(&result, |cols| {
            Ok((cols.next::<&str>("key")?, Version::read(cols)?))
        })?
        .into_iter()
        .collect();
        Ok(keys.iter().map(|k| written.get(k).copied()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, precondition: Precondition) -> CachePut {
        CachePut {
            key: CacheKey::parse(key.to_string()).unwrap(),
            value: PutValue::Json("1".into()),
            ttl_seconds: 60,
            tags: Vec::new(),
            precondition,
        }
    }

    fn star() -> Precondition {
        Precondition {
            if_match: None,
            if_none_match: Some(EtagSet::Any),
        }
    }

    fn step(item: usize, superseded: &[usize]) -> Step {
        Step {
            item,
            superseded: superseded.to_vec(),
        }
    }

    #[test]
    fn one_round_without_repeated_conditional_keys() {
        let items = [
            put("b", Precondition::default()),
            put("a", star()),
            put("b", Precondition::default()),
            put("c", Precondition::default()),
            put("b", Precondition::default()),
        ];
        assert_eq!(
            rounds(&items),
            vec![vec![step(1, &[]), step(4, &[0, 2]), step(3, &[])]]
        );
    }

    #[test]
    fn conditional_writes_of_one_key_go_one_round_each() {
        let items = [
            put("k", star()),
            put("k", Precondition::default()),
            put("k", Precondition::default()),
            put("k", star()),
            put("j", star()),
            put("k", Precondition::default()),
        ];
        assert_eq!(
            rounds(&items),
            vec![
                vec![step(4, &[]), step(0, &[])],
                vec![step(2, &[1])],
                vec![step(3, &[])],
                vec![step(5, &[])],
            ]
        );
    }

    #[test]
    fn statements_qualify_every_table() {
        for sql in [WRITE_IF, UPDATE_IF] {
            assert!(sql.contains("{schema}.cache"), "{sql}");
            assert!(!sql.contains(" cache "), "{sql}");
        }
    }
}
