//! Query strings (`src/http/decode.rs`, `parse_query`).
//!
//! Properties:
//! - wherever it accepts, it gives the pairs `form_urlencoded::parse` (the WHATWG URL
//!   standard's parser) gives, in order, and every name once;
//! - it refuses a repeated name, and any piece the strict decoder refuses;
//! - pairs written by `form_urlencoded::Serializer` (what `URLSearchParams` and the clients'
//!   encoders produce) are read back exactly, whatever text they hold.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsidecar::http::decode::{Plus, QueryError, parse_query, percent_decode};

fn serialize(pairs: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fuzz_target!(|input: (String, Vec<(String, String)>)| {
    let (raw, mut pairs) = input;

    let reference: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes())
        .map(|(n, v)| (n.into_owned(), v.into_owned()))
        .collect();
    match parse_query(&raw) {
        Ok(got) => {
            assert_eq!(got, reference, "{raw:?}");
            for (i, (name, _)) in got.iter().enumerate() {
                assert!(!got[..i].iter().any(|(n, _)| n == name), "{name:?} twice");
            }
            // Read back from its own serialization.
            assert_eq!(parse_query(&serialize(&got)).as_ref(), Ok(&got));
        }
        Err(QueryError::Repeated(name)) => {
            assert!(
                reference.iter().filter(|(n, _)| *n == name).count() > 1,
                "{raw:?}: {name:?} is not repeated"
            );
        }
        Err(QueryError::Decode { .. }) => {
            // Some name or value the strict decoder refuses.
            assert!(
                raw.split('&').any(|piece| piece
                    .split_once('=')
                    .map_or(vec![piece], |(n, v)| vec![n, v])
                    .into_iter()
                    .any(|part| percent_decode(part, Plus::Space).is_err())),
                "{raw:?} refused, yet every piece decodes"
            );
        }
    }

    // Any pairs, each name once, survive the round trip.
    let mut seen = std::collections::HashSet::new();
    pairs.retain(|(n, _)| seen.insert(n.clone()));
    // An empty name with an empty value serializes as "=", read back as ("", "").
    assert_eq!(parse_query(&serialize(&pairs)), Ok(pairs));
});
