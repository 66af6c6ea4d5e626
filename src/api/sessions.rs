//! `/v1/sessions` and `/v1/users/{user_id}/sessions`: create, validate (and slide, by path or
//! by body), update, list and revoke login sessions (by token, by id, or all of a user's).

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::cache::NoCache;
use super::{AppState, Body, PARAM_TOKEN, PARAM_USER, PathParam, QueryParams, parse_json};
use crate::config::MAX_TTL_SECONDS;
use crate::error::ApiError;
use crate::store::sessions::SessionAnswer;
use crate::store::{ListPage, NewSession, SessionRecord, TokenHash};

const MAX_USER_ID_BYTES: usize = 256;
const MAX_IP_BYTES: usize = 64;
const MAX_USER_AGENT_BYTES: usize = 1024;

fn not_found() -> ApiError {
    ApiError::NotFound("session not found, expired or revoked")
}

/// A user id: 1 to 256 bytes. Any Unicode is kept exactly; NUL cannot be stored by Postgres.
fn user_id(raw: String) -> Result<String, ApiError> {
    if raw.is_empty() || raw.len() > MAX_USER_ID_BYTES {
        return Err(ApiError::bad_request(
            "invalid_user_id",
            "user_id must be a string of 1 to 256 bytes",
        ));
    }
    if raw.contains('\0') {
        return Err(ApiError::bad_request(
            "invalid_user_id",
            "user_id must not contain NUL characters",
        ));
    }
    Ok(raw)
}

fn optional_text(
    v: Option<serde_json::Value>,
    field: &str,
    code: &'static str,
    max: usize,
) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.len() <= max && !s.contains('\0') => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request(
            code,
            format!("{field} must be a string of at most {max} bytes without NUL"),
        )),
    }
}

/// `data` must be a JSON object; it is kept as the exact text the client sent.
fn data(raw: Option<&RawValue>, max: usize) -> Result<String, ApiError> {
    let Some(raw) = raw else {
        return Ok("{}".to_string());
    };
    let text = raw.get();
    if text == "null" {
        return Ok("{}".to_string());
    }
    if !text.starts_with('{') {
        return Err(ApiError::bad_request(
            "invalid_data",
            "data must be a JSON object",
        ));
    }
    if text.len() > max {
        return Err(ApiError::PayloadTooLarge(format!(
            "data is larger than sessions.max_data_bytes ({max})"
        )));
    }
    Ok(text.to_string())
}

// Response bodies are serialized straight from the records (not through serde_json::Value),
// so the session's `data` keeps its exact JSON text.
#[derive(Serialize)]
struct Created<'a> {
    token: &'a str,
    session: &'a SessionRecord,
}

#[derive(Serialize)]
struct SessionList<'a> {
    sessions: &'a [SessionRecord],
    /// Where the next page starts (pass it as `cursor`); absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// Sessions per page of a user's list unless `limit` says otherwise, and the most it may ask.
pub const LIST_DEFAULT_LIMIT: u32 = 100;
pub const LIST_MAX_LIMIT: u32 = 1000;

/// A list cursor: the last session's (created_at, id), opaque to clients (base64url of
/// `<microseconds>.<uuid>`).
fn encode_cursor((at, id): (chrono::DateTime<chrono::Utc>, Uuid)) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "{}.{}",
        at.timestamp_micros(),
        id.simple()
    ))
}

fn decode_cursor(raw: &str) -> Option<(chrono::DateTime<chrono::Utc>, Uuid)> {
    use base64::Engine;
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .ok()?;
    let (micros, id) = std::str::from_utf8(&text).ok()?.split_once('.')?;
    Some((
        chrono::DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        Uuid::parse_str(id).ok()?,
    ))
}

#[derive(Deserialize)]
pub struct ListParams {
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody<'a> {
    user_id: Option<serde_json::Value>,
    ttl_seconds: Option<serde_json::Value>,
    ip_address: Option<serde_json::Value>,
    user_agent: Option<serde_json::Value>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// `POST /v1/sessions`: 201 `{"token", "session"}`.
pub async fn create(State(s): State<AppState>, Body(body): Body) -> Result<Response, ApiError> {
    let req: CreateBody = parse_json(&body)?;
    let user_id = match req.user_id {
        Some(serde_json::Value::String(u)) => user_id(u)?,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_user_id",
                "user_id is required and must be a string",
            ));
        }
    };
    let ttl_seconds = match req.ttl_seconds {
        None | Some(serde_json::Value::Null) => s.limits.session_default_ttl,
        Some(v) => match super::json_integer(&v) {
            Some(t) if (1..=MAX_TTL_SECONDS as u64).contains(&t) => t as u32,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_ttl",
                    format!("ttl_seconds must be an integer from 1 to {MAX_TTL_SECONDS}"),
                ));
            }
        },
    };
    let new = NewSession {
        user_id,
        ttl_seconds,
        ip_address: optional_text(
            req.ip_address,
            "ip_address",
            "invalid_ip_address",
            MAX_IP_BYTES,
        )?,
        user_agent: optional_text(
            req.user_agent,
            "user_agent",
            "invalid_user_agent",
            MAX_USER_AGENT_BYTES,
        )?,
        data: data(req.data, s.limits.session_max_data_bytes)?,
    };
    let (token, session) = s.store.session_create(new).await?;
    Ok((
        StatusCode::CREATED,
        super::json_response(&Created {
            token: &token,
            session: &session,
        }),
    )
        .into_response())
}

/// `GET /v1/sessions/{token}`: the session, slid forward when due; 404 when not live.
pub async fn validate(
    State(s): State<AppState>,
    PathParam(token): PathParam<PARAM_TOKEN>,
    NoCache(no_cache): NoCache,
) -> Result<Response, ApiError> {
    validate_token(&s, &token, no_cache).await
}

/// `POST /v1/sessions/_validate` with `{"token": "..."}`: what `GET /v1/sessions/{token}`
/// does, without the token in the URL (which proxies and tracing tools record).
pub async fn validate_body(
    State(s): State<AppState>,
    NoCache(no_cache): NoCache,
    Body(body): Body,
) -> Result<Response, ApiError> {
    // A JSON object, so that `["<token>"]` (which serde would take for the struct) is refused.
    let serde_json::Value::Object(mut fields) = parse_json::<serde_json::Value>(&body)? else {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object: {\"token\": \"...\"}",
        ));
    };
    if let Some(other) = fields.keys().find(|k| *k != "token") {
        return Err(ApiError::bad_request(
            "invalid_json",
            format!("unknown field `{other}`: the body must be {{\"token\": \"...\"}}"),
        ));
    }
    let Some(serde_json::Value::String(token)) = fields.remove("token") else {
        return Err(ApiError::bad_request(
            "invalid_token",
            "token is required and must be a string",
        ));
    };
    validate_token(&s, &token, no_cache).await
}

async fn validate_token(s: &AppState, token: &str, no_cache: bool) -> Result<Response, ApiError> {
    let Some(hash) = TokenHash::of(token) else {
        crate::store::sessions::count_validation(false);
        return Err(not_found());
    };
    match s
        .store
        .session_validate(hash, no_cache)
        .await?
        .ok_or_else(not_found)?
    {
        SessionAnswer::Record(session) => Ok(super::json_response(&session)),
        SessionAnswer::Json(json) => Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            json,
        )
            .into_response()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// `PATCH /v1/sessions/{token}`: replaces `data`.
pub async fn update(
    State(s): State<AppState>,
    PathParam(token): PathParam<PARAM_TOKEN>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let req: UpdateBody = parse_json(&body)?;
    let Some(raw) = req.data else {
        return Err(ApiError::bad_request(
            "invalid_data",
            "body must be {\"data\": {...}}",
        ));
    };
    let data = data(Some(raw), s.limits.session_max_data_bytes)?;
    let hash = TokenHash::of(&token).ok_or_else(not_found)?;
    let session = s
        .store
        .session_update_data(hash, data)
        .await?
        .ok_or_else(not_found)?;
    Ok(super::json_response(&session))
}

/// `DELETE /v1/sessions/{token}`: 204, also when it was already gone.
pub async fn revoke(
    State(s): State<AppState>,
    PathParam(token): PathParam<PARAM_TOKEN>,
) -> Result<StatusCode, ApiError> {
    if let Some(hash) = TokenHash::of(&token) {
        s.store.session_revoke(hash).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/users/{user_id}/sessions?limit=N&cursor=C`: live sessions, newest first, a page
/// at a time: at most `limit` (default 100, at most 1000) and about `sessions.max_list_bytes`.
pub async fn list(
    State(s): State<AppState>,
    PathParam(raw): PathParam<PARAM_USER>,
    QueryParams(q): QueryParams<ListParams>,
) -> Result<Response, ApiError> {
    let user = user_id(raw)?;
    let limit = match q.limit.as_deref() {
        None => LIST_DEFAULT_LIMIT,
        Some(n) => n
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=LIST_MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_limit",
                    format!("limit must be an integer from 1 to {LIST_MAX_LIMIT}"),
                )
            })?,
    };
    let after = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "cursor must be a next_cursor returned by this route",
            )
        })?),
    };
    // A page of up to sessions.max_list_bytes, or the share of the answer budget it gets.
    let permit = s
        .answers
        .reserve(
            s.limits.session_max_list_bytes,
            s.limits.session_max_data_bytes_page,
        )
        .await?;
    let page = s
        .store
        .sessions_of_user(
            &user,
            ListPage {
                after,
                limit,
                max_bytes: permit.num_permits(),
            },
        )
        .await?;
    let resp = super::json_response(&SessionList {
        sessions: &page.sessions,
        next_cursor: page.next.map(encode_cursor),
    });
    let len = axum::body::HttpBody::size_hint(resp.body())
        .exact()
        .map_or(usize::MAX, |n| n as usize);
    Ok(super::held_response(resp, permit, len))
}

fn session_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_request("invalid_session_id", "the session id must be a UUID"))
}

/// `DELETE /v1/users/{user_id}/sessions/{session_id}`: revokes that session when it is the
/// user's; 204 also when it is already gone (or is another user's, which stays untouched).
pub async fn revoke_one(State(s): State<AppState>, uri: Uri) -> Result<StatusCode, ApiError> {
    use crate::http::decode::{Plus, percent_decode};
    // The raw segments of /v1/users/{user_id}/sessions/{session_id} (the router matched it),
    // the user id decoded strictly like every path parameter; a UUID needs no decoding.
    let mut segments = uri.path().split('/').skip(3);
    let (Some(raw_user), Some(_), Some(raw_id)) =
        (segments.next(), segments.next(), segments.next())
    else {
        return Err(ApiError::Internal);
    };
    let user = percent_decode(raw_user, Plus::Literal).map_err(|e| {
        ApiError::bad_request(
            "invalid_user_id",
            format!("the user id in the path is not valid percent-encoded UTF-8: {e}"),
        )
    })?;
    let user = user_id(user)?;
    let id = session_id(raw_id)?;
    s.store.session_revoke_id(&user, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct RevokeAllParams {
    except: Option<String>,
}

/// `DELETE /v1/users/{user_id}/sessions?except=<session id>`: `{"revoked": n}`.
pub async fn revoke_all(
    State(s): State<AppState>,
    PathParam(raw): PathParam<PARAM_USER>,
    QueryParams(q): QueryParams<RevokeAllParams>,
) -> Result<Response, ApiError> {
    let user = user_id(raw)?;
    let keep = match q.except.as_deref() {
        None => None,
        Some(id) => Some(Uuid::parse_str(id).map_err(|_| {
            ApiError::bad_request("invalid_session_id", "except must be a session id (a UUID)")
        })?),
    };
    let revoked = s.store.sessions_revoke_user(&user, keep).await?;
    Ok(axum::Json(json!({"revoked": revoked})).into_response())
}
