//! HTTP plumbing shared by both listeners: the accept loop with a header-read timeout and
//! graceful shutdown, request ids, the access log and request metrics, JSON fallbacks.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UnixListener};

use crate::config::ListenAddr;
use crate::error::{ApiError, error_response};
use crate::metrics as m;
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

/// Serves `app` on `listener` until `lifecycle` stops, then lets in-flight requests finish for
/// at most `grace`. Must run inside a tokio runtime.
pub async fn serve(
    listener: Listener,
    app: Router,
    header_timeout: Duration,
    lifecycle: Lifecycle,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let service = TowerToHyperService::new(app);
    let unix_path;
    match listener {
        Listener::Tcp(l) => {
            unix_path = None;
            let Ok(l) = TcpListener::from_std(l) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = lifecycle.stopped() => break,
                    accepted = l.accept() => match accepted {
                        Ok((io, _)) => {
                            // Small request/response pairs: do not let Nagle hold them back.
                            let _ = io.set_nodelay(true);
                            let conn = builder.serve_connection(TokioIo::new(io), service.clone());
                            let fut = graceful.watch(conn);
                            tokio::spawn(fut);
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
            }
        }
        Listener::Unix(l, path) => {
            unix_path = Some(path);
            let Ok(l) = UnixListener::from_std(l) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = lifecycle.stopped() => break,
                    accepted = l.accept() => match accepted {
                        Ok((io, _)) => {
                            let conn = builder.serve_connection(TokioIo::new(io), service.clone());
                            tokio::spawn(graceful.watch(conn));
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
            }
        }
    }
    // The listener is dropped here: new connections are refused from now on.
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_seconds = grace.as_secs(),
            "in-flight requests did not finish within the grace period"
        );
    }
    if let Some(path) = unix_path {
        let _ = std::fs::remove_file(path);
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

/// Request ids, one access log line and the request metrics, for every request. The route is
/// the matched template (`/v1/sessions/{token}`), never the raw path.
pub async fn access_log(listener: &'static str, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = request_id(&req);
    req.headers_mut().insert(REQUEST_ID, id.clone());
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(REQUEST_ID, id.clone());
    let elapsed = start.elapsed();
    let status = resp.status().as_u16();
    metrics::counter!(m::HTTP_REQUESTS, "listener" => listener, "method" => method, "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!(m::HTTP_DURATION, "listener" => listener, "method" => method, "route" => route.clone())
        .record(elapsed.as_secs_f64());
    tracing::info!(
        target: "pgsidecar::access",
        listener,
        method,
        route,
        status,
        duration_ms = (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0,
        request_id = id.to_str().unwrap_or(""),
        "request"
    );
    resp
}

/// Adds the JSON fallbacks (404, 405) and the common layers to a router.
pub fn finish_router(router: Router, listener: &'static str) -> Router {
    router
        .fallback(|| async { ApiError::NotFound("no such route").into_response() })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed.into_response() })
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(axum::middleware::from_fn(move |req, next| {
            access_log(listener, req, next)
        }))
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked; the process keeps serving");
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
}
