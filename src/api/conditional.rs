//! Conditional requests (RFC 9110, section 13): parsing `If-Match` and `If-None-Match` into
//! the store's [`Precondition`], and the weak comparison a `GET` with `If-None-Match` makes.

use axum::extract::FromRequestParts;
use axum::http::header::{IF_MATCH, IF_NONE_MATCH};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::error::ApiError;
use crate::store::cache::{EtagSet, Precondition};

/// An entity tag as sent: weak or not, and its opaque part without the quotes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityTag {
    weak: bool,
    opaque: Vec<u8>,
}

/// The value of one precondition header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tags {
    /// `*`
    Any,
    List(Vec<EntityTag>),
}

impl Tags {
    /// Weak comparison (RFC 9110, 8.8.3.2), what `If-None-Match` uses: the opaque parts equal.
    pub fn matches_weakly(&self, etag: &[u8]) -> bool {
        match self {
            Self::Any => true,
            Self::List(tags) => tags.iter().any(|t| t.opaque == etag),
        }
    }

    /// For the store: `strong` keeps only strong tags (If-Match compares strongly, so a weak
    /// tag never matches). Tags with bytes ours never contain (non-ASCII) cannot match either
    /// and are dropped, so the store only sees plain visible ASCII.
    fn into_set(self, strong: bool) -> EtagSet {
        match self {
            Self::Any => EtagSet::Any,
            Self::List(tags) => EtagSet::Tags(
                tags.into_iter()
                    .filter(|t| !t.opaque.is_empty())
                    .filter(|t| !(strong && t.weak))
                    .filter_map(|t| String::from_utf8(t.opaque).ok())
                    .filter(|t| t.is_ascii())
                    .collect(),
            ),
        }
    }
}

fn invalid(header: &HeaderName) -> ApiError {
    ApiError::bad_request(
        "invalid_precondition",
        format!(
            "{header} must be * or a comma-separated list of entity tags (\"...\" or W/\"...\")"
        ),
    )
}

/// Parses every `header` field of the request (several fields form one list); `None` when
/// there is none.
pub fn parse(headers: &HeaderMap, header: &HeaderName) -> Result<Option<Tags>, ApiError> {
    let mut values = headers.get_all(header).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let mut any = false;
    let mut list = Vec::new();
    for value in values {
        parse_value(value, &mut any, &mut list).ok_or_else(|| invalid(header))?;
    }
    match (any, list.is_empty()) {
        (true, true) => Ok(Some(Tags::Any)),
        (false, false) => Ok(Some(Tags::List(list))),
        // `*` inside a list, or no element at all.
        _ => Err(invalid(header)),
    }
}

/// `If-Match = "*" / #entity-tag`, `entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE`,
/// `etagc = %x21 / %x23-7E / obs-text`; elements separated by commas and optional whitespace
/// (empty elements allowed, as in every list). None when malformed.
fn parse_value(value: &HeaderValue, any: &mut bool, list: &mut Vec<EntityTag>) -> Option<()> {
    let b = value.as_bytes();
    let mut i = 0;
    let ows = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    loop {
        ows(&mut i);
        if i == b.len() {
            return Some(());
        }
        match b[i] {
            b',' => {
                i += 1;
                continue;
            }
            b'*' => {
                *any = true;
                i += 1;
            }
            _ => {
                let weak = b[i..].starts_with(b"W/");
                if weak {
                    i += 2;
                }
                if b.get(i) != Some(&b'"') {
                    return None;
                }
                i += 1;
                let start = i;
                while i < b.len() && (b[i] == 0x21 || (0x23..=0x7e).contains(&b[i]) || b[i] >= 0x80)
                {
                    i += 1;
                }
                if b.get(i) != Some(&b'"') {
                    return None;
                }
                list.push(EntityTag {
                    weak,
                    opaque: b[start..i].to_vec(),
                });
                i += 1;
            }
        }
        ows(&mut i);
        match b.get(i) {
            None => return Some(()),
            Some(b',') => i += 1,
            Some(_) => return None,
        }
    }
}

/// The preconditions of a `PUT` or `DELETE`.
pub fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    Ok(Precondition {
        if_match: parse(headers, &IF_MATCH)?.map(|t| t.into_set(true)),
        if_none_match: parse(headers, &IF_NONE_MATCH)?.map(|t| t.into_set(false)),
    })
}

/// The `ETag` header value of what `write` appends (an unquoted tag), and whether
/// `if_none_match` matches that tag, with one buffer.
pub fn etag_header(
    write: impl FnOnce(&mut Vec<u8>),
    if_none_match: Option<&Tags>,
) -> (Option<HeaderValue>, bool) {
    let mut quoted = Vec::with_capacity(32);
    quoted.push(b'"');
    write(&mut quoted);
    quoted.push(b'"');
    let matched = if_none_match.is_some_and(|t| t.matches_weakly(&quoted[1..quoted.len() - 1]));
    (
        HeaderValue::from_maybe_shared(bytes::Bytes::from(quoted)).ok(),
        matched,
    )
}

/// A GET's `If-None-Match`, read where it lies (axum's `HeaderMap` extractor copies every
/// header of the request).
pub struct IfNoneMatch(pub Option<Tags>);

impl<S: Send + Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse(&parts.headers, &IF_NONE_MATCH).map(Self)
    }
}

/// The preconditions of a `PUT` or `DELETE`.
pub struct Preconditions(pub Precondition);

impl<S: Send + Sync> FromRequestParts<S> for Preconditions {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        precondition(&parts.headers).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(IF_MATCH, HeaderValue::from_bytes(v.as_bytes()).unwrap());
        }
        h
    }

    fn tags(values: &[&str]) -> Result<Option<Tags>, ApiError> {
        parse(&headers(values), &IF_MATCH)
    }

    fn list(items: &[(bool, &str)]) -> Tags {
        Tags::List(
            items
                .iter()
                .map(|(weak, o)| EntityTag {
                    weak: *weak,
                    opaque: o.as_bytes().to_vec(),
                })
                .collect(),
        )
    }

    #[test]
    fn valid_lists() {
        assert_eq!(tags(&[]).unwrap(), None);
        assert_eq!(tags(&["*"]).unwrap(), Some(Tags::Any));
        assert_eq!(tags(&[" * "]).unwrap(), Some(Tags::Any));
        assert_eq!(tags(&["\"a\""]).unwrap(), Some(list(&[(false, "a")])));
        assert_eq!(
            tags(&["\"a\", W/\"b\",,\t\"\"", "\"c,d\""]).unwrap(),
            Some(list(&[
                (false, "a"),
                (true, "b"),
                (false, ""),
                (false, "c,d")
            ]))
        );
    }

    #[test]
    fn malformed_lists() {
        for bad in [
            "",
            " ",
            ",",
            "a",
            "\"a",
            "a\"",
            "\"a\" \"b\"",
            "w/\"a\"",
            "W/ \"a\"",
            "*, \"a\"",
            "**",
            "\"a b\"",
            "\"a\"b",
        ] {
            let r = tags(&[bad]);
            assert!(r.is_err(), "{bad:?} -> {r:?}");
        }
        assert!(tags(&["*", "\"a\""]).is_err());
    }

    #[test]
    fn weak_comparison_and_store_sets() {
        let t = tags(&["W/\"x-1\", \"y\""]).unwrap().unwrap();
        assert!(t.matches_weakly(b"x-1"));
        assert!(t.matches_weakly(b"y"));
        assert!(!t.matches_weakly(b"x"));
        assert_eq!(t.clone().into_set(true), EtagSet::Tags(vec!["y".into()]));
        assert_eq!(
            t.into_set(false),
            EtagSet::Tags(vec!["x-1".into(), "y".into()])
        );
        let obs = parse(
            &{
                let mut h = HeaderMap::new();
                h.insert(
                    IF_MATCH,
                    HeaderValue::from_bytes(b"\"\xff\", \"\"").unwrap(),
                );
                h
            },
            &IF_MATCH,
        )
        .unwrap()
        .unwrap();
        assert_eq!(obs.into_set(true), EtagSet::Tags(vec![]));
    }
}
