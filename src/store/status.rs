//! [`DbStatus`]: what every data thread's store and the health probes know about the database.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::DbError;

/// Distinct failure causes remembered between two successes; beyond this the oldest is forgotten.
const REMEMBERED_CAUSES: usize = 16;

/// What the stores know about the database, shared by every data thread's store and the
/// health probes.
pub struct DbStatus {
    /// Migrations are applied (set once by the bootstrap task, through [`DbStatus::mark_migrated`]).
    pub migrated: AtomicBool,
    migrated_signal: tokio::sync::watch::Sender<bool>,
    /// The last health probe reached Postgres.
    pub reachable: AtomicBool,
    /// Counts the times Postgres was found gone (a failed probe, a broken connection). Each
    /// store empties its free list when this moves: connections resting there are likely dead,
    /// also on the data threads that sent no statement during the outage.
    outages: AtomicU64,
    /// When a statement last succeeded on any store (milliseconds since `started`, 0 = never).
    last_ok_ms: AtomicU64,
    started: Instant,
    /// Why Postgres could not be used, each cause as logged since it was last reachable: the
    /// bootstrap's retries and every probe round meet the same cause again.
    reported: Mutex<Vec<String>>,
}

impl Default for DbStatus {
    fn default() -> Self {
        Self {
            migrated: AtomicBool::new(false),
            migrated_signal: tokio::sync::watch::Sender::new(false),
            reachable: AtomicBool::new(false),
            outages: AtomicU64::new(0),
            last_ok_ms: AtomicU64::new(0),
            started: Instant::now(),
            reported: Mutex::new(Vec::new()),
        }
    }
}

impl DbStatus {
    pub(crate) fn mark_migrated(&self) {
        self.migrated.store(true, Ordering::Release);
        self.migrated_signal.send_replace(true);
    }

    /// Returns once migrations are applied (at once if they already are).
    pub async fn wait_migrated(&self) {
        let _ = self.migrated_signal.subscribe().wait_for(|m| *m).await;
    }

    /// Records whether Postgres answered the health probe.
    pub fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Release);
        if reachable {
            self.reported_causes().clear();
        } else {
            self.record_outage();
        }
    }

    /// Logs why Postgres could not be used, once per distinct cause until it is reachable
    /// again: a TLS failure as an error (someone must fix a certificate or a setting), any other
    /// cause as a warning. Callers go on retrying.
    pub fn report_failure(&self, e: &DbError) {
        let cause = crate::config::redact_url(&e.to_string());
        {
            let mut seen = self.reported_causes();
            if seen.contains(&cause) {
                return;
            }
            if seen.len() >= REMEMBERED_CAUSES {
                seen.remove(0);
            }
            seen.push(cause.clone());
        }
        match e {
            DbError::Tls(_) => tracing::error!(error = %cause, "database unavailable; retrying"),
            _ => tracing::warn!(error = %cause, "database unavailable; retrying"),
        }
    }

    fn reported_causes(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A panic while holding this lock cannot leave the Vec inconsistent: keep using it.
        self.reported.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record_outage(&self) {
        self.outages.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn outages(&self) -> u64 {
        self.outages.load(Ordering::Acquire)
    }

    pub(crate) fn record_success(&self) {
        // Every statement of every data thread passes here: write the shared line only when
        // the value changes (once a millisecond at most).
        let ms = (self.started.elapsed().as_millis() as u64).max(1);
        if self.last_ok_ms.load(Ordering::Relaxed) != ms {
            self.last_ok_ms.store(ms, Ordering::Release);
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
}
