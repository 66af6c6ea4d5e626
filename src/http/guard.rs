//! The data API's guard: authorization, the concurrency limit and the request timeout.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt};

use crate::config::{Secret, ServerSettings};
use crate::error::ApiError;
use crate::metrics as m;

/// The data API's guard: auth first, then a concurrency permit (or 503 at once: shedding
/// beats queueing without bound), then the request under its timeout. It covers every
/// request on the data listener, unknown paths included. Clones share the concurrency limit.
#[derive(Clone)]
pub struct Guard {
    permits: Arc<Semaphore>,
    timeout: Duration,
    token: Secret,
    in_flight: metrics::Gauge,
    shed: metrics::Counter,
}

impl Guard {
    pub fn new(settings: &ServerSettings) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(settings.max_concurrent_requests)),
            timeout: Duration::from_millis(settings.request_timeout_ms),
            token: settings.auth_token.clone(),
            in_flight: metrics::gauge!(m::HTTP_IN_FLIGHT),
            shed: metrics::counter!(m::HTTP_SHED),
        }
    }

    pub(super) async fn run<S>(&self, req: Request, inner: S) -> Response
    where
        S: Service<Request, Response = Response, Error = Infallible>,
    {
        if !self.token.is_empty() && !authorized(&req, &self.token) {
            return ApiError::Unauthorized.into_response();
        }
        let Ok(_permit) = self.permits.try_acquire() else {
            self.shed.increment(1);
            return ApiError::Overloaded.into_response();
        };
        let _in_flight = InFlight::enter(&self.in_flight);
        match tokio::time::timeout(self.timeout, inner.oneshot(req)).await {
            Ok(resp) => resp.unwrap_or_else(|e| match e {}),
            Err(_) => ApiError::Timeout.into_response(),
        }
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
