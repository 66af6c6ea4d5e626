//! The near caches: cache entries and sessions kept in this sidecar's memory, shared by every
//! data thread, invalidated by the listener (see [`super::listen`]) and by this sidecar's own
//! writes.
//!
//! Three things keep a near value within the documented bound (docs/consistency.md):
//! - the [`Window`]: hits are served only while the last heartbeat that reached the listener
//!   was sent less than `cache.near.max_staleness_ms` ago (so every change committed before
//!   then has been applied); the listener empties the caches before it opens the window again;
//! - the [`Gate`] (the fill race): a reader takes a ticket before it reads Postgres and keeps
//!   what it read only if no invalidation of that key (or of everything) was applied since, so
//!   a value read just before a write cannot land after that write's invalidation;
//! - expiry: an entry is never served past its `expires_at`, converted to this machine's clock
//!   with the offset and error the heartbeats measure.
//!
//! The maps are quick_cache's (bounded by weight, S3-FIFO eviction, sharded locks).

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::cache::CacheEntry;
use super::sessions::TokenHash;

/// Nanoseconds since this process first asked: a monotonic clock cheap to compare.
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn wall_micros() -> i64 {
    Utc::now().timestamp_micros()
}

/// Debug builds only (the integration tests): `PGSIDECAR_TEST_FILL_DELAY_MS` holds every near
/// fill that long between its read and its insert, so a test can make the fill race happen.
#[cfg(debug_assertions)]
pub async fn test_fill_delay() {
    static DELAY: OnceLock<Option<std::time::Duration>> = OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        std::env::var("PGSIDECAR_TEST_FILL_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    });
    if let Some(d) = delay {
        tokio::time::sleep(*d).await;
    }
}

/// When the near caches may answer, and how this machine's clock relates to the database's.
#[derive(Default)]
pub struct Window {
    /// [`now_ns`] until which hits may be served: the send time of the last heartbeat that
    /// arrived, plus the staleness bound. 0: closed.
    valid_until: AtomicU64,
    /// Database clock minus this machine's wall clock, in microseconds, and the error of that
    /// estimate (half a heartbeat's round trip, plus a millisecond).
    offset_us: AtomicI64,
    error_us: AtomicI64,
}

impl Window {
    pub fn is_open(&self, now: u64) -> bool {
        now < self.valid_until.load(Ordering::Acquire)
    }

    /// Opens (or extends) the window until `until` ([`now_ns`] time).
    pub fn open_until(&self, until: u64) {
        self.valid_until.store(until, Ordering::Release);
    }

    pub fn close(&self) {
        self.valid_until.store(0, Ordering::Release);
    }

    /// Records a clock sample: the database's clock read at `db`, between `sent` and `received`
    /// on this machine's wall clock (microseconds).
    pub fn clock_sample(&self, db: DateTime<Utc>, sent_us: i64, received_us: i64) {
        let mid = sent_us + (received_us - sent_us) / 2;
        self.offset_us
            .store(db.timestamp_micros() - mid, Ordering::Relaxed);
        self.error_us
            .store((received_us - sent_us) / 2 + 1000, Ordering::Relaxed);
    }

    /// The [`now_ns`] time until which something that expires at `at` (database clock) may be
    /// served, with the clock's error counted against it; 0 when already past.
    pub fn local_deadline(&self, at: DateTime<Utc>, now: u64) -> u64 {
        let db_now = wall_micros() + self.offset_us.load(Ordering::Relaxed);
        let left_us =
            at.timestamp_micros() - db_now - self.error_us.load(Ordering::Relaxed).max(1000);
        if left_us <= 0 {
            return 0;
        }
        now.saturating_add(left_us as u64 * 1000)
    }
}

/// Invalidation sequences, for the fill race (see the module documentation). A reader takes a
/// [`Ticket`] before reading Postgres; an invalidation bumps the key's stripe (or the epoch, for
/// everything) before removing the entry; the reader inserts, then checks its ticket, and
/// removes what it inserted when the ticket is no longer current. Either the invalidation's
/// removal comes after the insert, or the reader sees the bump.
pub struct Gate {
    epoch: AtomicU64,
    stripes: Box<[AtomicU64]>,
    /// Bumped when a tag is invalidated: tag-checked results known before are void.
    tags: AtomicU64,
}

const STRIPES: usize = 4096;

/// What a reader saw of the [`Gate`] before reading Postgres.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    epoch: u64,
    stripe: usize,
    seq: u64,
    pub(crate) tags: u64,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            epoch: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            tags: AtomicU64::new(0),
        }
    }
}

impl Gate {
    fn stripe(key: &[u8]) -> usize {
        use std::hash::BuildHasher;
        (foldhash::fast::FixedState::with_seed(17).hash_one(key) as usize) % STRIPES
    }

    pub fn ticket(&self, key: &[u8]) -> Ticket {
        let stripe = Self::stripe(key);
        Ticket {
            epoch: self.epoch.load(Ordering::SeqCst),
            seq: self.stripes[stripe].load(Ordering::SeqCst),
            stripe,
            tags: self.tags.load(Ordering::SeqCst),
        }
    }

    /// Whether no invalidation of the ticket's key (or of everything) came since it was taken.
    pub fn current(&self, t: &Ticket) -> bool {
        self.epoch.load(Ordering::SeqCst) == t.epoch
            && self.stripes[t.stripe].load(Ordering::SeqCst) == t.seq
    }

    pub fn tags_current(&self, tags: u64) -> bool {
        self.tags.load(Ordering::SeqCst) == tags
    }

    fn bump(&self, key: &[u8]) {
        self.stripes[Self::stripe(key)].fetch_add(1, Ordering::SeqCst);
    }

    fn bump_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.tags.fetch_add(1, Ordering::SeqCst);
    }

    fn bump_tags(&self) {
        self.tags.fetch_add(1, Ordering::SeqCst);
    }
}

/// What a near lookup found.
pub enum Lookup<T> {
    Hit(T),
    Miss,
    /// The window is closed (or the request asked for Postgres): read Postgres, keep nothing.
    Bypass,
}

/// Weighs an entry by what it holds in memory, so `max_bytes` bounds memory.
#[derive(Clone)]
struct ByWeight;

/// What a cache entry holds beyond its key and value as allocated: the map's slot and index,
/// the `Arc`d entry, the value's shared header. Measured with `bench/near_memory.rs`, which
/// fills a near cache under the binary's allocator: 320 to 360 bytes per entry (more for
/// values of a few KB, whose allocator pages have unusable tails). With 160 counted here and
/// no rounding, 64 MiB of 1 KB entries took 77 MiB of memory, and of 50-byte entries 108 MiB;
/// now 61 and 54 MiB (docs/performance.md).
const ENTRY_OVERHEAD: u64 = 384;

/// The same for a session (its token hash is the key, its answer the value), measured the same
/// way: 180 to 250 bytes above the answer as allocated, for answers of 100 bytes to 1 KB. With
/// 160 counted and no rounding, 16 MiB of 350-byte answers took 18.4 MiB; now 13.2 MiB.
const SESSION_OVERHEAD: u64 = 256;

/// The map's first allocation, in entries per byte of `max_bytes`: sized for 8 KB entries, so
/// that a near cache of larger ones does not hold slots it never uses (uncounted); a map of
/// smaller entries grows as it fills. (Sized for 1 KB entries, a full 64 MiB near cache took
/// 1 to 4 MiB more: 64.9 MiB rather than 60.6 with 1 KB values.)
const FIRST_ALLOCATION_BYTES_PER_ENTRY: u64 = 8192;

/// The bytes a block of `len` bytes takes: size-class allocators (mimalloc, jemalloc) keep four
/// classes per doubling, so a block is rounded up to a quarter of the power of two below it
/// (1,025 bytes take 1,280), and to 16 bytes when small.
fn allocated(len: usize) -> u64 {
    let len = len as u64;
    if len <= 64 {
        return len.next_multiple_of(16);
    }
    let below = 63 - (len - 1).leading_zeros();
    len.next_multiple_of(1 << (below - 2))
}

impl Weighter<Box<str>, Arc<NearEntry>> for ByWeight {
    fn weight(&self, key: &Box<str>, v: &Arc<NearEntry>) -> u64 {
        allocated(key.len()) + v.weight
    }
}

impl Weighter<[u8; 32], Arc<NearSession>> for ByWeight {
    fn weight(&self, _: &[u8; 32], v: &Arc<NearSession>) -> u64 {
        32 + v.weight
    }
}

/// A cache entry in memory.
pub struct NearEntry {
    /// As read (`stale` false, `near` true).
    entry: CacheEntry,
    /// [`now_ns`] time of its expiry (see [`Window::local_deadline`]).
    deadline: u64,
    weight: u64,
    /// Tag-checked reads of it known to be fresh: the tags asked (comma-joined), until when
    /// (a tag's delayed expiry may turn it expired), and the [`Gate`]'s tag sequence then.
    checked: Vec<(Box<str>, u64, u64)>,
}

/// The near cache of cache entries.
pub struct NearCache {
    map: Cache<Box<str>, Arc<NearEntry>, ByWeight>,
    gate: Gate,
    window: Arc<Window>,
}

impl NearCache {
    pub fn new(max_bytes: u64, window: Arc<Window>) -> Self {
        Self {
            map: Cache::with_weighter(
                (max_bytes / FIRST_ALLOCATION_BYTES_PER_ENTRY).max(64) as usize,
                max_bytes,
                ByWeight,
            ),
            gate: Gate::default(),
            window,
        }
    }

    /// The entry for `key`, for a plain read (`check` None) or a tag-checked one (the tags
    /// asked, comma-joined), if it may be served now.
    pub fn get(&self, key: &str, check: Option<&str>, now: u64) -> Lookup<CacheEntry> {
        if !self.window.is_open(now) {
            return Lookup::Bypass;
        }
        let Some(e) = self.map.get(key) else {
            return Lookup::Miss;
        };
        if now >= e.deadline {
            return Lookup::Miss;
        }
        if let Some(check) = check
            && !e.checked.iter().any(|(tags, until, seq)| {
                &**tags == check && now < *until && self.gate.tags_current(*seq)
            })
        {
            return Lookup::Miss;
        }
        Lookup::Hit(e.entry.clone())
    }

    pub fn ticket(&self, key: &str) -> Ticket {
        self.gate.ticket(key.as_bytes())
    }

    /// Keeps `entry`, read from Postgres after `ticket` was taken, unless an invalidation came
    /// since. For a tag-checked read, `check` is the tags asked and, when the read found the
    /// entry fresh, the next moment a tag's delayed expiry may turn it expired (None: never).
    pub fn fill(
        &self,
        key: &str,
        entry: &CacheEntry,
        check: Option<(&str, Option<DateTime<Utc>>)>,
        ticket: Ticket,
    ) {
        let now = now_ns();
        if !self.window.is_open(now) || !self.gate.current(&ticket) {
            return;
        }
        let deadline = self.window.local_deadline(entry.expires_at, now);
        if deadline <= now {
            self.map.remove(key);
            return;
        }
        let mut checked = Vec::new();
        // Tag-checked results of the same version stay known.
        if let Some(old) = self.map.peek(key)
            && old.entry.version == entry.version
        {
            checked.extend(
                old.checked
                    .iter()
                    .filter(|(_, until, seq)| now < *until && self.gate.tags_current(*seq))
                    .cloned(),
            );
        }
        if let Some((tags, next_change)) = check {
            let until = match next_change {
                Some(at) => self.window.local_deadline(at, now),
                None => u64::MAX,
            };
            if until > now && checked.len() < 8 {
                checked.retain(|(t, _, _)| &**t != tags);
                checked.push((tags.into(), until, ticket.tags));
            }
        }
        let weight = ENTRY_OVERHEAD
            + allocated(entry.value.len())
            + match &entry.value {
                super::CacheValue::Raw { content_type, .. } => content_type.len() as u64,
                super::CacheValue::Json(_) => 0,
            }
            + checked
                .iter()
                .map(|(t, _, _)| allocated(t.len()) + 48)
                .sum::<u64>();
        let near = Arc::new(NearEntry {
            entry: CacheEntry {
                stale: false,
                near: true,
                ..entry.clone()
            },
            deadline,
            weight,
            checked,
        });
        self.map.insert(key.into(), near.clone());
        if !self.gate.current(&ticket) {
            self.map.remove_if(key, |v| Arc::ptr_eq(v, &near));
        }
    }

    /// Drops `key` (a write, a delete, a notification naming it).
    pub fn invalidate(&self, key: &str) {
        self.gate.bump(key.as_bytes());
        self.map.remove(key);
    }

    /// Drops every key starting with `prefix`.
    pub fn invalidate_prefix(&self, prefix: &str) {
        self.gate.bump_all();
        self.map.retain(|k, _| !k.starts_with(prefix));
    }

    /// Voids every tag-checked result known (a tag was invalidated).
    pub fn invalidate_tags(&self) {
        self.gate.bump_tags();
    }

    pub fn clear(&self) {
        self.gate.bump_all();
        self.map.clear();
    }

    pub fn bytes(&self) -> u64 {
        self.map.weight()
    }
}

/// A live session in memory: its JSON answer, and until when it may be served (its expiry, or
/// the moment it becomes due for sliding, whichever is first).
pub struct NearSession {
    pub json: Bytes,
    until: u64,
    weight: u64,
}

/// The near cache of sessions, by token hash.
pub struct NearSessions {
    map: Cache<[u8; 32], Arc<NearSession>, ByWeight>,
    gate: Gate,
    window: Arc<Window>,
}

impl NearSessions {
    pub fn new(max_bytes: u64, window: Arc<Window>) -> Self {
        Self {
            map: Cache::with_weighter(
                (max_bytes / FIRST_ALLOCATION_BYTES_PER_ENTRY).max(64) as usize,
                max_bytes,
                ByWeight,
            ),
            gate: Gate::default(),
            window,
        }
    }

    pub fn get(&self, hash: &TokenHash, now: u64) -> Lookup<Bytes> {
        if !self.window.is_open(now) {
            return Lookup::Bypass;
        }
        match self.map.get(hash.as_bytes()) {
            Some(s) if now < s.until => Lookup::Hit(s.json.clone()),
            _ => Lookup::Miss,
        }
    }

    pub fn ticket(&self, hash: &TokenHash) -> Ticket {
        self.gate.ticket(hash.as_bytes())
    }

    /// Keeps a session read after `ticket` was taken: `json` its answer, served until the
    /// earlier of `expires_at` and `refresh_at` (database clock).
    pub fn fill(
        &self,
        hash: &TokenHash,
        json: Bytes,
        expires_at: DateTime<Utc>,
        refresh_at: DateTime<Utc>,
        ticket: Ticket,
    ) {
        let now = now_ns();
        if !self.window.is_open(now) || !self.gate.current(&ticket) {
            return;
        }
        let until = self.window.local_deadline(expires_at.min(refresh_at), now);
        if until <= now {
            // What memory holds is older than this read: drop it.
            self.map.remove(hash.as_bytes());
            return;
        }
        let weight = SESSION_OVERHEAD + allocated(json.len());
        let near = Arc::new(NearSession {
            json,
            until,
            weight,
        });
        self.map.insert(*hash.as_bytes(), near.clone());
        if !self.gate.current(&ticket) {
            self.map
                .remove_if(hash.as_bytes(), |v| Arc::ptr_eq(v, &near));
        }
    }

    pub fn invalidate(&self, hash: &[u8; 32]) {
        self.gate.bump(hash);
        self.map.remove(hash);
    }

    pub fn clear(&self) {
        self.gate.bump_all();
        self.map.clear();
    }

    pub fn bytes(&self) -> u64 {
        self.map.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::cache::{CacheValue, Version};

    #[test]
    fn blocks_are_rounded_to_four_classes_per_doubling() {
        let cases = [
            (0, 0),
            (1, 16),
            (64, 64),
            (65, 80),
            (100, 112),
            (129, 160),
            (1000, 1024),
            (1024, 1024),
            (1025, 1280),
            (20_000, 20_480),
        ];
        for (len, took) in cases {
            assert_eq!(allocated(len), took, "{len}");
        }
    }

    fn entry(v: &str, xmin: u32) -> CacheEntry {
        CacheEntry {
            value: CacheValue::Json(Bytes::from(v.to_string())),
            expires_at: Utc::now() + chrono::Duration::seconds(60),
            version: Version {
                xmin,
                written_at: Utc::now(),
            },
            stale: false,
            near: false,
            tag_expiry: None,
        }
    }

    fn open_cache() -> NearCache {
        let w = Arc::new(Window::default());
        w.open_until(u64::MAX);
        NearCache::new(1 << 20, w)
    }

    fn hit(c: &NearCache, k: &str) -> Option<CacheEntry> {
        match c.get(k, None, now_ns()) {
            Lookup::Hit(e) => Some(e),
            _ => None,
        }
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_is_dropped() {
        let c = open_cache();
        // The reader takes its ticket and reads v1; meanwhile v2 is written and its
        // invalidation applied; then the reader tries to keep v1.
        let t = c.ticket("k");
        c.invalidate("k");
        c.fill("k", &entry("1", 1), None, t);
        assert!(hit(&c, "k").is_none(), "a stale fill must not land");
        // A fill with a fresh ticket lands.
        let t = c.ticket("k");
        c.fill("k", &entry("2", 2), None, t);
        assert!(hit(&c, "k").is_some_and(|e| e.near && e.version.xmin == 2));
        // Clearing (a reconnect) voids every ticket taken before.
        let t = c.ticket("other");
        c.clear();
        c.fill("other", &entry("3", 3), None, t);
        assert!(hit(&c, "other").is_none());
    }

    #[test]
    fn nothing_is_served_while_the_window_is_closed_or_past_expiry() {
        let c = open_cache();
        let t = c.ticket("k");
        c.fill("k", &entry("1", 1), None, t);
        assert!(hit(&c, "k").is_some());
        c.window.close();
        assert!(matches!(c.get("k", None, now_ns()), Lookup::Bypass));
        c.window.open_until(u64::MAX);
        let mut e = entry("1", 1);
        e.expires_at = Utc::now() + chrono::Duration::milliseconds(500);
        let t = c.ticket("soon");
        c.fill("soon", &e, None, t);
        // Served at most until its expiry less the clock's error (at least a millisecond).
        assert!(hit(&c, "soon").is_some());
        assert!(matches!(
            c.get("soon", None, now_ns() + 500_000_000),
            Lookup::Miss
        ));
    }

    #[test]
    fn tag_checked_results_are_voided_by_tag_invalidations() {
        let c = open_cache();
        let t = c.ticket("k");
        c.fill("k", &entry("1", 1), Some(("a,b", None)), t);
        assert!(matches!(c.get("k", Some("a,b"), now_ns()), Lookup::Hit(_)));
        assert!(matches!(c.get("k", Some("a"), now_ns()), Lookup::Miss));
        c.invalidate_tags();
        assert!(matches!(c.get("k", Some("a,b"), now_ns()), Lookup::Miss));
        // The plain read still hits: the entry itself did not change.
        assert!(hit(&c, "k").is_some());
        // A checked fill whose read began before a tag invalidation is never served.
        let t = c.ticket("k");
        c.invalidate_tags();
        c.fill("k", &entry("1", 1), Some(("a,b", None)), t);
        assert!(matches!(c.get("k", Some("a,b"), now_ns()), Lookup::Miss));
    }

    #[test]
    fn prefixes_and_sessions() {
        let c = open_cache();
        for k in ["user:1", "user:2", "order:1"] {
            let t = c.ticket(k);
            c.fill(k, &entry("1", 1), None, t);
        }
        c.invalidate_prefix("user:");
        assert!(hit(&c, "user:1").is_none() && hit(&c, "user:2").is_none());
        assert!(hit(&c, "order:1").is_some());

        let w = Arc::new(Window::default());
        w.open_until(u64::MAX);
        let s = NearSessions::new(1 << 20, w);
        let h = TokenHash::of(&crate::store::sessions::new_token().unwrap()).unwrap();
        let later = Utc::now() + chrono::Duration::seconds(60);
        let t = s.ticket(&h);
        s.invalidate(h.as_bytes());
        s.fill(&h, Bytes::from_static(b"{}"), later, later, t);
        assert!(matches!(s.get(&h, now_ns()), Lookup::Miss));
        let t = s.ticket(&h);
        s.fill(&h, Bytes::from_static(b"{}"), later, later, t);
        assert!(matches!(s.get(&h, now_ns()), Lookup::Hit(_)));
        // Due for sliding now: not served from memory (the validation must slide it).
        let t = s.ticket(&h);
        s.fill(&h, Bytes::from_static(b"{}"), later, Utc::now(), t);
        assert!(matches!(s.get(&h, now_ns()), Lookup::Miss));
    }
}
