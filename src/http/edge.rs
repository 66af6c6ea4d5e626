//! The [`Edge`] every request passes: request ids, the data API's guard, one access log line
//! and the request metrics, around a listener's whole router, with JSON fallbacks.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tower::{Service, ServiceExt};

use super::REQUEST_ID;
use super::guard::Guard;
use crate::config::{AccessLog, LogSettings};
use crate::error::{ApiError, error_response};
use crate::metrics as m;
use crate::metrics::cached::ByAddr;

/// A request id from the client is kept when it is short and printable; otherwise a fresh one is made.
fn request_id(req: &Request) -> HeaderValue {
    if let Some(v) = req.headers().get(REQUEST_ID)
        && !v.is_empty()
        && v.len() <= 128
        && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return v.clone();
    }
    HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
        .unwrap_or(HeaderValue::from_static("invalid"))
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// What every request passes through, around the whole router of a listener: a request id,
/// the data API's guard, one access log line and the request metrics.
///
/// It wraps the router once, from outside. axum's `Router::layer` would wrap every route
/// separately, and each wrapper is a boxed service that is cloned for every request; on a
/// cache hit those clones and boxes cost more than the rest of the middleware together.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    ctx: Arc<EdgeContext>,
}

struct EdgeContext {
    listener: &'static str,
    access: AccessPolicy,
    /// Route templates, for the `route` label and log field (never the raw path).
    routes: matchit::Router<&'static str>,
    guard: Option<Guard>,
}

/// The router of one listener, finished (JSON 404/405 fallbacks, panics turned into JSON 500s,
/// a body limit) and wrapped in the [`Edge`]. `templates` are the router's path templates.
pub fn edge(
    router: Router,
    listener: &'static str,
    templates: impl IntoIterator<Item = &'static str>,
    guard: Option<Guard>,
    max_body_bytes: usize,
) -> Edge<
    impl Service<Request, Response = Response, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static,
> {
    let mut routes = matchit::Router::new();
    for t in templates {
        // Several methods share a path; the first insert wins, the rest are the same template.
        let _ = routes.insert(t, t);
    }
    let inner = tower::ServiceBuilder::new()
        // A panicking handler is answered with a JSON 500 and logged; the process and the
        // connection keep serving.
        .map_response(|r: Response<_>| r.map(axum::body::Body::new))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .service(
            router
                .fallback(|| async { ApiError::NotFound("no such route").into_response() })
                .method_not_allowed_fallback(|| async {
                    ApiError::MethodNotAllowed.into_response()
                }),
        );
    Edge {
        inner,
        ctx: Arc::new(EdgeContext {
            listener,
            access: AccessPolicy::ALL,
            routes,
            guard,
        }),
    }
}

impl<S> Edge<S> {
    /// Which requests get an access line (every request unless set).
    pub fn access_log(mut self, policy: AccessPolicy) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.access = policy;
        }
        self
    }
}

/// Which requests get an access line: `log.access` and its threshold and sample rate.
#[derive(Clone, Copy, Debug)]
pub struct AccessPolicy {
    pub mode: AccessLog,
    /// With `Errors`: requests at least this slow are logged (`None`: no threshold).
    pub slow: Option<Duration>,
    /// With `Errors`: the fraction of the other requests logged.
    pub sample_rate: f64,
}

impl AccessPolicy {
    pub const ALL: Self = Self {
        mode: AccessLog::All,
        slow: None,
        sample_rate: 0.0,
    };

    pub fn from_settings(log: &LogSettings) -> Self {
        Self {
            mode: log.access,
            slow: (log.access_slow_ms > 0).then(|| Duration::from_millis(log.access_slow_ms)),
            sample_rate: log.access_sample_rate,
        }
    }

    /// Whether a request answered `status` after `elapsed` gets a line. A 404 is not an error
    /// here: it is a cache miss or an unknown session, ordinary traffic.
    pub fn logs(&self, status: u16, elapsed: Duration) -> bool {
        match self.mode {
            AccessLog::All => true,
            AccessLog::Off => false,
            AccessLog::Errors => {
                (status >= 400 && status != 404)
                    || self.slow.is_some_and(|slow| elapsed >= slow)
                    || (self.sample_rate > 0.0 && rand::random::<f64>() < self.sample_rate)
            }
        }
    }
}

impl<S, B> Service<axum::http::Request<B>> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: axum::body::HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is the inner service's, checked per request by `oneshot` below.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let start = Instant::now();
        let mut req = req.map(axum::body::Body::new);
        let id = request_id(&req);
        req.headers_mut().insert(REQUEST_ID, id.clone());
        let method = method_label(req.method());
        let ctx = self.ctx.clone();
        let route = ctx
            .routes
            .at(req.uri().path())
            .map_or("unmatched", |m| *m.value);
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut resp = match &ctx.guard {
                Some(guard) => guard.run(req, inner).await,
                None => inner.oneshot(req).await.unwrap_or_else(|e| match e {}),
            };
            resp.headers_mut().insert(REQUEST_ID, id.clone());
            let elapsed = start.elapsed();
            let status = resp.status().as_u16();
            RequestMetrics::observe(ctx.listener, method, route, status, elapsed);
            if !ctx.access.logs(status, elapsed) {
                m::cached::increment(m::ACCESS_LOG_SKIPPED, &[], 1);
                return Ok(resp);
            }
            tracing::info!(
                target: "pgsidecar::access",
                listener = ctx.listener,
                method,
                route,
                status,
                duration_ms = (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0,
                request_id = id.to_str().unwrap_or(""),
                "request"
            );
            Ok(resp)
        })
    }
}

/// The request counter and latency histogram of one listener, method, route and status, kept
/// per thread (see [`m::cached`]). Every label is a static string (the route is a template
/// from the route table), found by its address.
struct RequestMetrics {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

type RequestKey = (ByAddr, ByAddr, ByAddr, u16);

thread_local! {
    static REQUEST_METRICS: std::cell::RefCell<foldhash::HashMap<RequestKey, RequestMetrics>> =
        std::cell::RefCell::default();
}

impl RequestMetrics {
    fn observe(
        listener: &'static str,
        method: &'static str,
        route: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        let key = (ByAddr(listener), ByAddr(method), ByAddr(route), status);
        REQUEST_METRICS.with(|cache| {
            let mut cache = cache.borrow_mut();
            let entry = cache.entry(key).or_insert_with(|| RequestMetrics {
                requests: metrics::counter!(m::HTTP_REQUESTS, "listener" => listener, "method" => method, "route" => route, "status" => status.to_string()),
                duration: metrics::histogram!(m::HTTP_DURATION, "listener" => listener, "method" => method, "route" => route),
            });
            entry.requests.increment(1);
            entry.duration.record(elapsed.as_secs_f64());
        });
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked; the process keeps serving");
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_policy() {
        let errors = AccessPolicy {
            mode: AccessLog::Errors,
            slow: Some(Duration::from_millis(500)),
            sample_rate: 0.0,
        };
        let fast = Duration::from_millis(1);
        assert!(!errors.logs(200, fast));
        assert!(!errors.logs(404, fast), "a miss is ordinary traffic");
        assert!(errors.logs(400, fast));
        assert!(errors.logs(503, fast));
        assert!(errors.logs(200, Duration::from_millis(500)));
        let all_sampled = AccessPolicy {
            sample_rate: 1.0,
            ..errors
        };
        assert!(all_sampled.logs(200, fast));
        assert!(AccessPolicy::ALL.logs(200, fast));
        let off = AccessPolicy {
            mode: AccessLog::Off,
            ..errors
        };
        assert!(!off.logs(500, Duration::from_secs(9)));
    }
}
