//! HTTP plumbing shared by both listeners: the accept loop, which hands each connection to a
//! serving loop (one per data thread, see `app`), the serving loops with a header-read timeout
//! and graceful shutdown, and the [`Edge`] every request passes: request ids, the data API's
//! guard (auth, load shedding, timeout), the access log and request metrics, JSON fallbacks.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc};
use tower::{Service, ServiceExt};

use crate::config::{ListenAddr, Secret, ServerSettings};
use crate::error::{ApiError, error_response};
use crate::metrics as m;
use crate::metrics::cached::ByAddr;
use crate::shutdown::Lifecycle;

pub const REQUEST_ID: &str = "x-request-id";

/// A bound listener: TCP, or a unix socket (data API only).
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

impl Listener {
    /// Binds now (before any task starts), so a busy port fails start-up and port 0 is resolved.
    pub fn bind(addr: &ListenAddr) -> std::io::Result<Self> {
        match addr {
            ListenAddr::Tcp(a) => {
                let l = std::net::TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                Ok(Self::Tcp(l))
            }
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::PermissionsExt;
                // A socket file left by a previous run would make bind fail: remove it, but only
                // when it is a socket nobody answers on (never a live sidecar's, never a file).
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        if std::os::unix::net::UnixStream::connect(path).is_ok() {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::AddrInUse,
                                "another process is listening on this socket",
                            ));
                        }
                        std::fs::remove_file(path)?;
                    }
                }
                let l = std::os::unix::net::UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                l.set_nonblocking(true)?;
                Ok(Self::Unix(l, path.clone()))
            }
        }
    }

    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> String {
        match self {
            Self::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// A connection a listener accepted, not yet tied to a runtime.
pub enum Accepted {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// The way into one serving loop (see [`serve_lane`]): accepted connections, and how many of
/// them are open there, so the acceptor can pick the least busy loop.
#[derive(Clone)]
pub struct Lane {
    tx: mpsc::UnboundedSender<Accepted>,
    open: Arc<AtomicUsize>,
}

/// The serving loop's end of a [`Lane`].
pub struct LaneRx {
    rx: mpsc::UnboundedReceiver<Accepted>,
    open: Arc<AtomicUsize>,
}

pub fn lane() -> (Lane, LaneRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let open = Arc::new(AtomicUsize::new(0));
    (
        Lane {
            tx,
            open: open.clone(),
        },
        LaneRx { rx, open },
    )
}

/// Serves `app` on `listener` on the current runtime until `lifecycle` stops, then lets
/// in-flight requests finish for at most `grace`.
pub async fn serve<S>(
    listener: Listener,
    app: S,
    header_timeout: Duration,
    lifecycle: Lifecycle,
    grace: Duration,
) where
    S: Service<axum::http::Request<hyper::body::Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let (lane, rx) = lane();
    tokio::join!(
        accept(listener, vec![lane], lifecycle),
        serve_lane(rx, app, header_timeout, grace)
    );
}

/// Accepts connections on `listener` until `lifecycle` stops and hands each to the lane with
/// the fewest open connections. Keep-alive clients hold their connection, so balancing
/// connections balances the load. Returning drops the listener (new connections are refused
/// from then on) and the lanes (their loops finish what they have).
pub async fn accept(listener: Listener, lanes: Vec<Lane>, lifecycle: Lifecycle) {
    let hand_over = |mut conn: Accepted| {
        // Ties go to the last lane: the first is the main thread, which also accepts and runs
        // the background tasks.
        while let Some(lane) = lanes
            .iter()
            .filter(|l| !l.tx.is_closed())
            .rev()
            .min_by_key(|l| l.open.load(Ordering::Relaxed))
        {
            lane.open.fetch_add(1, Ordering::Relaxed);
            match lane.tx.send(conn) {
                Ok(()) => return,
                // That loop has ended since the check: try the others.
                Err(mpsc::error::SendError(back)) => {
                    lane.open.fetch_sub(1, Ordering::Relaxed);
                    conn = back;
                }
            }
        }
        // No loop left (they only end at shutdown): the connection is closed.
    };
    match listener {
        Listener::Tcp(l) => {
            let Ok(l) = TcpListener::from_std(l) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = lifecycle.stopped() => break,
                    accepted = l.accept() => match accepted.and_then(|(io, _)| io.into_std()) {
                        Ok(io) => hand_over(Accepted::Tcp(io)),
                        Err(e) => accept_failed(e).await,
                    }
                }
            }
        }
        Listener::Unix(l, path) => {
            let Ok(l) = UnixListener::from_std(l) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = lifecycle.stopped() => break,
                    accepted = l.accept() => match accepted.and_then(|(io, _)| io.into_std()) {
                        Ok(io) => hand_over(Accepted::Unix(io)),
                        Err(e) => accept_failed(e).await,
                    }
                }
            }
            drop(l);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Serves the connections arriving on `lane` with `app`, on the current runtime, until the
/// acceptor has stopped; then lets in-flight requests finish for at most `grace`.
pub async fn serve_lane<S>(mut lane: LaneRx, app: S, header_timeout: Duration, grace: Duration)
where
    S: Service<axum::http::Request<hyper::body::Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let service = TowerToHyperService::new(app);
    while let Some(conn) = lane.rx.recv().await {
        let open = OpenConnection(lane.open.clone());
        match conn {
            Accepted::Tcp(io) => {
                let Ok(io) = tokio::net::TcpStream::from_std(io) else {
                    continue;
                };
                // Small request/response pairs: do not let Nagle hold them back.
                let _ = io.set_nodelay(true);
                let conn = builder.serve_connection(TokioIo::new(io), service.clone());
                tokio::spawn(counted(graceful.watch(conn), open));
            }
            Accepted::Unix(io) => {
                let Ok(io) = tokio::net::UnixStream::from_std(io) else {
                    continue;
                };
                let conn = builder.serve_connection(TokioIo::new(io), service.clone());
                tokio::spawn(counted(graceful.watch(conn), open));
            }
        }
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_seconds = grace.as_secs(),
            "in-flight requests did not finish within the grace period"
        );
    }
}

/// Runs a connection, counted among its lane's open ones until it ends.
async fn counted<F: Future>(conn: F, open: OpenConnection) {
    conn.await;
    drop(open);
}

/// Counts a connection among its lane's open ones until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Running out of file descriptors makes accept fail in a tight loop; back off briefly.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

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
            routes,
            guard,
        }),
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

    async fn run<S>(&self, req: Request, inner: S) -> Response
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
