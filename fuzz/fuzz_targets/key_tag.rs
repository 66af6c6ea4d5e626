//! Cache keys and tags (`CacheKey::parse`, `Tag::parse` in `src/store/cache.rs`).
//!
//! Properties, for any text:
//! - accepted exactly when the documented rules hold (docs/api.md): a key is 1 to 512 bytes,
//!   does not start with `_` and has no control character; a tag is 1 to 256 bytes without
//!   commas or control characters (so never a NUL, which PostgreSQL's `text` cannot hold);
//! - an accepted key or tag is kept exactly, and the same string means the same key or tag in
//!   every position a client can send it: a path segment (encoded as `encodeURIComponent`
//!   does), a query value (as `URLSearchParams` does), a comma-separated `tags` list, and a
//!   JSON body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use pgsidecar::http::decode::{Plus, parse_query, percent_decode};
use pgsidecar::store::CacheKey;
use pgsidecar::store::cache::Tag;

fn from_query(name: &str, value: &str) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair(name, value)
        .finish();
    let pairs = parse_query(&q).expect("a serialized query parses");
    assert_eq!(pairs.len(), 1);
    pairs.into_iter().next().map(|(_, v)| v).unwrap_or_default()
}

fuzz_target!(|input: (String, Vec<String>)| {
    let (raw, tags) = input;
    let no_control = !raw.chars().any(char::is_control);

    // Keys.
    let key_ok = (1..=512).contains(&raw.len()) && !raw.starts_with('_') && no_control;
    match CacheKey::parse(raw.clone()) {
        Ok(key) => {
            assert!(key_ok, "{raw:?} accepted as a key");
            assert_eq!(key.as_str(), raw);
            assert!(!raw.contains('\0'));
            let segment = utf8_percent_encode(&raw, NON_ALPHANUMERIC).to_string();
            let from_path = percent_decode(&segment, Plus::Literal).expect("encoded path");
            assert_eq!(CacheKey::parse(from_path), Ok(key.clone()));
            // A key's own text is a prefix that reaches it (`DELETE /v1/cache?prefix=`).
            assert_eq!(from_query("prefix", &raw), raw);
            let json = serde_json::to_string(&raw).expect("a string serializes");
            let from_json: String = serde_json::from_str(&json).expect("and parses back");
            assert_eq!(CacheKey::parse(from_json), Ok(key));
        }
        Err(why) => {
            assert!(!key_ok, "{raw:?} refused as a key: {why}");
            assert!(!why.is_empty());
        }
    }

    // Tags, one at a time.
    let tag_ok = (1..=256).contains(&raw.len()) && !raw.contains(',') && no_control;
    match Tag::parse(raw.clone()) {
        Ok(tag) => {
            assert!(tag_ok, "{raw:?} accepted as a tag");
            assert_eq!(tag.as_str(), raw);
        }
        Err(_) => assert!(!tag_ok, "{raw:?} refused as a tag"),
    }

    // A list of valid tags, as `PUT ...?tags=a,b` sends it, reads back as the same tags.
    let valid: Vec<Tag> = tags
        .into_iter()
        .filter_map(|t| Tag::parse(t).ok())
        .collect();
    if !valid.is_empty() {
        let list = valid.iter().map(Tag::as_str).collect::<Vec<_>>().join(",");
        let read: Vec<Tag> = from_query("tags", &list)
            .split(',')
            .map(|t| Tag::parse(t.to_string()).expect("a listed tag parses"))
            .collect();
        assert_eq!(read, valid);
    }
});
