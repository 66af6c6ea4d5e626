//! Shutdown: one signal future, and the lifecycle state shared by readiness and background tasks.
//!
//! SIGTERM/SIGINT first marks the process as draining (`/ready` answers 503 at once), then, after
//! `shutdown.drain_seconds`, cancels the stop token that listeners and background loops watch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

/// Lifecycle flags shared by every task of the process.
#[derive(Clone, Default)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    draining: AtomicBool,
    stop: CancellationToken,
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the start of shutdown: readiness turns false, traffic is still served.
    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Tells listeners to stop accepting and background loops to finish.
    pub fn stop(&self) {
        self.begin_drain();
        self.inner.stop.cancel();
    }

    /// Resolves once [`Lifecycle::stop`] was called.
    pub async fn stopped(&self) {
        self.inner.stop.cancelled().await
    }

    pub fn is_stopped(&self) -> bool {
        self.inner.stop.is_cancelled()
    }
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
