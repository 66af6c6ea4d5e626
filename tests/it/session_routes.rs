//! The session routes BetterAuth-style clients use: validation with the token in the body
//! (`POST /v1/sessions/_validate`), and revoking one session by its id.

use serde_json::{Value, json};

use crate::helpers::*;

async fn validate_body(s: &Sidecar, body: &str) -> reqwest::Response {
    s.http
        .post(s.url("/v1/sessions/_validate"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn validate_path(s: &Sidecar, token: &str) -> reqwest::Response {
    s.http
        .get(s.url(&format!("/v1/sessions/{token}")))
        .send()
        .await
        .unwrap()
}

async fn revoke_id(s: &Sidecar, user: &str, id: &str) -> reqwest::Response {
    s.http
        .delete(s.url(&format!("/v1/users/{user}/sessions/{id}")))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_with_the_token_in_the_body() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_SESSIONS__UPDATE_AGE_SECONDS", "1")
        .start()
        .await;
    let (token, created) = s
        .create_session(json!({"user_id": "u1", "ttl_seconds": 3600, "data": {"a": [1, 2.5]}}))
        .await;
    let r = validate_body(&s, &json!({"token": token}).to_string()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let text = r.text().await.unwrap();
    let by_body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(by_body["id"], created["id"]);
    assert!(!text.contains(&token), "the token is never echoed");
    let by_path: Value = validate_path(&s, &token).await.json().await.unwrap();
    assert_eq!(by_body["id"], by_path["id"]);
    // It slides like the path form: after update_age, expires_at moves forward.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let slid: Value = validate_body(&s, &json!({"token": token}).to_string())
        .await
        .json()
        .await
        .unwrap();
    assert!(slid["expires_at"].as_str().unwrap() > created["expires_at"].as_str().unwrap());

    // Unknown, malformed and revoked tokens: 404 like the path form.
    let unknown = "A".repeat(43);
    for t in [unknown.as_str(), "", "short", "../../etc", "%2F"] {
        let r = validate_body(&s, &json!({"token": t}).to_string()).await;
        assert_error(r, 404, "not_found").await;
    }
    s.http
        .delete(s.url(&format!("/v1/sessions/{token}")))
        .send()
        .await
        .unwrap();
    assert_error(
        validate_body(&s, &json!({"token": token}).to_string()).await,
        404,
        "not_found",
    )
    .await;

    // A body that is not a JSON object with a string token: 400.
    for (body, code) in [
        ("", "invalid_json"),
        ("{", "invalid_json"),
        ("token", "invalid_json"),
        ("[\"x\"]", "invalid_json"),
        ("\"x\"", "invalid_json"),
        ("null", "invalid_json"),
        ("{\"token\":\"x\",\"extra\":1}", "invalid_json"),
        ("{}", "invalid_token"),
        ("{\"token\":null}", "invalid_token"),
        ("{\"token\":42}", "invalid_token"),
        ("{\"token\":[\"x\"]}", "invalid_token"),
        ("{\"token\":{\"t\":\"x\"}}", "invalid_token"),
    ] {
        assert_error(validate_body(&s, body).await, 400, code).await;
    }
    // Other methods on the route are refused, not taken for a token.
    let r = s
        .http
        .get(s.url("/v1/sessions/_validate"))
        .send()
        .await
        .unwrap();
    assert_error(r, 405, "method_not_allowed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_one_session_by_id() {
    let s = Sidecar::start().await;
    let (a1, s1) = s.create_session(json!({"user_id": "alice"})).await;
    let (a2, s2) = s.create_session(json!({"user_id": "alice"})).await;
    let (b1, sb) = s.create_session(json!({"user_id": "bob/😀"})).await;
    let id = |v: &Value| v["id"].as_str().unwrap().to_string();

    // Another user's id: untouched, still 204 (nothing of alice's is revealed either way).
    assert_eq!(revoke_id(&s, "alice", &id(&sb)).await.status(), 204);
    assert_eq!(validate_path(&s, &b1).await.status(), 200);
    assert_eq!(revoke_id(&s, "bob", &id(&s1)).await.status(), 204);
    assert_eq!(validate_path(&s, &a1).await.status(), 200);

    assert_eq!(revoke_id(&s, "alice", &id(&s1)).await.status(), 204);
    assert_eq!(validate_path(&s, &a1).await.status(), 404);
    assert_eq!(
        validate_path(&s, &a2).await.status(),
        200,
        "the other device stays"
    );
    let list: Value = s
        .http
        .get(s.url("/v1/users/alice/sessions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(list["sessions"][0]["id"], s2["id"]);
    // Gone already, or never existed: 204.
    assert_eq!(revoke_id(&s, "alice", &id(&s1)).await.status(), 204);
    assert_eq!(
        revoke_id(&s, "alice", "00000000-0000-4000-8000-000000000000")
            .await
            .status(),
        204
    );
    // An upper-case UUID is the same id; a user id with any characters works.
    assert_eq!(
        revoke_id(&s, "alice", &id(&s2).to_uppercase())
            .await
            .status(),
        204
    );
    assert_eq!(validate_path(&s, &a2).await.status(), 404);
    assert_eq!(revoke_id(&s, &enc("bob/😀"), &id(&sb)).await.status(), 204);
    assert_eq!(validate_path(&s, &b1).await.status(), 404);

    for bad in [
        "not-a-uuid",
        "123",
        "%FF",
        "00000000-0000-4000-8000-00000000000g",
    ] {
        assert_error(revoke_id(&s, "alice", bad).await, 400, "invalid_session_id").await;
    }
    let valid = "00000000-0000-4000-8000-000000000000";
    assert_error(revoke_id(&s, "%FF", valid).await, 400, "invalid_user_id").await;
    let long = "u".repeat(257);
    assert_error(revoke_id(&s, &long, valid).await, 400, "invalid_user_id").await;
    assert_error(revoke_id(&s, "a%00b", valid).await, 400, "invalid_user_id").await;
}
