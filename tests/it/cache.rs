//! Cache API: every route, exact JSON round trips, keys, TTL, mget, prefix and tag
//! invalidation, two sidecars on one database, and fleet-wide cleanup.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete() {
    let s = Sidecar::start().await;
    assert_error(s.get_cache("k").await, 404, "not_found").await;
    assert_eq!(
        s.put_cache("k", r#"{"a":1}"#, "?ttl_seconds=120")
            .await
            .status(),
        204
    );
    let r = s.get_cache("k").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let expires = httpdate::parse_http_date(r.headers()["expires"].to_str().unwrap()).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        left > Duration::from_secs(100) && left <= Duration::from_secs(121),
        "{left:?}"
    );
    assert_eq!(r.text().await.unwrap(), r#"{"a":1}"#);
    // Replace.
    assert_eq!(s.put_cache("k", "[2]", "").await.status(), 204);
    assert_eq!(s.get_cache("k").await.text().await.unwrap(), "[2]");
    assert_eq!(
        s.http
            .delete(s.url("/v1/cache/k"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(s.get_cache("k").await.status(), 404);
    assert_eq!(
        s.http
            .delete(s.url("/v1/cache/k"))
            .send()
            .await
            .unwrap()
            .status(),
        204,
        "absent is fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_type_round_trips_exactly() {
    let s = Sidecar::start().await;
    let values = [
        "null",
        "true",
        "false",
        "0",
        "-12.5e-3",
        "123456789012345678901234567890",
        "1e400",
        "0.1000",
        r#""""#,
        r#""a \"quoted\" \\ string\n\u0000 \ud83d\ude00""#,
        r#""ünïcödé 😀 名前""#,
        "[]",
        "{}",
        r#"[1,"two",{"three":[3,{"four":null}]},true]"#,
        r#"{"z":1,"a":2,"z2":{"nested":{"deeper":[1,2,3]}}}"#,
    ];
    for (i, v) in values.iter().enumerate() {
        let key = format!("v{i}");
        assert_eq!(s.put_cache(&key, v, "").await.status(), 204, "{v}");
        assert_eq!(
            s.get_cache(&key).await.text().await.unwrap(),
            *v,
            "GET of {v}"
        );
    }
    // Surrounding whitespace is not part of the value.
    assert_eq!(
        s.put_cache("ws", "  \n {\"a\": 1}\n ", "").await.status(),
        204
    );
    assert_eq!(s.get_cache("ws").await.text().await.unwrap(), "{\"a\": 1}");
    // mget returns the same values.
    // mget returns the same values (those serde_json can hold as a Value here; the rest below).
    let keys: Vec<String> = (0..values.len())
        .filter(|i| ![5, 6].contains(i))
        .map(|i| format!("v{i}"))
        .collect();
    let r: Value = s
        .post_json("/v1/cache/_mget", &json!({"keys": keys}))
        .await
        .json()
        .await
        .unwrap();
    for (i, v) in values
        .iter()
        .enumerate()
        .filter(|(i, _)| ![5, 6].contains(i))
    {
        let expected: Value = serde_json::from_str(v).unwrap();
        assert_eq!(r["hits"][format!("v{i}")], expected, "{v}");
    }
    let raw = s
        .post_json("/v1/cache/_mget", &json!({"keys": ["v6", "v5"]}))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        raw,
        r#"{"hits":{"v6":1e400,"v5":123456789012345678901234567890},"raw":{},"misses":[]}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_special_characters() {
    let s = Sidecar::start().await;
    let long = "k".repeat(512);
    let long_multibyte = "é".repeat(256);
    let keys = [
        "user/42",
        "with space",
        "100%",
        "a_b%c",
        "😀",
        "a?b#c",
        "ключ",
        "a..b",
        "x\"y'z",
        long.as_str(),
        long_multibyte.as_str(),
    ];
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            s.put_cache(k, &i.to_string(), "").await.status(),
            204,
            "{k}"
        );
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            s.get_cache(k).await.text().await.unwrap(),
            i.to_string(),
            "{k}"
        );
    }
    // user%2F42 is the key user/42.
    assert_eq!(
        s.http
            .get(s.url("/v1/cache/user%2F42"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "0"
    );
    let mut sql = s.sql().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM cache WHERE key = 'user/42'")
        .fetch_one(&mut sql)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_inputs() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_CACHE__MAX_VALUE_BYTES", "1000")
        .start()
        .await;
    let too_long = "k".repeat(513);
    let too_long_multibyte = "é".repeat(257);
    for bad in [
        too_long.as_str(),
        too_long_multibyte.as_str(),
        "_reserved",
        "a\nb",
        "tab\there",
        "nul\u{0}",
        "\u{7f}",
    ] {
        assert_error(s.put_cache(bad, "1", "").await, 400, "invalid_key").await;
        assert_error(s.get_cache(bad).await, 400, "invalid_key").await;
        assert_error(
            s.http
                .delete(s.url(&format!("/v1/cache/{}", enc(bad))))
                .send()
                .await
                .unwrap(),
            400,
            "invalid_key",
        )
        .await;
    }
    assert_error(
        s.http.get(s.url("/v1/cache/%FF%FE")).send().await.unwrap(),
        400,
        "invalid_key",
    )
    .await;
    for body in [
        "",
        "{",
        "nope",
        "[1,]",
        "{\"a\":1} {\"b\":2}",
        "'single'",
        "NaN",
        "{\"a\":1,}",
    ] {
        assert_error(s.put_cache("k", body, "").await, 400, "invalid_json").await;
    }
    assert_error(
        s.put_cache("k", &format!("\"{}\"", "x".repeat(1000)), "")
            .await,
        413,
        "payload_too_large",
    )
    .await;
    for q in [
        "?ttl_seconds=0",
        "?ttl_seconds=-1",
        "?ttl_seconds=31536001",
        "?ttl_seconds=abc",
        "?ttl_seconds=1.5",
        "?ttl_seconds=",
    ] {
        assert_error(s.put_cache("k", "1", q).await, 400, "invalid_ttl").await;
    }
    let many_tags: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
    let long_tag = "t".repeat(257);
    for q in [
        "?tags=a,,b".to_string(),
        format!("?tags={}", many_tags.join(",")),
        format!("?tags={long_tag}"),
        "?tags=a%0Ab".to_string(),
    ] {
        assert_error(s.put_cache("k", "1", &q).await, 400, "invalid_tag").await;
    }
    // mget
    assert_error(
        s.post_json("/v1/cache/_mget", &json!({"keys": []})).await,
        400,
        "invalid_keys",
    )
    .await;
    let keys: Vec<String> = (0..1001).map(|i| format!("k{i}")).collect();
    assert_error(
        s.post_json("/v1/cache/_mget", &json!({"keys": keys})).await,
        400,
        "invalid_keys",
    )
    .await;
    assert_error(
        s.post_json("/v1/cache/_mget", &json!({"keys": ["ok", "_bad"]}))
            .await,
        400,
        "invalid_key",
    )
    .await;
    assert_error(
        s.post_json("/v1/cache/_mget", &json!({"keys": "k"})).await,
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        s.post_json("/v1/cache/_mget", &json!({"keys": [1]})).await,
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        s.post_json("/v1/cache/_mget", &json!({})).await,
        400,
        "invalid_json",
    )
    .await;
    // prefix
    assert_error(
        s.http.delete(s.url("/v1/cache")).send().await.unwrap(),
        400,
        "invalid_prefix",
    )
    .await;
    assert_error(
        s.http
            .delete(s.url("/v1/cache?prefix="))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_prefix",
    )
    .await;
    // invalidate
    assert_error(
        s.post_json("/v1/cache/_invalidate", &json!({"tags": []}))
            .await,
        400,
        "invalid_tags",
    )
    .await;
    let tags: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
    assert_error(
        s.post_json("/v1/cache/_invalidate", &json!({"tags": tags}))
            .await,
        400,
        "invalid_tags",
    )
    .await;
    assert_error(
        s.post_json("/v1/cache/_invalidate", &json!({"tags": ["a,b"]}))
            .await,
        400,
        "invalid_tag",
    )
    .await;
    assert_error(
        s.post_json("/v1/cache/_invalidate", &json!({"tags": [""]}))
            .await,
        400,
        "invalid_tag",
    )
    .await;
    // Nothing was written by any of the above.
    let mut sql = s.sql().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM cache")
        .fetch_one(&mut sql)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ttl_expires() {
    let s = Sidecar::start().await;
    // 2 s, not 1: the read right after the write must land inside the TTL on a loaded machine.
    assert_eq!(
        s.put_cache("short", "1", "?ttl_seconds=2").await.status(),
        204
    );
    assert_eq!(s.get_cache("short").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(s.get_cache("short").await.status(), 404);
    let r: Value = s
        .post_json("/v1/cache/_mget", &json!({"keys": ["short"]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r, json!({"hits": {}, "raw": {}, "misses": ["short"]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_with_duplicates_and_misses() {
    let s = Sidecar::start().await;
    s.put_cache("a", "1", "").await;
    s.put_cache("b", r#"{"x":"y"}"#, "").await;
    let r = s
        .post_json(
            "/v1/cache/_mget",
            &json!({"keys": ["a", "missing", "b", "a", "missing", "c/d"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"hits": {"a": 1, "b": {"x": "y"}}, "raw": {}, "misses": ["missing", "c/d"]})
    );
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    let v: Value = s
        .post_json("/v1/cache/_mget", &json!({"keys": keys}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["misses"].as_array().unwrap().len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_deletion_is_literal() {
    let s = Sidecar::start().await;
    for k in [
        "user:1",
        "user:2",
        "user:10",
        "users",
        "user;",
        "a%b1",
        "a%b2",
        "axb",
        "a_c1",
        "abc",
        "x\\y1",
        "x\\z",
        "é1",
        "é",
        "ê",
        "e\u{10FFFF}",
        "e\u{10FFFF}x",
        "f",
        "\u{D7FF}a",
        "\u{E000}",
        "\u{10FFFF}",
        "\u{10FFFF}\u{10FFFF}",
    ] {
        assert_eq!(s.put_cache(k, "1", "").await.status(), 204, "{k:?}");
    }
    let del = |p: &str| {
        s.http
            .delete(s.url(&format!("/v1/cache?prefix={}", enc(p))))
            .send()
    };
    assert_eq!(
        del("user:").await.unwrap().json::<Value>().await.unwrap(),
        json!({"deleted": 3})
    );
    assert_eq!(s.get_cache("users").await.status(), 200);
    assert_eq!(
        del("a%").await.unwrap().json::<Value>().await.unwrap(),
        json!({"deleted": 2}),
        "% is literal"
    );
    assert_eq!(s.get_cache("axb").await.status(), 200);
    assert_eq!(
        del("a_").await.unwrap().json::<Value>().await.unwrap(),
        json!({"deleted": 1}),
        "_ is literal"
    );
    assert_eq!(s.get_cache("abc").await.status(), 200);
    assert_eq!(
        del("x\\y").await.unwrap().json::<Value>().await.unwrap(),
        json!({"deleted": 1}),
        "backslash is literal"
    );
    assert_eq!(s.get_cache("x\\z").await.status(), 200);
    assert_eq!(
        del("nothing").await.unwrap().json::<Value>().await.unwrap(),
        json!({"deleted": 0})
    );
    // Beyond ASCII: the prefix is a byte range, whose end steps over the last character.
    for (prefix, deleted, kept) in [
        ("é", 2, "ê"),
        ("e\u{10FFFF}", 2, "f"),
        ("\u{D7FF}", 1, "\u{E000}"),
        ("\u{10FFFF}", 2, "f"), // no end: every key from the prefix up starts with it
    ] {
        assert_eq!(
            del(prefix).await.unwrap().json::<Value>().await.unwrap(),
            json!({ "deleted": deleted }),
            "{prefix:?}"
        );
        assert_eq!(s.get_cache(kept).await.status(), 200, "{kept:?}");
    }
    assert_eq!(s.get_cache("user;").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_invalidation() {
    let s = Sidecar::start().await;
    s.put_cache("page:42", "1", "?tags=product:42,catalog")
        .await;
    s.put_cache("page:43", "1", "?tags=product:43,catalog")
        .await;
    s.put_cache("page:home", "1", "?tags=home").await;
    s.put_cache("untagged", "1", "").await;
    let inv = |tags: Value| {
        let body = json!({"tags": tags});
        let s = &s;
        async move { s.post_json("/v1/cache/_invalidate", &body).await }
    };
    assert_eq!(
        inv(json!(["product:42"]))
            .await
            .json::<Value>()
            .await
            .unwrap()["deleted"],
        json!(1)
    );
    assert_eq!(s.get_cache("page:42").await.status(), 404);
    assert_eq!(s.get_cache("page:43").await.status(), 200);
    assert_eq!(
        inv(json!(["catalog", "home"]))
            .await
            .json::<Value>()
            .await
            .unwrap()["deleted"],
        json!(2)
    );
    assert_eq!(s.get_cache("page:home").await.status(), 404);
    assert_eq!(s.get_cache("untagged").await.status(), 200);

    // A PUT replaces the entry's tags: the old ones no longer reach it.
    s.put_cache("p", "1", "?tags=old,shared").await;
    s.put_cache("p", "2", "?tags=new").await;
    assert_eq!(
        inv(json!(["old", "shared"]))
            .await
            .json::<Value>()
            .await
            .unwrap()["deleted"],
        json!(0)
    );
    assert_eq!(s.get_cache("p").await.text().await.unwrap(), "2");
    s.put_cache("p", "3", "").await;
    assert_eq!(
        inv(json!(["new"])).await.json::<Value>().await.unwrap()["deleted"],
        json!(0),
        "tags cleared"
    );
    // Tags with SQL-ish and unicode content are plain strings.
    s.put_cache("q", "1", &format!("?tags={}", enc("it's;{x}\"😀")))
        .await;
    assert_eq!(
        inv(json!(["it's;{x}\"😀"]))
            .await
            .json::<Value>()
            .await
            .unwrap()["deleted"],
        json!(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_invalidation_uses_the_index() {
    // The health monitor checks rarely here, so the connection that ran the invalidation
    // keeps it as its last statement in pg_stat_activity.
    let s = Sidecar::builder()
        .env("PGSIDECAR_HEALTH__POSTGRES_INTERVAL_MS", "600000")
        .start()
        .await;
    let mut sql = s.sql().await;
    sqlx::query(
        "INSERT INTO cache (key, value, tags, expires_at) \
         SELECT 'k' || g, '1', ARRAY['t' || (g % 1000)], now() + interval '1 hour' FROM generate_series(1, 50000) g",
    )
    .execute(&mut sql)
    .await
    .unwrap();
    sqlx::query("ANALYZE cache")
        .execute(&mut sql)
        .await
        .unwrap();
    assert_eq!(
        s.post_json("/v1/cache/_invalidate", &json!({"tags": ["t7"]}))
            .await
            .json::<Value>()
            .await
            .unwrap()["deleted"],
        json!(50)
    );
    // The sidecar's own statement, as its connection sent it.
    let statement: String = sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'pgsidecar' AND query LIKE '%DELETE FROM%tags &&%'",
    )
    .fetch_one(&mut sql)
    .await
    .unwrap();
    // Planned as the sidecar plans it: every sidecar connection starts with
    // plan_cache_mode = force_generic_plan (store/pool.rs), so a prepared statement's plan
    // is made once, without its parameters' values.
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut sql)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PREPARE invalidate AS {statement}"
    )))
    .execute(&mut sql)
    .await
    .unwrap();
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN EXECUTE invalidate(ARRAY['t8']::text[], false)")
            .fetch_all(&mut sql)
            .await
            .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("$1"),
        "the generic plan, parameters not folded in:\n{plan}"
    );
    assert!(
        plan.contains("cache_tags_idx"),
        "tag invalidation must use the GIN index under a generic plan:\n{plan}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_see_each_others_writes_at_once() {
    let a = Sidecar::start().await;
    let b = Sidecar::builder().db(&a.db).start().await;
    for i in 0..20 {
        let v = format!("{{\"i\":{i}}}");
        assert_eq!(a.put_cache("shared", &v, "").await.status(), 204);
        assert_eq!(b.get_cache("shared").await.text().await.unwrap(), v);
        let (token, _) = b.create_session(json!({"user_id": format!("u{i}")})).await;
        assert_eq!(
            a.http
                .get(a.url(&format!("/v1/sessions/{token}")))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            a.http
                .delete(a.url(&format!("/v1/sessions/{token}")))
                .send()
                .await
                .unwrap()
                .status(),
            204
        );
        assert_eq!(
            b.http
                .get(b.url(&format!("/v1/sessions/{token}")))
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
    }
    assert_eq!(
        b.http
            .delete(b.url("/v1/cache/shared"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(a.get_cache("shared").await.status(), 404);
}

/// A store on `db` built the way the binary builds it, for calling one cleanup pass directly.
async fn store_on(db: &str, batch: u32) -> pgsidecar::store::Store {
    let settings = pgsidecar::config::Settings::load_from(
        None,
        &[
            ("DATABASE_URL".to_string(), db.to_string()),
            (
                "PGSIDECAR_CLEANUP__BATCH_SIZE".to_string(),
                batch.to_string(),
            ),
        ],
    )
    .unwrap();
    let store = pgsidecar::store::Store::new(&settings).unwrap();
    store.migrate("pgsidecar").await.unwrap();
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cleanup_runs_one_pass_at_a_time() {
    let db = fresh_db().await;
    let a = store_on(&db, 500).await;
    let b = store_on(&db, 500).await;
    let mut sql = <sqlx::PgConnection as sqlx::Connection>::connect(&db)
        .await
        .unwrap();
    sqlx::Executor::execute(&mut sql, "SET search_path = pgsidecar")
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO cache (key, value, expires_at) \
         SELECT 'old' || g, '1', now() - interval '1 minute' FROM generate_series(1, 20000) g \
         UNION ALL SELECT 'live' || g, '1', now() + interval '1 hour' FROM generate_series(1, 1000) g",
    )
    .execute(&mut sql)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sessions (id, token_hash, user_id, expires_at, ttl_seconds) \
         SELECT gen_random_uuid(), sha256(('t' || g)::bytea), 'u', \
                CASE WHEN g <= 3000 THEN now() - interval '1 second' ELSE now() + interval '1 hour' END, 3600 \
         FROM generate_series(1, 3500) g",
    )
    .execute(&mut sql)
    .await
    .unwrap();

    let life = pgsidecar::shutdown::Lifecycle::new();
    let (ra, rb) = tokio::join!(
        a.cleanup_pass("sidecar-a", &life),
        b.cleanup_pass("sidecar-b", &life)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(
        ra.is_some() != rb.is_some(),
        "exactly one pass ran: {ra:?} {rb:?}"
    );
    let report = ra.or(rb).unwrap();
    assert_eq!(report.cache_deleted, 20000);
    assert_eq!(report.sessions_deleted, 3000);
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM cache")
        .fetch_one(&mut sql)
        .await
        .unwrap();
    assert_eq!(live, 1000, "nothing unexpired deleted");
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(&mut sql)
        .await
        .unwrap();
    assert_eq!(live, 500);
    // The lease was released: the other sidecar can run the next pass at once.
    let next = b.cleanup_pass("sidecar-b", &life).await.unwrap();
    assert_eq!(next, Some(pgsidecar::store::cleanup::PassReport::default()));
    // A lease held by a live holder blocks others until it expires.
    sqlx::query("UPDATE leases SET holder = 'someone', expires_at = now() + interval '1 hour'")
        .execute(&mut sql)
        .await
        .unwrap();
    assert_eq!(a.cleanup_pass("sidecar-a", &life).await.unwrap(), None);
    sqlx::query("UPDATE leases SET expires_at = now() - interval '1 second'")
        .execute(&mut sql)
        .await
        .unwrap();
    assert!(
        a.cleanup_pass("sidecar-a", &life).await.unwrap().is_some(),
        "an expired lease is taken over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_cleanup_runs_in_the_sidecar() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_CLEANUP__INTERVAL_SECONDS", "1")
        .start()
        .await;
    s.put_cache("gone", "1", "?ttl_seconds=1").await;
    s.put_cache("kept", "1", "").await;
    let mut sql = s.sql().await;
    let mut remaining = 1;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        remaining = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM cache WHERE key = 'gone'")
            .fetch_one(&mut sql)
            .await
            .unwrap();
        if remaining == 0 {
            break;
        }
    }
    assert_eq!(remaining, 0, "expired row deleted by the background task");
    assert_eq!(s.get_cache("kept").await.status(), 200);
    let metrics = scrape(&s).await;
    assert_eq!(
        metric(
            &metrics,
            "pgsidecar_expired_rows_deleted_total",
            &[("table", "cache")]
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// Statements name their tables in the configured schema themselves (no statement relies on a
/// connection's search_path, which a transaction-mode pooler does not carry), so a schema named
/// with a reserved word works for every route, and nothing lands in the default schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_schema_holds_every_table() {
    let sc = Sidecar::builder()
        .env("PGSIDECAR_DATABASE__SCHEMA", "user")
        .start()
        .await;
    assert_eq!(sc.put_cache("a:1", "1", "?tags=t").await.status(), 204);
    assert_eq!(sc.put_cache("a:2", "2", "").await.status(), 204);
    assert_eq!(sc.put_cache("b:1", "3", "").await.status(), 204);
    assert_eq!(sc.get_cache("a:1").await.text().await.unwrap(), "1");
    let r = sc
        .post_json("/v1/cache/_mget", &json!({"keys": ["a:1", "b:1", "c"]}))
        .await;
    assert_eq!(r.status(), 200);
    let r = sc
        .post_json("/v1/cache/_invalidate", &json!({"tags": ["t"]}))
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"], 1);
    let r = sc
        .http
        .delete(sc.url("/v1/cache?prefix=a%3A"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"], 1);
    let (token, _) = sc.create_session(json!({"user_id": "u1"})).await;
    let r = sc
        .http
        .get(sc.url(&format!("/v1/sessions/{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = sc
        .http
        .get(sc.url("/v1/users/u1/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["sessions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&sc.db)
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM \"user\".cache")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(rows, 1, "only b:1 is left");
    let elsewhere: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE tablename IN ('cache', 'sessions', 'leases') \
         AND schemaname <> 'user')",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert!(!elsewhere, "a table outside the configured schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_capped_by_evicting_the_oldest_writes() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_CACHE__MAX_VALUE_BYTES", "1024")
        .env("PGSIDECAR_CACHE__MAX_BYTES", "20000")
        .env("PGSIDECAR_CLEANUP__INTERVAL_SECONDS", "1")
        .env("PGSIDECAR_CLEANUP__BATCH_SIZE", "7")
        .start()
        .await;
    // 50 entries of 650 bytes each (the key twice, the value, 140 bytes of overhead): 32,500.
    let value = format!("\"{}\"", "v".repeat(498));
    for i in 0..50 {
        let r = s.put_cache(&format!("k{i:02}"), &value, "").await;
        assert_eq!(r.status(), 204);
    }
    // Rewriting the oldest makes it the newest: it stays.
    assert_eq!(s.put_cache("k00", &value, "?tags=a,bc").await.status(), 204);
    let mut sql = s.sql().await;
    let weight: i32 = sqlx::query_scalar("SELECT byte_size FROM cache WHERE key = 'k00'")
        .fetch_one(&mut sql)
        .await
        .unwrap();
    assert_eq!(
        weight,
        2 * 3 + 500 + 4 + 140,
        "key twice, value, tags as text, overhead"
    );

    // Until a pass (every second) has brought it within the cap.
    let mut total = i64::MAX;
    for _ in 0..200 {
        total = sqlx::query_scalar("SELECT sum(byte_size)::int8 FROM cache")
            .fetch_one(&mut sql)
            .await
            .unwrap();
        if total <= 20000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(total <= 20000, "within the cap: {total}");
    assert!(total > 20000 - 650, "no more evicted than needed: {total}");
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM cache ORDER BY key")
        .fetch_all(&mut sql)
        .await
        .unwrap();
    // The oldest writes went: k01 upwards, in order, until it fit; k00 was rewritten last.
    let gone = 50 - left.len();
    let mut expected: Vec<String> = (gone + 1..50).map(|i| format!("k{i:02}")).collect();
    expected.insert(0, "k00".into());
    assert_eq!(left, expected);
    // The metric counts them (it moves just after each batch commits).
    let mut evicted = 0.0;
    for _ in 0..100 {
        evicted = metric(&scrape(&s).await, "pgsidecar_cache_evicted_total", &[]).unwrap_or(0.0);
        if evicted == gone as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(evicted, gone as f64);
    assert_eq!(s.get_cache("k00").await.status(), 200);
    assert_eq!(s.get_cache("k01").await.status(), 404);
    assert!(
        s.logs
            .wait_for("\"cache_evicted\":", Duration::from_secs(5))
    );
}
