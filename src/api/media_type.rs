//! The `Content-Type` of a cache `PUT`: JSON, or a media type stored with the bytes.
//!
//! Checked against RFC 9110's grammar here rather than with the `mime` crate, which accepts an
//! empty subtype (`text/`) and refuses valid whitespace before a `;`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};

use crate::error::ApiError;

/// Longest `Content-Type` stored with a value.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;

/// How a `PUT` body is to be stored.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// One JSON value, validated.
    Json,
    /// The bytes as they are, with this `Content-Type` (as sent, surrounding whitespace
    /// trimmed).
    Raw(String),
}

fn invalid(why: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_content_type",
        format!(
            "Content-Type {why}: it must be a media type (type/subtype, then optional ; name=value parameters) of at most {MAX_CONTENT_TYPE_BYTES} bytes"
        ),
    )
}

/// Reads the request's `Content-Type`. Absent, or `application/json` (any case, any
/// parameters): JSON. So is `application/x-www-form-urlencoded`, what `curl -d` sends when told
/// nothing else, so that `curl -X PUT -d '{"a":1}'` keeps storing validated JSON. Any other
/// valid media type: the bytes as they are.
pub fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Ok(BodyKind::Json);
    };
    if values.next().is_some() {
        return Err(invalid("is given more than once"));
    }
    // What JSON clients send, without the grammar.
    if value.as_bytes().eq_ignore_ascii_case(b"application/json") {
        return Ok(BodyKind::Json);
    }
    let text = value
        .to_str()
        .map_err(|_| invalid("has characters other than visible ASCII"))?
        .trim_matches([' ', '\t']);
    if text.len() > MAX_CONTENT_TYPE_BYTES {
        return Err(invalid("is too long"));
    }
    let essence_len = check(text.as_bytes()).ok_or_else(|| invalid("is malformed"))?;
    let essence = &text[..essence_len];
    if essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("application/x-www-form-urlencoded")
    {
        Ok(BodyKind::Json)
    } else {
        Ok(BodyKind::Raw(text.to_string()))
    }
}

/// How a `PUT` body is to be stored, from its `Content-Type`.
pub struct ValueKind(pub BodyKind);

impl<S: Send + Sync> FromRequestParts<S> for ValueKind {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        body_kind(&parts.headers).map(Self)
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks `media-type = type "/" subtype parameters`, `parameters = *( OWS ";" OWS
/// [ parameter ] )`, `parameter = token "=" ( token / quoted-string )` (RFC 9110, 8.3.1 and
/// 5.6); returns the length of `type/subtype`. Only visible ASCII, space and tab get here
/// (`HeaderValue::to_str`), so obs-text is refused.
fn check(b: &[u8]) -> Option<usize> {
    let token = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && is_tchar(b[*i]) {
            *i += 1;
        }
        *i > start
    };
    let ows = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let mut i = 0;
    if !token(&mut i) || b.get(i) != Some(&b'/') {
        return None;
    }
    i += 1;
    if !token(&mut i) {
        return None;
    }
    let essence = i;
    loop {
        ows(&mut i);
        if i == b.len() {
            return Some(essence);
        }
        if b[i] != b';' {
            return None;
        }
        i += 1;
        ows(&mut i);
        // An empty parameter (`;;` or a trailing `;`) is allowed.
        if i == b.len() || b[i] == b';' {
            continue;
        }
        if !token(&mut i) || b.get(i) != Some(&b'=') {
            return None;
        }
        i += 1;
        if b.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return None,
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        // quoted-pair: any HTAB, SP or VCHAR
                        match b.get(i + 1) {
                            Some(&c) if c == b'\t' || (0x20..=0x7e).contains(&c) => i += 2,
                            _ => return None,
                        }
                    }
                    Some(&c) if c == b'\t' || (0x20..=0x7e).contains(&c) => i += 1,
                    Some(_) => return None,
                }
            }
        } else if !token(&mut i) {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn kind(values: &[&[u8]]) -> Result<BodyKind, ApiError> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::CONTENT_TYPE, HeaderValue::from_bytes(v).unwrap());
        }
        body_kind(&h)
    }

    #[test]
    fn json_or_raw() {
        assert_eq!(kind(&[]).unwrap(), BodyKind::Json);
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/json ;charset=UTF-8 ",
            "application/x-www-form-urlencoded",
        ] {
            assert_eq!(kind(&[json.as_bytes()]).unwrap(), BodyKind::Json, "{json}");
        }
        for (sent, stored) in [
            ("application/octet-stream", "application/octet-stream"),
            ("text/plain; charset=utf-8", "text/plain; charset=utf-8"),
            ("text/plain;charset=utf-8;", "text/plain;charset=utf-8;"),
            (
                "text/html\t;\tcharset=\"utf-8\"",
                "text/html\t;\tcharset=\"utf-8\"",
            ),
            (
                "x-custom/x.y+z; a=\"q \\\" ;=\"; b=c",
                "x-custom/x.y+z; a=\"q \\\" ;=\"; b=c",
            ),
            ("application/problem+json", "application/problem+json"),
            ("application/jsonx", "application/jsonx"),
            (" image/png ", "image/png"),
        ] {
            assert_eq!(
                kind(&[sent.as_bytes()]).ok(),
                Some(BodyKind::Raw(stored.to_string())),
                "{sent}"
            );
        }
    }

    #[test]
    fn invalid_types() {
        let long = format!("a/{}", "b".repeat(254));
        for bad in [
            "",
            "text",
            "text/",
            "/plain",
            "a/b/c",
            "text /plain",
            "text/plain; charset",
            "text/plain; =x",
            "text/plain; a=\"unterminated",
            "text/plain; a=b c",
            "text/plain, text/html",
            "a@b/c",
            long.as_str(),
        ] {
            let r = kind(&[bad.as_bytes()]);
            assert!(
                matches!(
                    &r,
                    Err(ApiError::BadRequest {
                        code: "invalid_content_type",
                        ..
                    })
                ),
                "{bad:?} -> {r:?}"
            );
        }
        assert!(kind(&[b"text/plain; a=\xe9"]).is_err());
        assert!(kind(&[b"text/plain", b"text/plain"]).is_err());
        assert_eq!(
            kind(&[format!("a/{}", "b".repeat(253)).as_bytes()])
                .map(|_| ())
                .map_err(|_| ()),
            Ok(())
        );
    }
}
