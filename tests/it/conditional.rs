//! Strong ETags and conditional requests (RFC 9110): 304 on GET, 412 on PUT and DELETE, the
//! conditions kept by concurrent and batched writes.

use std::time::Duration;

use crate::helpers::*;

async fn put_if(s: &Sidecar, key: &str, body: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = s.http.put(s.url(&format!("/v1/cache/{}", enc(key))));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(body.to_string()).send().await.unwrap()
}

async fn delete_if(s: &Sidecar, key: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = s.http.delete(s.url(&format!("/v1/cache/{}", enc(key))));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn get_if(s: &Sidecar, key: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = s.http.get(s.url(&format!("/v1/cache/{}", enc(key))));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn etag_of(r: &reqwest::Response) -> String {
    r.headers()["etag"].to_str().unwrap().to_string()
}

async fn current_etag(s: &Sidecar, key: &str) -> String {
    let r = s.get_cache(key).await;
    assert_eq!(r.status(), 200, "{key}");
    etag_of(&r)
}

async fn body_of(s: &Sidecar, key: &str) -> String {
    s.get_cache(key).await.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etag_changes_on_every_write_by_anyone() {
    let s = Sidecar::start().await;
    let r = s.put_cache("k", "1", "").await;
    let mut seen = vec![etag_of(&r)];
    assert!(seen[0].starts_with('"') && seen[0].ends_with('"') && seen[0].len() > 2);
    assert!(!seen[0].starts_with("W/"), "strong");
    assert_eq!(current_etag(&s, "k").await, seen[0]);
    assert_eq!(
        current_etag(&s, "k").await,
        seen[0],
        "reads do not change it"
    );
    let fresh = |tag: String, seen: &mut Vec<String>, what: &str| {
        assert!(
            !seen.contains(&tag),
            "{what}: {tag} seen before in {seen:?}"
        );
        seen.push(tag);
    };
    // The same value again is a new version.
    let r = s.put_cache("k", "1", "").await;
    fresh(etag_of(&r), &mut seen, "same value");
    assert_eq!(current_etag(&s, "k").await, *seen.last().unwrap());
    let r = put_if(&s, "k", "raw", &[("content-type", "text/plain")]).await;
    fresh(etag_of(&r), &mut seen, "raw");
    // Writers that know nothing of ETags: an older sidecar's upsert, bare SQL setting only the
    // value, or only updated_at.
    let mut sql = s.sql().await;
    for stmt in [
        "INSERT INTO cache (key, value, tags, expires_at) VALUES ('k', '5', '{}', now() + interval '1 hour') \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, tags = EXCLUDED.tags, \
         expires_at = EXCLUDED.expires_at, updated_at = now()",
        "UPDATE cache SET value = '6', updated_at = now() WHERE key = 'k'",
        "UPDATE cache SET value = '7' WHERE key = 'k'",
        "UPDATE cache SET updated_at = updated_at WHERE key = 'k'",
    ] {
        sqlx::query(stmt).execute(&mut sql).await.unwrap();
        fresh(current_etag(&s, "k").await, &mut seen, stmt);
    }
    // The tag of a version written by SQL works in preconditions like any other.
    let tag = current_etag(&s, "k").await;
    assert_eq!(
        put_if(&s, "k", "8", &[("if-match", &tag)]).await.status(),
        204
    );
    // Deleted and written again: a new tag too.
    s.http.delete(s.url("/v1/cache/k")).send().await.unwrap();
    let r = s.put_cache("k", "1", "").await;
    fresh(etag_of(&r), &mut seen, "after delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_read_and_tags_compared_in_sql_agree() {
    // Reads format the tag from the row; conditional writes compute it in SQL. Write times with
    // every kind of microsecond part, then write conditionally on the tag each read gave.
    let s = Sidecar::start().await;
    let mut sql = s.sql().await;
    let times = [
        "2001-02-03 04:05:06.999999+00",
        "1999-12-31 23:59:59.000001+00",
        "1970-01-01 00:00:00+00",
        "1969-12-31 23:59:59.5+00",
        "2038-01-19 03:14:07.123456+00",
        "2026-11-29 12:00:00.000010+05:30",
    ];
    for (i, t) in times.iter().enumerate() {
        let key = format!("t{i}");
        s.put_cache(&key, "1", "").await;
        sqlx::query("UPDATE cache SET updated_at = $1::timestamptz WHERE key = $2")
            .bind(*t)
            .bind(&key)
            .execute(&mut sql)
            .await
            .unwrap();
        let tag = current_etag(&s, &key).await;
        assert_eq!(
            get_if(&s, &key, &[("if-none-match", &tag)]).await.status(),
            304,
            "{t}"
        );
        let r = put_if(&s, &key, "2", &[("if-match", &tag)]).await;
        assert_eq!(r.status(), 204, "{t}: {tag}");
    }
    for _ in 0..50 {
        let r = s.put_cache("now", "1", "").await;
        let tag = etag_of(&r);
        assert_eq!(current_etag(&s, "now").await, tag);
        assert_eq!(
            delete_if(&s, "now", &[("if-match", &tag)]).await.status(),
            204,
            "{tag}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_on_get_answers_304() {
    let s = Sidecar::start().await;
    s.put_cache("k", "{\"a\":1}", "?ttl_seconds=600").await;
    let tag = current_etag(&s, "k").await;
    let weak = format!("W/{tag}");
    let listed = format!("\"other\", {tag}");
    for matching in [tag.as_str(), weak.as_str(), listed.as_str(), "*"] {
        let r = get_if(&s, "k", &[("if-none-match", matching)]).await;
        assert_eq!(r.status(), 304, "{matching}");
        assert_eq!(etag_of(&r), tag);
        assert!(r.headers().contains_key("expires"));
        assert!(!r.headers().contains_key("content-type"));
        assert_eq!(r.bytes().await.unwrap().len(), 0);
    }
    // Several fields form one list.
    let r = s
        .http
        .get(s.url("/v1/cache/k"))
        .header("if-none-match", "\"x\"")
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    for other in ["\"x\"", "W/\"x\", \"y\""] {
        let r = get_if(&s, "k", &[("if-none-match", other)]).await;
        assert_eq!(r.status(), 200, "{other}");
        assert_eq!(r.text().await.unwrap(), "{\"a\":1}");
    }
    // An absent key is 404, whatever the condition.
    assert_error(
        get_if(&s, "gone", &[("if-none-match", "*")]).await,
        404,
        "not_found",
    )
    .await;
    for bad in ["x", "\"x", "*, \"x\"", "W/x", "\"a\" \"b\""] {
        assert_error(
            get_if(&s, "k", &[("if-none-match", bad)]).await,
            400,
            "invalid_precondition",
        )
        .await;
    }
    // A tag from before a write no longer matches.
    s.put_cache("k", "2", "").await;
    assert_eq!(
        get_if(&s, "k", &[("if-none-match", &tag)]).await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_puts() {
    let s = Sidecar::start().await;
    // If-None-Match: * creates only.
    let r = put_if(&s, "k", "1", &[("if-none-match", "*")]).await;
    assert_eq!(r.status(), 204);
    let v1 = etag_of(&r);
    assert_error(
        put_if(&s, "k", "2", &[("if-none-match", "*")]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_eq!(body_of(&s, "k").await, "1");
    // If-Match: the current tag writes; an old one, a weak one or an unknown one does not.
    let r = put_if(&s, "k", "3", &[("if-match", &v1)]).await;
    assert_eq!(r.status(), 204);
    let v3 = etag_of(&r);
    assert_ne!(v3, v1);
    let weak = format!("W/{v3}");
    for stale in [v1.as_str(), weak.as_str(), "\"nope\""] {
        assert_error(
            put_if(&s, "k", "4", &[("if-match", stale)]).await,
            412,
            "precondition_failed",
        )
        .await;
    }
    assert_eq!(body_of(&s, "k").await, "3");
    assert_eq!(
        current_etag(&s, "k").await,
        v3,
        "a failed write changes nothing"
    );
    let listed = format!("\"a\", {v3}");
    let r = put_if(&s, "k", "5", &[("if-match", &listed)]).await;
    assert_eq!(r.status(), 204);
    let v5 = etag_of(&r);
    // If-Match: * needs a live entry; it never creates one.
    assert_eq!(
        put_if(&s, "k", "6", &[("if-match", "*")]).await.status(),
        204
    );
    assert_error(
        put_if(&s, "absent", "1", &[("if-match", "*")]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_error(
        put_if(&s, "absent", "1", &[("if-match", &v5)]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_eq!(s.get_cache("absent").await.status(), 404);
    // If-None-Match with tags: only when the entry's tag is none of them; absent passes.
    let v6 = current_etag(&s, "k").await;
    assert_error(
        put_if(&s, "k", "7", &[("if-none-match", &format!("W/{v6}"))]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_eq!(
        put_if(&s, "k", "7", &[("if-none-match", &v5)])
            .await
            .status(),
        204
    );
    assert_eq!(
        put_if(&s, "new", "1", &[("if-none-match", "\"x\"")])
            .await
            .status(),
        204
    );
    // Both: If-Match and If-None-Match must hold.
    let v7 = current_etag(&s, "k").await;
    assert_error(
        put_if(&s, "k", "8", &[("if-match", &v7), ("if-none-match", &v7)]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_error(
        put_if(&s, "k", "8", &[("if-match", &v7), ("if-none-match", "*")]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_eq!(
        put_if(
            &s,
            "k",
            "8",
            &[("if-match", &v7), ("if-none-match", "\"x\"")]
        )
        .await
        .status(),
        204
    );
    // An expired entry counts as absent: If-None-Match: * writes over it, If-Match fails.
    s.put_cache("short", "1", "?ttl_seconds=1").await;
    let old = current_etag(&s, "short").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_error(
        put_if(&s, "short", "2", &[("if-match", &old)]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_eq!(
        put_if(&s, "short", "2", &[("if-none-match", "*")])
            .await
            .status(),
        204
    );
    assert_eq!(body_of(&s, "short").await, "2");
    // Conditions work for raw values as well.
    let r = put_if(
        &s,
        "b",
        "x",
        &[("content-type", "text/plain"), ("if-none-match", "*")],
    )
    .await;
    assert_eq!(r.status(), 204);
    let vb = etag_of(&r);
    assert_eq!(
        put_if(
            &s,
            "b",
            "y",
            &[("content-type", "text/plain"), ("if-match", &vb)]
        )
        .await
        .status(),
        204
    );
    assert_eq!(body_of(&s, "b").await, "y");
    // Malformed conditions are 400, before anything is written.
    for (h, bad) in [
        ("if-match", "x"),
        ("if-none-match", "\"x"),
        ("if-match", "*, \"a\""),
        ("if-match", ""),
    ] {
        assert_error(
            put_if(&s, "k", "9", &[(h, bad)]).await,
            400,
            "invalid_precondition",
        )
        .await;
    }
    assert_eq!(body_of(&s, "k").await, "8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_deletes() {
    let s = Sidecar::start().await;
    s.put_cache("k", "1", "").await;
    let v1 = current_etag(&s, "k").await;
    s.put_cache("k", "2", "").await;
    let v2 = current_etag(&s, "k").await;
    assert_error(
        delete_if(&s, "k", &[("if-match", &v1)]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_error(
        delete_if(&s, "k", &[("if-none-match", "*")]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_error(
        delete_if(&s, "k", &[("if-none-match", &v2)]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_eq!(body_of(&s, "k").await, "2");
    assert_eq!(delete_if(&s, "k", &[("if-match", &v2)]).await.status(), 204);
    assert_eq!(s.get_cache("k").await.status(), 404);
    // Absent: If-Match fails (there is nothing it could match), If-None-Match holds.
    assert_error(
        delete_if(&s, "k", &[("if-match", "*")]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_error(
        delete_if(&s, "k", &[("if-match", &v2)]).await,
        412,
        "precondition_failed",
    )
    .await;
    assert_eq!(
        delete_if(&s, "k", &[("if-none-match", "*")]).await.status(),
        204
    );
    assert_eq!(delete_if(&s, "k", &[]).await.status(), 204);
    // If-Match: * deletes any live entry; If-None-Match with another tag deletes too.
    s.put_cache("a", "1", "").await;
    assert_eq!(delete_if(&s, "a", &[("if-match", "*")]).await.status(), 204);
    assert_eq!(s.get_cache("a").await.status(), 404);
    s.put_cache("b", "1", "").await;
    assert_eq!(
        delete_if(&s, "b", &[("if-none-match", &v1)]).await.status(),
        204
    );
    assert_eq!(s.get_cache("b").await.status(), 404);
    assert_error(
        delete_if(&s, "b", &[("if-match", "nope")]).await,
        400,
        "invalid_precondition",
    )
    .await;
}

/// Sum of a histogram's count and of its `le="1"` bucket, for cache writes.
async fn write_batches(s: &Sidecar) -> (f64, f64) {
    let text = s
        .http
        .get(s.ops_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map_or(0.0, |l| {
                l.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
            })
    };
    (
        value("pgsidecar_db_batch_size_count{operation=\"cache_put\"}"),
        value("pgsidecar_db_batch_size_bucket{operation=\"cache_put\",le=\"1\"}"),
    )
}

/// A sidecar with one data thread and one write batch in flight at a time, so that writes
/// sent while [`hold`] holds its first batch queue up and reach the database together.
async fn batching_sidecar() -> Sidecar {
    Sidecar::builder()
        .env("PGSIDECAR_BATCH__MAX_IN_FLIGHT", "1")
        .env("PGSIDECAR_SERVER__WORKER_THREADS", "1")
        // The held batch waits on a lock for as long as the test needs.
        .env("PGSIDECAR_DATABASE__STATEMENT_TIMEOUT_MS", "15000")
        .env("PGSIDECAR_SERVER__REQUEST_TIMEOUT_MS", "30000")
        .start()
        .await
}

/// A write batch stuck on a row lock until [`Held::release`].
struct Held {
    lock: sqlx::PgConnection,
    blocker: tokio::task::JoinHandle<u16>,
}

async fn hold(s: &Sidecar) -> Held {
    s.put_cache("blocker", "0", "").await;
    let mut lock = s
        .hold_lock("SELECT 1 FROM pgsidecar.cache WHERE key = 'blocker' FOR UPDATE")
        .await;
    let http = s.http.clone();
    let url = s.url("/v1/cache/blocker");
    let blocker = tokio::spawn(async move {
        http.put(url)
            .body("1")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    wait_for_lock_wait(&mut lock).await;
    Held { lock, blocker }
}

impl Held {
    async fn release(mut self) {
        // Let the requests sent meanwhile reach the queue (however many do, the answers
        // checked afterwards must hold).
        tokio::time::sleep(Duration::from_millis(500)).await;
        sqlx::Executor::execute(&mut self.lock, "ROLLBACK")
            .await
            .unwrap();
        assert_eq!(self.blocker.await.unwrap(), 204);
    }
}

/// Sends a PUT in the background; answers (status, ETag).
fn spawn_put(
    s: &Sidecar,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> tokio::task::JoinHandle<(u16, Option<String>)> {
    let mut req = s.http.put(s.url(&format!("/v1/cache/{}", enc(key))));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body.to_string());
    tokio::spawn(async move {
        let r = req.send().await.unwrap();
        let etag = r
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), etag)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_key_have_exactly_one_winner() {
    let s = batching_sidecar().await;
    let held = hold(&s).await;
    let (count_before, ones_before) = write_batches(&s).await;
    let tasks: Vec<_> = (0..40)
        .map(|i| spawn_put(&s, "race", &i.to_string(), &[("if-none-match", "*")]))
        .collect();
    held.release().await;
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            (204, Some(_)) => winners.push(i),
            (412, None) => {}
            other => panic!("PUT {i}: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(body_of(&s, "race").await, winners[0].to_string());
    let (count, ones) = write_batches(&s).await;
    assert!(
        count - count_before > ones - ones_before,
        "a batch of more than one write formed ({count_before}/{ones_before} -> {count}/{ones})"
    );

    // Without holding anything: many clients at once over ten keys, two sidecars on one
    // database. One winner per key.
    let b = Sidecar::builder().db(&s.db).start().await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let side = if i % 2 == 0 { &s } else { &b };
            spawn_put(
                side,
                &format!("free{}", i % 10),
                "1",
                &[("if-none-match", "*")],
            )
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            (204, _) => wins += 1,
            (412, _) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(wins, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_inside_one_batch() {
    let s = batching_sidecar().await;
    for k in ["match", "stale", "dups", "once"] {
        s.put_cache(k, "0", "").await;
    }
    let m0 = current_etag(&s, "match").await;
    let s0 = current_etag(&s, "stale").await;
    s.put_cache("stale", "1", "").await;
    let o0 = current_etag(&s, "once").await;
    let (count_before, ones_before) = write_batches(&s).await;

    let held = hold(&s).await;
    let matching = spawn_put(&s, "match", "11", &[("if-match", &m0)]);
    let stale = spawn_put(&s, "stale", "12", &[("if-match", &s0)]);
    let absent = spawn_put(&s, "absent", "13", &[("if-match", "*")]);
    let create = spawn_put(&s, "create", "14", &[("if-none-match", "*")]);
    let raw = spawn_put(
        &s,
        "raw",
        "r",
        &[("content-type", "application/octet-stream")],
    );
    let dups: Vec<_> = (0..5)
        .map(|i| spawn_put(&s, "dups", &format!("{i}"), &[]))
        .collect();
    let once: Vec<_> = (0..5)
        .map(|i| spawn_put(&s, "once", &format!("{i}"), &[("if-match", &o0)]))
        .collect();
    held.release().await;

    assert_eq!(matching.await.unwrap().0, 204);
    assert_eq!(body_of(&s, "match").await, "11");
    assert_eq!(stale.await.unwrap(), (412, None));
    assert_eq!(body_of(&s, "stale").await, "1");
    assert_eq!(absent.await.unwrap(), (412, None));
    assert_eq!(s.get_cache("absent").await.status(), 404);
    assert_eq!(create.await.unwrap().0, 204);
    assert_eq!(body_of(&s, "create").await, "14");
    assert_eq!(raw.await.unwrap().0, 204);
    assert_eq!(
        s.get_cache("raw").await.headers()["content-type"],
        "application/octet-stream"
    );
    // Unconditional writes of one key: all succeed, each with its own tag; the one left is the
    // current version, the tags of the others match nothing.
    let mut tags = Vec::new();
    for t in dups {
        let (status, tag) = t.await.unwrap();
        assert_eq!(status, 204);
        tags.push(tag.unwrap());
    }
    let mut distinct = tags.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 5, "{tags:?}");
    let current = current_etag(&s, "dups").await;
    assert!(tags.contains(&current), "{current} in {tags:?}");
    for t in tags.iter().filter(|t| **t != current) {
        assert_eq!(
            get_if(&s, "dups", &[("if-none-match", t)]).await.status(),
            200
        );
        assert_error(
            put_if(&s, "dups", "9", &[("if-match", t)]).await,
            412,
            "precondition_failed",
        )
        .await;
    }
    // Five writes over the same version: exactly one wins.
    let mut wins = 0;
    for t in once {
        match t.await.unwrap() {
            (204, Some(_)) => wins += 1,
            (412, None) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(wins, 1);
    let (count, ones) = write_batches(&s).await;
    assert!(
        count - count_before > ones - ones_before,
        "a batch of more than one write formed ({count_before}/{ones_before} -> {count}/{ones})"
    );
}
