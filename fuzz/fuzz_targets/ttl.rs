//! `ttl_seconds` as a query value (`parse_ttl` in `src/api/cache.rs`).
//!
//! Properties: absent means the default; otherwise accepted exactly when the text is a decimal
//! integer (leading zeros and one leading `+` allowed, as Rust's `u32::from_str` reads it) from 1
//! to one year, and then its value; whatever it accepts, its canonical form gives the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsidecar::api::cache::parse_ttl;
use pgsidecar::config::MAX_TTL_SECONDS;

fuzz_target!(|input: (String, u32)| {
    let (raw, default) = input;
    assert_eq!(parse_ttl(None, default).ok(), Some(default));

    let digits = raw.strip_prefix('+').unwrap_or(&raw);
    let expected = (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| {
            // The value, saturated: anything past a year is out of range anyway.
            digits.bytes().fold(0u64, |v, b| {
                (v * 10 + u64::from(b - b'0')).min(u64::from(u32::MAX) + 1)
            })
        })
        .filter(|v| (1..=u64::from(MAX_TTL_SECONDS)).contains(v));
    let got = parse_ttl(Some(&raw), default).ok();
    assert_eq!(got.map(u64::from), expected, "{raw:?}");
    if let Some(v) = got {
        assert_eq!(parse_ttl(Some(&v.to_string()), default).ok(), Some(v));
    }
});
