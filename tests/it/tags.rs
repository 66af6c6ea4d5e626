//! Tag invalidation records: `_invalidate` answers and records times (on the database clock),
//! `_tags` reads them, `expire_seconds` lowers entries' expiry, and the tag-checked read
//! (`?check_tags=`) answers expired, stale or fresh in one round trip.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

async fn db_now_ms(s: &Sidecar) -> i64 {
    let mut sql = s.sql().await;
    sqlx::query_scalar("SELECT floor(date_part('epoch', clock_timestamp()) * 1000)::int8")
        .fetch_one(&mut sql)
        .await
        .unwrap()
}

async fn invalidate(s: &Sidecar, body: Value) -> Value {
    let r = s.post_json("/v1/cache/_invalidate", &body).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn tag_records(s: &Sidecar, query: &str) -> Value {
    let r = s
        .http
        .get(s.url(&format!("/v1/cache/_tags?tags={query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn checked(s: &Sidecar, key: &str, tags: &str) -> reqwest::Response {
    s.http
        .get(s.url(&format!("/v1/cache/{}?check_tags={tags}", enc(key))))
        .send()
        .await
        .unwrap()
}

fn is_stale(r: &reqwest::Response) -> bool {
    match r.headers().get("pgsidecar-stale") {
        None => false,
        Some(v) => {
            assert_eq!(v, "1");
            true
        }
    }
}

fn written_at(r: &reqwest::Response) -> i64 {
    r.headers()["pgsidecar-written-at"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_records_and_answers_times() {
    let s = Sidecar::start().await;
    s.put_cache("a", "1", "?tags=t1").await;
    s.put_cache("b", "1", "?tags=t2,t1").await;
    s.put_cache("c", "1", "?tags=t3").await;
    assert_eq!(
        tag_records(&s, "t1,never").await,
        json!({"tags": {"t1": null, "never": null}, "expires": {"t1": null, "never": null}})
    );
    let before = db_now_ms(&s).await;
    let v = invalidate(&s, json!({"tags": ["t1", "t1", "other"]})).await;
    let after = db_now_ms(&s).await;
    assert_eq!(v["deleted"], 2);
    let at = v["invalidated_at"].as_i64().unwrap();
    assert!(before <= at && at <= after, "{before} <= {at} <= {after}");
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    let r = tag_records(&s, "t1,other,t3,t1").await;
    assert_eq!(
        r,
        json!({"tags": {"t1": at, "other": at, "t3": null}, "expires": {"t1": at, "other": at, "t3": null}})
    );
    // With expire_seconds the entries stay; the record expires later.
    let v = invalidate(&s, json!({"tags": ["t3"], "expire_seconds": 600})).await;
    assert_eq!(v["deleted"], 0);
    let at3 = v["invalidated_at"].as_i64().unwrap();
    assert!(at3 >= at);
    assert_eq!(
        tag_records(&s, "t3").await,
        json!({"tags": {"t3": at3}, "expires": {"t3": at3 + 600_000}})
    );
    assert_eq!(s.get_cache("c").await.status(), 200);
    // Invalidated again: the record moves.
    tokio::time::sleep(Duration::from_millis(5)).await;
    // 600.0 is the integer JSON Schema (and openapi.json) says it is.
    let v = invalidate(&s, json!({"tags": ["t3"], "expire_seconds": 600.0})).await;
    assert_eq!(v["deleted"], 0);
    let at3 = v["invalidated_at"].as_i64().unwrap();
    assert_eq!(tag_records(&s, "t3").await["expires"]["t3"], at3 + 600_000);
    let v = invalidate(&s, json!({"tags": ["t1"], "expire_seconds": null})).await;
    let again = v["invalidated_at"].as_i64().unwrap();
    assert!(again > at);
    assert_eq!(tag_records(&s, "t1").await["tags"]["t1"], again);
    // A tag with reserved-looking, SQL-ish and unicode content is just a string.
    let odd = "it's;{x}\"😀";
    invalidate(&s, json!({"tags": [odd]})).await;
    assert!(tag_records(&s, &enc(odd)).await["tags"][odd].is_i64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tag_requests_are_400() {
    let s = Sidecar::start().await;
    let get = |q: String| {
        let s = &s;
        async move {
            s.http
                .get(s.url(&format!("/v1/cache/_tags{q}")))
                .send()
                .await
                .unwrap()
        }
    };
    assert_error(get(String::new()).await, 400, "invalid_tags").await;
    assert_error(get("?tags=".into()).await, 400, "invalid_tags").await;
    let many: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
    assert_error(
        get(format!("?tags={}", many.join(","))).await,
        400,
        "invalid_tags",
    )
    .await;
    assert_eq!(
        get(format!("?tags={}", many[..100].join(",")))
            .await
            .status(),
        200
    );
    assert_error(get("?tags=a,,b".into()).await, 400, "invalid_tag").await;
    assert_error(
        get(format!("?tags={}", "t".repeat(257))).await,
        400,
        "invalid_tag",
    )
    .await;
    assert_error(get("?tags=a%0Ab".into()).await, 400, "invalid_tag").await;
    assert_error(get("?tags=a&tags=b".into()).await, 400, "invalid_query").await;
    // The route is not a key: other methods are refused.
    let r = s
        .http
        .put(s.url("/v1/cache/_tags"))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_error(r, 405, "method_not_allowed").await;

    for bad in [
        json!(-1),
        json!(1.5),
        json!("3"),
        json!(31_536_001),
        json!(true),
    ] {
        let r = s
            .post_json(
                "/v1/cache/_invalidate",
                &json!({"tags": ["t"], "expire_seconds": bad}),
            )
            .await;
        assert_error(r, 400, "invalid_expire_seconds").await;
    }
    let r = s
        .post_json(
            "/v1/cache/_invalidate",
            &json!({"tags": ["t"], "expire": 1}),
        )
        .await;
    assert_error(r, 400, "invalid_json").await;
    let r = s
        .post_json(
            "/v1/cache/_invalidate",
            &json!({"tags": ["t"], "expire_seconds": 31_536_000}),
        )
        .await;
    assert_eq!(r.status(), 200);

    for q in ["check_tags=a,,b", "check_tags=a%00"] {
        let r = s
            .http
            .get(s.url(&format!("/v1/cache/k?{q}")))
            .send()
            .await
            .unwrap();
        assert_error(r, 400, "invalid_tag").await;
    }
    let many: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
    let r = checked(&s, "k", &many.join(",")).await;
    assert_error(r, 400, "invalid_tag").await;
    let r = s
        .http
        .get(s.url("/v1/cache/k?check_tags=a&check_tags=b"))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_query").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_checked_reads_answer_expired_stale_or_fresh() {
    let s = Sidecar::start().await;
    s.put_cache("page", "\"v1\"", "?tags=own").await;
    s.put_cache("other", "1", "").await;
    // Fresh: no record, no header; the plain read never carries one.
    for q in ["", "soft", "soft,own", "never"] {
        let r = checked(&s, "page", q).await;
        assert_eq!(r.status(), 200, "{q}");
        assert!(!is_stale(&r), "{q}");
    }
    let written = written_at(&s.get_cache("page").await);

    // A soft tag (checked by the reader, not stored on the entry) invalidated at once: the
    // entry counts as expired for readers that check it, and stays for the rest.
    let v = invalidate(&s, json!({"tags": ["soft"]})).await;
    assert_eq!(v["deleted"], 0, "soft tags are not stored on the entry");
    assert!(v["invalidated_at"].as_i64().unwrap() >= written);
    assert_error(checked(&s, "page", "soft").await, 404, "not_found").await;
    assert_error(checked(&s, "page", "x,soft").await, 404, "not_found").await;
    let r = checked(&s, "page", "").await;
    assert_eq!(r.status(), 200, "own tags only");
    assert!(!is_stale(&r));
    let r = s.get_cache("page").await;
    assert_eq!(r.status(), 200);
    assert!(!is_stale(&r));
    // Written again after the invalidation: fresh.
    s.put_cache("page", "\"v2\"", "?tags=own").await;
    let r = checked(&s, "page", "soft").await;
    assert_eq!(r.status(), 200);
    assert!(!is_stale(&r));
    assert_eq!(r.text().await.unwrap(), "\"v2\"");

    // Stale-while-revalidate on the entry's own tag: served with the header until the
    // record expires, then expired; a plain read never looks.
    let before = s.get_cache("page").await;
    let (old_tag, old_written) = (before.headers()["etag"].clone(), written_at(&before));
    invalidate(&s, json!({"tags": ["own"], "expire_seconds": 2})).await;
    let r = checked(&s, "page", "").await;
    assert_eq!(r.status(), 200);
    assert!(is_stale(&r));
    // The entry was not rewritten (same write time), but its expiry moved, so its tag changed.
    assert_eq!(written_at(&r), old_written);
    assert_ne!(r.headers()["etag"], old_tag);
    let expires = httpdate::parse_http_date(r.headers()["expires"].to_str().unwrap()).unwrap();
    assert!(
        expires <= std::time::SystemTime::now() + Duration::from_secs(30),
        "expiry lowered to about 2 s"
    );
    // 304 carries the stale mark as well.
    let tag = r.headers()["etag"].to_str().unwrap().to_string();
    let r = s
        .http
        .get(s.url("/v1/cache/page?check_tags="))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert!(is_stale(&r));
    // A soft-tagged entry, invalidated with expire_seconds: stale, then expired for checkers,
    // while plain readers keep it (its own expiry is untouched: it does not carry the tag).
    s.put_cache("soft-page", "1", "?ttl_seconds=600").await;
    invalidate(&s, json!({"tags": ["soft2"], "expire_seconds": 2})).await;
    let r = checked(&s, "soft-page", "soft2").await;
    assert_eq!(r.status(), 200);
    assert!(is_stale(&r));
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_error(checked(&s, "soft-page", "soft2").await, 404, "not_found").await;
    assert_eq!(s.get_cache("soft-page").await.status(), 200);
    // The own-tagged entry has expired on its own by now.
    assert_eq!(s.get_cache("page").await.status(), 404);
    // An entry whose expiry was already sooner keeps it; one tagged otherwise is untouched.
    s.put_cache("soon", "1", "?ttl_seconds=3&tags=t").await;
    s.put_cache("later", "1", "?ttl_seconds=600&tags=t").await;
    s.put_cache("untagged", "1", "?ttl_seconds=600").await;
    let soon_before = s.get_cache("soon").await.headers()["etag"].clone();
    let v = invalidate(&s, json!({"tags": ["t"], "expire_seconds": 100})).await;
    assert_eq!(v["deleted"], 0);
    assert_eq!(
        s.get_cache("soon").await.headers()["etag"],
        soon_before,
        "not rewritten"
    );
    let exp = |r: &reqwest::Response| {
        httpdate::parse_http_date(r.headers()["expires"].to_str().unwrap()).unwrap()
    };
    let later = exp(&s.get_cache("later").await);
    let untagged = exp(&s.get_cache("untagged").await);
    assert!(
        later < untagged - Duration::from_secs(300),
        "{later:?} {untagged:?}"
    );
    // Other entries are not affected by the records at all.
    let r = checked(&s, "other", "").await;
    assert_eq!(r.status(), 200);
    assert!(!is_stale(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_tag_checked_reads_batched_together_keep_their_answers() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_BATCH__MAX_IN_FLIGHT", "1")
        .env("PGSIDECAR_SERVER__WORKER_THREADS", "1")
        .start()
        .await;
    s.put_cache("k", "1", "").await;
    s.put_cache("j", "2", "?tags=own").await;
    invalidate(&s, json!({"tags": ["gone"]})).await;
    invalidate(&s, json!({"tags": ["stale", "own"], "expire_seconds": 600})).await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let http = s.http.clone();
        let (key, query, expect) = match i % 6 {
            0 => ("k", "", (200, false)),
            1 => ("k", "?check_tags=stale", (200, true)),
            2 => ("k", "?check_tags=gone", (404, false)),
            3 => ("k", "?check_tags=", (200, false)),
            4 => ("j", "?check_tags=", (200, true)),
            _ => ("j", "", (200, false)),
        };
        let url = s.url(&format!("/v1/cache/{key}{query}"));
        tasks.push(tokio::spawn(async move {
            let r = http.get(url).send().await.unwrap();
            let got = (
                r.status().as_u16(),
                r.headers().contains_key("pgsidecar-stale"),
            );
            assert_eq!(got, expect, "{key}{query}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_go_a_year_after_they_expired() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_CLEANUP__INTERVAL_SECONDS", "1")
        .start()
        .await;
    let mut sql = s.sql().await;
    sqlx::query(
        "INSERT INTO cache_tags (tag, invalidated_at, expires_at) VALUES \
         ('ancient', now() - interval '400 days', now() - interval '367 days'), \
         ('old', now() - interval '300 days', now() - interval '300 days')",
    )
    .execute(&mut sql)
    .await
    .unwrap();
    invalidate(&s, json!({"tags": ["new"]})).await;
    let mut left = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = sqlx::query_scalar::<_, String>("SELECT tag FROM cache_tags ORDER BY tag")
            .fetch_all(&mut sql)
            .await
            .unwrap();
        if left.len() == 2 {
            break;
        }
    }
    assert_eq!(left, ["new", "old"]);
    let r = tag_records(&s, "ancient,old").await;
    assert!(r["tags"]["ancient"].is_null());
    assert!(r["tags"]["old"].is_i64());
}
