//! The data API (`/v1/...`): HTTP only. Handlers parse and validate into small types, call the
//! store, and map its answers; they never build SQL.

pub mod cache;
mod conditional;
pub mod events;
mod media_type;
pub mod sessions;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Settings;
use crate::error::ApiError;
use crate::store::Store;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub limits: Arc<Limits>,
    pub answers: AnswerBudget,
    /// Open change-feed streams end when the sidecar stops.
    pub lifecycle: crate::shutdown::Lifecycle,
}

/// Bytes of answers whose size the request does not bound (`_mget` answers, session list
/// pages) held at once, all data threads together (`server.max_response_bytes_in_flight`).
/// Clones share the budget.
#[derive(Clone)]
pub struct AnswerBudget(Arc<Semaphore>, usize);

impl AnswerBudget {
    pub fn new(settings: &crate::config::ServerSettings) -> Self {
        let size = settings
            .max_response_bytes_in_flight
            .min(Semaphore::MAX_PERMITS);
        Self(Arc::new(Semaphore::new(size)), size)
    }

    /// Bytes of answers held right now (read at scrape time, not kept as a gauge).
    pub fn held(&self) -> usize {
        self.1.saturating_sub(self.0.available_permits())
    }

    /// Bytes of the budget for one answer: an eighth of what is free, but at least `at_least`
    /// (one largest item) and at most `want` (the answer's own bound), so that one answer cannot
    /// take it all from the next ones; answers are cut to what they get (an `_mget` sooner, a
    /// page shorter). When not even `at_least` is free, waits for it (in turn) up to
    /// [`ANSWER_BUDGET_WAIT`], then 503 `overloaded`.
    pub async fn reserve(
        &self,
        want: usize,
        at_least: usize,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        let at_least = at_least.min(want);
        let permits = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        // Racing other reservations: what was free a moment ago may be gone; try again.
        for _ in 0..4 {
            let free = self.0.available_permits();
            if free < at_least {
                break;
            }
            let n = (free / 8).clamp(at_least, want);
            if let Ok(p) = self.0.clone().try_acquire_many_owned(permits(n)) {
                return Ok(p);
            }
        }
        let wait = self.0.clone().acquire_many_owned(permits(at_least));
        match tokio::time::timeout(ANSWER_BUDGET_WAIT, wait).await {
            Ok(Ok(p)) => Ok(p),
            _ => {
                metrics::counter!(crate::metrics::HTTP_ANSWER_BUDGET_SHED).increment(1);
                Err(ApiError::Overloaded)
            }
        }
    }
}

/// Longest an answer waits for room in the [`AnswerBudget`]: answers are written in
/// milliseconds, so a longer wait means clients that do not read theirs.
pub const ANSWER_BUDGET_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `resp` holding `permit` (its share of the [`AnswerBudget`], trimmed to `bytes`) until the
/// answer has been sent.
pub fn held_response(
    resp: axum::response::Response,
    mut permit: OwnedSemaphorePermit,
    bytes: usize,
) -> axum::response::Response {
    drop(permit.split(permit.num_permits().saturating_sub(bytes)));
    resp.map(|inner| {
        axum::body::Body::new(Held {
            inner,
            _permit: permit,
        })
    })
}

/// A response body and the budget it holds until hyper has written it to the socket.
struct Held {
    inner: axum::body::Body,
    _permit: OwnedSemaphorePermit,
}

impl axum::body::HttpBody for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    /// Never true: hyper drops a body that says it has ended as soon as it has taken its last
    /// bytes, before writing them; asked for a frame after that, this body ends (and gives its
    /// share back) once hyper has written the bytes out.
    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Input limits, from the settings.
#[derive(Debug)]
pub struct Limits {
    pub session_default_ttl: u32,
    pub session_max_data_bytes: usize,
    pub cache_default_ttl: u32,
    pub cache_max_value_bytes: usize,
    pub cache_max_mget_bytes: usize,
    pub session_max_list_bytes: usize,
    pub session_max_data_bytes_page: usize,
}

/// Builds the data router. Its guard (auth, load shedding, request timeout) and body limit are
/// put around it by [`crate::http::edge`]. `answers` is shared by every data thread's router.
pub fn router(
    store: Store,
    settings: &Settings,
    answers: AnswerBudget,
    lifecycle: crate::shutdown::Lifecycle,
) -> Router {
    let state = AppState {
        answers,
        store,
        lifecycle,
        limits: Arc::new(Limits {
            session_default_ttl: settings.sessions.default_ttl_seconds,
            session_max_data_bytes: settings.sessions.max_data_bytes,
            cache_default_ttl: settings.cache.default_ttl_seconds,
            cache_max_value_bytes: settings.cache.max_value_bytes,
            cache_max_mget_bytes: settings.cache.max_mget_bytes,
            session_max_list_bytes: settings.sessions.max_list_bytes,
            // One session's share of a page at most: its data, a user agent, the rest.
            session_max_data_bytes_page: settings.sessions.max_data_bytes + 2048,
        }),
    };
    let mut router = Router::new();
    for (_, path, handler) in routes() {
        // Routes sharing a path merge their methods.
        router = router.route(path, handler);
    }
    router.with_state(state)
}

/// Every data route: method, path template, handler. The router is built from this list and
/// the OpenAPI test checks the document against it, so the two cannot drift apart.
pub fn routes() -> Vec<(&'static str, &'static str, MethodRouter<AppState>)> {
    vec![
        ("POST", "/v1/sessions", post(sessions::create)),
        (
            "POST",
            "/v1/sessions/_validate",
            post(sessions::validate_body),
        ),
        ("GET", "/v1/sessions/{token}", get(sessions::validate)),
        ("PATCH", "/v1/sessions/{token}", patch(sessions::update)),
        ("DELETE", "/v1/sessions/{token}", delete(sessions::revoke)),
        ("GET", "/v1/users/{user_id}/sessions", get(sessions::list)),
        (
            "DELETE",
            "/v1/users/{user_id}/sessions",
            delete(sessions::revoke_all),
        ),
        (
            "DELETE",
            "/v1/users/{user_id}/sessions/{session_id}",
            delete(sessions::revoke_one),
        ),
        ("GET", "/v1/events", get(events::events)),
        ("DELETE", "/v1/cache", delete(cache::delete_prefix)),
        ("POST", "/v1/cache/_mget", post(cache::mget)),
        ("POST", "/v1/cache/_invalidate", post(cache::invalidate)),
        ("GET", "/v1/cache/_tags", get(cache::tags)),
        ("GET", "/v1/cache/{key}", get(cache::get)),
        ("PUT", "/v1/cache/{key}", put(cache::put)),
        ("DELETE", "/v1/cache/{key}", delete(cache::delete)),
    ]
}

/// Method and path template of every data route, for documentation checks.
pub fn route_table() -> Vec<(&'static str, &'static str)> {
    routes().into_iter().map(|(m, p, _)| (m, p)).collect()
}

/// The raw request body, with a too-large body mapped to our 413.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(
                        "request body is larger than server.max_body_bytes".into(),
                    )
                } else {
                    ApiError::bad_request("invalid_body", "could not read the request body")
                }
            })
    }
}

/// `value` as a JSON response. Serialized into one `Vec` sized for a session record: axum's
/// `Json` writes through a `BytesMut` writer piece by piece, which cost twice as much here.
pub fn json_response<T: serde::Serialize>(value: &T) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut body = Vec::with_capacity(512);
    match serde_json::to_writer(&mut body, value) {
        Ok(()) => (
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        // Our own types always serialize; never send half a body.
        Err(_) => ApiError::Internal.into_response(),
    }
}

/// A JSON number read as a non-negative integer the way JSON Schema's `integer` (and so
/// openapi.json) reads it: any number with no fractional part, so `86400.0` and `8.64e4` are
/// the integer 86400, as much as `86400`. JavaScript clients cannot tell them apart either.
pub fn json_integer(v: &serde_json::Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    // Exact below 2^53; larger values are beyond every integer field here anyway.
    let f = v.as_f64()?;
    (f.fract() == 0.0 && (0.0..9_007_199_254_740_992.0).contains(&f)).then_some(f as u64)
}

/// A JSON body parsed into `T`; malformed JSON is 400 `invalid_json`.
pub fn parse_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON for this route: {e}"),
        )
    })
}

/// A single path parameter, decoded by the strict decoder ([`crate::http::decode`]: `+` is a
/// plus sign, malformed escapes and non-UTF-8 are refused); undecodable input is `CODE`.
pub struct PathParam<const CODE: u8>(pub String);

/// Codes for [`PathParam`] rejections.
pub const PARAM_KEY: u8 = 0;
pub const PARAM_TOKEN: u8 = 1;
pub const PARAM_USER: u8 = 2;

impl<S: Send + Sync, const CODE: u8> FromRequestParts<S> for PathParam<CODE> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        use crate::http::decode::{Plus, path_param, percent_decode};
        // The raw segment, not axum's decoded one: axum passes malformed escapes through as text.
        let raw = parts
            .extensions
            .get::<MatchedPath>()
            .and_then(|m| path_param(m.as_str(), parts.uri.path()));
        let Some(raw) = raw else {
            return Err(ApiError::Internal);
        };
        percent_decode(raw, Plus::Literal)
            .map(Self)
            .map_err(|e| match CODE {
                PARAM_KEY => ApiError::bad_request(
                    "invalid_key",
                    format!("the key in the path is not valid percent-encoded UTF-8: {e}"),
                ),
                PARAM_USER => ApiError::bad_request(
                    "invalid_user_id",
                    format!("the user id in the path is not valid percent-encoded UTF-8: {e}"),
                ),
                // A token that cannot even be decoded is simply unknown.
                _ => ApiError::NotFound("session not found"),
            })
    }
}

/// Query parameters, decoded by the strict decoder ([`crate::http::decode::parse_query`]: `+`
/// is a space, malformed escapes, non-UTF-8 and repeated names are refused) into `T`, whose
/// fields are strings; anything else is 400 `invalid_query`.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let pairs = crate::http::decode::parse_query(parts.uri.query().unwrap_or(""))
            .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
        let map: serde_json::Map<String, serde_json::Value> = pairs
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        serde_json::from_value(serde_json::Value::Object(map))
            .map(QueryParams)
            .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))
    }
}
