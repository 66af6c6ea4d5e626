//! Listeners and the accept loop: binding TCP or unix sockets, the connection cap of each
//! listener, and handing each accepted connection to the serving loop (lane) with the fewest
//! open connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::config::ListenAddr;
use crate::metrics as m;
use crate::shutdown::Lifecycle;

/// A bound listener (TCP, or a unix socket for the data API) with its connection cap.
pub struct Listener {
    socket: Socket,
    /// `listener` label of its metrics: "data" or "ops".
    name: &'static str,
    max_connections: usize,
}

enum Socket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

impl Listener {
    /// Binds now (before any task starts), so a busy port fails start-up and port 0 is resolved.
    /// The connection cap is unlimited until [`Listener::limit`] sets one.
    pub fn bind(addr: &ListenAddr) -> std::io::Result<Self> {
        let socket = match addr {
            ListenAddr::Tcp(a) => {
                let l = std::net::TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                Socket::Tcp(l)
            }
            ListenAddr::Unix(path) => {
                let l = bind_unix(path)?;
                l.set_nonblocking(true)?;
                Socket::Unix(l, path.clone())
            }
        };
        Ok(Self {
            socket,
            name: "data",
            max_connections: Semaphore::MAX_PERMITS,
        })
    }

    /// Names the listener (its metrics' `listener` label) and caps its open connections.
    pub fn limit(mut self, name: &'static str, max_connections: usize) -> Self {
        self.name = name;
        self.max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> String {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Socket::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Binds a unix socket that is never reachable with a mode other than 0660: it is bound in a
/// fresh private directory (0700) beside `path`, set to 0660 there, then renamed into place.
/// (Binding at `path` and then chmod-ing it leaves a window with the umask's mode; changing the
/// umask would affect every thread of the process.)
fn bind_unix(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    // A socket file left by a previous run is replaced, but only when nobody answers on it
    // (never a live sidecar's socket), and never a file of another kind.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket exists at this path",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is listening on this socket",
            ));
        }
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name in the path")
    })?;
    let private = parent.join(format!(
        ".pgsidecar-bind-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join(file);
    let result = (|| {
        let l = std::os::unix::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
        std::fs::rename(&staged, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    result
}

/// Raises the soft open-file limit to the hard limit (as Go's runtime does at start): the
/// soft default (often 1024) is far below what `server.max_connections` asks for. Returns the
/// soft limit in force afterwards, if it could be read.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(lim.rlim_cur)
}

/// A connection a listener accepted, not yet tied to a runtime, with its place under the
/// listener's cap.
pub struct Accepted {
    pub io: AcceptedIo,
    pub slot: Slot,
}

pub enum AcceptedIo {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// A connection's place under its listener's cap, given back (and the open-connection gauge
/// lowered) when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// The way into one serving loop (see [`serve_lane`](super::serve_lane)): accepted
/// connections, and how many of them are open there, so the acceptor can pick the least busy
/// loop.
#[derive(Clone)]
pub struct Lane {
    tx: mpsc::UnboundedSender<Accepted>,
    open: Arc<AtomicUsize>,
}

/// The serving loop's end of a [`Lane`].
pub struct LaneRx {
    pub(super) rx: mpsc::UnboundedReceiver<Accepted>,
    pub(super) open: Arc<AtomicUsize>,
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

/// Connections being refused at once (answered 503 and closed) at most: each holds a
/// descriptor for up to [`REFUSAL_LINGER`]; beyond this a connection over the cap is closed
/// without an answer.
const MAX_REFUSING: usize = 64;
/// How long a refused connection may take to read its 503.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// The body of the answer to a connection over the cap.
const REFUSAL_BODY: &str =
    r#"{"error":{"code":"overloaded","message":"too many open connections; retry shortly"}}"#;

/// The whole answer to a connection over the cap.
fn refusal() -> Arc<[u8]> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{REFUSAL_BODY}",
        REFUSAL_BODY.len()
    )
    .into_bytes()
    .into()
}

/// Accepts connections on `listener` until `lifecycle` stops and hands each to the lane with
/// the fewest open connections. Keep-alive clients hold their connection, so balancing
/// connections balances the load. At the listener's cap a new connection is answered 503 and
/// closed. Returning drops the listener (new connections are refused from then on) and the
/// lanes (their loops finish what they have).
pub async fn accept(listener: Listener, lanes: Vec<Lane>, lifecycle: Lifecycle) {
    let Listener {
        socket,
        name,
        max_connections,
    } = listener;
    let slots = Arc::new(Semaphore::new(max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let open = metrics::gauge!(m::HTTP_CONNECTIONS, "listener" => name);
    let rejected = metrics::counter!(m::HTTP_CONNECTIONS_REJECTED, "listener" => name);
    let mut failures = AcceptFailures::new(name);
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
    // A slot under the cap, or None: the caller refuses the connection.
    let take_slot = || {
        let permit = slots.clone().try_acquire_owned().ok()?;
        open.increment(1.0);
        Some(Slot {
            _permit: permit,
            gauge: open.clone(),
        })
    };
    let answer = refusal();
    let refuse = |io: Refused| {
        rejected.increment(1);
        if let Ok(permit) = refusing.clone().try_acquire_owned() {
            let answer = answer.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REFUSAL_LINGER, io.answer(&answer)).await;
                drop(permit);
            });
        }
    };
    match socket {
        Socket::Tcp(l) => {
            let Ok(l) = TcpListener::from_std(l) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = lifecycle.stopped() => break,
                    accepted = l.accept() => match accepted {
                        Ok((io, _)) => {
                            failures.reset();
                            match take_slot() {
                                Some(slot) => match io.into_std() {
                                    Ok(io) => hand_over(Accepted { io: AcceptedIo::Tcp(io), slot }),
                                    Err(e) => failures.failed(e).await,
                                },
                                None => refuse(Refused::Tcp(io)),
                            }
                        }
                        Err(e) => failures.failed(e).await,
                    }
                }
            }
        }
        Socket::Unix(l, path) => {
            let Ok(l) = UnixListener::from_std(l) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = lifecycle.stopped() => break,
                    accepted = l.accept() => match accepted {
                        Ok((io, _)) => {
                            failures.reset();
                            match take_slot() {
                                Some(slot) => match io.into_std() {
                                    Ok(io) => hand_over(Accepted { io: AcceptedIo::Unix(io), slot }),
                                    Err(e) => failures.failed(e).await,
                                },
                                None => refuse(Refused::Unix(io)),
                            }
                        }
                        Err(e) => failures.failed(e).await,
                    }
                }
            }
            drop(l);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connection over the cap.
enum Refused {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Refused {
    /// Reads what the client has sent so far (closing with unread bytes would reset the
    /// connection and could destroy the answer before the client reads it), writes the 503,
    /// closes the sending side and waits briefly for the client to close.
    async fn answer(self, answer: &[u8]) {
        async fn run<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
            mut s: S,
            answer: &[u8],
        ) {
            use tokio::io::AsyncReadExt;
            let mut sink = [0u8; 1024];
            // Whatever of the request has arrived: a short wait, the client sends it at once.
            let _ = tokio::time::timeout(Duration::from_millis(50), s.read(&mut sink)).await;
            if s.write_all(answer).await.is_err() || s.shutdown().await.is_err() {
                return;
            }
            // Until the client closes (or the linger ends), at most a few KiB read and dropped.
            for _ in 0..8 {
                match s.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
        match self {
            Self::Tcp(s) => run(s, answer).await,
            Self::Unix(s) => run(s, answer).await,
        }
    }
}

/// Failed accepts: running out of descriptors (EMFILE, ENFILE) makes accept fail at once and
/// again, so each failure in a row backs off longer (10 ms doubling to 1 s), and the log gets
/// one line per 10 s with the count, not one per failure.
struct AcceptFailures {
    listener: &'static str,
    in_a_row: u32,
    unlogged: u64,
    last_log: Option<Instant>,
    counter: metrics::Counter,
}

impl AcceptFailures {
    const LOG_EVERY: Duration = Duration::from_secs(10);

    fn new(listener: &'static str) -> Self {
        Self {
            listener,
            in_a_row: 0,
            unlogged: 0,
            last_log: None,
            counter: metrics::counter!(m::HTTP_ACCEPT_ERRORS, "listener" => listener),
        }
    }

    fn reset(&mut self) {
        self.in_a_row = 0;
    }

    async fn failed(&mut self, e: std::io::Error) {
        self.counter.increment(1);
        self.unlogged += 1;
        if self.last_log.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY) {
            tracing::warn!(
                listener = self.listener,
                error = %e,
                failures = self.unlogged,
                "accept failed (out of file descriptors?); backing off (logged at most every 10 s)"
            );
            self.unlogged = 0;
            self.last_log = Some(Instant::now());
        }
        let delay = Duration::from_millis(10) * 2u32.pow(self.in_a_row.min(7));
        self.in_a_row += 1;
        tokio::time::sleep(delay.min(Duration::from_secs(1))).await;
    }
}
