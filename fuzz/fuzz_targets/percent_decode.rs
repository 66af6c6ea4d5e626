//! The strict percent-decoder of path segments and query values (`src/http/decode.rs`).
//!
//! Properties, for any text:
//! - it agrees with the `percent-encoding` crate wherever it accepts (with `+` read as a space
//!   in a query), and refuses exactly what is malformed: the first `%` not followed by two hex
//!   digits (`BadEscape` at that offset), else escapes that do not decode to UTF-8;
//! - a string encoded by the encoders clients use (`encodeURIComponent`-style for paths,
//!   `application/x-www-form-urlencoded` for queries) decodes back to itself;
//! - in a path `+` is a plus, never a space.

#![no_main]

use libfuzzer_sys::fuzz_target;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use pgsidecar::http::decode::{DecodeError, Plus, path_param, percent_decode};

/// What JavaScript's `encodeURIComponent` leaves as it is: `A-Z a-z 0-9 - _ . ! ~ * ' ( )`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Offset of the first `%` not followed by two hex digits.
fn first_bad_escape(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (0..b.len()).find(|&i| {
        b[i] == b'%'
            && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

fn check(raw: &str) {
    for plus in [Plus::Literal, Plus::Space] {
        let got = percent_decode(raw, plus);
        // The reference: `+` first (an escape never contains one), then the escapes.
        let spaced;
        let input = if plus == Plus::Space {
            spaced = raw.replace('+', " ");
            spaced.as_str()
        } else {
            raw
        };
        let reference = percent_decode_str(input).decode_utf8();
        match (first_bad_escape(raw), &got) {
            (Some(at), Err(DecodeError::BadEscape(got_at))) => assert_eq!(at, *got_at),
            (Some(at), _) => panic!("{raw:?}: bad escape at {at} not refused: {got:?}"),
            (None, Ok(text)) => {
                assert_eq!(Ok(text.as_str()), reference.as_deref().map_err(|_| ()));
            }
            (None, Err(DecodeError::NotUtf8)) => assert!(reference.is_err(), "{raw:?}"),
            (None, Err(e)) => panic!("{raw:?}: no bad escape, yet {e:?}"),
        }
        if plus == Plus::Literal && !raw.contains('%') {
            assert_eq!(got.as_deref(), Ok(raw), "nothing to decode in a path");
        }
        if let Ok(text) = &got {
            assert_eq!(
                percent_decode(&utf8_percent_encode(text, URI_COMPONENT).to_string(), plus)
                    .as_ref(),
                Ok(text),
                "re-encoded decode of {raw:?}"
            );
        }
    }

    // Encoded as clients encode, any string decodes back to itself.
    let path = utf8_percent_encode(raw, URI_COMPONENT).to_string();
    assert_eq!(percent_decode(&path, Plus::Literal).as_deref(), Ok(raw));
    assert_eq!(percent_decode(&path, Plus::Space).as_deref(), Ok(raw));
    let form: String = form_urlencoded::byte_serialize(raw.as_bytes()).collect();
    assert_eq!(percent_decode(&form, Plus::Space).as_deref(), Ok(raw));

    // A path parameter is the whole segment, whatever it holds (the router has matched the
    // template already, so the segment holds no '/').
    let segment = raw.replace('/', "%2F");
    let full = format!("/v1/cache/{segment}");
    assert_eq!(path_param("/v1/cache/{key}", &full), Some(segment.as_str()));
    assert_eq!(path_param("/v1/cache/{key}", &format!("{full}/x")), None);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = std::str::from_utf8(data) {
        check(raw);
    }
});
