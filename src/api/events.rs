//! `GET /v1/events`: the change feed, as Server-Sent Events, filtered by query parameters.
//!
//! The stream is returned at once, so it holds no concurrency permit and is not cut by the
//! request timeout (both bound producing the answer's head); it ends when the sidecar stops
//! (after the drain, so shutdown is not held up by open streams), or when the client goes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream;
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::broadcast::{self, error::RecvError};

use super::{AppState, QueryParams};
use crate::error::ApiError;
use crate::store::CacheKey;
use crate::store::notify::{Event, EventKind};

/// A comment line this often keeps proxies and clients from taking a quiet stream for dead.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long a new subscriber waits for the registration to become effective before a 503.
const REGISTER_WAIT: Duration = Duration::from_secs(5);
/// Most tags one subscription may filter on.
const MAX_TAGS: usize = 100;
const MAX_USER_ID_BYTES: usize = 256;

#[derive(Deserialize)]
pub struct EventParams {
    cache_prefix: Option<String>,
    tags: Option<String>,
    user_id: Option<String>,
}

/// Which events a subscriber gets (see docs/consistency.md): with no parameter, all; cache
/// parameters (`cache_prefix`, `tags`, together: both must hold) select cache events,
/// `user_id` session events; naming one kind only leaves the other kind out. `reset` always.
#[derive(Debug, Default)]
pub struct Filter {
    prefix: Option<String>,
    tags: Option<Vec<String>>,
    user_id: Option<String>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        let cache_filter = self.prefix.is_some() || self.tags.is_some();
        let any = !cache_filter && self.user_id.is_none();
        match e.kind {
            EventKind::Reset => true,
            EventKind::SessionRevoke => {
                any || self
                    .user_id
                    .as_ref()
                    .is_some_and(|u| e.user_id.as_deref() == Some(u.as_str()))
            }
            EventKind::CacheInvalidate => {
                // An invalidation names tags, not keys: it passes a tags filter that shares a
                // tag; under a prefix filter alone it does not.
                any || match &self.tags {
                    Some(tags) => e.tags.iter().any(|t| tags.contains(t)),
                    None => false,
                }
            }
            EventKind::CachePut | EventKind::CacheDelete => {
                if any {
                    return true;
                }
                if !cache_filter {
                    return false;
                }
                let prefix_ok = match (&self.prefix, &e.key, &e.prefix) {
                    (None, _, _) => true,
                    (Some(p), Some(k), _) => k.starts_with(p.as_str()),
                    // A prefix delete passes when its keys and the filter's can overlap.
                    (Some(p), None, Some(q)) => {
                        q.starts_with(p.as_str()) || p.starts_with(q.as_str())
                    }
                    (Some(_), None, None) => false,
                };
                // A prefix delete's entries' tags are unknown: it passes a tags filter.
                let tags_ok = match &self.tags {
                    None => true,
                    Some(tags) => e.prefix.is_some() || e.tags.iter().any(|t| tags.contains(t)),
                };
                prefix_ok && tags_ok
            }
        }
    }
}

fn filter(q: EventParams) -> Result<Filter, ApiError> {
    let prefix = match q.cache_prefix {
        None => None,
        Some(p)
            if !p.is_empty()
                && p.len() <= CacheKey::MAX_BYTES
                && !p.chars().any(char::is_control) =>
        {
            Some(p)
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_prefix",
                "cache_prefix must be 1 to 512 bytes without control characters",
            ));
        }
    };
    let tags = match q.tags {
        None => None,
        Some(list) => {
            let tags = super::cache::tag_list_public(&list, MAX_TAGS, "invalid_tags", "in tags")?;
            if tags.is_empty() {
                return Err(ApiError::bad_request(
                    "invalid_tags",
                    format!("tags must name 1 to {MAX_TAGS} tags"),
                ));
            }
            Some(tags)
        }
    };
    let user_id = match q.user_id {
        None => None,
        Some(u) if !u.is_empty() && u.len() <= MAX_USER_ID_BYTES && !u.contains('\0') => Some(u),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_user_id",
                "user_id must be 1 to 256 bytes without NUL",
            ));
        }
    };
    Ok(Filter {
        prefix,
        tags,
        user_id,
    })
}

/// One SSE frame: `event:` line, one `data:` line (compact JSON has no newline), blank line.
fn frame(e: &Event) -> Bytes {
    let name = e.kind.name();
    let mut out = Vec::with_capacity(name.len() + e.data.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(&e.data);
    out.extend_from_slice(b"\n\n");
    out.into()
}

/// A subscriber's stream state.
struct Subscriber {
    rx: broadcast::Receiver<Arc<Event>>,
    filter: Filter,
    stop: crate::shutdown::Lifecycle,
    keep_alive: tokio::time::Interval,
    first: bool,
    _permit: OwnedSemaphorePermit,
    _gauge: Gauge,
}

/// Counts an open stream in the subscribers gauge until dropped.
struct Gauge;

impl Gauge {
    fn new() -> Self {
        metrics::gauge!(crate::metrics::EVENT_SUBSCRIBERS).increment(1.0);
        Self
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::EVENT_SUBSCRIBERS).decrement(1.0);
    }
}

/// `GET /v1/events[?cache_prefix=P][&tags=a,b][&user_id=U]`: `text/event-stream`.
pub async fn events(
    State(s): State<AppState>,
    QueryParams(q): QueryParams<EventParams>,
) -> Result<Response, ApiError> {
    let filter = filter(q)?;
    let notifier = s.store.notifier().clone();
    if !notifier.enabled {
        return Err(ApiError::EventsUnavailable(
            "change notifications are off: behind a transaction-mode pooler the sidecar needs \
             database.listen_url (a direct or session-mode URL) to listen",
        ));
    }
    let Ok(permit) = notifier.feed.subscribers.clone().try_acquire_owned() else {
        return Err(ApiError::Overloaded);
    };
    // Writers notify only while some sidecar is registered (see store::registry): register,
    // and answer once every change committed from now on is announced.
    let demand = notifier.demand();
    if !notifier.wait_effective(REGISTER_WAIT).await {
        return Err(ApiError::EventsUnavailable(
            "change notifications are not available yet (the listening connection or its \
             registration is not up); retry",
        ));
    }
    // Subscribed before the answer's head goes out: every change committed after the client
    // has it is in the stream.
    let rx = notifier.feed.subscribe();
    drop(demand);
    let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
    keep_alive.reset();
    let sub = Subscriber {
        rx,
        filter,
        stop: s.lifecycle.clone(),
        keep_alive,
        first: true,
        _permit: permit,
        _gauge: Gauge::new(),
    };
    let body = stream::unfold(sub, |mut sub| async move {
        if sub.first {
            // A first comment, so the head and something of the body go out at once.
            sub.first = false;
            return Some((
                Ok::<_, std::convert::Infallible>(Bytes::from_static(b": ok\n\n")),
                sub,
            ));
        }
        loop {
            tokio::select! {
                _ = sub.stop.stopped() => return None,
                _ = sub.keep_alive.tick() => {
                    return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), sub));
                }
                r = sub.rx.recv() => match r {
                    Ok(e) if sub.filter.matches(&e) => return Some((Ok(frame(&e)), sub)),
                    Ok(_) => continue,
                    // Fell behind the ring: the oldest were lost.
                    Err(RecvError::Lagged(_)) => {
                        return Some((Ok(frame(&Event::reset())), sub));
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    });
    let mut resp = Body::from_stream(body).into_response();
    resp.extensions_mut().insert(crate::http::Streaming);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies such as nginx buffer answers unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(
        kind: EventKind,
        key: Option<&str>,
        prefix: Option<&str>,
        tags: &[&str],
        user: Option<&str>,
    ) -> Event {
        Event {
            kind,
            key: key.map(str::to_string),
            prefix: prefix.map(str::to_string),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            user_id: user.map(str::to_string),
            data: Bytes::new(),
        }
    }

    #[test]
    fn filters() {
        let put = |k: &str, tags: &[&str]| ev(EventKind::CachePut, Some(k), None, tags, None);
        let all = Filter::default();
        assert!(all.matches(&put("a", &[])));
        assert!(all.matches(&ev(EventKind::SessionRevoke, None, None, &[], Some("u"))));
        let prefix = Filter {
            prefix: Some("user:".into()),
            ..Default::default()
        };
        assert!(prefix.matches(&put("user:1", &[])));
        assert!(!prefix.matches(&put("order:1", &[])));
        assert!(prefix.matches(&ev(EventKind::CacheDelete, None, Some("user:1"), &[], None)));
        assert!(prefix.matches(&ev(EventKind::CacheDelete, None, Some("us"), &[], None)));
        assert!(!prefix.matches(&ev(EventKind::CacheDelete, None, Some("order"), &[], None)));
        assert!(!prefix.matches(&ev(EventKind::CacheInvalidate, None, None, &["a"], None)));
        assert!(!prefix.matches(&ev(EventKind::SessionRevoke, None, None, &[], Some("u"))));
        assert!(prefix.matches(&Event::reset()));
        let tags = Filter {
            prefix: Some("user:".into()),
            tags: Some(vec!["a".into()]),
            ..Default::default()
        };
        assert!(tags.matches(&put("user:1", &["b", "a"])));
        assert!(!tags.matches(&put("user:1", &["b"])));
        assert!(!tags.matches(&put("order:1", &["a"])));
        assert!(tags.matches(&ev(
            EventKind::CacheInvalidate,
            None,
            None,
            &["a", "c"],
            None
        )));
        assert!(!tags.matches(&ev(EventKind::CacheInvalidate, None, None, &["c"], None)));
        let user = Filter {
            user_id: Some("u".into()),
            ..Default::default()
        };
        assert!(user.matches(&ev(EventKind::SessionRevoke, None, None, &[], Some("u"))));
        assert!(!user.matches(&ev(EventKind::SessionRevoke, None, None, &[], Some("v"))));
        assert!(!user.matches(&put("a", &[])));
    }

    #[test]
    fn frames() {
        let mut e = Event::reset();
        e.data = Bytes::from_static(b"{}");
        assert_eq!(&frame(&e)[..], b"event: reset\ndata: {}\n\n");
    }
}
