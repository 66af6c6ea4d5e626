//! The JSON check of a cache `PUT` body (`json_text` in `src/api/cache.rs`).
//!
//! Properties, for any bytes:
//! - everything `serde_json` reads as a value is accepted, and means the same value afterwards;
//! - what is accepted is the body's exact text less the surrounding JSON whitespace (stored and
//!   served as sent), is itself accepted unchanged, and holds no NUL (PostgreSQL's `text`
//!   cannot store one: it would be a 500 at write time);
//! - bodies with anything after the value are refused.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsidecar::api::cache::json_text;

fuzz_target!(|body: &[u8]| {
    let value = serde_json::from_slice::<serde_json::Value>(body);
    match json_text(body) {
        Ok(text) => {
            assert!(!text.is_empty());
            assert!(!text.contains('\0'), "a NUL would reach PostgreSQL");
            let ws = [' ', '\t', '\r', '\n'];
            assert_eq!(text, text.trim_matches(ws));
            let body_text = std::str::from_utf8(body).expect("accepted bodies are UTF-8");
            assert_eq!(text, body_text.trim_matches(ws), "not kept as sent");
            assert_eq!(json_text(text.as_bytes()).ok().as_ref(), Some(&text));
            if let Ok(v) = value {
                assert_eq!(
                    serde_json::from_str::<serde_json::Value>(&text).ok(),
                    Some(v)
                );
            }
            // One value only: a second one after it is refused.
            let mut two = text.clone().into_bytes();
            two.extend_from_slice(b" 1");
            assert!(json_text(&two).is_err(), "{text:?} 1 accepted");
        }
        Err(_) => assert!(
            value.is_err(),
            "{:?} refused",
            String::from_utf8_lossy(body)
        ),
    }
});
