//! Listeners and the accept loop: binding TCP or unix sockets, and handing each accepted
//! connection to the serving loop (lane) with the fewest open connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

use crate::config::ListenAddr;
use crate::shutdown::Lifecycle;

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
/// Running out of file descriptors makes accept fail in a tight loop; back off briefly.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
