//! The ops listener: health, readiness, liveness, the Next.js-style routes and /metrics.

use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_health_json_with_every_check() {
    let s = Sidecar::start().await;
    let r = s.http.get(s.ops_url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/health+json");
    let v: Value = r.json().await.unwrap();
    assert!(
        ["pass", "warn"].contains(&v["status"].as_str().unwrap()),
        "{v}"
    );
    assert_eq!(v["serviceId"], "test-host");
    assert!(v["version"].is_string());
    let checks = v["checks"].as_object().unwrap();
    for name in [
        "postgres:responseTime",
        "postgres:tables",
        "memory:utilization",
        "cpu:utilization",
        "disk:utilization",
    ] {
        let entries = checks
            .get(name)
            .unwrap_or_else(|| panic!("missing check {name} in {v}"));
        let first = &entries[0];
        assert!(
            first["status"].is_string() && first["time"].as_str().unwrap().ends_with('Z'),
            "{name}: {first}"
        );
    }
    let pg = &checks["postgres:responseTime"][0];
    assert_eq!(pg["status"], "pass");
    assert_eq!(pg["observedUnit"], "ms");
    assert!(pg["observedValue"].as_f64().unwrap() >= 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_live_and_nextjs_routes() {
    let s = Sidecar::start().await;
    let get = |p: &str| s.http.get(s.ops_url(p)).send();
    let r = get("/ready").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        serde_json::json!({"ready": true})
    );
    assert_eq!(get("/live").await.unwrap().status(), 200);
    let r = get("/api/health").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["database"], true);
    assert_eq!(v["cache"], true);
    chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap())
        .expect("RFC 3339 timestamp");
    let r = get("/api/ready").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        serde_json::json!({"ready": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_upstream_failing_fails_health_and_readiness() {
    // An upstream that refuses connections: port 9 on loopback (discard) is closed here.
    let s = Sidecar::builder()
        .env(
            "PGSIDECAR_HEALTH__UPSTREAMS",
            r#"[{name="app", url="http://127.0.0.1:9/api/health", timeout_ms=300, critical=true}]"#,
        )
        .no_wait()
        .start()
        .await;
    // Not ready, and once migrations are in, the reason names the failing upstream.
    // A deadline, not a count: four suites share two cores, and a fresh database's
    // migrations plus the first upstream timeout can take seconds there.
    let mut reason = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let r = s.http.get(s.ops_url("/ready")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let v: Value = r.json().await.unwrap();
        reason = v["reason"].as_str().unwrap().to_string();
        // The full phrase: the migrations reason ("not applied yet") contains "app" too.
        if reason.contains("critical upstream failing: app") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        reason.contains("critical upstream failing: app"),
        "{reason}"
    );
    let r = s.http.get(s.ops_url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "fail");
    assert_eq!(v["checks"]["upstream:app"][0]["status"], "fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_and_non_critical_upstreams() {
    // The sidecar's own ops port is a healthy upstream for a second sidecar.
    let first = Sidecar::start().await;
    let upstreams = format!(
        r#"[{{name="peer", url="{}/live", timeout_ms=500, critical=true}}, {{name="optional", url="http://127.0.0.1:9/", timeout_ms=300, critical=false}}]"#,
        first.ops
    );
    let s = Sidecar::builder()
        .env("PGSIDECAR_HEALTH__UPSTREAMS", upstreams)
        .start()
        .await;
    // Until a round has checked both upstreams (a deadline, not a fixed wait: CI is loaded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let v = loop {
        let r = s.http.get(s.ops_url("/health")).send().await.unwrap();
        assert_eq!(r.status(), 200, "warn is still 200");
        let v: Value = r.json().await.unwrap();
        if v["checks"]["upstream:optional"][0]["status"] == "warn"
            || std::time::Instant::now() > deadline
        {
            break v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(v["status"], "warn");
    assert_eq!(v["checks"]["upstream:peer"][0]["status"], "pass");
    assert_eq!(v["checks"]["upstream:optional"][0]["status"], "warn");
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

const REQUIRED_METRICS: &[&str] = &[
    "pgsidecar_http_requests_total",
    "pgsidecar_http_request_duration_seconds",
    "pgsidecar_db_query_duration_seconds",
    "pgsidecar_db_pool_connections",
    "pgsidecar_db_pool_max_connections",
    "pgsidecar_health_check_up",
    "pgsidecar_log_lines_dropped_total",
    "pgsidecar_build_info",
    "pgsidecar_cache_requests_total",
    "pgsidecar_session_validations_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_with_help_and_histograms() {
    let s = Sidecar::start().await;
    // Some traffic so request, cache, session and db series exist.
    s.put_cache("k", "1", "").await;
    s.get_cache("k").await;
    s.get_cache("missing").await;
    let (token, _) = s.create_session(serde_json::json!({"user_id": "u"})).await;
    s.http
        .get(s.url(&format!("/v1/sessions/{token}")))
        .send()
        .await
        .unwrap();
    s.http
        .get(s.url("/v1/cache/secret%20key%20value"))
        .send()
        .await
        .unwrap();
    let _ = s.http.get(s.ops_url("/metrics")).send().await.unwrap();
    let r = s.http.get(s.ops_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();

    for name in REQUIRED_METRICS {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "no samples for {name}"
        );
    }
    for name in [
        "pgsidecar_http_request_duration_seconds",
        "pgsidecar_db_query_duration_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} histogram")),
            "{name} must be a histogram"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{")),
            "{name} has no buckets"
        );
    }
    // Every metric family has help text.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
    }
    // Labels carry route templates, never keys or tokens.
    assert!(
        text.contains(r#"route="/v1/cache/{key}""#),
        "route template label"
    );
    assert!(
        text.contains(r#"route="/v1/sessions/{token}""#),
        "route template label"
    );
    assert!(!text.contains(&token), "token in metrics");
    assert!(!text.contains("secret"), "key in metrics");
    let hits = &[("operation", "get"), ("result", "hit")];
    assert_eq!(
        metric(&text, "pgsidecar_cache_requests_total", hits),
        Some(1.0),
        "{text}"
    );
    let misses = &[("operation", "get"), ("result", "miss")];
    assert_eq!(
        metric(&text, "pgsidecar_cache_requests_total", misses),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "pgsidecar_session_validations_total",
            &[("result", "valid")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "pgsidecar_db_pool_max_connections", &[]),
        Some(20.0)
    );
    // CPU time with the kernel's tick precision: a fresh sidecar has used well under a
    // second, which the whole-second counter it used to be showed as 0.
    let cpu = metric(&text, "process_cpu_seconds_total", &[]).unwrap();
    assert!(cpu > 0.0 && cpu < 600.0, "{cpu}");
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter"),
        "{text}"
    );

    // promtool is the reference linter; scripts/test.sh installs it when it can.
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && report.trim().is_empty(),
            "promtool check metrics reported:\n{report}"
        );
    } else {
        // scripts/test.sh sets this when promtool is installed: then the lint must run.
        assert!(
            std::env::var("PGSIDECAR_REQUIRE_PROMTOOL").is_err(),
            "promtool is required but could not be run"
        );
        eprintln!(
            "promtool not installed: skipping the promtool lint (scripts/test.sh installs it as root)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_errors_are_json_and_request_ids_echo() {
    let s = Sidecar::start().await;
    assert_error(
        s.http.get(s.ops_url("/nope")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_error(
        s.http.post(s.ops_url("/health")).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    let r = s
        .http
        .get(s.ops_url("/live"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = s.http.get(s.ops_url("/live")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "generated id {id}");
    // Oversized or unprintable ids are replaced rather than logged.
    let r = s
        .http
        .get(s.ops_url("/live"))
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"].len(), 36);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_listener_does_not_serve_ops_routes_and_vice_versa() {
    let s = Sidecar::start().await;
    assert_error(
        s.http.get(s.url("/health")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_error(
        s.http.get(s.ops_url("/v1/cache/k")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_names_the_kind_of_failure_never_the_servers_words() {
    // The ops port answers anyone: a missing role or database must not be named there. The
    // full error goes to the log.
    let cases = [
        (
            "pgsidecar_missing_db_x7",
            "postgres",
            "database does not exist",
        ),
        (
            "postgres",
            "pgsidecar_missing_role_x7",
            "authentication failed",
        ),
    ];
    for (db, role, phrase) in cases {
        let url = with_database(&admin_url(), db).replacen("postgres@", &format!("{role}@"), 1);
        let s = Sidecar::builder().db(&url).no_wait().start().await;
        let mut body = String::new();
        for _ in 0..200 {
            body = s
                .http
                .get(s.ops_url("/health"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if body.contains(phrase) && body.contains("circuit open") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(body.contains(phrase), "{phrase}: {body}");
        assert!(body.contains("circuit open"), "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "fail");
        for name in [
            "pgsidecar_missing_db_x7",
            "pgsidecar_missing_role_x7",
            "SQLSTATE",
        ] {
            assert!(!body.contains(name), "{name} shown on /health: {body}");
        }
        let ready: Value = s
            .http
            .get(s.ops_url("/ready"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(!ready.to_string().contains("_x7"), "{ready}");
        // The log names it, once per change of cause, without PostgreSQL's source line.
        let failed: Vec<_> = s
            .logs
            .lines()
            .into_iter()
            .filter(|l| l.contains("postgres check failed"))
            .collect();
        // (Two when a loaded machine made the first check time out before the refusal came.)
        assert!((1..=2).contains(&failed.len()), "{failed:?}");
        let named = failed
            .iter()
            .find(|l| l.contains("_x7"))
            .expect("named in the log");
        assert!(!named.contains("at line"), "{named}");
        // And the start-up retries say why too, instead of an acquire timeout.
        let retry = s
            .logs
            .wait_for_line(
                "database not ready; retrying",
                std::time::Duration::from_secs(5),
            )
            .expect("a retry line");
        assert!(
            retry.contains("_x7") && retry.contains("SQLSTATE"),
            "{retry}"
        );
        assert!(!retry.contains("acquire timeout"), "{retry}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_named_at_start_up() {
    // Nothing listens on port 1: the start-up retries say "refused", not sqlx's acquire timeout.
    let s = Sidecar::builder()
        .db("postgres://postgres@127.0.0.1:1/postgres")
        .no_wait()
        .start()
        .await;
    let retry = s
        .logs
        .wait_for_line(
            "database not ready; retrying",
            std::time::Duration::from_secs(10),
        )
        .expect("a retry line");
    assert!(retry.contains("Connection refused"), "{retry}");
    // The monitor's first check waits on the pool; the next ones, with connections of their
    // own, see the refusal.
    let mut output = String::new();
    for _ in 0..200 {
        let v: Value = s
            .http
            .get(s.ops_url("/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        output = v["checks"]["postgres:responseTime"][0]["output"].to_string();
        if output.contains("connection refused") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(output.contains("connection refused"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_full_version_and_logs_failing_checks_as_a_list() {
    let s = Sidecar::builder()
        .env(
            "PGSIDECAR_HEALTH__UPSTREAMS",
            r#"[{name="optional", url="http://127.0.0.1:9/", timeout_ms=300, critical=false}]"#,
        )
        .start()
        .await;
    let v: Value = s
        .http
        .get(s.ops_url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["releaseId"], env!("CARGO_PKG_VERSION"));
    assert!(
        s.logs
            .wait_for("\"status\":\"Warn\"", std::time::Duration::from_secs(5))
            || s.logs.contains("health status changed")
    );
    let changes: Vec<Value> = s
        .logs
        .json()
        .into_iter()
        .filter(|l| l["message"] == "health status changed")
        .collect();
    assert!(!changes.is_empty());
    for c in &changes {
        assert!(c["failing"].is_array(), "a JSON array: {c}");
    }
    assert!(
        changes.iter().any(|c| c["failing"]
            .as_array()
            .unwrap()
            .contains(&Value::from("upstream:optional"))),
        "{changes:?}"
    );
}
