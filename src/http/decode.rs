//! The one strict decoder for what arrives percent-encoded: path segments and query strings.
//!
//! Small pure functions (fuzzing targets), used by the data API's extractors. The rules:
//! - `%` must be followed by two hex digits (`%G1`, a trailing `%` are errors, not literal text);
//! - the decoded bytes must be UTF-8 (`%FF` is an error, never U+FFFD);
//! - in a path segment `+` is a plus sign (RFC 3986); in a query string `+` is a space
//!   (`application/x-www-form-urlencoded`, which is what `URLSearchParams`, Go's `url.Values`,
//!   Python's `urlencode`, Java's `URLEncoder` and every server framework use). `%2B` is a plus
//!   and `%20` a space everywhere.
//!
//! So the string a client encodes with its standard encoder for that position (a path segment
//! or a query value) is the string the sidecar sees, equal to the same string in a JSON body.

use std::fmt;

/// Why a component could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A `%` not followed by two hex digits, at this byte offset.
    BadEscape(usize),
    /// The decoded bytes are not UTF-8.
    NotUtf8,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadEscape(at) => write!(
                f,
                "invalid percent-escape at byte {at} (a '%' must be followed by two hex digits; send '%25' for a literal '%')"
            ),
            Self::NotUtf8 => f.write_str("percent-escapes do not decode to UTF-8"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// How a `+` is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plus {
    /// A plus sign: path segments.
    Literal,
    /// A space: query strings.
    Space,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one percent-encoded component strictly (see the module documentation).
pub fn percent_decode(raw: &str, plus: Plus) -> Result<String, DecodeError> {
    let bytes = raw.as_bytes();
    // Nothing to decode: the common case (plain keys and numbers) costs one scan and one copy.
    if !bytes
        .iter()
        .any(|&b| b == b'%' || (b == b'+' && plus == Plus::Space))
    {
        return Ok(raw.to_string());
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex);
                let lo = bytes.get(i + 2).copied().and_then(hex);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(DecodeError::BadEscape(i)),
                }
                i += 3;
            }
            b'+' if plus == Plus::Space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError::NotUtf8)
}

/// Why a query string was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryError {
    /// A name or value that does not decode; the name as far as it decodes.
    Decode { name: String, error: DecodeError },
    /// The same parameter twice (`?prefix=a&prefix=b`): which one was meant is not guessed.
    Repeated(String),
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Decode { name, error } if name.is_empty() => {
                write!(f, "query string: {error}")
            }
            Self::Decode { name, error } => write!(f, "query parameter {name:?}: {error}"),
            Self::Repeated(name) => write!(f, "query parameter {name:?} is given more than once"),
        }
    }
}

impl std::error::Error for QueryError {}

/// Splits a query string (without the `?`) into decoded name-value pairs, in order. Empty
/// pieces (`a=1&&b=2`) are skipped; a name without `=` has the value "". Each name may appear
/// once.
pub fn parse_query(raw: &str) -> Result<Vec<(String, String)>, QueryError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for piece in raw.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
        let name = percent_decode(name, Plus::Space).map_err(|error| QueryError::Decode {
            name: String::new(),
            error,
        })?;
        let value = percent_decode(value, Plus::Space).map_err(|error| QueryError::Decode {
            name: name.clone(),
            error,
        })?;
        if pairs.iter().any(|(n, _)| *n == name) {
            return Err(QueryError::Repeated(name));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// The raw (still encoded) text of the one `{param}` segment of `template` in `path`, when the
/// path has the template's shape. Route templates here have one parameter, a whole segment.
pub fn path_param<'a>(template: &str, path: &'a str) -> Option<&'a str> {
    let mut t = template.split('/');
    let mut p = path.split('/');
    let mut found = None;
    loop {
        match (t.next(), p.next()) {
            (None, None) => return found,
            (Some(ts), Some(ps)) => {
                if ts.starts_with('{') && ts.ends_with('}') {
                    found = Some(ps);
                } else if ts != ps {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_escapes() {
        let d = |s| percent_decode(s, Plus::Literal);
        assert_eq!(d("user%2F42").unwrap(), "user/42");
        assert_eq!(d("%e2%82%ac").unwrap(), "€");
        assert_eq!(d("a%G1"), Err(DecodeError::BadEscape(1)));
        assert_eq!(d("a%"), Err(DecodeError::BadEscape(1)));
        assert_eq!(d("a%4"), Err(DecodeError::BadEscape(1)));
        assert_eq!(d("%FF"), Err(DecodeError::NotUtf8));
        assert_eq!(d("%C3"), Err(DecodeError::NotUtf8));
        assert_eq!(d("%25"), Ok("%".into()));
        assert_eq!(d(""), Ok("".into()));
    }

    #[test]
    fn plus_depends_on_the_position() {
        assert_eq!(percent_decode("c++", Plus::Literal).unwrap(), "c++");
        assert_eq!(percent_decode("c++", Plus::Space).unwrap(), "c  ");
        for plus in [Plus::Literal, Plus::Space] {
            assert_eq!(percent_decode("c%2B%2B", plus).unwrap(), "c++");
            assert_eq!(percent_decode("a%20b", plus).unwrap(), "a b");
        }
    }

    #[test]
    fn queries() {
        assert_eq!(
            parse_query("ttl_seconds=60&tags=a+b,c%2B%2B&&flag").unwrap(),
            vec![
                ("ttl_seconds".into(), "60".into()),
                ("tags".into(), "a b,c++".into()),
                ("flag".into(), String::new()),
            ]
        );
        assert_eq!(parse_query("").unwrap(), vec![]);
        assert_eq!(
            parse_query("prefix=%FF"),
            Err(QueryError::Decode {
                name: "prefix".into(),
                error: DecodeError::NotUtf8
            })
        );
        assert_eq!(
            parse_query("a=1&a=2"),
            Err(QueryError::Repeated("a".into()))
        );
        // An encoded '=' or '&' belongs to the name or value.
        assert_eq!(
            parse_query("prefix=a%3Db%26c").unwrap(),
            vec![("prefix".into(), "a=b&c".into())]
        );
    }

    #[test]
    fn path_params() {
        assert_eq!(
            path_param("/v1/cache/{key}", "/v1/cache/a%2Fb"),
            Some("a%2Fb")
        );
        assert_eq!(
            path_param("/v1/users/{user_id}/sessions", "/v1/users/u%20/sessions"),
            Some("u%20")
        );
        assert_eq!(path_param("/v1/cache/{key}", "/v1/cache/a/b"), None);
        assert_eq!(path_param("/v1/cache/{key}", "/v2/cache/a"), None);
    }
}
