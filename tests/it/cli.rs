//! The command line: bad configuration, check-config, migrate, probe, --version.

use crate::helpers::*;

#[test]
fn bad_config_exits_64_with_one_line_naming_the_key() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("PGSIDECAR_DATABASE__MAX_CONNECTIONS", "lots")],
            "database.max_connections",
        ),
        (
            &[("PGSIDECAR_DATABASE__MAX_CONNECTIONS", "0")],
            "database.max_connections",
        ),
        (
            &[("PGSIDECAR_SERVER__DATA_LISTEN", "0.0.0.0:7070")],
            "server.data_listen",
        ),
        (
            &[("PGSIDECAR_SERVER__DATA_LISTEN", "not an address")],
            "server.data_listen",
        ),
        (
            &[("PGSIDECAR_SERVER__AUTH_TOKEN", "short")],
            "server.auth_token",
        ),
        (&[("DATABASE_URL", "mysql://x")], "database.url"),
        (&[("PGSIDECAR_DATABASE__SCHEMA", "a-b")], "database.schema"),
        (
            &[("PGSIDECAR_CACHE__DEFAULT_TTL_SECONDS", "0")],
            "cache.default_ttl_seconds",
        ),
        (&[("PGSIDECAR_LOG__LEVEL", "loud=[")], "log.level"),
        // EnvFilter takes a bare word for a target name: every line would be silenced.
        (&[("PGSIDECAR_LOG__LEVEL", "verbose")], "log.level"),
        (&[("RUST_LOG", "verbose")], "RUST_LOG"),
        (
            &[("PGSIDECAR_SESSIONS__UPDATE_AGE_SECONDS", "0")],
            "sessions.update_age_seconds",
        ),
        (&[("PGSIDECAR_SERVER__UNKNOWN_KEY", "1")], "unknown_key"),
    ];
    for (env, key) in cases {
        let (code, stdout, stderr) = run_cli(&[], env);
        assert_eq!(code, 64, "{env:?}: stderr {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "one line for {env:?}: {stderr}"
        );
        assert!(stderr.contains(key), "{env:?}: {stderr} should name {key}");
        assert!(
            stdout.is_empty(),
            "nothing on stdout before start: {stdout}"
        );
    }
}

#[test]
fn config_file_layers_and_missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsidecar.toml");
    std::fs::write(
        &path,
        "[database]\nmax_connections = 9\n[cache]\ndefault_ttl_seconds = 5\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (code, out, err) = run_cli(
        &["--config", p, "check-config"],
        &[("PGSIDECAR_CACHE__DEFAULT_TTL_SECONDS", "7")],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["database"]["max_connections"], 9, "file over defaults");
    assert_eq!(v["cache"]["default_ttl_seconds"], 7, "env over file");
    // PGSIDECAR_CONFIG works like --config.
    let (code, out, _) = run_cli(&["check-config"], &[("PGSIDECAR_CONFIG", p)]);
    assert_eq!(code, 0);
    assert!(out.contains("\"max_connections\": 9"));
    let (code, _, err) = run_cli(&["--config", "/nonexistent/x.toml", "check-config"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("/nonexistent/x.toml"), "{err}");
    std::fs::write(&path, "[database\n").unwrap();
    let (code, _, err) = run_cli(&["--config", p, "check-config"], &[]);
    assert_eq!(code, 64, "{err}");
}

#[test]
fn check_config_redacts_secrets() {
    let (code, out, _) = run_cli(
        &["check-config"],
        &[
            (
                "DATABASE_URL",
                "postgres://app:hunter2hunter2@db.internal:5432/app",
            ),
            ("PGSIDECAR_SERVER__AUTH_TOKEN", "s3cr3t-s3cr3t-s3cr3t"),
            ("PGSIDECAR_SERVER__DATA_LISTEN", "0.0.0.0:7070"),
        ],
    );
    assert_eq!(code, 0);
    assert!(!out.contains("hunter2") && !out.contains("s3cr3t"), "{out}");
    assert!(
        out.contains("postgres://app:[redacted]@db.internal:5432/app"),
        "{out}"
    );
}

#[test]
fn version_and_help() {
    let (code, out, _) = run_cli(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
    let (code, out, _) = run_cli(&["--help"], &[]);
    assert_eq!(code, 0);
    for cmd in ["serve", "migrate", "check-config", "probe"] {
        assert!(out.contains(cmd), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_command_then_serve_without_migrating() {
    let db = fresh_db().await;
    let (code, out, err) = run_cli(&["migrate"], &[("DATABASE_URL", &db)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("migrations applied"));
    // Idempotent.
    let (code, _, _) = run_cli(&["migrate"], &[("DATABASE_URL", &db)]);
    assert_eq!(code, 0);
    let s = Sidecar::builder()
        .db(&db)
        .env("PGSIDECAR_DATABASE__MIGRATE_ON_START", "false")
        .start()
        .await;
    assert_eq!(s.put_cache("a", "1", "").await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_migrations_and_no_migrate_on_start_it_is_not_ready() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_DATABASE__MIGRATE_ON_START", "false")
        .no_wait()
        .start()
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let r = s.http.get(s.ops_url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_error(s.get_cache("a").await, 503, "database_unavailable").await;
}

#[test]
fn migrate_against_unreachable_database_names_the_cause() {
    let (code, out, _) = run_cli(
        &["migrate"],
        &[
            ("DATABASE_URL", "postgres://u:pw-secret@127.0.0.1:1/x"),
            ("PGSIDECAR_DATABASE__CONNECT_TIMEOUT_SECONDS", "2"),
        ],
    );
    assert_eq!(code, 1);
    assert!(!out.contains("pw-secret"), "{out}");
    // The real cause, not sqlx's pool timeout that used to hide it.
    assert!(out.contains("Connection refused"), "{out}");
    assert!(out.contains("127.0.0.1:1"), "{out}");
    assert!(!out.contains("acquire timeout"), "{out}");
}

#[test]
fn migrate_against_a_missing_database_says_so_cleanly() {
    let missing = with_database(&admin_url(), "pgsidecar_no_such_database");
    let (code, out, _) = run_cli(&["migrate"], &[("DATABASE_URL", &missing)]);
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("migration failed"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains(r#"database \"pgsidecar_no_such_database\" does not exist (SQLSTATE 3D000)"#),
        "{line}"
    );
    // Not the line of PostgreSQL's C source that raised it.
    assert!(!line.contains("at line"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_asks_the_local_ops_listener_and_says_what_it_heard() {
    // A drain long enough to ask while not ready.
    let s = Sidecar::builder()
        .env("PGSIDECAR_SHUTDOWN__DRAIN_SECONDS", "5")
        .start()
        .await;
    let port = s.ops.rsplit(':').next().unwrap().to_string();
    let ops = format!("0.0.0.0:{port}");
    let env = [("PGSIDECAR_SERVER__OPS_LISTEN", ops.as_str())];
    let (code, out, err) = run_cli(&["probe", "live"], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        r#"pgsidecar probe /live: HTTP/1.0 200 OK {"live":true}"#
    );
    let (code, out, err) = run_cli(&["probe", "ready"], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        r#"pgsidecar probe /ready: HTTP/1.0 200 OK {"ready":true}"#
    );
    // Not ready: 1, and the reason on stderr.
    s.sigterm();
    let mut said = String::new();
    for _ in 0..100 {
        let (code, _, err) = run_cli(&["probe", "ready"], &env);
        if code == 1 {
            said = err;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        said.trim()
            .starts_with("pgsidecar probe /ready: HTTP/1.0 503")
            && said.contains("shutting down"),
        "{said}"
    );
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    drop(s);
    let (code, out, err) = run_cli(&["probe", "live"], &env);
    assert_eq!(code, 1, "nothing listens any more");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.trim()
            .starts_with("pgsidecar probe /live: cannot ask the ops listener at 127.0.0.1:")
            && err.contains("refused"),
        "{err}"
    );
}
