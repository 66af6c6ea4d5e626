//! Serving loops: hyper's HTTP/1 connection driver, one loop per data thread, with graceful
//! shutdown, and each connection's two timers: the header-read timeout and the keep-alive idle
//! timeout.
//!
//! hyper's own `header_read_timeout` also runs between requests (hyper 1.x arms it whenever it
//! starts reading a request head, which on a kept-alive connection is right after the previous
//! answer), so it would close every idle keep-alive connection after a few seconds, and a
//! client reusing one would see a reset. Both timers are therefore kept here, in [`TimedIo`]:
//! - before the first request, and from the first byte of any later one, until its head is
//!   parsed: `header_read_timeout_ms` (slowloris guard);
//! - between requests, before any byte of the next: `keep_alive_idle_seconds`, after which the
//!   connection is closed quietly (FIN, no answer: nothing was asked).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::HeaderValue;
use axum::response::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tower::{Service, ServiceExt};

use super::listener::{Accepted, AcceptedIo, LaneRx, Listener, accept, lane};
use crate::config::ServerSettings;
use crate::shutdown::Lifecycle;

/// `Keep-Alive`, which the http crate has no constant for.
const KEEP_ALIVE: axum::http::HeaderName = axum::http::HeaderName::from_static("keep-alive");

/// Largest read buffer of a connection (see `serve_lane`): room for the largest legitimate
/// request head, a PUT with 64 tags of 256 bytes, each percent-encoded (about 49 KiB).
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

/// A connection's timers (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct ConnTimeouts {
    /// Complete request headers must arrive within this.
    pub header: Duration,
    /// A kept-alive connection without a request is closed after this.
    pub keep_alive_idle: Duration,
}

impl ConnTimeouts {
    pub fn from_settings(s: &ServerSettings) -> Self {
        Self {
            header: Duration::from_millis(s.header_read_timeout_ms),
            keep_alive_idle: Duration::from_secs(s.keep_alive_idle_seconds),
        }
    }
}

/// Serves `app` on `listener` on the current runtime until `lifecycle` stops, then lets
/// in-flight requests finish for at most `grace`.
pub async fn serve<S>(
    listener: Listener,
    app: S,
    timeouts: ConnTimeouts,
    lifecycle: Lifecycle,
    grace: Duration,
) where
    S: Service<axum::http::Request<hyper::body::Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
{
    let (lane, rx) = lane();
    tokio::join!(
        accept(listener, vec![lane], lifecycle),
        serve_lane(rx, app, timeouts, grace)
    );
}

/// Serves the connections arriving on `lane` with `app`, on the current runtime, until the
/// acceptor has stopped; then lets in-flight requests finish for at most `grace`.
pub async fn serve_lane<S>(mut lane: LaneRx, app: S, timeouts: ConnTimeouts, grace: Duration)
where
    S: Service<axum::http::Request<hyper::body::Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper's header timer also runs between requests (see the module documentation), so
        // TimedIo keeps both timers. hyper's is kept, set past both, because while it is set
        // hyper starts reading the next head as soon as an answer is out (without it hyper waits
        // for the socket to be readable, and TimedIo would not see the idle period begin).
        .header_read_timeout(timeouts.keep_alive_idle + timeouts.header)
        .keep_alive(true);
    let keep_alive =
        HeaderValue::from_str(&format!("timeout={}", timeouts.keep_alive_idle.as_secs())).ok();
    while let Some(conn) = lane.rx.recv().await {
        let Accepted { io, slot } = conn;
        let open = OpenConnection {
            open: lane.open.clone(),
            _slot: slot,
        };
        let state = Arc::new(ConnState::default());
        let service = ConnService {
            inner: app.clone(),
            state: state.clone(),
            keep_alive: keep_alive.clone(),
        };
        match io {
            AcceptedIo::Tcp(io) => {
                let Ok(io) = tokio::net::TcpStream::from_std(io) else {
                    continue;
                };
                // Small request/response pairs: do not let Nagle hold them back.
                let _ = io.set_nodelay(true);
                let io = TimedIo::new(io, state, timeouts);
                let conn = builder.serve_connection(TokioIo::new(io), service);
                tokio::spawn(counted(graceful.watch(conn), open));
            }
            AcceptedIo::Unix(io) => {
                let Ok(io) = tokio::net::UnixStream::from_std(io) else {
                    continue;
                };
                let io = TimedIo::new(io, state, timeouts);
                let conn = builder.serve_connection(TokioIo::new(io), service);
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

/// Counts a connection among its lane's open ones, and holds its place under the listener's
/// connection cap, until dropped.
struct OpenConnection {
    open: Arc<AtomicUsize>,
    _slot: super::listener::Slot,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a connection's service tells its [`TimedIo`]: whether a request is being handled, and
/// how many have been answered.
#[derive(Default)]
struct ConnState {
    busy: AtomicBool,
    answered: AtomicU64,
}

/// The per-connection service: marks the connection busy from the moment a request head is
/// parsed until its answer is ready, and adds `Keep-Alive: timeout=N` to every answer, so
/// clients that read it (Node's fetch, Apache HttpClient) close idle connections first.
struct ConnService<S> {
    inner: S,
    state: Arc<ConnState>,
    keep_alive: Option<HeaderValue>,
}

impl<S> hyper::service::Service<axum::http::Request<hyper::body::Incoming>> for ConnService<S>
where
    S: Service<axum::http::Request<hyper::body::Incoming>, Response = Response, Error = Infallible>
        + Clone,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answering<tower::util::Oneshot<S, axum::http::Request<hyper::body::Incoming>>>;

    fn call(&self, req: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        self.state.busy.store(true, Ordering::Release);
        Answering {
            fut: self.inner.clone().oneshot(req),
            state: self.state.clone(),
            keep_alive: self.keep_alive.clone(),
        }
    }
}

/// A request being answered; see [`ConnService`].
struct Answering<F> {
    fut: F,
    state: Arc<ConnState>,
    keep_alive: Option<HeaderValue>,
}

impl<F> Future for Answering<F>
where
    F: Future<Output = Result<Response, Infallible>> + Unpin,
{
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Ok(mut resp) = std::task::ready!(Pin::new(&mut this.fut).poll(cx));
        if let Some(v) = this.keep_alive.take() {
            resp.headers_mut().insert(KEEP_ALIVE, v);
        }
        if resp.extensions().get::<Streaming>().is_some() {
            // Busy until the body has been sent: the idle and header timers must not run
            // while a stream is open (hyper reads the socket meanwhile, to see the client go).
            let state = this.state.clone();
            resp = resp.map(|inner| {
                axum::body::Body::new(UntilSent {
                    inner,
                    state: Some(state),
                })
            });
            return Poll::Ready(Ok(resp));
        }
        this.state.answered.fetch_add(1, Ordering::Release);
        this.state.busy.store(false, Ordering::Release);
        Poll::Ready(Ok(resp))
    }
}

/// A response extension marking a long-lived streaming answer (the change feed): its
/// connection counts as busy until the body has been sent, not only until its head is ready.
#[derive(Clone, Copy, Debug)]
pub struct Streaming;

/// A streaming body that marks its connection idle (an answer sent) when it is done.
struct UntilSent {
    inner: axum::body::Body,
    state: Option<Arc<ConnState>>,
}

impl Drop for UntilSent {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            state.answered.fetch_add(1, Ordering::Release);
            state.busy.store(false, Ordering::Release);
        }
    }
}

impl axum::body::HttpBody for UntilSent {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Which timer a connection's reads run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head: the header timer.
    Head,
    /// Between requests, no byte of the next yet: the idle timer.
    Idle,
    /// A request is being handled: its own timeouts apply (body, request).
    Busy,
}

/// A connection's socket with its header and keep-alive timers (see the module documentation).
/// The timers are checked only when hyper waits for bytes, which is exactly when they apply.
struct TimedIo<T> {
    io: T,
    state: Arc<ConnState>,
    timeouts: ConnTimeouts,
    phase: Phase,
    /// `state.answered` when this last looked: a change means an answer went out since.
    seen: u64,
    /// When the current phase's time is up.
    deadline: Instant,
    /// Set to `deadline` only when a read has to wait: most reads find their bytes at once,
    /// and a timer reset per request would cost more than the rest of this wrapper.
    timer: Pin<Box<Sleep>>,
}

impl<T> TimedIo<T> {
    fn new(io: T, state: Arc<ConnState>, timeouts: ConnTimeouts) -> Self {
        let deadline = Instant::now() + timeouts.header;
        Self {
            io,
            state,
            timeouts,
            phase: Phase::Head,
            seen: 0,
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    fn arm(&mut self, phase: Phase, after: Duration) {
        self.phase = phase;
        self.deadline = Instant::now() + after;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.state.busy.load(Ordering::Acquire) {
            this.phase = Phase::Busy;
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let answered = this.state.answered.load(Ordering::Acquire);
        if answered != this.seen {
            // An answer went out since the last read: the connection is idle until the next
            // request's first byte.
            this.seen = answered;
            this.arm(Phase::Idle, this.timeouts.keep_alive_idle);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == Phase::Idle && buf.filled().len() > before {
                    // The next request has begun: its head must be complete in time.
                    this.arm(Phase::Head, this.timeouts.header);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.phase == Phase::Busy {
                    return Poll::Pending;
                }
                if this.timer.deadline() != this.deadline {
                    this.timer.as_mut().reset(this.deadline);
                }
                if this.timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(match this.phase {
                        // Idle too long: end of stream, which hyper takes as a quiet close.
                        Phase::Idle => Ok(()),
                        _ => Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "request headers not received in time",
                        )),
                    });
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
