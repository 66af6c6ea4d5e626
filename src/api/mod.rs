//! The data API (`/v1/...`): HTTP only. Handlers parse and validate into small types, call the
//! store, and map its answers; they never build SQL.

pub mod cache;
mod conditional;
mod media_type;
pub mod sessions;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{MethodRouter, delete, get, patch, post, put};
use serde::de::DeserializeOwned;

use crate::config::Settings;
use crate::error::ApiError;
use crate::store::Store;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub limits: Arc<Limits>,
}

/// Input limits, from the settings.
#[derive(Debug)]
pub struct Limits {
    pub session_default_ttl: u32,
    pub session_max_data_bytes: usize,
    pub cache_default_ttl: u32,
    pub cache_max_value_bytes: usize,
}

/// Builds the data router. Its guard (auth, load shedding, request timeout) and body limit are
/// put around it by [`crate::http::edge`].
pub fn router(store: Store, settings: &Settings) -> Router {
    let state = AppState {
        store,
        limits: Arc::new(Limits {
            session_default_ttl: settings.sessions.default_ttl_seconds,
            session_max_data_bytes: settings.sessions.max_data_bytes,
            cache_default_ttl: settings.cache.default_ttl_seconds,
            cache_max_value_bytes: settings.cache.max_value_bytes,
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

/// A JSON body parsed into `T`; malformed JSON is 400 `invalid_json`.
pub fn parse_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON for this route: {e}"),
        )
    })
}

/// A single path parameter, percent-decoded; undecodable input is `code`.
pub struct PathParam<const CODE: u8>(pub String);

/// Codes for [`PathParam`] rejections.
pub const PARAM_KEY: u8 = 0;
pub const PARAM_TOKEN: u8 = 1;
pub const PARAM_USER: u8 = 2;

impl<S: Send + Sync, const CODE: u8> FromRequestParts<S> for PathParam<CODE> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(s)) => Ok(Self(s)),
            Err(_) => Err(match CODE {
                PARAM_KEY => ApiError::bad_request(
                    "invalid_key",
                    "the key in the path is not valid percent-encoded UTF-8",
                ),
                PARAM_USER => ApiError::bad_request(
                    "invalid_user_id",
                    "the user id in the path is not valid percent-encoded UTF-8",
                ),
                // A token that cannot even be decoded is simply unknown.
                _ => ApiError::NotFound("session not found"),
            }),
        }
    }
}

/// Query parameters; a malformed query string is 400 `invalid_query`.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(t)| QueryParams(t))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}
