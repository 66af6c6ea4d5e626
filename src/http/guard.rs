//! The data API's guard: authorization, the request body (read in full, under its own timeout
//! and the global body budget), then the concurrency limit and the request timeout.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use subtle::ConstantTimeEq;
use tokio::sync::{Semaphore, SemaphorePermit};
use tower::{Service, ServiceExt};

use crate::config::{Secret, ServerSettings};
use crate::error::ApiError;
use crate::metrics as m;

/// The data API's guard, around every request on the data listener (unknown paths included):
/// 1. authorization;
/// 2. the body, read in full before anything else is held: a `Content-Length` above
///    `max_body_bytes` is 413 at once, a body slower than `body_read_timeout_ms` is 408, a
///    truncated one 400; its bytes, as they arrive, are taken from the body budget
///    (`max_body_bytes_in_flight`, 503 when spent), so slow or large bodies can neither hold
///    the concurrency permits nor more memory than configured;
/// 3. a concurrency permit (or 503 at once: shedding beats queueing without bound);
/// 4. the request, under its timeout.
///
/// Clones share the concurrency limit and the body budget.
#[derive(Clone)]
pub struct Guard {
    permits: Arc<Semaphore>,
    /// One permit per byte of request body held.
    body_bytes: Arc<Semaphore>,
    body_budget: usize,
    max_body_bytes: usize,
    body_timeout: Duration,
    timeout: Duration,
    token: Secret,
    in_flight: metrics::Gauge,
    shed: metrics::Counter,
    body_shed: metrics::Counter,
}

impl Guard {
    pub fn new(settings: &ServerSettings) -> Self {
        let body_budget = settings
            .max_body_bytes_in_flight
            .min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(settings.max_concurrent_requests)),
            body_bytes: Arc::new(Semaphore::new(body_budget)),
            body_budget,
            max_body_bytes: settings.max_body_bytes,
            body_timeout: Duration::from_millis(settings.body_read_timeout_ms),
            timeout: Duration::from_millis(settings.request_timeout_ms),
            token: settings.auth_token.clone(),
            in_flight: metrics::gauge!(m::HTTP_IN_FLIGHT),
            shed: metrics::counter!(m::HTTP_SHED),
            body_shed: metrics::counter!(m::HTTP_BODY_BUDGET_SHED),
        }
    }

    /// Bytes of request bodies held right now (read at scrape time, not kept as a gauge).
    pub fn body_bytes_held(&self) -> usize {
        self.body_budget
            .saturating_sub(self.body_bytes.available_permits())
    }

    pub(super) async fn run<S>(&self, req: Request, inner: S) -> Response
    where
        S: Service<Request, Response = Response, Error = Infallible>,
    {
        if !self.token.is_empty() && !authorized(&req, &self.token) {
            return ApiError::Unauthorized.into_response();
        }
        let (parts, body) = req.into_parts();
        // Held until the request is answered: the handler holds the bytes that long.
        let (body, _body_bytes) = if body.is_end_stream() {
            (body, None)
        } else {
            match self.read_body(&parts.headers, body).await {
                Ok((bytes, held)) => (Body::from(bytes), held),
                Err(e) => return e.into_response(),
            }
        };
        // A read that may wait for another caller's fill (`wait_ms`) gets that wait on top.
        let timeout = self.timeout + lease_wait(parts.uri.query());
        let req = Request::from_parts(parts, body);
        let Ok(_permit) = self.permits.try_acquire() else {
            self.shed.increment(1);
            return ApiError::Overloaded.into_response();
        };
        let _in_flight = InFlight::enter(&self.in_flight);
        match tokio::time::timeout(timeout, inner.oneshot(req)).await {
            Ok(resp) => resp.unwrap_or_else(|e| match e {}),
            Err(_) => ApiError::Timeout.into_response(),
        }
    }
}

impl Guard {
    /// Reads a request body in full under the body timeout, taking its bytes from the budget as
    /// they arrive.
    async fn read_body(
        &self,
        headers: &axum::http::HeaderMap,
        body: Body,
    ) -> Result<(Bytes, Option<SemaphorePermit<'_>>), BodyError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(BodyError::TooLarge(self.max_body_bytes));
        }
        let read = async {
            let mut body = body;
            let mut held: Option<SemaphorePermit<'_>> = None;
            // A body in one frame (the usual case) is kept as it came, without a copy.
            let mut first: Option<Bytes> = None;
            let mut buf = bytes::BytesMut::new();
            let mut len = 0;
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.map_err(|_| BodyError::Truncated)?.into_data() else {
                    continue; // trailers
                };
                len += data.len();
                if len > self.max_body_bytes {
                    return Err(BodyError::TooLarge(self.max_body_bytes));
                }
                let Ok(more) = self.body_bytes.try_acquire_many(data.len() as u32) else {
                    self.body_shed.increment(1);
                    return Err(BodyError::Budget);
                };
                match &mut held {
                    Some(h) => h.merge(more),
                    None => held = Some(more),
                }
                match first.take() {
                    None if buf.is_empty() => first = Some(data),
                    earlier => {
                        if let Some(earlier) = earlier {
                            buf.reserve(declared.map_or(len, |n| n as usize));
                            buf.extend_from_slice(&earlier);
                        }
                        buf.extend_from_slice(&data);
                    }
                }
            }
            if let Some(only) = first {
                return Ok((only, held));
            }
            Ok((buf.freeze(), held))
        };
        tokio::time::timeout(self.body_timeout, read)
            .await
            .unwrap_or(Err(BodyError::Timeout))
    }
}

/// The `wait_ms` of a query string (at most the 30 s a read may ask for), or zero. Malformed
/// values are the handler's to refuse.
fn lease_wait(query: Option<&str>) -> Duration {
    let Some(q) = query else {
        return Duration::ZERO;
    };
    q.split('&')
        .find_map(|pair| pair.strip_prefix("wait_ms="))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::ZERO, |ms| {
            Duration::from_millis(ms.min(crate::api::cache::MAX_WAIT_MS))
        })
}

/// Why a request body was not read.
enum BodyError {
    TooLarge(usize),
    Timeout,
    Truncated,
    Budget,
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        let e = match self {
            Self::TooLarge(max) => ApiError::PayloadTooLarge(format!(
                "request body is larger than server.max_body_bytes ({max})"
            )),
            Self::Timeout => ApiError::BodyTimeout,
            Self::Truncated => ApiError::bad_request(
                "invalid_body",
                "the request body ended early or was malformed",
            ),
            Self::Budget => ApiError::Overloaded,
        };
        let mut resp = e.into_response();
        // The rest of the body is never read: this connection cannot carry another request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    }
}

/// Counts a request in the in-flight gauge until dropped, also when the client goes away and
/// the request's future is dropped half-way.
struct InFlight<'a>(&'a metrics::Gauge);

impl<'a> InFlight<'a> {
    fn enter(g: &'a metrics::Gauge) -> Self {
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// `Authorization: Bearer <secret>` (the scheme in any case, as RFC 7235 allows), the secret
/// compared in constant time.
fn authorized(req: &Request, secret: &Secret) -> bool {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let v = value.as_bytes();
    if v.len() < 7 || !v[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    v[7..].ct_eq(secret.expose().as_bytes()).into()
}
