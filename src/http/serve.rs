//! Serving loops: hyper's HTTP/1 connection driver with the header-read timeout, one loop per
//! data thread, with graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::response::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::Service;

use super::listener::{Accepted, LaneRx, Listener, accept, lane};
use crate::shutdown::Lifecycle;

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
