//! The change feed, `GET /v1/events`: every event type, filters, `reset` after the listening
//! connection comes back and for a subscriber that falls behind, values never in events, the
//! data API's protection, the subscriber limit, long-lived streams beside the request timeout
//! and the concurrency limit, shutdown ending open streams, large statements split or flushed,
//! and evictions (storage cap, per-user session cap) as events.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use sqlx::Executor;
use tokio::sync::mpsc;

use crate::helpers::*;

/// One event: its name and its data, parsed.
type Ev = (String, Value);

/// An open subscription, read in the background.
pub struct Feed {
    rx: mpsc::UnboundedReceiver<Option<Ev>>,
    /// The task reading the stream: dropping the feed closes the stream.
    reader: tokio::task::AbortHandle,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Feed {
    /// Opens `GET /v1/events?{query}` and waits for its head (after which every change is in
    /// the stream).
    pub async fn open(s: &Sidecar, query: &str) -> Feed {
        // Subscribed before the listener is up, the first event would be its `reset`.
        assert!(
            s.logs.wait_for(
                "listening for change notifications",
                Duration::from_secs(30)
            ),
            "{:?}",
            s.logs.lines()
        );
        let r = s
            .http
            .get(s.url(&format!("/v1/events{query}")))
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        Self::from_response(r)
    }

    pub fn from_response(r: reqwest::Response) -> Feed {
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        assert_eq!(r.headers()["cache-control"], "no-cache");
        let (tx, rx) = mpsc::unbounded_channel();
        let mut body = r.bytes_stream();
        let reader = tokio::spawn(async move {
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(std::str::from_utf8(&chunk).unwrap());
                while let Some(end) = buf.find("\n\n") {
                    let frame: String = buf.drain(..end + 2).collect();
                    let mut name = None;
                    let mut data = None;
                    for line in frame.lines() {
                        if let Some(n) = line.strip_prefix("event: ") {
                            name = Some(n.to_string());
                        } else if let Some(d) = line.strip_prefix("data: ") {
                            data = Some(serde_json::from_str(d).unwrap());
                        } else {
                            assert!(line.is_empty() || line.starts_with(':'), "{line:?}");
                        }
                    }
                    if let (Some(n), Some(d)) = (name, data) {
                        let _ = tx.send(Some((n, d)));
                    }
                }
            }
            let _ = tx.send(None);
        });
        Feed {
            rx,
            reader: reader.abort_handle(),
        }
    }

    /// The next event (panics after 10 s without one, or at the end of the stream).
    pub async fn next(&mut self) -> Ev {
        self.next_within(Duration::from_secs(10)).await
    }

    /// The next event (panics after `within` without one, or at the end of the stream).
    pub async fn next_within(&mut self, within: Duration) -> Ev {
        match tokio::time::timeout(within, self.rx.recv()).await {
            Ok(Some(Some(e))) => e,
            Ok(_) => panic!("the stream ended"),
            Err(_) => panic!("no event within {within:?}"),
        }
    }

    /// Events up to (not including) the first `cache.put` of `sentinel`.
    pub async fn until(&mut self, sentinel: &str) -> Vec<Ev> {
        let mut seen = Vec::new();
        loop {
            let e = self.next().await;
            if e.0 == "cache.put" && e.1["key"] == sentinel {
                return seen;
            }
            seen.push(e);
        }
    }

    /// Whether the stream ends within `within`.
    pub async fn ends_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Some(_))) => continue,
                Ok(_) => return true,
                Err(_) => return false,
            }
        }
    }
}

fn ev(name: &str, data: Value) -> Ev {
    (name.to_string(), data)
}

#[tokio::test]
async fn every_change_is_an_event_and_values_never_are() {
    let s = Sidecar::start().await;
    let mut feed = Feed::open(&s, "").await;
    let secret = "a-value-nobody-may-see";
    assert_eq!(
        s.put_cache("k", &format!("\"{secret}\""), "?tags=a,b")
            .await
            .status(),
        204
    );
    let r = s.http.delete(s.url("/v1/cache/k")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    // Deleting an absent key changes nothing: no event.
    let r = s.http.delete(s.url("/v1/cache/none")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(s.put_cache("p:1", "1", "").await.status(), 204);
    let r = s
        .http
        .delete(s.url("/v1/cache?prefix=p%3A"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.put_cache("t", "1", "?tags=x").await.status(), 204);
    let r = s
        .post_json(
            "/v1/cache/_invalidate",
            &json!({"tags": ["x", "y"], "expire_seconds": 30}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let (token, session) = s
        .create_session(json!({"user_id": "u1", "data": {"s": secret}}))
        .await;
    let r = s
        .http
        .patch(s.url(&format!("/v1/sessions/{token}")))
        .json(&json!({"data": {"n": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .http
        .delete(s.url(&format!("/v1/sessions/{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    s.create_session(json!({"user_id": "u2"})).await;
    s.create_session(json!({"user_id": "u2"})).await;
    let r = s
        .http
        .delete(s.url("/v1/users/u2/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.put_cache("end", "1", "").await.status(), 204);
    let got = feed.until("end").await;
    let mut invalidate_tags = json!(["x", "y"]);
    if let Some(e) = got.iter().find(|e| e.0 == "cache.invalidate") {
        // The tags come in whatever order the statement wrote them.
        let mut tags: Vec<String> = serde_json::from_value(e.1["tags"].clone()).unwrap();
        tags.sort();
        invalidate_tags = json!(tags);
    }
    let normalized: Vec<Ev> = got
        .into_iter()
        .map(|(n, mut d)| {
            if n == "cache.invalidate" {
                d["tags"] = invalidate_tags.clone();
            }
            (n, d)
        })
        .collect();
    assert_eq!(
        normalized,
        vec![
            ev("cache.put", json!({"key": "k", "tags": ["a", "b"]})),
            ev("cache.delete", json!({"key": "k"})),
            ev("cache.put", json!({"key": "p:1", "tags": []})),
            ev("cache.delete", json!({"prefix": "p:"})),
            ev("cache.put", json!({"key": "t", "tags": ["x"]})),
            ev(
                "cache.invalidate",
                json!({"tags": ["x", "y"], "expire_seconds": 30})
            ),
            ev(
                "session.revoke",
                json!({"user_id": "u1", "session_id": session["id"]})
            ),
            ev("session.revoke", json!({"user_id": "u2", "all": true})),
        ]
    );
    let all = format!("{normalized:?}");
    assert!(!all.contains(secret) && !all.contains(&token), "{all}");
}

#[tokio::test]
async fn subscribers_get_only_what_their_filters_name() {
    let s = Sidecar::start().await;
    let mut by_prefix = Feed::open(&s, "?cache_prefix=user%3A").await;
    let mut by_tag = Feed::open(&s, "?tags=red,blue").await;
    let mut by_both = Feed::open(&s, "?cache_prefix=user%3A&tags=red").await;
    let mut by_user = Feed::open(&s, "?user_id=u%201").await;
    assert_eq!(s.put_cache("user:1", "1", "?tags=red").await.status(), 204);
    assert_eq!(
        s.put_cache("user:2", "1", "?tags=green").await.status(),
        204
    );
    assert_eq!(
        s.put_cache("order:1", "1", "?tags=blue").await.status(),
        204
    );
    let r = s
        .http
        .delete(s.url("/v1/cache?prefix=us"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .post_json("/v1/cache/_invalidate", &json!({"tags": ["blue"]}))
        .await;
    assert_eq!(r.status(), 200);
    let (t1, _) = s.create_session(json!({"user_id": "u 1"})).await;
    let (t2, _) = s.create_session(json!({"user_id": "u2"})).await;
    for t in [&t1, &t2] {
        let r = s
            .http
            .delete(s.url(&format!("/v1/sessions/{t}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    // Sentinels each filter passes.
    assert_eq!(
        s.put_cache("user:end", "1", "?tags=red").await.status(),
        204
    );
    let names = |evs: Vec<Ev>| -> Vec<String> {
        evs.into_iter()
            .map(|(n, d)| {
                format!(
                    "{n} {}",
                    d.get("key")
                        .or(d.get("prefix"))
                        .or(d.get("tags"))
                        .or(d.get("user_id"))
                        .unwrap()
                )
            })
            .collect()
    };
    assert_eq!(
        names(by_prefix.until("user:end").await),
        [
            "cache.put \"user:1\"",
            "cache.put \"user:2\"",
            "cache.delete \"us\""
        ]
    );
    assert_eq!(
        names(by_tag.until("user:end").await),
        [
            "cache.put \"user:1\"",
            "cache.put \"order:1\"",
            "cache.delete \"us\"",
            "cache.invalidate [\"blue\"]"
        ]
    );
    assert_eq!(
        names(by_both.until("user:end").await),
        ["cache.put \"user:1\"", "cache.delete \"us\""]
    );
    // The session subscriber sees no cache event: its sentinel is the next revocation.
    let (t3, _) = s.create_session(json!({"user_id": "u 1"})).await;
    let r = s
        .http
        .delete(s.url(&format!("/v1/sessions/{t3}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(by_user.next().await.1["user_id"], "u 1");
    let e = by_user.next().await;
    assert_eq!(e.0, "session.revoke");
    assert_eq!(e.1["user_id"], "u 1");
}

#[tokio::test]
async fn bad_filters_are_refused() {
    let s = Sidecar::start().await;
    for (q, code) in [
        ("?cache_prefix=", "invalid_prefix"),
        ("?cache_prefix=a%0Ab", "invalid_prefix"),
        ("?tags=", "invalid_tags"),
        ("?tags=a,%01", "invalid_tag"),
        ("?user_id=", "invalid_user_id"),
        ("?tags=a&tags=b", "invalid_query"),
    ] {
        let r = s
            .http
            .get(s.url(&format!("/v1/events{q}")))
            .send()
            .await
            .unwrap();
        assert_error(r, 400, code).await;
    }
}

#[tokio::test]
async fn a_reconnect_of_the_listening_connection_sends_reset() {
    let s = Sidecar::start().await;
    let mut feed = Feed::open(&s, "").await;
    assert_eq!(s.put_cache("a", "1", "").await.status(), 204);
    assert_eq!(feed.next().await.0, "cache.put");
    let mut c = s.sql().await;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'pgsidecar-listen'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(feed.next().await, ev("reset", json!({})));
    // And the feed goes on.
    assert_eq!(s.put_cache("b", "1", "").await.status(), 204);
    assert_eq!(feed.next().await.1["key"], "b");
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_loses_events_and_gets_reset() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_EVENTS__QUEUE_EVENTS", 16)
        .start()
        .await;
    let mut feed = Feed::open(&s, "").await;
    // One statement of 500 rows: one notification's worth of events at once, far more than
    // the 16 a subscriber may fall behind by.
    let mut c = s.sql().await;
    c.execute(
        "INSERT INTO cache (key, value, expires_at) \
         SELECT 'bulk' || i, '1', now() + interval '1 hour' FROM generate_series(1, 500) i",
    )
    .await
    .unwrap();
    assert_eq!(s.put_cache("end", "1", "").await.status(), 204);
    let got = feed.until("end").await;
    assert!(got.iter().any(|e| e.0 == "reset"), "{got:?}");
    let puts = got.iter().filter(|e| e.0 == "cache.put").count();
    assert!(puts < 500, "{puts} events");
}

#[tokio::test]
async fn the_feed_is_protected_like_every_data_route() {
    let token = "a-long-enough-secret-token";
    let s = Sidecar::builder()
        .env("PGSIDECAR_SERVER__AUTH_TOKEN", token)
        .start()
        .await;
    let r = s.http.get(s.url("/v1/events")).send().await.unwrap();
    assert_error(r, 401, "unauthorized").await;
    assert!(s.logs.wait_for(
        "listening for change notifications",
        Duration::from_secs(30)
    ));
    let r = s
        .http
        .get(s.url("/v1/events"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut feed = Feed::from_response(r);
    let r = s
        .http
        .put(s.url("/v1/cache/k"))
        .bearer_auth(token)
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(feed.next().await.1["key"], "k");
}

#[tokio::test]
async fn subscribers_are_bounded_and_streams_outlive_the_request_timeout() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_EVENTS__MAX_SUBSCRIBERS", 2)
        .env("PGSIDECAR_SERVER__MAX_CONCURRENT_REQUESTS", 2)
        .env("PGSIDECAR_SERVER__REQUEST_TIMEOUT_MS", 500)
        .env("PGSIDECAR_SERVER__KEEP_ALIVE_IDLE_SECONDS", 1)
        .env("PGSIDECAR_SERVER__HEADER_READ_TIMEOUT_MS", 500)
        .start()
        .await;
    let mut first = Feed::open(&s, "").await;
    let _second = Feed::open(&s, "").await;
    let r = s.http.get(s.url("/v1/events")).send().await.unwrap();
    assert_error(r, 503, "overloaded").await;
    // Two streams open, yet requests still get a concurrency permit: streams hold none.
    for _ in 0..3 {
        assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
    }
    // Past the request timeout and the keep-alive idle time, the stream still delivers.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(s.put_cache("later", "1", "").await.status(), 204);
    assert_eq!(first.until("later").await.len(), 3);
    let text = scrape(&s).await;
    assert_eq!(
        metric(&text, "pgsidecar_events_subscribers", &[]),
        Some(2.0)
    );
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let mut s = Sidecar::builder()
        .env("PGSIDECAR_SHUTDOWN__DRAIN_SECONDS", 1)
        .env("PGSIDECAR_SHUTDOWN__GRACE_SECONDS", 60)
        .start()
        .await;
    let mut feed = Feed::open(&s, "").await;
    s.sigterm();
    // During the drain the stream still delivers...
    assert_eq!(s.put_cache("during", "1", "").await.status(), 204);
    assert_eq!(feed.next().await.1["key"], "during");
    // ...then it ends, and the process exits well before the 60 s grace.
    assert!(feed.ends_within(Duration::from_secs(20)).await);
    let status = s.wait_exit(Duration::from_secs(20)).expect("exited");
    assert!(status.success());
}

#[tokio::test]
async fn without_a_listening_connection_the_feed_is_unavailable() {
    let db = fresh_db().await;
    let s = Sidecar::builder()
        .db(&db)
        .env("PGSIDECAR_DATABASE__POOLER", "transaction")
        .env("PGSIDECAR_DATABASE__MIGRATE_URL", &db)
        .env("PGSIDECAR_CACHE__NEAR__ENABLED", "true")
        .start()
        .await;
    let r = s.http.get(s.url("/v1/events")).send().await.unwrap();
    assert_error(r, 503, "events_unavailable").await;
    assert!(
        s.logs
            .wait_for("without database.listen_url", Duration::from_secs(10)),
        "{:?}",
        s.logs.lines()
    );
    // One line says why, not one per request or per data thread.
    let why = |s: &Sidecar| {
        s.logs
            .lines()
            .iter()
            .filter(|l| l.contains("without database.listen_url"))
            .count()
    };
    assert_eq!(why(&s), 1);
    // The near cache is off too: reads keep working from Postgres.
    assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
    for _ in 0..3 {
        let r = s.get_cache("k").await;
        assert!(r.headers().get("pgsidecar-cache").is_none());
        assert_eq!(r.text().await.unwrap(), "1");
    }
    assert_eq!(why(&s), 1);
}

/// A statement naming more than one notification's worth of keys (PostgreSQL refuses payloads
/// of 8,000 bytes) is announced in several notifications, every key an event; one naming far
/// more is announced as a flush: subscribers get `reset`. Bare SQL, as any writer may.
#[tokio::test]
async fn a_large_statement_is_split_and_a_huge_one_flushed() {
    let s = Sidecar::start().await;
    let mut feed = Feed::open(&s, "").await;
    let mut sql = s.sql().await;
    // 300 keys of 104 bytes: about 33 kB of payload, five notifications or so.
    sql.execute(
        "INSERT INTO pgsidecar.cache (key, value, expires_at) \
         SELECT 'big:' || lpad(i::text, 100, '0'), '1', now() + interval '1 hour' \
         FROM generate_series(1, 300) AS i",
    )
    .await
    .unwrap();
    assert_eq!(s.put_cache("sentinel1", "1", "").await.status(), 204);
    let seen = feed.until("sentinel1").await;
    let mut keys: Vec<String> = seen
        .iter()
        .map(|(name, data)| {
            assert_eq!(name, "cache.put", "{data}");
            data["key"].as_str().unwrap().to_string()
        })
        .collect();
    keys.sort();
    let expected: Vec<String> = (1..=300).map(|i| format!("big:{i:0>100}")).collect();
    assert_eq!(keys, expected);
    // 6,000 of them: far past 64 notifications, so one flush instead of any list.
    sql.execute(
        "INSERT INTO pgsidecar.cache (key, value, expires_at) \
         SELECT 'huge:' || lpad(i::text, 100, '0'), '1', now() + interval '1 hour' \
         FROM generate_series(1, 6000) AS i",
    )
    .await
    .unwrap();
    assert_eq!(s.put_cache("sentinel2", "1", "").await.status(), 204);
    let seen = feed.until("sentinel2").await;
    assert!(
        seen.iter().any(|(name, _)| name == "reset"),
        "{} events, no reset",
        seen.len()
    );
    assert!(
        seen.iter().all(|(name, data)| name == "reset"
            || !data["key"].as_str().unwrap_or("").starts_with("huge:")),
        "a flushed statement's keys are not listed"
    );
}

/// Evictions are changes too: entries evicted by `cache.max_bytes` (the cleanup) are
/// `cache.delete` events, and sessions evicted by `sessions.max_per_user` are `session.revoke`.
#[tokio::test]
async fn evictions_are_events() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_CACHE__MAX_VALUE_BYTES", "1024")
        .env("PGSIDECAR_CACHE__MAX_BYTES", "20000")
        .env("PGSIDECAR_CLEANUP__INTERVAL_SECONDS", "1")
        .env("PGSIDECAR_SESSIONS__MAX_PER_USER", "2")
        .start()
        .await;
    let mut feed = Feed::open(&s, "?user_id=u").await;
    let (_, first) = s.create_session(json!({"user_id": "u"})).await;
    s.create_session(json!({"user_id": "u"})).await;
    s.create_session(json!({"user_id": "u"})).await;
    assert_eq!(
        feed.next().await,
        ev(
            "session.revoke",
            json!({"user_id": "u", "session_id": first["id"]})
        )
    );

    let mut feed = Feed::open(&s, "?cache_prefix=k").await;
    // 40 entries of 650 bytes: 26,000 bytes, so the cleanup evicts the oldest.
    let value = format!("\"{}\"", "v".repeat(498));
    for i in 0..40 {
        assert_eq!(
            s.put_cache(&format!("k{i:02}"), &value, "").await.status(),
            204
        );
    }
    for i in 0..40 {
        assert_eq!(
            feed.next().await,
            ev("cache.put", json!({"key": format!("k{i:02}"), "tags": []}))
        );
    }
    // The cleanup's first pass may take a few seconds to come round on a loaded machine.
    let mut evicted = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    // 6,000 bytes too many: the ten oldest writes go (in whatever order a statement lists them).
    while evicted.len() < 10 {
        assert!(std::time::Instant::now() < until, "evicted: {evicted:?}");
        let (name, data) = feed.next_within(Duration::from_secs(60)).await;
        assert_eq!(name, "cache.delete", "{data}");
        evicted.push(data["key"].as_str().unwrap().to_string());
    }
    evicted.sort();
    let oldest: Vec<String> = (0..10).map(|i| format!("k{i:02}")).collect();
    assert_eq!(evicted, oldest);
}
