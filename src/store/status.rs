//! [`DbStatus`]: what every data thread's store and the health monitor know about the database.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::circuit::Circuit;

/// Consecutive failures that open the circuit when the settings do not say.
pub const DEFAULT_CIRCUIT_THRESHOLD: u32 = 3;

/// How long a refused connection attempt keeps the stores from opening more (the health probe
/// renews it every round while PostgreSQL keeps refusing, and clears it once it accepts).
const REFUSAL_HOLDS: Duration = Duration::from_secs(30);

/// What the stores know about the database, shared by every data thread's store and the
/// health monitor.
pub struct DbStatus {
    /// Migrations are applied (set once by the bootstrap task, through [`DbStatus::mark_migrated`]).
    pub migrated: AtomicBool,
    migrated_signal: tokio::sync::watch::Sender<bool>,
    /// Whether Postgres is reachable: the breaker every data request passes.
    pub circuit: Circuit,
    /// Counts the times Postgres was found gone (a broken connection, the circuit opening).
    /// Each store empties its free list when this moves: connections resting there are likely
    /// dead, also on the data threads that sent no statement during the outage.
    outages: AtomicU64,
    /// When a statement last succeeded on any store (milliseconds since `started`, 0 = never).
    last_ok_ms: AtomicU64,
    started: Instant,
    /// PostgreSQL's last refusal of a new connection for lack of slots (SQLSTATE 53300, "too
    /// many clients"), and when: the stores then serve on the connections they have.
    refusal: Mutex<Option<(Instant, String)>>,
}

impl Default for DbStatus {
    fn default() -> Self {
        Self::new(DEFAULT_CIRCUIT_THRESHOLD, Duration::from_millis(500))
    }
}

impl DbStatus {
    /// A status whose circuit opens after `threshold` consecutive failures and, while open,
    /// lets a trial request through every `trial_every`.
    pub fn new(threshold: u32, trial_every: Duration) -> Self {
        Self {
            migrated: AtomicBool::new(false),
            migrated_signal: tokio::sync::watch::Sender::new(false),
            circuit: Circuit::new(threshold, trial_every),
            outages: AtomicU64::new(0),
            last_ok_ms: AtomicU64::new(0),
            started: Instant::now(),
            refusal: Mutex::new(None),
        }
    }

    pub(crate) fn mark_migrated(&self) {
        self.migrated.store(true, Ordering::Release);
        self.migrated_signal.send_replace(true);
    }

    /// Returns once migrations are applied (at once if they already are).
    pub async fn wait_migrated(&self) {
        let _ = self.migrated_signal.subscribe().wait_for(|m| *m).await;
    }

    pub(crate) fn record_outage(&self) {
        self.outages.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn outages(&self) -> u64 {
        self.outages.load(Ordering::Acquire)
    }

    /// Postgres answered a statement.
    pub(crate) fn record_success(&self) {
        // Every statement of every data thread passes here: write the shared line only when
        // the value changes (once a millisecond at most).
        let ms = (self.started.elapsed().as_millis() as u64).max(1);
        if self.last_ok_ms.load(Ordering::Relaxed) != ms {
            self.last_ok_ms.store(ms, Ordering::Release);
        }
        self.circuit.record_success();
    }

    /// Postgres could not be reached (see [`Circuit::record_failure`]). When that opens the
    /// circuit, every store empties its free list: its connections are likely dead.
    pub(crate) fn record_failure(&self, cause: &str) {
        if self.circuit.record_failure(cause) {
            self.record_outage();
        }
    }

    /// Whether some statement succeeded within `window`: Postgres answered recently, even if
    /// every connection is busy right now.
    pub fn succeeded_within(&self, window: Duration) -> bool {
        let last = self.last_ok_ms.load(Ordering::Acquire);
        last > 0
            && (self.started.elapsed().as_millis() as u64).saturating_sub(last)
                <= window.as_millis() as u64
    }

    /// Records that PostgreSQL refused a new connection for lack of slots (`cause`: its message).
    pub fn record_refusal(&self, cause: String) {
        *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), cause));
    }

    /// PostgreSQL accepts new connections again.
    pub fn clear_refusal(&self) {
        self.refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Why new connections are refused, if they were recently.
    pub fn refusal(&self) -> Option<String> {
        match &*self.refusal.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((at, cause)) if at.elapsed() < REFUSAL_HOLDS => Some(cause.clone()),
            _ => None,
        }
    }
}
