//! Cache values of any type: bytes stored exactly with their Content-Type, JSON still
//! validated, `_mget` with mixed entries, size limits, and rows that older sidecars read or
//! write.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::helpers::*;

/// PUT `body` with this Content-Type (none when `None`).
pub async fn put_typed(
    s: &Sidecar,
    key: &str,
    content_type: Option<&[u8]>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut req = s.http.put(s.url(&format!("/v1/cache/{}", enc(key))));
    if let Some(ct) = content_type {
        req = req.header(
            "content-type",
            reqwest::header::HeaderValue::from_bytes(ct).unwrap(),
        );
    }
    req.body(body).send().await.unwrap()
}

/// Deterministic bytes covering every byte value, NUL and invalid UTF-8 included.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_round_trip_exactly_with_their_content_type() {
    let s = Sidecar::start().await;
    let cases: Vec<(&str, &[u8], Vec<u8>)> = vec![
        ("octets", b"application/octet-stream", noise(4096, 7)),
        (
            "nul-and-bad-utf8",
            b"application/octet-stream",
            b"\0\xff\xfe\xc3\x28 \0 end\0".to_vec(),
        ),
        ("empty", b"application/octet-stream", Vec::new()),
        (
            "text",
            b"text/plain; charset=utf-8",
            "héllo wörld\n".as_bytes().to_vec(),
        ),
        ("html", b"text/html", b"<!doctype html><p>hi</p>".to_vec()),
        // JSON-looking text that is not labelled JSON is bytes too, stored as sent.
        ("plain-json", b"text/plain", b"  {\"a\": 1}  ".to_vec()),
        ("not-json", b"text/plain", b"{not json".to_vec()),
        // Odd but valid: case, whitespace, quoted parameters with escapes, a trailing `;`.
        (
            "odd",
            b"Application/Vnd.Example+JSON ;  v=\"1 \\\"two\\\"\";q=x;",
            b"[1,2]".to_vec(),
        ),
        (
            "rsc",
            b"text/x-component",
            b"0:[\"$\",\"div\",null,{}]\n".to_vec(),
        ),
    ];
    for (key, ct, body) in &cases {
        let r = put_typed(&s, key, Some(ct), body.clone()).await;
        assert_eq!(r.status(), 204, "{key}");
        let put_etag = r.headers()["etag"].to_str().unwrap().to_string();
        let r = s.get_cache(key).await;
        assert_eq!(r.status(), 200, "{key}");
        assert_eq!(r.headers()["content-type"].as_bytes(), *ct, "{key}");
        assert_eq!(r.headers()["etag"].to_str().unwrap(), put_etag, "{key}");
        assert!(r.headers().contains_key("expires"), "{key}");
        assert!(r.headers().contains_key("pgsidecar-written-at"), "{key}");
        assert!(!r.headers().contains_key("pgsidecar-stale"), "{key}");
        assert_eq!(
            r.headers()["content-length"].to_str().unwrap(),
            body.len().to_string(),
            "{key}"
        );
        assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..], "{key}");
    }
    // A raw value replaced by JSON reads as JSON, and back.
    assert_eq!(s.put_cache("octets", "[1]", "").await.status(), 204);
    let r = s.get_cache("octets").await;
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), "[1]");
    put_typed(&s, "octets", Some(b"image/png"), b"\x89PNG".to_vec()).await;
    let r = s.get_cache("octets").await;
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"\x89PNG");
    // Written-At is the database's clock, in milliseconds.
    let mut sql = s.sql().await;
    let db_now: i64 = sqlx::query_scalar("SELECT (date_part('epoch', now()) * 1000)::int8")
        .fetch_one(&mut sql)
        .await
        .unwrap();
    let written: i64 = s.get_cache("octets").await.headers()["pgsidecar-written-at"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        written <= db_now + 1 && written > db_now - 60_000,
        "{written} vs {db_now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_stays_validated_and_typed() {
    let s = Sidecar::start().await;
    let json_types: [Option<&[u8]>; 5] = [
        None,
        Some(b"application/json"),
        Some(b"application/json; charset=utf-8"),
        Some(b"APPLICATION/JSON"),
        // What `curl -d` sends when told nothing else.
        Some(b"application/x-www-form-urlencoded"),
    ];
    for ct in json_types {
        let what = format!("{:?}", ct.map(String::from_utf8_lossy));
        assert_error(
            put_typed(&s, "j", ct, b"{not json".to_vec()).await,
            400,
            "invalid_json",
        )
        .await;
        assert_error(
            put_typed(&s, "j", ct, Vec::new()).await,
            400,
            "invalid_json",
        )
        .await;
        assert_error(
            put_typed(&s, "j", ct, b"\"\xff\"".to_vec()).await,
            400,
            "invalid_json",
        )
        .await;
        assert_eq!(s.get_cache("j").await.status(), 404, "{what}");
        let r = put_typed(&s, "j", ct, b" {\"a\": [1, 2.50]} \n".to_vec()).await;
        assert_eq!(r.status(), 204, "{what}");
        let r = s.get_cache("j").await;
        assert_eq!(r.headers()["content-type"], "application/json", "{what}");
        assert_eq!(r.text().await.unwrap(), "{\"a\": [1, 2.50]}", "{what}");
        let v: Value = s
            .post_json("/v1/cache/_mget", &json!({"keys": ["j"]}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            v,
            json!({"hits": {"j": {"a": [1, 2.5]}}, "raw": {}, "misses": []})
        );
        s.http.delete(s.url("/v1/cache/j")).send().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_content_types_are_refused() {
    let s = Sidecar::start().await;
    let long = format!("application/{}", "x".repeat(256 - 12));
    assert_eq!(long.len(), 256);
    let bad: Vec<&[u8]> = vec![
        b"",
        b"text",
        b"text/",
        b"/plain",
        b"text/plain/x",
        b"text /plain",
        b"text/plain; charset",
        b"text/plain; =utf-8",
        b"text/plain; a=\"open",
        b"text/plain; a=b c",
        b"text/plain, text/html",
        b"te(x)t/plain",
        b"text/pl\xe9in",
        long.as_bytes(),
    ];
    for ct in bad {
        let r = put_typed(&s, "k", Some(ct), b"x".to_vec()).await;
        assert_error(r, 400, "invalid_content_type").await;
    }
    // Two Content-Type fields.
    let r = s
        .http
        .put(s.url("/v1/cache/k"))
        .header("content-type", "text/plain")
        .header("content-type", "text/html")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_content_type").await;
    assert_eq!(s.get_cache("k").await.status(), 404, "nothing stored");
    // 255 bytes is the limit.
    let longest = &long[..255];
    let r = put_typed(&s, "k", Some(longest.as_bytes()), b"x".to_vec()).await;
    assert_eq!(r.status(), 204);
    assert_eq!(s.get_cache("k").await.headers()["content-type"], longest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_near_the_size_limit() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_CACHE__MAX_VALUE_BYTES", "200000")
        .start()
        .await;
    let at_limit = noise(200_000, 3);
    let r = put_typed(
        &s,
        "big",
        Some(b"application/octet-stream"),
        at_limit.clone(),
    )
    .await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        s.get_cache("big").await.bytes().await.unwrap().as_ref(),
        &at_limit[..]
    );
    let over = noise(200_001, 4);
    assert_error(
        put_typed(&s, "big", Some(b"application/octet-stream"), over).await,
        413,
        "payload_too_large",
    )
    .await;
    let json = format!("\"{}\"", "j".repeat(199_998)).into_bytes();
    assert_eq!(
        put_typed(&s, "json", None, json.clone()).await.status(),
        204
    );
    assert_eq!(
        s.get_cache("json").await.bytes().await.unwrap().as_ref(),
        &json[..]
    );
    let json = format!("\"{}\"", "j".repeat(199_999)).into_bytes();
    assert_error(
        put_typed(&s, "json", None, json).await,
        413,
        "payload_too_large",
    )
    .await;
    // Still the value stored before.
    assert_eq!(
        s.get_cache("big").await.bytes().await.unwrap().len(),
        200_000
    );

    // The default limit, 1 MiB, through one request each and through _mget.
    let d = Sidecar::start().await;
    let mib = noise(1 << 20, 5);
    let r = put_typed(&d, "mib", Some(b"application/octet-stream"), mib.clone()).await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        d.get_cache("mib").await.bytes().await.unwrap().as_ref(),
        &mib[..]
    );
    let v: Value = d
        .post_json("/v1/cache/_mget", &json!({"keys": ["mib"]}))
        .await
        .json()
        .await
        .unwrap();
    let decoded = STANDARD
        .decode(v["raw"]["mib"]["base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, mib);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_answers_json_and_bytes_apart() {
    let s = Sidecar::start().await;
    s.put_cache("j1", "{\"a\":1}", "").await;
    s.put_cache("j2", "1.50", "").await;
    let bytes = noise(300, 9);
    put_typed(&s, "b1", Some(b"application/octet-stream"), bytes.clone()).await;
    put_typed(
        &s,
        "b2",
        Some(b"text/plain; charset=\"utf-8\""),
        b"\"quoted\"\n".to_vec(),
    )
    .await;
    put_typed(&s, "empty", Some(b"text/plain"), Vec::new()).await;
    let r = s
        .post_json(
            "/v1/cache/_mget",
            &json!({"keys": ["b1", "j1", "missing", "b2", "j2", "empty", "b1"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    // Stored JSON is spliced in as it is (a re-encoding would drop the 0).
    assert!(text.contains("\"j2\":1.50"), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["hits"]["j1"], json!({"a": 1}));
    assert_eq!(v["hits"].as_object().unwrap().len(), 2);
    assert_eq!(v["misses"], json!(["missing"]));
    let raw = v["raw"].as_object().unwrap();
    assert_eq!(raw.len(), 3);
    assert_eq!(raw["b1"]["content_type"], "application/octet-stream");
    assert_eq!(
        STANDARD
            .decode(raw["b1"]["base64"].as_str().unwrap())
            .unwrap(),
        bytes
    );
    assert_eq!(raw["b2"]["content_type"], "text/plain; charset=\"utf-8\"");
    assert_eq!(
        STANDARD
            .decode(raw["b2"]["base64"].as_str().unwrap())
            .unwrap(),
        b"\"quoted\"\n"
    );
    assert_eq!(
        raw["empty"],
        json!({"content_type": "text/plain", "base64": ""})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_stay_readable_across_versions() {
    let s = Sidecar::start().await;
    put_typed(
        &s,
        "b",
        Some(b"application/octet-stream"),
        b"\0\x01".to_vec(),
    )
    .await;
    let mut sql = s.sql().await;
    // An older sidecar reads only `value`: it finds a JSON null.
    let value: String = sqlx::query_scalar("SELECT value FROM cache WHERE key = 'b'")
        .fetch_one(&mut sql)
        .await
        .unwrap();
    assert_eq!(value, " null");
    assert!(serde_json::from_str::<Value>(&value).unwrap().is_null());
    // An older sidecar's upsert replaces value, tags, expiry and updated_at, and leaves the
    // newer columns behind: the entry is its JSON now.
    sqlx::query(
        "INSERT INTO cache (key, value, tags, expires_at) VALUES ('b', '{\"old\":true}', '{}', now() + interval '1 hour') \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, tags = EXCLUDED.tags, \
         expires_at = EXCLUDED.expires_at, updated_at = now()",
    )
    .execute(&mut sql)
    .await
    .unwrap();
    let r = s.get_cache("b").await;
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), "{\"old\":true}");
    let v: Value = s
        .post_json("/v1/cache/_mget", &json!({"keys": ["b"]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v,
        json!({"hits": {"b": {"old": true}}, "raw": {}, "misses": []})
    );
    // A JSON write of ours clears the leftovers.
    s.put_cache("b", "2", "").await;
    let (ct, bytes): (Option<String>, Option<Vec<u8>>) =
        sqlx::query_as("SELECT content_type, bytes FROM cache WHERE key = 'b'")
            .fetch_one(&mut sql)
            .await
            .unwrap();
    assert_eq!((ct, bytes), (None, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_values_count_against_the_cache_cap() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_CACHE__MAX_VALUE_BYTES", "8192")
        .env("PGSIDECAR_CACHE__MAX_BYTES", "30000")
        .env("PGSIDECAR_CLEANUP__INTERVAL_SECONDS", "1")
        .start()
        .await;
    let mut sql = s.sql().await;
    for i in 0..10 {
        let r = put_typed(
            &s,
            &format!("b{i}"),
            Some(b"application/octet-stream"),
            noise(5000, i + 1),
        )
        .await;
        assert_eq!(r.status(), 204);
        // Written one after the other, so the oldest is evicted first.
        if i == 0 {
            let raw: Option<i32> =
                sqlx::query_scalar("SELECT raw_size FROM cache WHERE key = 'b0'")
                    .fetch_one(&mut sql)
                    .await
                    .unwrap();
            assert_eq!(raw, Some(5000 + 24), "the bytes and the media type");
        }
    }
    // About 52 KB in all: the cleanup evicts the oldest until it fits.
    let mut total = i64::MAX;
    for _ in 0..200 {
        total =
            sqlx::query_scalar("SELECT sum(byte_size + coalesce(raw_size, 0))::int8 FROM cache")
                .fetch_one(&mut sql)
                .await
                .unwrap();
        if total <= 30000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(total <= 30000, "within the cap: {total}");
    assert_eq!(s.get_cache("b0").await.status(), 404, "the oldest went");
    assert_eq!(s.get_cache("b9").await.status(), 200, "the newest stayed");
    // A JSON write over a binary entry drops its extra weight.
    s.put_cache("b9", "1", "").await;
    let raw: Option<i32> = sqlx::query_scalar("SELECT raw_size FROM cache WHERE key = 'b9'")
        .fetch_one(&mut sql)
        .await
        .unwrap();
    assert_eq!(raw, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_answers_are_bounded_with_binary_values_in_base64() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_CACHE__MAX_VALUE_BYTES", "4096")
        .env("PGSIDECAR_CACHE__MAX_MGET_BYTES", "8000")
        .start()
        .await;
    // Each takes about 4,070 bytes of the answer (4,000 in base64, its media type, names).
    for k in ["b1", "b2", "b3"] {
        put_typed(&s, k, Some(b"application/octet-stream"), noise(3000, 5)).await;
    }
    s.put_cache("j", "1", "").await;
    let v: Value = s
        .post_json(
            "/v1/cache/_mget",
            &json!({"keys": ["j", "b1", "b2", "b3", "none"]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["hits"], json!({"j": 1}));
    assert_eq!(v["raw"].as_object().unwrap().len(), 1, "{v}");
    assert!(v["raw"]["b1"]["base64"].is_string());
    assert_eq!(v["unprocessed"], json!(["b2", "b3"]));
    assert_eq!(v["misses"], json!(["none"]));
    // The first hit always comes back, whatever its size.
    put_typed(&s, "big", Some(b"application/octet-stream"), noise(4096, 6)).await;
    let v: Value = s
        .post_json("/v1/cache/_mget", &json!({"keys": ["big", "b1"]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        STANDARD
            .decode(v["raw"]["big"]["base64"].as_str().unwrap())
            .unwrap()
            .len(),
        4096
    );
    assert_eq!(v["unprocessed"], json!(["b1"]));
}
