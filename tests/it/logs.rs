//! Logs: one JSON object per stdout line, with the fixed fields, and never a secret.

use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_is_json_with_fixed_fields_and_no_secret() {
    let db = fresh_db().await;
    // A database password in the URL (the test server trusts local connections, so any
    // password is accepted; a server of your own keeps the one DATABASE_URL has).
    let (db, db_password) = match db.split_once("://").and_then(|(_, rest)| {
        let userinfo = rest.split('@').next()?;
        userinfo.split_once(':').map(|(_, pw)| pw.to_string())
    }) {
        Some(pw) => (db.clone(), pw),
        None => (
            db.replacen("@", ":db-password-should-not-leak@", 1),
            "db-password-should-not-leak".to_string(),
        ),
    };
    let secret = "sidecar-shared-secret-0123456789";
    let s = Sidecar::builder()
        .db(&db)
        .env("PGSIDECAR_SERVER__AUTH_TOKEN", secret)
        .env(
            "PGSIDECAR_HEALTH__UPSTREAMS",
            r#"[{name="app", url="http://127.0.0.1:9/health?token=upstream-token-should-not-leak&page=1", timeout_ms=300, critical=false}]"#,
        )
        .env("PGSIDECAR_LOG__ACCESS", "all")
        .start()
        .await;
    let auth = format!("Bearer {secret}");
    let r = s
        .http
        .post(s.url("/v1/sessions"))
        .header("authorization", &auth)
        .header("cookie", "sid=cookie-value-should-not-leak")
        .json(&json!({"user_id": "user-1", "data": {"secret-session-data": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let token = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    s.http
        .get(s.url(&format!("/v1/sessions/{token}")))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    s.http
        .delete(s.url(&format!("/v1/sessions/{token}")))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    s.http
        .put(s.url("/v1/cache/some-key"))
        .header("authorization", &auth)
        .header("x-request-id", "req-42")
        .body(r#"{"cached":"top-secret-cached-value"}"#)
        .send()
        .await
        .unwrap();
    s.http
        .get(s.url("/v1/cache/some-key"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    s.http
        .get(s.url("/v1/cache/x"))
        .header("authorization", "Bearer wrong-secret-guess")
        .send()
        .await
        .unwrap();
    assert!(
        s.logs
            .wait_for("\"status\":401", std::time::Duration::from_secs(5))
    );

    let lines = s.logs.json();
    assert!(lines.len() >= 8, "{lines:?}");
    for l in &lines {
        for field in ["timestamp", "level", "message", "target", "hostname"] {
            assert!(l.get(field).is_some(), "{field} missing in {l}");
        }
        assert_eq!(l["hostname"], "test-host");
        let ts = l["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z'), "{ts}");
        chrono::DateTime::parse_from_rfc3339(ts).unwrap();
    }
    let raw = s.logs.lines().join("\n");
    for leak in [
        db_password.as_str(),
        "upstream-token-should-not-leak",
        secret,
        token.as_str(),
        "cookie-value-should-not-leak",
        "top-secret-cached-value",
        "secret-session-data",
        "wrong-secret-guess",
        "some-key",
    ] {
        assert!(!raw.contains(leak), "{leak} leaked into the logs");
    }

    // The start-up line: version, listeners, effective config (redacted).
    let start = lines
        .iter()
        .find(|l| l["message"] == "pgsidecar started")
        .unwrap();
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        start["data_listen"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(start["config"]["server"]["auth_token"], "[redacted]");
    let url = start["config"]["database"]["url"].as_str().unwrap();
    assert!(url.contains(":[redacted]@"), "{url}");
    assert_eq!(
        start["config"]["health"]["upstreams"][0]["url"],
        "http://127.0.0.1:9/health?token=[redacted]&page=1"
    );
    let health = s
        .http
        .get(s.ops_url("/health"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !health.contains("should-not-leak") && !health.contains(&db_password),
        "{health}"
    );
    assert_eq!(start["config"]["database"]["max_connections"], 20);

    // One access line per request, with the route template.
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "pgsidecar::access" && l["listener"] == "data")
        .collect();
    assert_eq!(access.len(), 6, "{access:?}");
    for a in &access {
        for field in ["method", "route", "status", "duration_ms", "request_id"] {
            assert!(a.get(field).is_some(), "{field} missing in {a}");
        }
    }
    let put = access.iter().find(|a| a["request_id"] == "req-42").unwrap();
    assert_eq!(put["route"], "/v1/cache/{key}");
    assert_eq!(put["method"], "PUT");
    assert_eq!(put["status"], 204);
    assert!(
        access
            .iter()
            .any(|a| a["route"] == "/v1/sessions/{token}" && a["status"] == 200)
    );
    assert!(access.iter().any(|a| a["status"] == 401));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_password_is_never_logged() {
    // A role with a password, so the URL carries one.
    let admin = admin_url();
    let db = fresh_db().await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap();
    let role = format!("r{}", uuid::Uuid::new_v4().simple());
    sqlx::Executor::execute(
        &mut conn,
        sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'pw-do-not-log-123'"
        )),
    )
    .await
    .unwrap();
    let url = db.replacen(
        "postgres://postgres@",
        &format!("postgres://{role}:pw-do-not-log-123@"),
        1,
    );
    let s = Sidecar::builder().db(&url).start().await;
    assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
    let raw = s.logs.lines().join("\n");
    assert!(!raw.contains("pw-do-not-log-123"), "password leaked");
    assert!(raw.contains("[redacted]"), "the URL is logged redacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_and_log_level_filter_lines() {
    // Access lines off, the start-up line (which the test harness reads) kept.
    let mut s = Sidecar::builder()
        .env("PGSIDECAR_LOG__LEVEL", "warn,pgsidecar::app=info")
        .start()
        .await;
    s.put_cache("k", "1", "").await;
    // After a clean exit every line is flushed: then the absence of access lines means something.
    s.sigterm();
    assert_eq!(
        s.wait_exit(std::time::Duration::from_secs(10))
            .and_then(|e| e.code()),
        Some(0)
    );
    assert!(
        s.logs
            .wait_for("pgsidecar stopped", std::time::Duration::from_secs(2))
    );
    assert!(
        !s.logs.contains("pgsidecar::access"),
        "info lines filtered at warn"
    );
    // RUST_LOG takes precedence over log.level.
    let s = Sidecar::builder()
        .env("PGSIDECAR_LOG__LEVEL", "warn,pgsidecar::app=info")
        .env("PGSIDECAR_LOG__ACCESS", "all")
        .env("RUST_LOG", "info")
        .start()
        .await;
    s.put_cache("k", "1", "").await;
    // The PUT's own line: the start-up /ready polls have written access lines already.
    assert!(s.logs.wait_for(
        r#""route":"/v1/cache/{key}""#,
        std::time::Duration::from_secs(3)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_pipe_drops_lines_and_never_stalls_requests() {
    // stdout is a pipe nobody reads: it fills after 64 KiB, then the writer's queue fills.
    let db = fresh_db().await;
    let mut child = std::process::Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db)
        .env("PGSIDECAR_SERVER__DATA_LISTEN", "127.0.0.1:0")
        .env("PGSIDECAR_SERVER__OPS_LISTEN", "127.0.0.1:0")
        .env("PGSIDECAR_HEALTH__INTERVAL_MS", "200")
        .env("PGSIDECAR_LOG__ACCESS", "all")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The start line names the bound addresses; after it, nobody reads. The reader is kept, not
    // dropped: a closed pipe would be a different failure from a full one.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (data, ops) = loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(n > 0, "pgsidecar exited before its start line");
        if let Some(addrs) = started_addrs(&line) {
            break addrs;
        }
    };
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let ready = format!("http://{ops}/ready");
    for _ in 0..200 {
        if http
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Enough access lines (about 200 bytes each) to overflow the pipe and the writer's queue.
    let url = format!("http://{data}/v1/nothing-here");
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..1800 {
                assert_eq!(http.get(&url).send().await.unwrap().status(), 404);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let metrics = http
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped = metric(&metrics, "pgsidecar_log_lines_dropped_total", &[]).unwrap_or(0.0);
    assert!(dropped > 0.0, "lines were dropped and counted:\n{metrics}");
    assert_eq!(
        http.get(&ready).send().await.unwrap().status(),
        200,
        "still serving"
    );
    let _ = child.kill();
    let _ = child.wait();
}
