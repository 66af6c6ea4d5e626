//! What change notifications drive: the near caches, the change feed's subscribers and the
//! fill-lease waiters, shared by every data thread. The listener ([`super::listen`]) parses
//! each notification into [`Change`]s and [`Notifier::apply`]s them; this sidecar's own writes
//! invalidate its near caches directly, before they are answered (read-your-writes).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use foldhash::HashMap;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Notify, Semaphore, broadcast};

use super::near::{NearCache, NearSessions, Window, now_ns};
use super::sessions::TokenHash;
use crate::config::Settings;
use crate::metrics as m;

/// One change, as a notification announced it (see the migration for the payloads).
#[derive(Debug, PartialEq)]
pub enum Change {
    /// Entries written: key and tags.
    Put(Vec<(String, Vec<String>)>),
    /// Live entries deleted.
    Delete(Vec<(String, Vec<String>)>),
    /// Entries deleted or expired by a tag invalidation (near caches only).
    Drop(Vec<String>),
    Prefix(String),
    Invalidate {
        tags: Vec<String>,
        expire_seconds: u64,
    },
    /// Sessions updated (or revoked by a revoke-all): token hashes.
    Sessions(Vec<TokenHash>),
    /// Live sessions revoked: hash, user id, session id.
    Revoke(Vec<(TokenHash, String, String)>),
    RevokeAll {
        user_id: String,
    },
    /// Fill leases released or voided (`None`: possibly any).
    Leases(Option<Vec<String>>),
    /// Anything may have changed (a payload too large, or the listener reconnected).
    Flush,
}

#[derive(Deserialize)]
struct Payload {
    op: String,
    #[serde(default)]
    items: Vec<serde_json::Value>,
    prefix: Option<String>,
    user_id: Option<String>,
    expire_seconds: Option<u64>,
    #[serde(default)]
    all: bool,
}

impl Change {
    /// Parses a notification's payload; `None` when it is not one of ours (unknown op,
    /// malformed): the caller treats that as a flush.
    pub fn parse(payload: &str) -> Option<Self> {
        let p: Payload = serde_json::from_str(payload).ok()?;
        let key_tags = |items: Vec<serde_json::Value>| -> Option<Vec<(String, Vec<String>)>> {
            items
                .into_iter()
                .map(|i| serde_json::from_value::<(String, Vec<String>)>(i).ok())
                .collect()
        };
        let strings = |items: Vec<serde_json::Value>| -> Option<Vec<String>> {
            items
                .into_iter()
                .map(|i| serde_json::from_value::<String>(i).ok())
                .collect()
        };
        let sessions = |items: Vec<serde_json::Value>| -> Option<Vec<(TokenHash, String, String)>> {
            items
                .into_iter()
                .map(|i| {
                    let (h, u, id) = serde_json::from_value::<(String, String, String)>(i).ok()?;
                    Some((TokenHash::from_hex(&h)?, u, id))
                })
                .collect()
        };
        Some(match p.op.as_str() {
            "put" => Self::Put(key_tags(p.items)?),
            "del" => Self::Delete(key_tags(p.items)?),
            "drop" => Self::Drop(key_tags(p.items)?.into_iter().map(|(k, _)| k).collect()),
            "prefix" => Self::Prefix(p.prefix?),
            "inval" => Self::Invalidate {
                tags: strings(p.items)?,
                expire_seconds: p.expire_seconds?,
            },
            "sess" => Self::Sessions(sessions(p.items)?.into_iter().map(|(h, ..)| h).collect()),
            "revoke" => Self::Revoke(sessions(p.items)?),
            "revoke_all" => Self::RevokeAll {
                user_id: p.user_id?,
            },
            "lease" if p.all => Self::Leases(None),
            "lease" => Self::Leases(Some(strings(p.items)?)),
            "flush" => Self::Flush,
            _ => return None,
        })
    }
}

/// The kinds of change-feed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    CachePut,
    CacheDelete,
    CacheInvalidate,
    SessionRevoke,
    Reset,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::CachePut => "cache.put",
            Self::CacheDelete => "cache.delete",
            Self::CacheInvalidate => "cache.invalidate",
            Self::SessionRevoke => "session.revoke",
            Self::Reset => "reset",
        }
    }
}

/// One change-feed event: what filters look at, and its `data` (JSON, never a value).
#[derive(Debug)]
pub struct Event {
    pub kind: EventKind,
    pub key: Option<String>,
    pub prefix: Option<String>,
    /// The entry's tags (cache.put, cache.delete by key) or the tags invalidated.
    pub tags: Vec<String>,
    pub user_id: Option<String>,
    pub data: Bytes,
}

impl Event {
    pub fn reset() -> Self {
        Self {
            kind: EventKind::Reset,
            key: None,
            prefix: None,
            tags: Vec::new(),
            user_id: None,
            data: Bytes::from_static(b"{}"),
        }
    }

    /// `session.revoke` of one session (`data` names it) or of all of a user's.
    fn session_revoke(user_id: String, data: serde_json::Value) -> Self {
        Self {
            kind: EventKind::SessionRevoke,
            key: None,
            prefix: None,
            tags: Vec::new(),
            user_id: Some(user_id),
            data: data.to_string().into(),
        }
    }
}

/// Lease waiters by key: each waits on the key's [`Notify`], woken by any change of the key.
#[derive(Default)]
pub struct Waiters {
    map: std::sync::Mutex<HashMap<String, (Arc<Notify>, usize)>>,
    count: AtomicUsize,
}

/// A registration in [`Waiters`], removed when dropped.
pub struct Waiting<'a> {
    waiters: &'a Waiters,
    key: String,
    pub notify: Arc<Notify>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        if let Some((_, n)) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
        self.waiters.count.fetch_sub(1, Ordering::Release);
    }
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Notify>, usize)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, key: &str) -> Waiting<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        let mut map = self.lock();
        let (notify, n) = map
            .entry(key.to_string())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        *n += 1;
        Waiting {
            waiters: self,
            key: key.to_string(),
            notify: notify.clone(),
        }
    }

    fn wake(&self, key: &str) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some((n, _)) = self.lock().get(key) {
            n.notify_waiters();
        }
    }

    fn wake_prefix(&self, prefix: &str) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        for (k, (n, _)) in self.lock().iter() {
            if k.starts_with(prefix) {
                n.notify_waiters();
            }
        }
    }

    fn wake_all(&self) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        for (n, _) in self.lock().values() {
            n.notify_waiters();
        }
    }
}

/// The change feed: one ring of events shared by every subscriber (tokio's broadcast), so a
/// subscriber that falls more than `events.queue_events` behind loses the oldest and is told
/// (`reset`), and memory never grows with a slow one; and the subscriber limit.
pub struct Feed {
    tx: broadcast::Sender<Arc<Event>>,
    pub subscribers: Arc<Semaphore>,
}

impl Feed {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    fn send(&self, e: Event) {
        let _ = self.tx.send(Arc::new(e));
    }
}

/// Everything change notifications drive, shared by the stores of all data threads.
pub struct Notifier {
    /// Whether this sidecar can listen at all (see [`Settings::listen_url`]).
    pub enabled: bool,
    pub cache: Option<NearCache>,
    pub sessions: Option<NearSessions>,
    pub window: Arc<Window>,
    pub feed: Feed,
    pub waiters: Waiters,
    /// The listening connection is up (LISTEN done).
    listening: AtomicBool,
    /// [`now_ns`] time until which this sidecar's registration (a row of `listeners`) makes
    /// every writer notify (see [`super::registry`]); 0: not registered.
    effective_until: AtomicU64,
    /// Woken when the registration becomes effective.
    pub effective_changed: Notify,
    /// Requests that need notifications besides the near caches and the feed's subscribers:
    /// subscribers waiting for their answer's head, lease waiters (see [`Demand`]).
    demand: AtomicUsize,
    /// Woken when the need may have appeared (the registrar sleeps on it).
    pub demand_changed: Notify,
}

/// Counts one request that needs notifications until dropped (see [`Notifier::demand`]).
pub struct Demand<'a>(&'a Notifier);

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        self.0.demand.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Notifier {
    pub fn new(settings: &Settings) -> Self {
        let enabled = settings.listen_url().is_ok();
        let window = Arc::new(Window::default());
        let (tx, _) = broadcast::channel(settings.events.queue_events);
        Self {
            enabled,
            cache: (enabled && settings.cache.near.enabled)
                .then(|| NearCache::new(settings.cache.near.max_bytes, window.clone())),
            sessions: (enabled && settings.sessions.near.enabled)
                .then(|| NearSessions::new(settings.sessions.near.max_bytes, window.clone())),
            window,
            feed: Feed {
                tx,
                subscribers: Arc::new(Semaphore::new(settings.events.max_subscribers)),
            },
            waiters: Waiters::default(),
            listening: AtomicBool::new(false),
            effective_until: AtomicU64::new(0),
            effective_changed: Notify::new(),
            demand: AtomicUsize::new(0),
            demand_changed: Notify::new(),
        }
    }

    /// A notifier with notifications off (tests of the store alone, tools).
    pub fn off() -> Self {
        let (tx, _) = broadcast::channel(16);
        Self {
            enabled: false,
            cache: None,
            sessions: None,
            window: Arc::new(Window::default()),
            feed: Feed {
                tx,
                subscribers: Arc::new(Semaphore::new(0)),
            },
            waiters: Waiters::default(),
            listening: AtomicBool::new(false),
            effective_until: AtomicU64::new(0),
            effective_changed: Notify::new(),
            demand: AtomicUsize::new(0),
            demand_changed: Notify::new(),
        }
    }

    /// Whether any near cache is on (heartbeats are then frequent).
    pub fn has_near(&self) -> bool {
        self.cache.is_some() || self.sessions.is_some()
    }

    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Whether this sidecar needs notifications now: a near cache on, a change-feed
    /// subscriber, or a request waiting for them.
    pub fn needed(&self) -> bool {
        self.enabled
            && (self.has_near() || self.feed.wanted() || self.demand.load(Ordering::Acquire) > 0)
    }

    /// Marks a request as needing notifications (until the guard is dropped) and wakes the
    /// registrar.
    pub fn demand(&self) -> Demand<'_> {
        self.demand.fetch_add(1, Ordering::AcqRel);
        self.demand_changed.notify_one();
        Demand(self)
    }

    /// Whether every writer notifies now: this sidecar's registration is effective.
    pub fn is_effective(&self) -> bool {
        now_ns() < self.effective_until()
    }

    /// [`now_ns`] time until which the registration is effective (0: it is not).
    pub fn effective_until(&self) -> u64 {
        self.effective_until.load(Ordering::Acquire)
    }

    /// The registration is effective until `until` ([`now_ns`]; 0: no longer).
    pub fn set_effective_until(&self, until: u64) {
        let was = self.effective_until.swap(until, Ordering::AcqRel);
        if until > 0 {
            if was <= now_ns() {
                // Effective again after a lapse: changes committed meanwhile may not have been
                // announced. (A new subscriber subscribes only after this: it gets none.)
                self.feed.send(Event::reset());
                self.waiters.wake_all();
            }
            self.effective_changed.notify_waiters();
        }
    }

    /// The registration lapsed (not renewed in time, or given up): writers may have stopped
    /// notifying, so the near caches are emptied and closed, subscribers get `reset` and lease
    /// waiters look again (and poll until it is effective again).
    pub fn lapsed(&self) {
        self.set_effective_until(0);
        self.close_near();
        self.feed.send(Event::reset());
        self.waiters.wake_all();
    }

    /// Waits until the registration is effective, at most `max`; whether it is.
    pub async fn wait_effective(&self, max: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let changed = self.effective_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_effective() {
                return true;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => return self.is_effective(),
            }
        }
    }

    /// The listening connection is up again: messages may have been missed while it was not,
    /// so subscribers get `reset` and waiters look again. (The near caches stay closed until a
    /// heartbeat arrives.)
    pub fn listening_again(&self) {
        self.listening.store(true, Ordering::Release);
        // The registrar registers only while listening.
        self.demand_changed.notify_one();
        self.feed.send(Event::reset());
        self.waiters.wake_all();
    }

    /// The listening connection is gone: the near caches are emptied and closed.
    pub fn lost(&self) {
        self.listening.store(false, Ordering::Release);
        self.close_near();
    }

    /// Closes the window and empties both near caches.
    pub fn close_near(&self) {
        self.window.close();
        self.clear_near();
    }

    pub fn clear_near(&self) {
        if let Some(c) = &self.cache {
            c.clear();
        }
        if let Some(s) = &self.sessions {
            s.clear();
        }
    }

    /// Applies a change: near caches first (before the heartbeat after it can open the
    /// window), then lease waiters, then the feed.
    pub fn apply(&self, change: Change) {
        metrics::counter!(m::NOTIFICATIONS_RECEIVED).increment(1);
        let feed = self.feed.wanted();
        match change {
            Change::Put(items) => {
                for (key, tags) in items {
                    self.cache_key(&key);
                    if feed {
                        let data = json!({"key": key, "tags": tags}).to_string();
                        self.feed.send(Event {
                            kind: EventKind::CachePut,
                            key: Some(key),
                            prefix: None,
                            tags,
                            user_id: None,
                            data: data.into(),
                        });
                    }
                }
            }
            Change::Delete(items) => {
                for (key, tags) in items {
                    self.cache_key(&key);
                    if feed {
                        let data = json!({ "key": key }).to_string();
                        self.feed.send(Event {
                            kind: EventKind::CacheDelete,
                            key: Some(key),
                            prefix: None,
                            tags,
                            user_id: None,
                            data: data.into(),
                        });
                    }
                }
            }
            Change::Drop(keys) => {
                for key in keys {
                    self.cache_key(&key);
                }
            }
            Change::Prefix(prefix) => {
                if let Some(c) = &self.cache {
                    c.invalidate_prefix(&prefix);
                }
                self.waiters.wake_prefix(&prefix);
                if feed {
                    let data = json!({ "prefix": prefix }).to_string();
                    self.feed.send(Event {
                        kind: EventKind::CacheDelete,
                        key: None,
                        prefix: Some(prefix),
                        tags: Vec::new(),
                        user_id: None,
                        data: data.into(),
                    });
                }
            }
            Change::Invalidate {
                tags,
                expire_seconds,
            } => {
                if let Some(c) = &self.cache {
                    c.invalidate_tags();
                }
                if feed {
                    let data = json!({"tags": tags, "expire_seconds": expire_seconds}).to_string();
                    self.feed.send(Event {
                        kind: EventKind::CacheInvalidate,
                        key: None,
                        prefix: None,
                        tags,
                        user_id: None,
                        data: data.into(),
                    });
                }
            }
            Change::Sessions(hashes) => {
                if let Some(s) = &self.sessions {
                    for h in &hashes {
                        s.invalidate(h.as_bytes());
                    }
                }
            }
            Change::Revoke(items) => {
                for (hash, user_id, id) in items {
                    if let Some(s) = &self.sessions {
                        s.invalidate(hash.as_bytes());
                    }
                    if feed {
                        let data = json!({"user_id": user_id, "session_id": id});
                        self.feed.send(Event::session_revoke(user_id, data));
                    }
                }
            }
            Change::RevokeAll { user_id } => {
                if feed {
                    let data = json!({"user_id": user_id, "all": true});
                    self.feed.send(Event::session_revoke(user_id, data));
                }
            }
            Change::Leases(Some(keys)) => {
                for key in keys {
                    self.waiters.wake(&key);
                }
            }
            Change::Leases(None) => self.waiters.wake_all(),
            Change::Flush => {
                self.clear_near();
                self.waiters.wake_all();
                self.feed.send(Event::reset());
            }
        }
    }

    fn cache_key(&self, key: &str) {
        if let Some(c) = &self.cache {
            c.invalidate(key);
        }
        self.waiters.wake(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        assert_eq!(
            Change::parse(r#"{"op":"put","items":[["k",["a","b"]],["é",[]]]}"#),
            Some(Change::Put(vec![
                ("k".into(), vec!["a".into(), "b".into()]),
                ("é".into(), vec![])
            ]))
        );
        assert_eq!(
            Change::parse(r#"{"op":"prefix","prefix":"user:"}"#),
            Some(Change::Prefix("user:".into()))
        );
        assert_eq!(
            Change::parse(r#"{"op":"inval","expire_seconds":0,"items":["t"]}"#),
            Some(Change::Invalidate {
                tags: vec!["t".into()],
                expire_seconds: 0
            })
        );
        let h = "ab".repeat(32);
        assert!(matches!(
            Change::parse(&format!(r#"{{"op":"revoke","items":[["{h}","u","id"]]}}"#)),
            Some(Change::Revoke(v)) if v.len() == 1 && v[0].1 == "u"
        ));
        assert_eq!(
            Change::parse(r#"{"op":"lease","all":true}"#),
            Some(Change::Leases(None))
        );
        assert_eq!(Change::parse(r#"{"op":"flush"}"#), Some(Change::Flush));
        for bad in [
            "",
            "{}",
            r#"{"op":"nope"}"#,
            r#"{"op":"put","items":[[1,2]]}"#,
            r#"{"op":"revoke","items":[["xx","u","id"]]}"#,
        ] {
            assert_eq!(Change::parse(bad), None, "{bad}");
        }
    }
}
