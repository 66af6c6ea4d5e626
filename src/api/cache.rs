//! `/v1/cache`: get, put with TTL and tags, delete, batch get, prefix and tag invalidation.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, Body, PARAM_KEY, PathParam, QueryParams, parse_json};
use crate::config::MAX_TTL_SECONDS;
use crate::error::ApiError;
use crate::store::CacheKey;
use crate::store::cache::{CachePut, MgetSlot, Tag};

/// Most keys one `_mget` may ask for.
pub const MAX_MGET_KEYS: usize = 1000;
/// Most tags one `_invalidate` may name.
pub const MAX_INVALIDATE_TAGS: usize = 100;

fn key(raw: String) -> Result<CacheKey, ApiError> {
    CacheKey::parse(raw).map_err(|why| ApiError::bad_request("invalid_key", why))
}

fn tag(raw: String) -> Result<Tag, ApiError> {
    Tag::parse(raw).map_err(|why| ApiError::bad_request("invalid_tag", why))
}

/// `GET /v1/cache/{key}`: the stored JSON as the body, expiry in `Expires`.
pub async fn get(
    State(s): State<AppState>,
    PathParam(raw): PathParam<PARAM_KEY>,
) -> Result<Response, ApiError> {
    let key = key(raw)?;
    let entry = s
        .store
        .cache_get(key)
        .await?
        .ok_or(ApiError::NotFound("no such key, or it expired"))?;
    let mut resp = entry.value.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let expires = httpdate::fmt_http_date(entry.expires_at.into());
    if let Ok(v) = HeaderValue::from_str(&expires) {
        h.insert(header::EXPIRES, v);
    }
    Ok(resp)
}

#[derive(Deserialize)]
pub struct PutParams {
    ttl_seconds: Option<String>,
    tags: Option<String>,
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

/// `PUT /v1/cache/{key}?ttl_seconds=N&tags=a,b`: create or replace.
pub async fn put(
    State(s): State<AppState>,
    PathParam(raw): PathParam<PARAM_KEY>,
    QueryParams(q): QueryParams<PutParams>,
    Body(body): Body,
) -> Result<StatusCode, ApiError> {
    let key = key(raw)?;
    let ttl_seconds = parse_ttl(q.ttl_seconds.as_deref(), s.limits.cache_default_ttl)?;
    let tags = match q.tags.as_deref() {
        None | Some("") => Vec::new(),
        Some(list) => {
            let mut tags = Vec::new();
            for t in list.split(',') {
                let t = tag(t.to_string())?;
                if !tags.contains(&t) {
                    tags.push(t);
                }
            }
            if tags.len() > Tag::MAX_PER_ENTRY {
                return Err(ApiError::bad_request(
                    "invalid_tag",
                    format!("at most {} tags per entry", Tag::MAX_PER_ENTRY),
                ));
            }
            tags
        }
    };
    if body.len() > s.limits.cache_max_value_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "the value is larger than cache.max_value_bytes ({})",
            s.limits.cache_max_value_bytes
        )));
    }
    let value = json_text(&body)?;
    s.store
        .cache_put(CachePut {
            key,
            value,
            ttl_seconds,
            tags,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/cache/{key}`: 204 whether or not it existed.
pub async fn delete(
    State(s): State<AppState>,
    PathParam(raw): PathParam<PARAM_KEY>,
) -> Result<StatusCode, ApiError> {
    let key = key(raw)?;
    s.store.cache_delete(&key).await?;
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
pub async fn mget(State(s): State<AppState>, Body(body): Body) -> Result<Response, ApiError> {
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
    let permit = s
        .answers
        .reserve(
            s.limits.cache_max_mget_bytes + key_bytes,
            s.limits.cache_max_value_bytes + key_bytes,
        )
        .await?;
    let slots = s
        .store
        .cache_mget_bounded(&keys, permit.num_permits().saturating_sub(key_bytes))
        .await?;
    // Values are stored, validated JSON: splice them in as they are instead of re-encoding.
    let mut hits = Vec::new();
    let mut misses = Vec::new();
    let mut unprocessed = Vec::new();
    for (k, slot) in keys.iter().zip(slots) {
        match slot {
            MgetSlot::Hit(e) => hits.push((k, e.value)),
            MgetSlot::Miss => misses.push(k.as_str()),
            MgetSlot::Unprocessed => unprocessed.push(k.as_str()),
        }
    }
    let mut out = Vec::with_capacity(
        64 + hits
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
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
}

/// `POST /v1/cache/_invalidate`: drop every entry carrying any of the tags.
pub async fn invalidate(State(s): State<AppState>, Body(body): Body) -> Result<Response, ApiError> {
    let req: InvalidateBody = parse_json(&body)?;
    if req.tags.is_empty() || req.tags.len() > MAX_INVALIDATE_TAGS {
        return Err(ApiError::bad_request(
            "invalid_tags",
            format!("tags must hold 1 to {MAX_INVALIDATE_TAGS} tags"),
        ));
    }
    let tags = req
        .tags
        .into_iter()
        .map(tag)
        .collect::<Result<Vec<_>, _>>()?;
    let deleted = s.store.cache_invalidate(&tags).await?;
    Ok(axum::Json(json!({"deleted": deleted})).into_response())
}
