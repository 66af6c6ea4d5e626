//! Change notifications and the near caches (issue 17): two sidecars on one database, the near
//! caches on, invalidation across them, read-your-writes, `Cache-Control: no-cache`, the fill
//! race, the listening connection lost (killed, cut off) and back, sessions revoked, and the
//! staleness bound under concurrent writers and readers, entries never served past their TTL,
//! and the memory bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Executor;

use crate::helpers::*;

/// The documented bound in these tests (`cache.near.max_staleness_ms`).
pub const BOUND_MS: u64 = 1000;

pub fn near(b: Builder) -> Builder {
    b.env("PGSIDECAR_CACHE__NEAR__ENABLED", "true")
        .env("PGSIDECAR_SESSIONS__NEAR__ENABLED", "true")
        .env("PGSIDECAR_CACHE__NEAR__MAX_STALENESS_MS", BOUND_MS)
}

/// Two sidecars with the near caches on, on one fresh database.
pub async fn pair() -> (Sidecar, Sidecar) {
    let a = near(Sidecar::builder()).start().await;
    let b = near(Sidecar::builder()).db(&a.db).start().await;
    (a, b)
}

/// A GET: status, body, and whether the near cache answered.
pub async fn get(s: &Sidecar, key: &str) -> (u16, String, bool) {
    let r = s.get_cache(key).await;
    let near = r
        .headers()
        .get("pgsidecar-cache")
        .is_some_and(|v| v == "near");
    (r.status().as_u16(), r.text().await.unwrap(), near)
}

/// Reads `key` on `s` until the near cache answers it (the listener is up and heartbeats
/// arrive), and returns that answer's body.
pub async fn until_near(s: &Sidecar, key: &str) -> String {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body, near) = get(s, key).await;
        if status == 200 && near {
            return body;
        }
        assert!(
            Instant::now() < until,
            "the near cache never answered {key} (last: {status} {body}); logs:\n{}",
            s.logs.lines().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `key` on `s` until the answer is `want` (a body, or None for 404), at most `within`.
async fn until_value(s: &Sidecar, key: &str, want: Option<&str>, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let (status, body, _) = get(s, key).await;
        let got = (status == 200).then_some(body.as_str());
        if got == want {
            return;
        }
        assert!(status == 200 || status == 404, "{status} {body}");
        assert!(
            Instant::now() < until,
            "{key}: still {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The pid of `s`'s listening connection.
async fn listener_pid(s: &Sidecar) -> i32 {
    let mut c = s.sql().await;
    for _ in 0..500 {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'pgsidecar-listen'",
        )
        .fetch_optional(&mut c)
        .await
        .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no listening connection");
}

/// A write straight to the table with the triggers off (`session_replication_role = replica`):
/// a change no notification announces, which only a near cache that was emptied can miss.
async fn silent_write(s: &Sidecar, key: &str, value: &str) {
    let mut c = s.sql().await;
    c.execute("SET session_replication_role = replica")
        .await
        .unwrap();
    sqlx::query("UPDATE cache SET value = $2, updated_at = now() WHERE key = $1")
        .bind(key)
        .bind(value)
        .execute(&mut c)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_write_on_one_sidecar_invalidates_the_others_near_cache() {
    let (a, b) = pair().await;
    assert_eq!(a.put_cache("k", "1", "?tags=t").await.status(), 204);
    assert_eq!(until_near(&b, "k").await, "1");
    // A put, a delete, a prefix delete and a tag invalidation on A each reach B's memory.
    assert_eq!(a.put_cache("k", "2", "?tags=t").await.status(), 204);
    until_value(&b, "k", Some("2"), Duration::from_secs(5)).await;
    assert_eq!(until_near(&b, "k").await, "2");
    let r = a.http.delete(a.url("/v1/cache/k")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    until_value(&b, "k", None, Duration::from_secs(5)).await;

    for k in ["user:1", "user:2", "other"] {
        assert_eq!(a.put_cache(k, "1", "?tags=t").await.status(), 204);
        assert_eq!(until_near(&b, k).await, "1");
    }
    let r = a
        .http
        .delete(a.url("/v1/cache?prefix=user%3A"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    until_value(&b, "user:1", None, Duration::from_secs(5)).await;
    until_value(&b, "user:2", None, Duration::from_secs(5)).await;
    assert_eq!(until_near(&b, "other").await, "1");
    let r = a
        .post_json("/v1/cache/_invalidate", &json!({"tags": ["t"]}))
        .await;
    assert_eq!(r.status(), 200);
    until_value(&b, "other", None, Duration::from_secs(5)).await;
    // Tag-checked reads are served from memory too, and dropped by an invalidation.
    assert_eq!(a.put_cache("c", "1", "?tags=x").await.status(), 204);
    let checked = |s: &Sidecar| s.http.get(s.url("/v1/cache/c?check_tags=y")).send();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = checked(&b).await.unwrap();
        if r.headers().get("pgsidecar-cache").is_some() {
            break;
        }
        assert!(Instant::now() < until, "checked reads never from memory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = a
        .post_json(
            "/v1/cache/_invalidate",
            &json!({"tags": ["y"], "expire_seconds": 60}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let r = checked(&b).await.unwrap();
        if r.headers().get("pgsidecar-stale").is_some() {
            break;
        }
        assert!(
            Instant::now() < until,
            "B kept serving the checked read as fresh"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn writes_through_a_sidecar_are_read_back_at_once() {
    let (_a, b) = pair().await;
    assert_eq!(b.put_cache("k", "1", "?tags=t").await.status(), 204);
    assert_eq!(until_near(&b, "k").await, "1");
    // Every change made through B is what B answers next, with no wait.
    assert_eq!(b.put_cache("k", "2", "?tags=t").await.status(), 204);
    assert_eq!(get(&b, "k").await.1, "2");
    assert_eq!(until_near(&b, "k").await, "2");
    let r = b.http.delete(b.url("/v1/cache/k")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(get(&b, "k").await.0, 404);
    assert_eq!(b.put_cache("p:1", "1", "?tags=t").await.status(), 204);
    assert_eq!(until_near(&b, "p:1").await, "1");
    let r = b
        .http
        .delete(b.url("/v1/cache?prefix=p"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&b, "p:1").await.0, 404);
    assert_eq!(b.put_cache("t:1", "1", "?tags=t").await.status(), 204);
    assert_eq!(until_near(&b, "t:1").await, "1");
    let r = b
        .post_json("/v1/cache/_invalidate", &json!({"tags": ["t"]}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(get(&b, "t:1").await.0, 404);
    // _mget reads memory too, and sees B's own writes at once.
    assert_eq!(b.put_cache("m", "1", "").await.status(), 204);
    assert_eq!(until_near(&b, "m").await, "1");
    assert_eq!(b.put_cache("m", "2", "").await.status(), 204);
    let r = b
        .post_json("/v1/cache/_mget", &json!({"keys": ["m", "none"]}))
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["hits"]["m"], 2);
    assert_eq!(v["misses"], json!(["none"]));
}

#[tokio::test]
async fn no_cache_reads_postgres() {
    let b = near(Sidecar::builder()).start().await;
    assert_eq!(b.put_cache("k", "1", "").await.status(), 204);
    assert_eq!(until_near(&b, "k").await, "1");
    // A change nobody announced: memory still holds the old value...
    silent_write(&b, "k", "2").await;
    assert_eq!(get(&b, "k").await, (200, "1".into(), true));
    // ...a no-cache read goes to Postgres, and keeps what it found.
    let r = b
        .http
        .get(b.url("/v1/cache/k"))
        .header("cache-control", "max-age=0, No-Cache")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("pgsidecar-cache").is_none());
    assert_eq!(r.text().await.unwrap(), "2");
    assert_eq!(get(&b, "k").await, (200, "2".into(), true));
    // _mget and session validation take it too.
    silent_write(&b, "k", "3").await;
    let r = b
        .http
        .post(b.url("/v1/cache/_mget"))
        .header("cache-control", "no-cache")
        .json(&json!({"keys": ["k"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["hits"]["k"], 3);
}

#[tokio::test]
async fn a_value_read_before_a_write_is_not_kept_after_its_invalidation() {
    // The fill race: B reads v1, A writes v2 and B applies its notification, then B's read
    // would keep v1 (nothing would remove it). The debug build holds every fill 1.5 s between
    // its read and its insert, which makes the race happen every time.
    let a = near(Sidecar::builder()).start().await;
    let b = near(Sidecar::builder())
        .db(&a.db)
        .env("PGSIDECAR_TEST_FILL_DELAY_MS", 1500)
        .start()
        .await;
    assert_eq!(a.put_cache("k", "1", "").await.status(), 204);
    // The near cache is open on B (a key of its own made it answer from memory).
    assert_eq!(a.put_cache("probe", "1", "").await.status(), 204);
    until_near(&b, "probe").await;
    let reader = {
        let http = b.http.clone();
        let url = b.url("/v1/cache/k");
        tokio::spawn(async move { http.get(url).send().await.unwrap().text().await.unwrap() })
    };
    // B's read of v1 is done (it waits before keeping it); A writes v2; B applies it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(a.put_cache("k", "2", "").await.status(), 204);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        reader.await.unwrap(),
        "1",
        "the racing read answered what it read"
    );
    // What B keeps must not be v1, now or later.
    for _ in 0..20 {
        assert_eq!(get(&b, "k").await.1, "2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_near_cache_is_emptied_when_the_listening_connection_dies() {
    let b = near(Sidecar::builder()).start().await;
    assert_eq!(b.put_cache("k", "1", "").await.status(), 204);
    assert_eq!(until_near(&b, "k").await, "1");
    silent_write(&b, "k", "2").await;
    assert_eq!(
        get(&b, "k").await.1,
        "1",
        "memory holds the unannounced old value"
    );
    let pid = listener_pid(&b).await;
    let mut c = b.sql().await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert!(killed);
    assert!(
        b.logs
            .wait_for("listening connection lost", Duration::from_secs(10)),
        "{}",
        b.logs.lines().join("\n")
    );
    // Emptied: whatever changed meanwhile is read from Postgres.
    let (_, body, _) = get(&b, "k").await;
    assert_eq!(body, "2");
    // Back after the reconnect.
    assert_eq!(until_near(&b, "k").await, "2");
    assert_ne!(listener_pid(&b).await, pid);
    let text = scrape(&b).await;
    assert!(
        metric(&text, "pgsidecar_listener_up", &[]) == Some(1.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "pgsidecar_near_cache_requests_total",
            &[("cache", "cache"), ("result", "hit")]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
}

/// A TCP proxy in front of PostgreSQL whose connections the test can cut, and which refuses
/// new ones while closed.
pub struct Proxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl Proxy {
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (o, c) = (open.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !o.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = c.notified() => {}
                    }
                });
            }
        });
        Self { port, open, cut }
    }

    /// Cuts every connection and refuses new ones until [`Proxy::reopen`].
    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    pub fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// `url` (postgres://user@host:port/db) with its port replaced.
pub fn via(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (auth_host, path) = rest.split_once('/').unwrap();
    let (auth, host) = match auth_host.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), auth_host),
    };
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    format!("{scheme}://{auth}{host}:{port}/{path}")
}

fn pg_addr(url: &str) -> String {
    let rest = url.split_once("://").unwrap().1;
    let host = rest.split_once('/').unwrap().0;
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5432")
    }
}

#[tokio::test]
async fn the_near_cache_stays_off_until_the_listener_is_back() {
    let db = fresh_db().await;
    let proxy = Proxy::start(pg_addr(&db)).await;
    let b = near(Sidecar::builder())
        .db(&db)
        .env("PGSIDECAR_DATABASE__LISTEN_URL", via(&db, proxy.port))
        .start()
        .await;
    assert_eq!(b.put_cache("k", "1", "").await.status(), 204);
    assert_eq!(until_near(&b, "k").await, "1");
    proxy.close();
    assert!(
        b.logs
            .wait_for("listening connection lost", Duration::from_secs(10))
    );
    // While it cannot listen, nothing comes from memory, and every change is seen at once.
    for i in 2..20 {
        silent_write(&b, "k", &i.to_string()).await;
        let (status, body, near) = get(&b, "k").await;
        assert_eq!(
            (status, body.as_str(), near),
            (200, i.to_string().as_str(), false)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = scrape(&b).await;
    assert_eq!(metric(&text, "pgsidecar_listener_up", &[]), Some(0.0));
    assert!(
        metric(
            &text,
            "pgsidecar_near_cache_requests_total",
            &[("cache", "cache"), ("result", "bypass")]
        )
        .unwrap_or(0.0)
            >= 18.0,
        "{text}"
    );
    proxy.reopen();
    assert_eq!(until_near(&b, "k").await, "19");
}

/// Validates `token` on `s` until it is refused; every acceptance must come from a request
/// sent less than the bound after `revoked` (when sent, not when answered: on a loaded machine
/// an answer may arrive late).
async fn refused_within_bound(s: &Sidecar, token: &str, revoked: Instant) {
    let url = s.url(&format!("/v1/sessions/{token}"));
    loop {
        let asked = Instant::now();
        let status = s.http.get(&url).send().await.unwrap().status();
        if status == 404 {
            return;
        }
        assert_eq!(status, 200);
        assert!(
            asked.duration_since(revoked) < Duration::from_millis(BOUND_MS),
            "accepted a session {:?} after its revocation was acknowledged",
            asked.duration_since(revoked)
        );
    }
}

#[tokio::test]
async fn a_session_revoked_on_one_sidecar_is_refused_by_the_other() {
    let (a, b) = pair().await;
    let (token, session) = a.create_session(json!({"user_id": "u1"})).await;
    let (token2, _) = a.create_session(json!({"user_id": "u1"})).await;
    let (token3, session3) = a.create_session(json!({"user_id": "u2"})).await;
    let validate = |s: &Sidecar, t: &str| {
        let url = s.url(&format!("/v1/sessions/{t}"));
        let http = s.http.clone();
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    let metric_hits = |text: &str| {
        metric(
            text,
            "pgsidecar_near_cache_requests_total",
            &[("cache", "sessions"), ("result", "hit")],
        )
        .unwrap_or(0.0)
    };
    // B answers from memory once the near cache is open.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(validate(&b, &token).await, 200);
        if metric_hits(&scrape(&b).await) >= 2.0 {
            break;
        }
        assert!(Instant::now() < until, "no session hit from memory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in [&token2, &token3] {
        assert_eq!(validate(&b, t).await, 200);
        assert_eq!(validate(&b, t).await, 200);
    }
    // Revoked on A by token, by id, and all of a user's: refused on B within the bound, and
    // on A at once.
    let r = a
        .http
        .delete(a.url(&format!("/v1/sessions/{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let revoked = Instant::now();
    assert_eq!(validate(&a, &token).await, 404);
    refused_within_bound(&b, &token, revoked).await;
    let r = a
        .http
        .delete(a.url(&format!(
            "/v1/users/u2/sessions/{}",
            session3["id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    refused_within_bound(&b, &token3, Instant::now()).await;
    let r = a
        .http
        .delete(a.url("/v1/users/u1/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    refused_within_bound(&b, &token2, Instant::now()).await;
    // The revoking sidecar refuses at once, from memory or not.
    let (t4, _) = b.create_session(json!({"user_id": "u3"})).await;
    for _ in 0..3 {
        assert_eq!(validate(&b, &t4).await, 200);
    }
    let r = b
        .http
        .delete(b.url(&format!("/v1/sessions/{t4}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(validate(&b, &t4).await, 404);
    let _ = session;
}

/// The correctness test: with the near caches on, two sidecars, concurrent writers on
/// A and readers on B. Every value B answers was the current value at some moment no earlier
/// than the bound before the read; and no session is accepted on B after its revocation on A
/// was acknowledged plus the bound.
#[tokio::test]
async fn every_read_on_another_sidecar_is_within_the_documented_bound() {
    let (a, b) = pair().await;
    let a = Arc::new(a);
    let b = Arc::new(b);
    const KEYS: usize = 4;
    // Per key, the writes in order: (value, acknowledged at), recorded before each is sent.
    // v stops being current when the next write commits, no later than that write's
    // acknowledgement; so a read that began more than the bound after that acknowledgement
    // and still answered v is certainly outside the bound.
    type History = Vec<Vec<(u64, Option<Instant>)>>;
    let history: Arc<std::sync::Mutex<History>> =
        Arc::new(std::sync::Mutex::new(vec![Vec::new(); KEYS]));
    let start = Instant::now();
    for k in 0..KEYS {
        assert_eq!(a.put_cache(&format!("k{k}"), "0", "").await.status(), 204);
        history.lock().unwrap()[k].push((0, Some(Instant::now())));
        until_near(&b, &format!("k{k}")).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    // Writers on A: each key written by one writer, values increasing.
    for k in 0..KEYS {
        let (a, history, stop, next) = (a.clone(), history.clone(), stop.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let v = next.fetch_add(1, Ordering::Relaxed);
                history.lock().unwrap()[k].push((v, None));
                let r = a.put_cache(&format!("k{k}"), &v.to_string(), "").await;
                assert_eq!(r.status(), 204);
                let acked = Instant::now();
                if let Some(last) = history.lock().unwrap()[k].last_mut() {
                    last.1 = Some(acked);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // Readers on B: every answer checked against the history afterwards.
    // (key, value answered, when the read began, whether from memory)
    type Read = (usize, u64, Instant, bool);
    let reads: Arc<std::sync::Mutex<Vec<Read>>> = Arc::default();
    for r in 0..4 {
        let (b, stop, reads) = (b.clone(), stop.clone(), reads.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                let k = i % KEYS;
                i += 1;
                let asked = Instant::now();
                let (status, body, near) = get(&b, &format!("k{k}")).await;
                assert_eq!(status, 200, "{body}");
                reads
                    .lock()
                    .unwrap()
                    .push((k, body.parse().unwrap(), asked, near));
            }
        }));
    }
    // Sessions: created on A, validated on B in a loop, revoked on A; after the revocation's
    // acknowledgement plus the bound, B must refuse.
    let mut sessions_checked = 0;
    while start.elapsed() < Duration::from_secs(8) {
        let (token, _) = a.create_session(json!({"user_id": "bound"})).await;
        let url = b.url(&format!("/v1/sessions/{token}"));
        for _ in 0..5 {
            assert_eq!(b.http.get(&url).send().await.unwrap().status(), 200);
        }
        let r = a
            .http
            .delete(a.url(&format!("/v1/sessions/{token}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let acked = Instant::now();
        loop {
            let asked = Instant::now();
            let status = b.http.get(&url).send().await.unwrap().status();
            if status == 404 {
                break;
            }
            assert!(
                asked.duration_since(acked) < Duration::from_millis(BOUND_MS),
                "B accepted a session {:?} after its revocation was acknowledged",
                asked.duration_since(acked)
            );
        }
        sessions_checked += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let history = history.lock().unwrap();
    let reads = reads.lock().unwrap();
    let bound = Duration::from_millis(BOUND_MS);
    let mut from_memory = 0;
    for &(k, v, asked, near) in reads.iter() {
        from_memory += near as usize;
        let h = &history[k];
        let i = h
            .iter()
            .position(|(value, _)| *value == v)
            .unwrap_or_else(|| panic!("k{k}: B answered {v}, never written"));
        // v was current until the next write's commit, which came no later than that
        // write's acknowledgement: that must be no earlier than the bound before the read.
        if let Some((_, Some(replaced_by))) = h.get(i + 1) {
            assert!(
                *replaced_by + bound >= asked,
                "k{k}: B answered {v} to a read begun {:?} after it was replaced",
                asked.duration_since(*replaced_by)
            );
        }
    }
    assert!(
        reads.len() > 100 && from_memory > 0,
        "{} reads, {from_memory} from memory",
        reads.len()
    );
    assert!(sessions_checked > 0);
}

/// An entry is never served from memory past its expiry: every read begun after the write's
/// acknowledgement plus its TTL (its expiry came before, on the database clock) is a 404.
#[tokio::test]
async fn a_near_entry_is_never_served_past_its_ttl() {
    let b = near(Sidecar::builder()).start().await;
    // A longer TTL on each try, should a loaded machine be too slow to read one from memory
    // before it expires.
    for (attempt, ttl) in [2u64, 4, 8].into_iter().enumerate() {
        let key = format!("k{attempt}");
        let r = b.put_cache(&key, "1", &format!("?ttl_seconds={ttl}")).await;
        assert_eq!(r.status(), 204);
        let expired = Instant::now() + Duration::from_secs(ttl);
        let mut from_memory = false;
        loop {
            let asked = Instant::now();
            let (status, body, near) = get(&b, &key).await;
            if asked >= expired {
                assert_eq!(
                    (status, near),
                    (404, false),
                    "{key} answered {body:?} {:?} after its expiry",
                    asked - expired
                );
                if asked >= expired + Duration::from_millis(300) {
                    break;
                }
            } else if status == 200 {
                from_memory |= near;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if from_memory {
            return;
        }
    }
    panic!("no entry was ever served from memory before it expired");
}

/// The near cache holds at most `cache.near.max_bytes`, however much is read through it.
#[tokio::test]
async fn the_near_cache_stays_within_its_bytes() {
    const MAX: u64 = 1024 * 1024;
    let b = near(Sidecar::builder())
        .env("PGSIDECAR_CACHE__NEAR__MAX_BYTES", MAX)
        .start()
        .await;
    // 4 MB of values, each read a few times.
    let value = format!("\"{}\"", "x".repeat(20_000));
    for i in 0..200 {
        assert_eq!(
            b.put_cache(&format!("k{i}"), &value, "").await.status(),
            204
        );
    }
    until_near(&b, "k0").await;
    for _ in 0..3 {
        for i in 0..200 {
            let (status, body, _) = get(&b, &format!("k{i}")).await;
            assert_eq!((status, body.len()), (200, value.len()));
        }
    }
    // The gauge is set with each heartbeat (every 250 ms here).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let bytes = metric(
            &scrape(&b).await,
            "pgsidecar_near_cache_bytes",
            &[("cache", "cache")],
        )
        .unwrap_or(0.0);
        assert!(bytes <= MAX as f64, "{bytes} bytes held");
        if bytes > MAX as f64 / 4.0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the near cache holds only {bytes} bytes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
