//! Sessions API: every route, expiry, sliding, revoke-all, concurrency, hashing, bad inputs.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

async fn validate(s: &Sidecar, token: &str) -> reqwest::Response {
    s.http
        .get(s.url(&format!("/v1/sessions/{token}")))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_validate_update_revoke() {
    let s = Sidecar::start().await;
    let r = s
        .post_json(
            "/v1/sessions",
            &json!({"user_id": "user-1", "ttl_seconds": 3600, "ip_address": "203.0.113.7", "user_agent": "curl/8", "data": {"role": "admin", "n": [1, 2.5, null]}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 43);
    assert!(
        token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    );
    let session = &v["session"];
    let keys: Vec<&String> = session.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "id",
            "user_id",
            "created_at",
            "updated_at",
            "expires_at",
            "ip_address",
            "user_agent",
            "data"
        ]
    );
    assert!(
        !session.to_string().contains(&token),
        "the session never holds the token"
    );
    uuid::Uuid::parse_str(session["id"].as_str().unwrap()).unwrap();
    assert_eq!(session["user_id"], "user-1");
    assert_eq!(session["ip_address"], "203.0.113.7");
    assert_eq!(
        session["data"],
        json!({"role": "admin", "n": [1, 2.5, null]})
    );
    let created =
        chrono::DateTime::parse_from_rfc3339(session["created_at"].as_str().unwrap()).unwrap();
    let expires =
        chrono::DateTime::parse_from_rfc3339(session["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - created).num_seconds(), 3600);
    assert!(session["expires_at"].as_str().unwrap().ends_with('Z'));

    let r = validate(&s, &token).await;
    assert_eq!(r.status(), 200);
    let got: Value = r.json().await.unwrap();
    assert_eq!(
        got, *session,
        "validation within update_age returns it unchanged"
    );

    let r = s
        .http
        .patch(s.url(&format!("/v1/sessions/{token}")))
        .json(&json!({"data": {"cart": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["data"], json!({"cart": 3}));
    assert_eq!(updated["id"], session["id"]);
    assert_eq!(
        validate(&s, &token).await.json::<Value>().await.unwrap()["data"],
        json!({"cart": 3})
    );

    assert_eq!(
        s.http
            .delete(s.url(&format!("/v1/sessions/{token}")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_error(validate(&s, &token).await, 404, "not_found").await;
    // Revoking again is still 204; updating a revoked session is 404.
    assert_eq!(
        s.http
            .delete(s.url(&format!("/v1/sessions/{token}")))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let r = s
        .http
        .patch(s.url(&format!("/v1/sessions/{token}")))
        .json(&json!({"data": {}}))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_and_unknown_tokens() {
    let s = Sidecar::start().await;
    let (_, session) = s.create_session(json!({"user_id": "u"})).await;
    let created =
        chrono::DateTime::parse_from_rfc3339(session["created_at"].as_str().unwrap()).unwrap();
    let expires =
        chrono::DateTime::parse_from_rfc3339(session["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        (expires - created).num_seconds(),
        604800,
        "default ttl is 7 days"
    );
    assert_eq!(session["data"], json!({}));
    assert_eq!(session["ip_address"], Value::Null);
    // Well-formed but unknown, malformed, and undecodable tokens are all plain 404s.
    let unknown = "A".repeat(43);
    for t in [
        unknown.as_str(),
        "short",
        "%FF%FE",
        &"a".repeat(44),
        "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    ] {
        assert_error(validate(&s, t).await, 404, "not_found").await;
    }
    assert_eq!(
        s.http
            .delete(s.url("/v1/sessions/short"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ttl_really_expires() {
    let s = Sidecar::start().await;
    let (token, _) = s
        .create_session(json!({"user_id": "u", "ttl_seconds": 2}))
        .await;
    assert_eq!(validate(&s, &token).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_error(validate(&s, &token).await, 404, "not_found").await;
    let r = s
        .http
        .patch(s.url(&format!("/v1/sessions/{token}")))
        .json(&json!({"data": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r: Value = s
        .http
        .get(s.url("/v1/users/u/sessions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["sessions"], json!([]), "expired sessions are not listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_shorter_than_update_age_slides_past_its_halfway_mark() {
    // update_age is the default day; the session lives 6 s. It used to be never due (its
    // expiry came first), so an active user was logged out after 6 s.
    let s = Sidecar::start().await;
    let created = std::time::Instant::now();
    let (token, session) = s
        .create_session(json!({"user_id": "u", "ttl_seconds": 6}))
        .await;
    let mut sql = s.sql().await;
    let id = uuid::Uuid::parse_str(session["id"].as_str().unwrap()).unwrap();
    let before = xmin(&mut sql, id).await;
    // Before half its TTL: a read, no write.
    assert_eq!(validate(&s, &token).await.status(), 200);
    if created.elapsed() < Duration::from_millis(2500) {
        assert_eq!(xmin(&mut sql, id).await, before, "no write before 3 s");
    }
    tokio::time::sleep(
        Duration::from_secs(3).saturating_sub(created.elapsed()) + Duration::from_millis(500),
    )
    .await;
    let slid: Value = validate(&s, &token).await.json().await.unwrap();
    let old_exp =
        chrono::DateTime::parse_from_rfc3339(session["expires_at"].as_str().unwrap()).unwrap();
    let new_exp =
        chrono::DateTime::parse_from_rfc3339(slid["expires_at"].as_str().unwrap()).unwrap();
    assert!(
        (new_exp - old_exp).num_milliseconds() >= 3000,
        "expiry moved past the halfway mark: {old_exp} -> {new_exp}"
    );
    // Past its first expiry, the session still validates.
    tokio::time::sleep(Duration::from_millis(6500).saturating_sub(created.elapsed())).await;
    assert_eq!(validate(&s, &token).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_expiry_writes_at_most_once_per_update_age() {
    let s = Sidecar::builder()
        // 3 s, not 1: creating, five validations and two xmin reads must all fit inside it on a
        // loaded machine (seen taking 0.4-2.8 s under heavy load).
        .env("PGSIDECAR_SESSIONS__UPDATE_AGE_SECONDS", "3")
        .start()
        .await;
    let (token, session) = s
        .create_session(json!({"user_id": "u", "ttl_seconds": 10}))
        .await;
    let mut sql = s.sql().await;
    let id = uuid::Uuid::parse_str(session["id"].as_str().unwrap()).unwrap();
    let before = xmin(&mut sql, id).await;
    // Within update_age: pure reads, no write.
    for _ in 0..5 {
        assert_eq!(validate(&s, &token).await.status(), 200);
    }
    assert_eq!(
        xmin(&mut sql, id).await,
        before,
        "no write within update_age"
    );

    tokio::time::sleep(Duration::from_millis(3500)).await;
    let slid: Value = validate(&s, &token).await.json().await.unwrap();
    let old_exp =
        chrono::DateTime::parse_from_rfc3339(session["expires_at"].as_str().unwrap()).unwrap();
    let new_exp =
        chrono::DateTime::parse_from_rfc3339(slid["expires_at"].as_str().unwrap()).unwrap();
    assert!(
        (new_exp - old_exp).num_milliseconds() >= 3400,
        "expiry moved: {old_exp} -> {new_exp}"
    );
    let after_slide = xmin(&mut sql, id).await;
    assert_ne!(after_slide, before, "one write to slide");
    // A second validation right after does not write again.
    let again: Value = validate(&s, &token).await.json().await.unwrap();
    assert_eq!(again["expires_at"], slid["expires_at"]);
    assert_eq!(xmin(&mut sql, id).await, after_slide);

    // Concurrent validations of a session due for sliding write it once.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let before_burst = xmin(&mut sql, id).await;
    let futs = (0..20).map(|_| validate(&s, &token));
    let results = futures_util::future::join_all(futs).await;
    let mut expiries = std::collections::HashSet::new();
    for r in results {
        assert_eq!(r.status(), 200);
        expiries.insert(
            r.json::<Value>().await.unwrap()["expires_at"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_ne!(xmin(&mut sql, id).await, before_burst);
    assert_eq!(
        expiries.len(),
        1,
        "every concurrent caller saw the one slid expiry: {expiries:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_revoke_all_except_one() {
    let s = Sidecar::start().await;
    let mut tokens = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let (t, sess) = s
            .create_session(json!({"user_id": "alice", "data": {"device": i}}))
            .await;
        tokens.push(t);
        ids.push(sess["id"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (bob, _) = s.create_session(json!({"user_id": "bob"})).await;
    let list: Value = s
        .http
        .get(s.url("/v1/users/alice/sessions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()],
        "newest first"
    );
    assert!(!list.to_string().contains(&tokens[0]));

    let r = s
        .http
        .delete(s.url(&format!("/v1/users/alice/sessions?except={}", ids[1])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"revoked": 2}));
    assert_eq!(validate(&s, &tokens[0]).await.status(), 404);
    assert_eq!(
        validate(&s, &tokens[1]).await.status(),
        200,
        "the kept device stays logged in"
    );
    assert_eq!(validate(&s, &tokens[2]).await.status(), 404);
    assert_eq!(
        validate(&s, &bob).await.status(),
        200,
        "other users untouched"
    );

    let r = s
        .http
        .delete(s.url("/v1/users/alice/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"revoked": 1}));
    let r = s
        .http
        .delete(s.url("/v1/users/nobody/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"revoked": 0}));
    let list: Value = s
        .http
        .get(s.url("/v1/users/alice/sessions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list, json!({"sessions": []}));
    let r = s
        .http
        .delete(s.url("/v1/users/alice/sessions?except=not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_session_id").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_ids_and_data_are_stored_exactly() {
    let s = Sidecar::start().await;
    let weird = [
        "O'Brien \"quoted\"",
        "'; DROP TABLE sessions; --",
        "名前 😀 ünïcödé",
        "a/b?c=d&e#f",
        "%2F%00",
        "\\x00 backslash",
    ];
    for uid in weird {
        let data = json!({"uid": uid, "nul": "a\u{0}b", "big": 12345678901234567890u64, "deep": {"x": [{"y": "z"}]}});
        let (token, session) = s
            .create_session(json!({"user_id": uid, "data": data}))
            .await;
        assert_eq!(session["user_id"], uid);
        let got: Value = validate(&s, &token).await.json().await.unwrap();
        assert_eq!(got["user_id"], uid);
        assert_eq!(got["data"], data);
        let list: Value = s
            .http
            .get(s.url(&format!("/v1/users/{}/sessions", enc(uid))))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list["sessions"].as_array().unwrap().len(), 1, "{uid}");
    }
    // The exact JSON text of data comes back, number spelling included.
    let r = s
        .http
        .post(s.url("/v1/sessions"))
        .body(r#"{"user_id":"x","data":{"n":1.50,"e":1e400}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let text = r.text().await.unwrap();
    assert!(text.contains(r#""data":{"n":1.50,"e":1e400}"#), "{text}");
}

/// openapi.json declares `ttl_seconds` a JSON Schema `integer`, which any number without a
/// fractional part is (`7200.0`, `7.2e3`): schemathesis sent one and got a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_number_written_with_a_fraction_or_exponent_is_an_integer_ttl() {
    let s = Sidecar::start().await;
    // Raw bodies: the numbers must reach the sidecar exactly as written.
    let create = |body: &'static str| s.http.post(s.url("/v1/sessions")).body(body).send();
    for body in [
        r#"{"user_id":"u","ttl_seconds":7200.0}"#,
        r#"{"user_id":"u","ttl_seconds":7.2e3}"#,
        r#"{"user_id":"u","ttl_seconds":72E2}"#,
    ] {
        let r = create(body).await.unwrap();
        assert_eq!(r.status(), 201, "{body}");
        let v: Value = r.json().await.unwrap();
        let at = |k: &str| {
            chrono::DateTime::parse_from_rfc3339(v["session"][k].as_str().unwrap()).unwrap()
        };
        assert_eq!(
            (at("expires_at") - at("created_at")).num_seconds(),
            7200,
            "{body}"
        );
    }
    for body in [
        r#"{"user_id":"u","ttl_seconds":7200.5}"#,
        r#"{"user_id":"u","ttl_seconds":3.2e7}"#,
        r#"{"user_id":"u","ttl_seconds":-0.0}"#,
    ] {
        let r = create(body).await.unwrap();
        assert_error(r, 400, "invalid_ttl").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_400_with_a_code() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_SESSIONS__MAX_DATA_BYTES", "100")
        .start()
        .await;
    let cases = [
        (json!({}), 400, "invalid_user_id"),
        (json!({"user_id": ""}), 400, "invalid_user_id"),
        (json!({"user_id": 42}), 400, "invalid_user_id"),
        (json!({"user_id": null}), 400, "invalid_user_id"),
        (json!({"user_id": "a".repeat(257)}), 400, "invalid_user_id"),
        (json!({"user_id": "nul\u{0}byte"}), 400, "invalid_user_id"),
        (
            json!({"user_id": "u", "ttl_seconds": 0}),
            400,
            "invalid_ttl",
        ),
        (
            json!({"user_id": "u", "ttl_seconds": -5}),
            400,
            "invalid_ttl",
        ),
        (
            json!({"user_id": "u", "ttl_seconds": 31536001}),
            400,
            "invalid_ttl",
        ),
        (
            json!({"user_id": "u", "ttl_seconds": 1.5}),
            400,
            "invalid_ttl",
        ),
        (
            json!({"user_id": "u", "ttl_seconds": "60"}),
            400,
            "invalid_ttl",
        ),
        (
            json!({"user_id": "u", "ip_address": 1}),
            400,
            "invalid_ip_address",
        ),
        (
            json!({"user_id": "u", "ip_address": "x".repeat(65)}),
            400,
            "invalid_ip_address",
        ),
        (
            json!({"user_id": "u", "user_agent": "x".repeat(1025)}),
            400,
            "invalid_user_agent",
        ),
        (
            json!({"user_id": "u", "user_agent": "a\u{0}"}),
            400,
            "invalid_user_agent",
        ),
        (json!({"user_id": "u", "data": [1]}), 400, "invalid_data"),
        (json!({"user_id": "u", "data": "s"}), 400, "invalid_data"),
        (
            json!({"user_id": "u", "data": {"x": "y".repeat(200)}}),
            413,
            "payload_too_large",
        ),
        (json!({"user_id": "u", "unknown": 1}), 400, "invalid_json"),
        (json!([1, 2]), 400, "invalid_json"),
    ];
    for (body, status, code) in cases {
        let r = s.post_json("/v1/sessions", &body).await;
        let got = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(got, status, "{body}: {text}");
        assert!(
            text.contains(&format!("\"code\":\"{code}\"")),
            "{body}: {text}"
        );
    }
    let (token, _) = s.create_session(json!({"user_id": "u"})).await;
    let patch = |b: &'static str| {
        s.http
            .patch(s.url(&format!("/v1/sessions/{token}")))
            .body(b)
            .send()
    };
    assert_error(patch("{}").await.unwrap(), 400, "invalid_data").await;
    assert_error(patch(r#"{"data": 5}"#).await.unwrap(), 400, "invalid_data").await;
    assert_error(
        patch(r#"{"data": {}, "x": 1}"#).await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_error(patch("nope").await.unwrap(), 400, "invalid_json").await;
    let long_user = "u".repeat(300);
    assert_error(
        s.http
            .get(s.url(&format!("/v1/users/{long_user}/sessions")))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_user_id",
    )
    .await;
    assert_error(
        s.http
            .get(s.url("/v1/users/%FF/sessions"))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_user_id",
    )
    .await;
    assert_error(
        s.http
            .get(s.url("/v1/users/a%00b/sessions"))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_user_id",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_token_hash_is_stored() {
    let s = Sidecar::start().await;
    let (token, session) = s.create_session(json!({"user_id": "u"})).await;
    let mut sql = s.sql().await;
    // Dump every column of every row as text: the token is nowhere.
    let dump: Vec<String> = sqlx::query_scalar("SELECT s::text FROM sessions s")
        .fetch_all(&mut sql)
        .await
        .unwrap();
    let all = dump.join("\n");
    assert!(!all.contains(&token), "token stored in clear");
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&token)
        .unwrap();
    let hex_raw: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!all.contains(&hex_raw), "token bytes stored");
    use sha2::Digest;
    let expected: Vec<u8> = sha2::Sha256::digest(token.as_bytes()).to_vec();
    let stored: Vec<u8> = sqlx::query_scalar("SELECT token_hash FROM sessions WHERE id = $1")
        .bind(uuid::Uuid::parse_str(session["id"].as_str().unwrap()).unwrap())
        .fetch_one(&mut sql)
        .await
        .unwrap();
    assert_eq!(stored, expected, "SHA-256 of the token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_validations_and_revocations() {
    // Validations race revocations of the same session. Whatever the interleaving, a
    // validation that starts after some revocation has returned must not find the session.
    let s = Sidecar::start().await;
    let base = std::time::Instant::now();
    let mut after_revoke = 0;
    for round in 0..5 {
        let (token, _) = s.create_session(json!({"user_id": "race"})).await;
        let url = s.url(&format!("/v1/sessions/{token}"));
        let mut tasks = Vec::new();
        // Validators keep validating until they have seen the session gone a few times;
        // revokers revoke at staggered moments in between.
        for _ in 0..8 {
            let (http, url) = (s.http.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut gone = 0;
                for _ in 0..400 {
                    let start = base.elapsed();
                    let status = http.get(&url).send().await.unwrap().status().as_u16();
                    seen.push((false, start, base.elapsed(), status));
                    gone += usize::from(status == 404);
                    if gone >= 5 {
                        break;
                    }
                }
                seen
            }));
        }
        for k in 0..4u64 {
            let (http, url) = (s.http.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20 + 15 * k)).await;
                let start = base.elapsed();
                let status = http.delete(&url).send().await.unwrap().status().as_u16();
                vec![(true, start, base.elapsed(), status)]
            }));
        }
        let mut done = Vec::new();
        for t in tasks {
            done.extend(t.await.unwrap());
        }
        let first_revoked = done
            .iter()
            .filter(|(revoke, ..)| *revoke)
            .map(|&(_, _, end, status)| {
                assert_eq!(status, 204, "round {round}: revoke answered {status}");
                end
            })
            .min()
            .unwrap();
        for &(revoke, start, _, status) in &done {
            if revoke {
                continue;
            }
            assert!([200, 404].contains(&status), "unexpected {status}");
            if start > first_revoked {
                after_revoke += 1;
                assert_eq!(
                    status,
                    404,
                    "round {round}: a validation that began {:?} after a revoke returned found the session",
                    start - first_revoked
                );
            }
        }
        // And every validation from now on.
        for _ in 0..10 {
            assert_eq!(validate(&s, &token).await.status(), 404);
        }
    }
    eprintln!("{after_revoke} validations began after a revoke had returned");
    assert!(after_revoke > 0, "the race was never run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_validated_many_times_at_once_is_found_by_every_caller() {
    // Concurrent validations share batches; a token asked for several times in one batch is
    // read once and every caller must still get its own full answer.
    let s = Sidecar::start().await;
    let mut tokens = Vec::new();
    for u in ["dup-a", "dup-b", "dup-c"] {
        tokens.push((s.create_session(json!({"user_id": u})).await.0, u));
    }
    let mut tasks = Vec::new();
    for i in 0..150 {
        let (token, user) = tokens[i % tokens.len()].clone();
        let http = s.http.clone();
        let url = s.url(&format!("/v1/sessions/{token}"));
        tasks.push(tokio::spawn(async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap(), user)
        }));
    }
    for t in tasks {
        let (status, body, user) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user_id"], user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_validations_return_each_session_whole() {
    // Batched rows are read by position with their columns checked on the first row only, so
    // sessions with and without the optional fields, validated at once, must each come back
    // with exactly what was sent, whichever row a batch happens to start with.
    let s = Sidecar::start().await;
    let mut sessions = Vec::new();
    for i in 0..6 {
        let sent = if i % 2 == 0 {
            json!({"user_id": format!("bare-{i}")})
        } else {
            json!({
                "user_id": format!("full-{i}"),
                "ip_address": format!("203.0.113.{i}"),
                "user_agent": format!("agent {i}"),
                "data": {"n": i, "tags": ["a", "b"]}
            })
        };
        let (token, created) = s.create_session(sent.clone()).await;
        sessions.push((token, created, sent));
    }
    let mut tasks = Vec::new();
    for i in 0..240 {
        let (token, created, sent) = sessions[(i * 7) % sessions.len()].clone();
        let http = s.http.clone();
        let url = s.url(&format!("/v1/sessions/{token}"));
        tasks.push(tokio::spawn(async move {
            let r = http.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap(), created, sent)
        }));
    }
    for t in tasks {
        let (status, body, created, sent) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        // What the client sent (absent optional fields come back null, absent data as {})...
        for field in ["user_id", "ip_address", "user_agent"] {
            assert_eq!(body[field], sent[field], "{field} in {body}");
        }
        let data = if sent["data"].is_null() {
            json!({})
        } else {
            sent["data"].clone()
        };
        assert_eq!(body["data"], data, "{body}");
        // ...and the session it created.
        for field in ["id", "created_at"] {
            assert_eq!(body[field], created[field], "{field} in {body}");
        }
    }
}

/// The row version of a session: it changes with every write.
async fn xmin(c: &mut sqlx::PgConnection, id: uuid::Uuid) -> String {
    sqlx::query_scalar("SELECT xmin::text FROM sessions WHERE id = $1")
        .bind(id)
        .fetch_one(c)
        .await
        .unwrap()
}
