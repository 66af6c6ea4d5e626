//! What a near cache really costs in memory, against what it counts toward its `max_bytes`.
//!
//! Fills the sidecar's own near caches (cache entries and sessions, `pgsidecar::store::near`)
//! in this process, under the binary's allocator, with entries shaped like the benchmark's:
//! first until full, then with as many again (evicting all the while, as a busy sidecar does).
//! Reports, per cache, the bytes counted, the resident memory that filling added (and its peak),
//! and their ratio: `max_bytes` bounds memory only while the ratio stays near 1.
//!
//!     cargo run --release --example near_memory -- cache|sessions [MAX_BYTES] [VALUE_BYTES]
//!
//! One cache per run (a second would reuse what the first freed). Defaults: the shipped
//! `max_bytes` (64 MiB for cache entries, 16 MiB for sessions), the benchmark's 1 KB values and
//! 350-byte session answers.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use pgsidecar::store::TokenHash;
use pgsidecar::store::cache::{CacheEntry, CacheValue, Version};
use pgsidecar::store::near::{NearCache, NearSessions, Window};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// (resident, peak resident) of this process, in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// A JSON string of `len` bytes, as sqlx hands the sidecar a row's value (its own allocation).
fn json_of(len: usize, i: u64) -> Bytes {
    let mut s = format!("{{\"id\":{i},\"payload\":\"");
    while s.len() + 2 < len {
        s.push('x');
    }
    s.push_str("\"}");
    Bytes::from(s.clone())
}

fn report(what: &str, max: u64, counted: u64, entries: u64, before: (u64, u64), after: (u64, u64)) {
    let grew = after.0.saturating_sub(before.0);
    let peak = after.1.saturating_sub(before.0);
    println!(
        "{what}: max_bytes {:.1} MiB, counted {:.1} MiB over {entries} entries; resident +{:.1} MiB \
         (peak +{:.1}): {:.2}x counted, {:.0} bytes per entry against {:.0} counted",
        mib(max),
        mib(counted),
        mib(grew),
        mib(peak),
        peak as f64 / counted.max(1) as f64,
        peak as f64 / entries.max(1) as f64,
        counted as f64 / entries.max(1) as f64,
    );
}

fn main() {
    let arg = |i: usize, default: u64| {
        std::env::args()
            .nth(i)
            .map(|v| v.parse::<u64>().expect("a number of bytes"))
            .unwrap_or(default)
    };
    let sessions = match std::env::args().nth(1).as_deref() {
        Some("cache") => false,
        Some("sessions") => true,
        _ => panic!("usage: near_memory cache|sessions [MAX_BYTES] [VALUE_BYTES]"),
    };
    let max = arg(2, if sessions { 16 << 20 } else { 64 << 20 });
    let value_len = arg(3, if sessions { 350 } else { 1000 }) as usize;
    let window = Arc::new(Window::default());
    window.open_until(u64::MAX);
    let now_us = Utc::now().timestamp_micros();
    window.clock_sample(Utc::now(), now_us, now_us);
    let expires_at = Utc::now() + chrono::Duration::hours(1);

    if sessions {
        fill_sessions(max, value_len, window, expires_at);
    } else {
        fill_cache(max, value_len, window, expires_at);
    }
}

fn fill_cache(max: u64, value_len: usize, window: Arc<Window>, expires_at: DateTime<Utc>) {
    let before = rss();
    let cache = NearCache::new(max, window);
    // Until full, then as many again: every insert past the first round evicts.
    let mut i = 0u64;
    let mut full_at = None;
    while full_at.is_none_or(|n| i < 2 * n) {
        let key = format!("bench:{i:08}");
        let entry = CacheEntry {
            value: CacheValue::Json(json_of(value_len, i)),
            expires_at,
            version: Version {
                xmin: i as u32,
                written_at: Utc::now(),
            },
            stale: false,
            near: false,
            tag_expiry: None,
        };
        let held = cache.bytes();
        cache.fill(&key, &entry, None, cache.ticket(&key));
        // Full: this insert evicted (what is held grew by less than the entry). The map is
        // sharded, so the first eviction comes a little before every shard is full: bytes per
        // entry come out slightly high, the ratio to what is counted does not move.
        if full_at.is_none() && cache.bytes() <= held {
            full_at = Some(i);
        }
        i += 1;
    }
    let entries = full_at.unwrap();
    report("cache", max, cache.bytes(), entries, before, rss());
}

fn fill_sessions(max: u64, session_len: usize, window: Arc<Window>, expires_at: DateTime<Utc>) {
    let before = rss();
    let sessions = NearSessions::new(max, window);
    let refresh_at = expires_at;
    let mut i = 0u64;
    let mut full_at = None;
    while full_at.is_none_or(|n| i < 2 * n) {
        use sha2::Digest;
        let hex: String = sha2::Sha256::digest(i.to_le_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let hash = TokenHash::from_hex(&hex).unwrap();
        let held = sessions.bytes();
        let ticket = sessions.ticket(&hash);
        sessions.fill(
            &hash,
            json_of(session_len, i),
            expires_at,
            refresh_at,
            ticket,
        );
        if full_at.is_none() && sessions.bytes() <= held {
            full_at = Some(i);
        }
        i += 1;
    }
    report(
        "sessions",
        max,
        sessions.bytes(),
        full_at.unwrap(),
        before,
        rss(),
    );
}
