//! `ApiError`: every error a client can see, mapped to a status and a JSON body in one place.
//!
//! Bodies are always `{"error":{"code":"snake_case","message":"..."}}`. Internal causes are
//! logged once, here, and never sent to the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::DbError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Input the client can fix: 400 with a code naming what is wrong.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(&'static str),
    #[error("authorization required")]
    Unauthorized,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// An If-Match / If-None-Match condition did not hold; nothing was written.
    #[error("a precondition (If-Match / If-None-Match) did not hold; nothing was changed")]
    PreconditionFailed,
    /// A PUT's fill lease was voided (or never was); nothing was written.
    #[error(
        "the fill lease was voided (the key was deleted or a tag invalidated since it was granted, or another caller took it over) or is unknown; nothing was written"
    )]
    LeaseVoided,
    /// The change feed needs the listening connection, which this sidecar cannot have.
    #[error("{0}")]
    EventsUnavailable(&'static str),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("the sidecar is overloaded")]
    Overloaded,
    #[error("the request took longer than the configured timeout")]
    Timeout,
    #[error("the request body did not arrive within server.body_read_timeout_ms")]
    BodyTimeout,
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::LeaseVoided => StatusCode::CONFLICT,
            Self::EventsUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Db(DbError::Other(_)) | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            // Every other database failure is one a retry later may clear.
            Self::Db(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } => code,
            Self::NotFound(_) => "not_found",
            Self::Unauthorized => "unauthorized",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PreconditionFailed => "precondition_failed",
            Self::LeaseVoided => "lease_voided",
            Self::EventsUnavailable(_) => "events_unavailable",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Overloaded => "overloaded",
            Self::Timeout => "request_timeout",
            Self::BodyTimeout => "body_timeout",
            Self::Db(DbError::ReadOnly(_)) => "database_read_only",
            Self::Db(DbError::Timeout) => "database_timeout",
            Self::Db(DbError::Other(_)) | Self::Internal => "internal",
            Self::Db(_) => "database_unavailable",
        }
    }

    /// The text sent to the client: never an internal cause.
    fn public_message(&self) -> String {
        match self {
            Self::Db(DbError::ReadOnly(_)) => {
                "the database accepts no writes right now (failover?); retry shortly".into()
            }
            Self::Db(DbError::Timeout) => {
                "the database did not answer in time; retry shortly".into()
            }
            Self::Db(DbError::Other(_)) | Self::Internal => "internal error".into(),
            Self::Db(_) => "the database is unavailable; retry shortly".into(),
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Db(e) = &self {
            // The one place a database failure behind a client error is logged.
            match e {
                DbError::Other(cause) => tracing::error!(error = %cause, "database error"),
                DbError::Unavailable(cause)
                | DbError::RolledBack(cause)
                | DbError::ConnectionLost(cause)
                | DbError::ReadOnly(cause) => {
                    tracing::warn!(error = %cause, "database unavailable")
                }
                DbError::Tls(failure) => tracing::warn!(error = %failure, "database unavailable"),
                DbError::Timeout => tracing::warn!("database statement timed out"),
                // The circuit's opening was logged once; a line per refused request would
                // flood the log during an outage.
                DbError::CircuitOpen => tracing::debug!("database unreachable (circuit open)"),
                DbError::PoolExhausted => {
                    tracing::warn!("no database connection free within the acquire timeout")
                }
            }
        }
        let body = json!({"error": {"code": self.code(), "message": self.public_message()}});
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A JSON error body for a status produced outside our handlers (panic, unknown route).
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}
