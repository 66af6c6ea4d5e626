//! Request handling: auth, limits, timeouts, load shedding, slowloris, panics, unix sockets.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use sqlx::{Connection, Executor};

use crate::helpers::*;

const SECRET: &str = "0123456789abcdef-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_secret_guards_every_data_route() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_SERVER__AUTH_TOKEN", SECRET)
        // With a secret, the data API may listen beyond loopback.
        .env("PGSIDECAR_SERVER__DATA_LISTEN", "0.0.0.0:0")
        .start()
        .await;
    let port = s.data.rsplit(':').next().unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/cache/k");
    let r = s.http.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_error(r, 401, "unauthorized").await;
    for bad in [
        "Bearer wrong",
        "Bearer 0123456789abcdef-secreT",
        "Basic eDp5",
        SECRET,
        "Bearer ",
    ] {
        let r = s
            .http
            .get(&url)
            .header("authorization", bad)
            .send()
            .await
            .unwrap();
        assert_error(r, 401, "unauthorized").await;
    }
    let r = s
        .http
        .post(format!("http://127.0.0.1:{port}/v1/sessions"))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "unauthorized").await;
    // Unknown paths too: without the secret nothing on the data listener answers more.
    let r = s
        .http
        .get(format!("http://127.0.0.1:{port}/v2/anything"))
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "unauthorized").await;
    let r = s
        .http
        .get(&url)
        .header("authorization", format!("Bearer {SECRET}"))
        .send()
        .await
        .unwrap();
    assert_error(r, 404, "not_found").await;
    // The ops API stays open for load balancers and Prometheus.
    assert_eq!(
        s.http
            .get(s.ops_url("/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_4xx() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_SERVER__MAX_BODY_BYTES", "4096")
        .env("PGSIDECAR_CACHE__MAX_VALUE_BYTES", "2048")
        .start()
        .await;
    assert_error(
        s.http.get(s.url("/v1/nothing")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_error(
        s.http.get(s.url("/")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_error(
        s.http.post(s.url("/v1/cache/k")).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    assert_error(
        s.http.put(s.url("/v1/sessions")).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    assert_error(
        s.http
            .post(s.url("/v1/sessions"))
            .body("{nope")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        s.http
            .post(s.url("/v1/sessions"))
            .body("")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        s.http
            .post(s.url("/v1/sessions"))
            .body(vec![0xff, 0xfe])
            .send()
            .await
            .unwrap(),
        400,
        "invalid_json",
    )
    .await;
    let big = format!(
        "{{\"user_id\":\"u\",\"data\":{{\"x\":\"{}\"}}}}",
        "a".repeat(5000)
    );
    assert_error(
        s.http
            .post(s.url("/v1/sessions"))
            .body(big.clone())
            .send()
            .await
            .unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    assert_error(
        s.put_cache("k", &format!("\"{}\"", "a".repeat(3000)), "")
            .await,
        413,
        "payload_too_large",
    )
    .await;
    assert_error(
        s.put_cache("k", &format!("\"{}\"", "a".repeat(9000)), "")
            .await,
        413,
        "payload_too_large",
    )
    .await;
    // Chunked body without Content-Length, over the limit: refused once the limit is crossed.
    let addr = s.data.trim_start_matches("http://").to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    let mut req =
        b"PUT /v1/cache/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        req.extend_from_slice(format!("3e8\r\n{}\r\n", " ".repeat(1000)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    c.write_all(&req).unwrap();
    let mut head = [0u8; 12];
    c.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    // Still serving afterwards.
    assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_SERVER__HEADER_READ_TIMEOUT_MS", "500")
        .start()
        .await;
    let addr = s.data.trim_start_matches("http://").to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET /v1/cache/k HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "connection held for {took:?}"
    );
    // And a normal client is unaffected.
    assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_database_gives_timeout_and_overload_answers() {
    let s = Sidecar::builder()
        // The slow PUT holds the one permit for the request timeout; in that window the test
        // must see its lock wait and send the second request, so 2 s, not a tight 400 ms. The
        // statement timeout stays longer, so the answer is the 504, not a database 503.
        .env("PGSIDECAR_SERVER__REQUEST_TIMEOUT_MS", "2000")
        .env("PGSIDECAR_DATABASE__STATEMENT_TIMEOUT_MS", "10000")
        .env("PGSIDECAR_SERVER__MAX_CONCURRENT_REQUESTS", "1")
        .start()
        .await;
    assert_eq!(s.put_cache("locked", "1", "").await.status(), 204);
    let mut blocker = s
        .hold_lock("SELECT * FROM pgsidecar.cache WHERE key = 'locked' FOR UPDATE")
        .await;
    // Connected before the slow request starts, so its time is not taken from the window.
    let mut watcher = sqlx::PgConnection::connect(&s.db).await.unwrap();

    let http = s.http.clone();
    let url = s.url("/v1/cache/locked");
    let slow = tokio::spawn(async move {
        let t = Instant::now();
        let r = http.put(url).body("2").send().await.unwrap();
        (r, t.elapsed())
    });
    wait_for_lock_wait(&mut watcher).await;
    // The one permit is taken: shed at once with 503 + Retry-After.
    let r = s.get_cache("other").await;
    assert_eq!(r.headers()["retry-after"], "1");
    assert_error(r, 503, "overloaded").await;
    let (r, took) = slow.await.unwrap();
    assert!(took < Duration::from_secs(5), "timed out after {took:?}");
    assert_error(r, 504, "request_timeout").await;
    blocker.execute("ROLLBACK").await.unwrap();
    assert_eq!(s.get_cache("other").await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_is_a_503() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_DATABASE__STATEMENT_TIMEOUT_MS", "300")
        .start()
        .await;
    assert_eq!(s.put_cache("locked", "1", "").await.status(), 204);
    let mut blocker = s
        .hold_lock("SELECT * FROM pgsidecar.cache WHERE key = 'locked' FOR UPDATE")
        .await;
    let r = s
        .http
        .delete(s.url("/v1/cache/locked"))
        .send()
        .await
        .unwrap();
    assert_error(r, 503, "database_timeout").await;
    blocker.execute("ROLLBACK").await.unwrap();
    assert_eq!(
        s.get_cache("locked").await.status(),
        200,
        "nothing was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_data_listener() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("pgsidecar.sock");
    let s = Sidecar::builder()
        .env(
            "PGSIDECAR_SERVER__DATA_LISTEN",
            format!("unix:{}", sock.display()),
        )
        .start()
        .await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(
        b"PUT /v1/cache/k HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n42",
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 204"), "{out}");
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(b"GET /v1/cache/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("42"),
        "{out}"
    );
    drop(s);
}

#[tokio::test]
async fn a_panicking_handler_is_a_json_500_and_serving_goes_on() {
    use axum::routing::get;
    use tower::ServiceExt;
    let app = pgsidecar::http::edge(
        axum::Router::new()
            .route("/boom", get(boom))
            .route("/ok", get(|| async { "ok" })),
        "data",
        ["/boom", "/ok"],
        None,
        1 << 20,
    );
    let req = axum::http::Request::get("/boom")
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 500);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "internal");
    assert!(
        !String::from_utf8_lossy(&body).contains("handler bug"),
        "no internal text to clients"
    );
    let req = axum::http::Request::get("/ok")
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(app.oneshot(req).await.unwrap().status(), 200);
}

async fn boom() -> &'static str {
    panic!("handler bug")
}
