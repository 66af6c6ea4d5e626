//! `/v1/cache`: get (plain, conditional, tag-checked), put of any value with TTL, tags and
//! preconditions, delete, batch get, prefix deletion, tag invalidation and tag records.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use super::conditional::{IfNoneMatch, Preconditions, etag_header};
use super::media_type::{BodyKind, ValueKind};
use super::{AppState, Body, PARAM_KEY, PathParam, QueryParams, parse_json};
use crate::config::MAX_TTL_SECONDS;
use crate::error::ApiError;
use crate::store::cache::{CachePut, MgetSlot, PutValue, Tag};
use crate::store::{CacheEntry, CacheKey, CacheValue};

/// Most keys one `_mget` may ask for.
pub const MAX_MGET_KEYS: usize = 1000;
/// Most tags one `_invalidate` or `_tags` may name, and one tag-checked read may add.
pub const MAX_INVALIDATE_TAGS: usize = 100;

/// When the entry was last written, in milliseconds since the epoch (database clock).
pub const WRITTEN_AT: HeaderName = HeaderName::from_static("pgsidecar-written-at");
/// On a tag-checked read: a tag was invalidated after the entry was written.
pub const STALE: HeaderName = HeaderName::from_static("pgsidecar-stale");
/// `near` on a read answered from this sidecar's near cache.
pub const SERVED_FROM: HeaderName = HeaderName::from_static("pgsidecar-cache");
/// On a miss with `fill_lease_ms`: this caller's fill lease (pass it as `?lease=` to the PUT).
pub const FILL_LEASE: HeaderName = HeaderName::from_static("pgsidecar-fill-lease");

/// The longest fill lease and wait a GET may ask for.
pub const MAX_FILL_LEASE_MS: u64 = 60_000;
pub const MAX_WAIT_MS: u64 = 30_000;

/// `Cache-Control: no-cache` (in any field, any case): read Postgres, not the near cache.
pub struct NoCache(pub bool);

impl<S: Send + Sync> FromRequestParts<S> for NoCache {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self(
            parts
                .headers
                .get_all(header::CACHE_CONTROL)
                .iter()
                .any(|v| {
                    v.as_bytes().split(|&b| b == b',').any(|d| {
                        let d = d.trim_ascii();
                        d.eq_ignore_ascii_case(b"no-cache")
                    })
                }),
        ))
    }
}

fn key(raw: String) -> Result<CacheKey, ApiError> {
    CacheKey::parse(raw).map_err(|why| ApiError::bad_request("invalid_key", why))
}

fn tag(raw: String) -> Result<Tag, ApiError> {
    Tag::parse(raw).map_err(|why| ApiError::bad_request("invalid_tag", why))
}

/// A comma-separated tag list (query strings): each tag checked, repeats dropped, at most
/// `max` (`code` beyond); empty: no tags.
fn tag_list(list: &str, max: usize, code: &'static str, what: &str) -> Result<Vec<Tag>, ApiError> {
    let mut tags = Vec::new();
    if list.is_empty() {
        return Ok(tags);
    }
    for t in list.split(',') {
        let t = tag(t.to_string())?;
        if !tags.contains(&t) {
            tags.push(t);
        }
    }
    if tags.len() > max {
        return Err(ApiError::bad_request(
            code,
            format!("at most {max} tags {what}"),
        ));
    }
    Ok(tags)
}

/// [`tag_list`], as the tags' text.
pub(crate) fn tag_list_public(
    list: &str,
    max: usize,
    code: &'static str,
    what: &str,
) -> Result<Vec<String>, ApiError> {
    Ok(tag_list(list, max, code, what)?
        .iter()
        .map(|t| t.as_str().to_string())
        .collect())
}

fn millis(t: DateTime<Utc>) -> HeaderValue {
    HeaderValue::from(t.timestamp_millis())
}

#[derive(Deserialize)]
pub struct GetParams {
    check_tags: Option<String>,
    fill_lease_ms: Option<String>,
    wait_ms: Option<String>,
}

/// A read's query: the tags of a tag-checked read (`None`: a plain read), and a fill lease to
/// take on a miss (its length and how long to wait for another holder's write). A request
/// without a query string, the common case, skips the query parser.
pub struct GetQuery {
    check_tags: Option<Vec<Tag>>,
    lease: Option<(std::time::Duration, std::time::Duration)>,
}

/// `name` as milliseconds in `min..=max`, else 400 `invalid_lease`.
fn lease_millis(raw: &str, name: &str, min: u64, max: u64) -> Result<u64, ApiError> {
    raw.parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_lease",
                format!("{name} must be an integer from {min} to {max}"),
            )
        })
}

impl<S: Send + Sync> FromRequestParts<S> for GetQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if parts.uri.query().is_none() {
            return Ok(Self {
                check_tags: None,
                lease: None,
            });
        }
        let QueryParams(q) = QueryParams::<GetParams>::from_request_parts(parts, state).await?;
        let check_tags = q
            .check_tags
            .map(|list| tag_list(&list, MAX_INVALIDATE_TAGS, "invalid_tag", "in check_tags"))
            .transpose()?;
        let lease = match (q.fill_lease_ms, q.wait_ms) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_lease",
                    "wait_ms needs fill_lease_ms",
                ));
            }
            (Some(n), wait) => {
                let n = lease_millis(&n, "fill_lease_ms", 1, MAX_FILL_LEASE_MS)?;
                let wait = match wait {
                    None => 0,
                    Some(w) => lease_millis(&w, "wait_ms", 0, MAX_WAIT_MS)?,
                };
                Some((
                    std::time::Duration::from_millis(n),
                    std::time::Duration::from_millis(wait),
                ))
            }
        };
        Ok(Self { check_tags, lease })
    }
}

/// `GET /v1/cache/{key}[?check_tags=a,b][&fill_lease_ms=N[&wait_ms=M]]`: the stored bytes
/// with their `Content-Type`, and `ETag`, `Expires`, `Pgsidecar-Written-At` (and
/// `Pgsidecar-Stale` on a tag-checked read of a stale entry, `Pgsidecar-Cache: near` when
/// answered from the near cache); 304 when `If-None-Match` matches. With `fill_lease_ms`, a
/// miss may carry `Pgsidecar-Fill-Lease` (see `store::leases`).
pub async fn get(
    State(s): State<AppState>,
    PathParam(raw): PathParam<PARAM_KEY>,
    query: GetQuery,
    IfNoneMatch(if_none_match): IfNoneMatch,
    NoCache(no_cache): NoCache,
) -> Result<Response, ApiError> {
    let key = key(raw)?;
    let GetQuery { check_tags, lease } = query;
    let entry = match lease {
        None => s.store.cache_get(key, check_tags, no_cache).await?,
        Some((lease, wait)) => {
            use crate::store::leases::LeaseRead;
            match s
                .store
                .cache_get_leased(key, check_tags, no_cache, lease, wait)
                .await?
            {
                LeaseRead::Hit(e) => Some(e),
                LeaseRead::Miss => None,
                LeaseRead::Lease(token) => {
                    let mut resp = ApiError::NotFound("no such key, or it expired").into_response();
                    if let Ok(v) = HeaderValue::from_str(&token) {
                        resp.headers_mut().insert(FILL_LEASE, v);
                    }
                    return Ok(resp);
                }
            }
        }
    };
    let entry = entry.ok_or(ApiError::NotFound("no such key, or it expired"))?;
    let (etag, not_modified) =
        etag_header(|out| entry.version.write_etag(out), if_none_match.as_ref());
    if not_modified {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        entry_headers(resp.headers_mut(), &entry, etag);
        return Ok(resp);
    }
    let (content_type, body) = match entry.value {
        CacheValue::Json(ref b) => (HeaderValue::from_static("application/json"), b.clone()),
        CacheValue::Raw {
            ref content_type,
            ref bytes,
        } => (
            // Checked when stored; a row written some other way may hold anything.
            HeaderValue::from_str(content_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream")),
            bytes.clone(),
        ),
    };
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    entry_headers(h, &entry, etag);
    Ok(resp)
}

/// The headers a 200 and a 304 share.
fn entry_headers(h: &mut HeaderMap, entry: &CacheEntry, etag: Option<HeaderValue>) {
    let expires = httpdate::fmt_http_date(entry.expires_at.into());
    if let Ok(v) = HeaderValue::from_str(&expires) {
        h.insert(header::EXPIRES, v);
    }
    if let Some(v) = etag {
        h.insert(header::ETAG, v);
    }
    h.insert(WRITTEN_AT, millis(entry.version.written_at));
    if entry.stale {
        h.insert(STALE, HeaderValue::from_static("1"));
    }
    if entry.near {
        h.insert(SERVED_FROM, HeaderValue::from_static("near"));
    }
}

#[derive(Deserialize)]
pub struct PutParams {
    ttl_seconds: Option<String>,
    tags: Option<String>,
    lease: Option<String>,
}

/// Parses a TTL given as text (query string) into 1..=one year.
pub fn parse_ttl(raw: Option<&str>, default: u32) -> Result<u32, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.parse::<u32>() {
        Ok(v) if (1..=MAX_TTL_SECONDS).contains(&v) => Ok(v),
        _ => Err(ApiError::bad_request(
            "invalid_ttl",
            format!("ttl_seconds must be an integer from 1 to {MAX_TTL_SECONDS}"),
        )),
    }
}

/// Checks that `body` is exactly one JSON value and returns it as text, trimmed (public for
/// the `json_value` fuzz target).
pub fn json_text(body: &[u8]) -> Result<String, ApiError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("the body is not a JSON value: {e}"))
    })?;
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("invalid_json", "the body is not UTF-8"))?;
    Ok(text.trim_matches([' ', '\t', '\r', '\n']).to_string())
}

/// `PUT /v1/cache/{key}?ttl_seconds=N&tags=a,b`: create or replace, when the preconditions
/// hold; 204 with the `ETag` of the version written.
pub async fn put(
    State(s): State<AppState>,
    PathParam(raw): PathParam<PARAM_KEY>,
    QueryParams(q): QueryParams<PutParams>,
    ValueKind(kind): ValueKind,
    Preconditions(precondition): Preconditions,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let key = key(raw)?;
    let ttl_seconds = parse_ttl(q.ttl_seconds.as_deref(), s.limits.cache_default_ttl)?;
    let tags = tag_list(
        q.tags.as_deref().unwrap_or(""),
        Tag::MAX_PER_ENTRY,
        "invalid_tag",
        "per entry",
    )?;
    if body.len() > s.limits.cache_max_value_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "the value is larger than cache.max_value_bytes ({})",
            s.limits.cache_max_value_bytes
        )));
    }
    let lease = match q.lease {
        None => None,
        Some(token) if crate::store::leases::well_formed(&token) => Some(token),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_lease",
                "lease must be a token from a Pgsidecar-Fill-Lease header",
            ));
        }
    };
    if lease.is_some() && !precondition.is_none() {
        return Err(ApiError::bad_request(
            "invalid_lease",
            "a PUT with a lease cannot carry If-Match or If-None-Match",
        ));
    }
    let value = match kind {
        BodyKind::Json => PutValue::Json(json_text(&body)?),
        BodyKind::Raw(content_type) => PutValue::Raw {
            content_type,
            bytes: body,
        },
    };
    let put = CachePut {
        key,
        value,
        ttl_seconds,
        tags,
        precondition,
    };
    let written = match lease {
        None => s
            .store
            .cache_put(put)
            .await?
            .ok_or(ApiError::PreconditionFailed)?,
        Some(token) => s
            .store
            .cache_put_leased(put, &token)
            .await?
            .ok_or(ApiError::LeaseVoided)?,
    };
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let (Some(v), _) = etag_header(|out| written.write_etag(out), None) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

/// `DELETE /v1/cache/{key}`: 204 whether or not it existed, unless a precondition fails (412).
pub async fn delete(
    State(s): State<AppState>,
    PathParam(raw): PathParam<PARAM_KEY>,
    Preconditions(precondition): Preconditions,
) -> Result<StatusCode, ApiError> {
    let key = key(raw)?;
    if !s.store.cache_delete(&key, &precondition).await? {
        return Err(ApiError::PreconditionFailed);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MgetBody {
    keys: Vec<String>,
}

/// `POST /v1/cache/_mget`: `{"hits": {key: value}, "misses": [key]}`, plus `"unprocessed":
/// [key]` when the values would exceed `cache.max_mget_bytes` (as DynamoDB's BatchGetItem
/// returns `UnprocessedKeys`): the keys, in the order asked, from the first that did not fit.
pub async fn mget(
    State(s): State<AppState>,
    NoCache(no_cache): NoCache,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let req: MgetBody = parse_json(&body)?;
    if req.keys.is_empty() || req.keys.len() > MAX_MGET_KEYS {
        return Err(ApiError::bad_request(
            "invalid_keys",
            format!("keys must hold 1 to {MAX_MGET_KEYS} keys"),
        ));
    }
    let mut keys = Vec::with_capacity(req.keys.len());
    let mut seen = foldhash::HashSet::default();
    for raw in req.keys {
        let k = key(raw)?;
        if seen.insert(k.clone()) {
            keys.push(k);
        }
    }
    // Every key appears once in the answer (a hit, a miss or unprocessed): room for them, and
    // for the values up to cache.max_mget_bytes, or the share of the answer budget it gets.
    let key_bytes: usize = keys.iter().map(|k| k.as_str().len() + 8).sum::<usize>() + 64;
    // One largest item: a value that is not JSON travels in base64 (a third more), with its
    // media type (at most 255 bytes, each escaped at worst) and its field names.
    let largest = s.limits.cache_max_value_bytes.div_ceil(3) * 4 + 600;
    let permit = s
        .answers
        .reserve(
            s.limits.cache_max_mget_bytes.max(largest) + key_bytes,
            largest + key_bytes,
        )
        .await?;
    let slots = s
        .store
        .cache_mget_bounded(
            &keys,
            permit.num_permits().saturating_sub(key_bytes),
            no_cache,
        )
        .await?;
    // JSON values are stored, validated JSON: spliced in as they are instead of re-encoded.
    let mut hits = Vec::new();
    let mut raw = Vec::new();
    let mut misses = Vec::new();
    let mut unprocessed = Vec::new();
    for (k, slot) in keys.iter().zip(slots) {
        match slot {
            MgetSlot::Hit(e) => match e.value {
                CacheValue::Json(v) => hits.push((k, v)),
                CacheValue::Raw {
                    content_type,
                    bytes,
                } => raw.push((k, content_type, bytes)),
            },
            MgetSlot::Miss => misses.push(k.as_str()),
            MgetSlot::Unprocessed => unprocessed.push(k.as_str()),
        }
    }
    let mut out = Vec::with_capacity(
        64 + hits
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
            + raw
                .iter()
                .map(|(k, t, b)| k.as_str().len() + t.len() + b.len() / 3 * 4 + 40)
                .sum::<usize>(),
    );
    out.extend_from_slice(b"{\"hits\":{");
    for (i, (k, v)) in hits.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, k.as_str()).map_err(|_| ApiError::Internal)?;
        out.push(b':');
        out.extend_from_slice(v);
    }
    out.extend_from_slice(b"},\"raw\":{");
    for (i, (k, content_type, bytes)) in raw.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, k.as_str()).map_err(|_| ApiError::Internal)?;
        out.extend_from_slice(b":{\"content_type\":");
        serde_json::to_writer(&mut out, content_type).map_err(|_| ApiError::Internal)?;
        out.extend_from_slice(b",\"base64\":\"");
        // The standard alphabet needs no JSON escaping.
        let start = out.len();
        out.resize(
            start + base64::encoded_len(bytes.len(), true).unwrap_or(0),
            0,
        );
        let n = STANDARD
            .encode_slice(bytes, &mut out[start..])
            .map_err(|_| ApiError::Internal)?;
        out.truncate(start + n);
        out.extend_from_slice(b"\"}");
    }
    out.extend_from_slice(b"},\"misses\":");
    serde_json::to_writer(&mut out, &misses).map_err(|_| ApiError::Internal)?;
    // Only when the answer was cut at cache.max_mget_bytes: ask for these keys again.
    if !unprocessed.is_empty() {
        out.extend_from_slice(b",\"unprocessed\":");
        serde_json::to_writer(&mut out, &unprocessed).map_err(|_| ApiError::Internal)?;
    }
    out.push(b'}');
    let len = out.len();
    Ok(super::held_response(
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            out,
        )
            .into_response(),
        permit,
        len,
    ))
}

#[derive(Deserialize)]
pub struct PrefixParams {
    prefix: Option<String>,
}

/// `DELETE /v1/cache?prefix=P`: `{"deleted": n}`.
pub async fn delete_prefix(
    State(s): State<AppState>,
    QueryParams(q): QueryParams<PrefixParams>,
) -> Result<Response, ApiError> {
    let prefix = q.prefix.unwrap_or_default();
    if prefix.is_empty()
        || prefix.len() > CacheKey::MAX_BYTES
        || prefix.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            "invalid_prefix",
            "prefix must be 1 to 512 bytes without control characters (deleting everything needs an explicit prefix)",
        ));
    }
    let deleted = s.store.cache_delete_prefix(&prefix).await?;
    Ok(axum::Json(json!({"deleted": deleted})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateBody {
    tags: Vec<String>,
    expire_seconds: Option<serde_json::Value>,
}

/// `POST /v1/cache/_invalidate`: record the tags' invalidation, and drop every entry carrying
/// any of them (or, with `expire_seconds`, let them expire within that many seconds).
pub async fn invalidate(State(s): State<AppState>, Body(body): Body) -> Result<Response, ApiError> {
    let req: InvalidateBody = parse_json(&body)?;
    if req.tags.is_empty() || req.tags.len() > MAX_INVALIDATE_TAGS {
        return Err(ApiError::bad_request(
            "invalid_tags",
            format!("tags must hold 1 to {MAX_INVALIDATE_TAGS} tags"),
        ));
    }
    let expire_seconds = match req.expire_seconds {
        None | Some(serde_json::Value::Null) => 0,
        Some(v) => match super::json_integer(&v) {
            Some(n) if n <= MAX_TTL_SECONDS as u64 => n as u32,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_expire_seconds",
                    format!("expire_seconds must be an integer from 0 to {MAX_TTL_SECONDS}"),
                ));
            }
        },
    };
    let tags = req
        .tags
        .into_iter()
        .map(tag)
        .collect::<Result<Vec<_>, _>>()?;
    let done = s.store.cache_invalidate(&tags, expire_seconds).await?;
    Ok(super::json_response(&json!({
        "deleted": done.deleted,
        "invalidated_at": done.at.timestamp_millis(),
    })))
}

#[derive(Deserialize)]
pub struct TagsParams {
    tags: Option<String>,
}

/// `GET /v1/cache/_tags?tags=a,b`: when each tag was last invalidated, and from when entries
/// written before that count as expired (null: never invalidated).
pub async fn tags(
    State(s): State<AppState>,
    QueryParams(q): QueryParams<TagsParams>,
) -> Result<Response, ApiError> {
    let tags = tag_list(
        q.tags.as_deref().unwrap_or(""),
        MAX_INVALIDATE_TAGS,
        "invalid_tags",
        "per request",
    )?;
    if tags.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_tags",
            format!("tags must name 1 to {MAX_INVALIDATE_TAGS} tags"),
        ));
    }
    let records = s.store.cache_tag_records(&tags).await?;
    let mut invalidated = serde_json::Map::new();
    let mut expires = serde_json::Map::new();
    for (t, r) in tags.iter().zip(records) {
        invalidated.insert(
            t.as_str().to_string(),
            json!(r.map(|r| r.invalidated_at.timestamp_millis())),
        );
        expires.insert(
            t.as_str().to_string(),
            json!(r.map(|r| r.expires_at.timestamp_millis())),
        );
    }
    Ok(super::json_response(
        &json!({"tags": invalidated, "expires": expires}),
    ))
}
