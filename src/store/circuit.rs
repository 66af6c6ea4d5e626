//! [`Circuit`]: the breaker between the data path and a database that is gone.
//!
//! Closed, every statement goes to Postgres. It opens after `threshold` consecutive failures
//! to reach Postgres (opening a connection failed, or a statement got no answer at all), seen
//! by the data path or by the health monitor; any success in between starts the count again.
//! Open, requests are refused at once (no acquire timeout to wait out), except one trial
//! request per `trial_every` (half-open), and the monitor keeps checking with fresh
//! connections. The first success, a trial's or the monitor's, closes it.
//!
//! A broken *reused* connection is not counted: it shows that this connection is gone, not
//! that Postgres is (after a restart every pooled connection is dead while a new one works).
//! It only raises a suspicion, which makes the monitor check with a fresh connection at once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// What the data path may do right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The circuit is closed.
    Pass,
    /// The circuit is open, and this request is the trial of this interval.
    Trial,
    /// The circuit is open: refuse at once.
    Refuse,
}

pub struct Circuit {
    threshold: u32,
    trial_every_ms: u64,
    /// Failures since the last success.
    failures: AtomicU32,
    /// When the circuit opened (milliseconds since `started`, at least 1); 0 while closed.
    opened_ms: AtomicU64,
    /// When the last trial request was let through while open.
    trial_ms: AtomicU64,
    /// Something looked wrong (a failure, a broken connection): the monitor checks with a
    /// fresh connection until it succeeds.
    suspect: AtomicBool,
    /// The last failure's full text, for the log line when the circuit opens.
    last_cause: Mutex<String>,
    /// Wakes the monitor for a check now.
    wake: Notify,
    started: Instant,
}

impl Circuit {
    pub fn new(threshold: u32, trial_every: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            trial_every_ms: trial_every.as_millis() as u64,
            failures: AtomicU32::new(0),
            opened_ms: AtomicU64::new(0),
            trial_ms: AtomicU64::new(0),
            suspect: AtomicBool::new(false),
            last_cause: Mutex::new(String::new()),
            wake: Notify::new(),
            started: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        (self.started.elapsed().as_millis() as u64).max(1)
    }

    /// Whether a data request may go to the database (see [`Admission`]).
    pub fn admit(&self) -> Admission {
        if self.opened_ms.load(Ordering::Acquire) == 0 {
            return Admission::Pass;
        }
        let now = self.now_ms();
        let last = self.trial_ms.load(Ordering::Acquire);
        if now.saturating_sub(last) >= self.trial_every_ms
            && self
                .trial_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            Admission::Trial
        } else {
            Admission::Refuse
        }
    }

    pub fn is_open(&self) -> bool {
        self.opened_ms.load(Ordering::Acquire) != 0
    }

    /// How long the circuit has been open, or `None` while closed.
    pub fn open_for(&self) -> Option<Duration> {
        match self.opened_ms.load(Ordering::Acquire) {
            0 => None,
            at => Some(Duration::from_millis(self.now_ms().saturating_sub(at))),
        }
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Acquire)
    }

    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// A statement succeeded: the count starts again and an open circuit closes. On the hot
    /// path: one load when nothing has failed.
    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) == 0
            && !self.suspect.load(Ordering::Relaxed)
            && !self.is_open()
        {
            return;
        }
        self.failures.store(0, Ordering::Release);
        self.suspect.store(false, Ordering::Release);
        if let Some(at) = self.close() {
            tracing::info!(
                open_ms = self.now_ms().saturating_sub(at),
                "database reachable again; circuit closed"
            );
        }
    }

    fn close(&self) -> Option<u64> {
        match self.opened_ms.swap(0, Ordering::AcqRel) {
            0 => None,
            at => Some(at),
        }
    }

    /// Postgres could not be reached: a connection could not be opened, or a statement got no
    /// answer. Returns true when this failure opened the circuit.
    pub fn record_failure(&self, cause: &str) -> bool {
        if let Ok(mut last) = self.last_cause.lock() {
            last.clear();
            last.push_str(cause);
        }
        self.suspect.store(true, Ordering::Release);
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let opened = n >= self.threshold
            && self
                .opened_ms
                .compare_exchange(0, self.now_ms(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if opened {
            // The trial interval starts now, so the first trial comes one interval later.
            self.trial_ms.store(self.now_ms(), Ordering::Release);
            tracing::warn!(
                failures = n,
                error = %crate::config::redact_url(cause),
                "database unreachable; circuit open: data requests fail at once until it answers again"
            );
        }
        self.wake_monitor();
        opened
    }

    /// Asks the monitor for a check now, unless the circuit is open: then it checks at its
    /// interval anyway, and an outage must not turn into a check every few milliseconds.
    fn wake_monitor(&self) {
        if !self.is_open() {
            self.wake.notify_one();
        }
    }

    /// The last failure's text, if anything has failed yet.
    pub fn last_cause(&self) -> Option<String> {
        self.last_cause
            .lock()
            .ok()
            .map(|c| c.clone())
            .filter(|c| !c.is_empty())
    }

    /// A reused connection broke: not counted (see the module doc), but the monitor checks
    /// with a fresh connection right away.
    pub fn suspect(&self) {
        self.suspect.store(true, Ordering::Release);
        self.wake_monitor();
    }

    /// Whether the monitor should check with a fresh connection rather than a pooled one.
    pub fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Acquire) || self.is_open()
    }

    /// Returns when a failure or a suspicion asks the monitor for a check now.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_only() {
        let c = Circuit::new(3, Duration::from_secs(60));
        assert!(!c.record_failure("refused"));
        assert!(!c.record_failure("refused"));
        c.record_success();
        assert!(!c.record_failure("refused"));
        assert!(!c.record_failure("refused"));
        assert_eq!(c.admit(), Admission::Pass);
        assert!(c.record_failure("refused"), "the third in a row opens it");
        assert!(c.is_open());
        assert!(!c.record_failure("refused"), "opens once");
        assert_eq!(c.admit(), Admission::Refuse);
        c.record_success();
        assert!(!c.is_open());
        assert_eq!(c.failures(), 0);
        assert_eq!(c.admit(), Admission::Pass);
    }

    #[test]
    fn open_lets_one_trial_through_per_interval() {
        let c = Circuit::new(1, Duration::from_millis(50));
        assert!(c.record_failure("no answer"));
        assert_eq!(c.admit(), Admission::Refuse, "no trial at once");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.admit(), Admission::Trial);
        assert_eq!(c.admit(), Admission::Refuse, "one trial per interval");
        c.record_failure("no answer");
        assert!(c.is_open(), "a failed trial keeps it open");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.admit(), Admission::Trial);
        c.record_success();
        assert_eq!(c.admit(), Admission::Pass, "a successful trial closes it");
    }

    #[test]
    fn suspicion_is_not_a_failure() {
        let c = Circuit::new(1, Duration::from_secs(1));
        c.suspect();
        assert!(c.is_suspect());
        assert!(!c.is_open());
        assert_eq!(c.failures(), 0);
        c.record_success();
        assert!(!c.is_suspect());
    }
}
