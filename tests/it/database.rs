//! The shared database full, down, or migrated by a newer binary: PostgreSQL refusing new
//! connections ("too many clients"), readiness with `health.ready_requires_database`, and a
//! schema with migrations this binary does not know.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};

use crate::helpers::*;
use crate::servers::PrivatePostgres;

async fn get_json(s: &Sidecar, path: &str) -> (u16, Value) {
    let r = s.http.get(s.ops_url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until `check` holds for the sidecar's /health body (status, body).
async fn wait_health(s: &Sidecar, what: &str, check: impl Fn(u16, &Value) -> bool) -> Value {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = get_json(s, "/health").await;
        if check(status, &v) {
            return v;
        }
        assert!(Instant::now() < until, "/health never showed {what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens connections to `url` until PostgreSQL refuses one with 53300; returns them.
async fn take_every_slot(url: &str) -> Vec<PgConnection> {
    let mut held = Vec::new();
    loop {
        match PgConnection::connect(url).await {
            Ok(c) => held.push(c),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("53300") => return held,
            Err(e) => panic!("unexpected connect error: {e}"),
        }
        assert!(held.len() < 100, "max_connections was not reached");
    }
}

/// Mixed traffic from `tasks` clients: (successes, 503s). Anything else fails the test.
async fn traffic(s: &Arc<Sidecar>, tag: &str, tasks: usize, each: usize) -> (usize, usize) {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let s = s.clone();
        let tag = tag.to_string();
        handles.push(tokio::spawn(async move {
            let (mut ok, mut unavailable) = (0, 0);
            for i in 0..each {
                let key = format!("{tag}-{t}-{i}");
                let started = Instant::now();
                let r = if i % 2 == 0 {
                    s.put_cache(&key, "1", "").await
                } else {
                    s.get_cache(&format!("{tag}-{t}-{}", i - 1)).await
                };
                assert!(
                    started.elapsed() < Duration::from_secs(6),
                    "a request hung: waits for a connection end at the acquire timeout"
                );
                match r.status().as_u16() {
                    200 | 204 | 404 => ok += 1,
                    503 => {
                        assert_error(r, 503, "database_unavailable").await;
                        unavailable += 1;
                    }
                    other => panic!("answered {other}"),
                }
            }
            (ok, unavailable)
        }));
    }
    let mut total = (0, 0);
    for h in handles {
        let (ok, unavailable) = h.await.unwrap();
        total.0 += ok;
        total.1 += unavailable;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clients_keeps_serving_on_open_connections_and_recovers() {
    let pg = PrivatePostgres::new();
    pg.start_with(&["-c", "max_connections=12"]);
    let s = Arc::new(
        Sidecar::builder()
            .db(&pg.url())
            .env("PGSIDECAR_DATABASE__MAX_CONNECTIONS", 6)
            .env("PGSIDECAR_DATABASE__MIN_CONNECTIONS", 2)
            .env("PGSIDECAR_SERVER__WORKER_THREADS", 1)
            .env("PGSIDECAR_DATABASE__ACQUIRE_TIMEOUT_MS", 1000)
            // The writes stuck on the lock below stay stuck until the test lets them go, however
            // slow the machine: timeouts would free their connections (and open the circuit).
            .env("PGSIDECAR_DATABASE__STATEMENT_TIMEOUT_MS", 60000)
            .env("PGSIDECAR_SERVER__REQUEST_TIMEOUT_MS", 60000)
            .start()
            .await,
    );
    assert_eq!(s.put_cache("locked", "0", "").await.status(), 204);
    // The sidecar holds its two warm connections; another client takes every other slot.
    let mut hog = take_every_slot(&pg.url()).await;
    // Writes stuck on a row lock hold every connection the sidecar has (two warm ones, maybe
    // one more), so a read needs another, which PostgreSQL refuses.
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgsidecar'",
    )
    .fetch_one(&mut hog[1])
    .await
    .unwrap();
    assert!((1..6).contains(&open), "{open} connections, of 6 allowed");
    hog[0].execute("BEGIN").await.unwrap();
    hog[0]
        .execute("SELECT * FROM pgsidecar.cache WHERE key = 'locked' FOR UPDATE")
        .await
        .unwrap();
    let mut stuck = Vec::new();
    for i in 0..open {
        // One after the other, so they are separate statements (batches), one per connection.
        let s2 = s.clone();
        stuck.push(tokio::spawn(async move {
            s2.put_cache("locked", &i.to_string(), "").await.status()
        }));
        let mut waits = 0;
        for _ in 0..200 {
            waits = settled_lock_waits(&mut hog[1]).await;
            if waits == i + 1 {
                break;
            }
        }
        assert_eq!(waits, i + 1);
    }
    let r = s.get_cache("other").await;
    assert!(matches!(r.status().as_u16(), 404 | 503), "{}", r.status());
    hog[0].execute("ROLLBACK").await.unwrap();
    for t in stuck {
        assert!(matches!(t.await.unwrap().as_u16(), 204 | 503));
    }
    // /health says why, and still passes the database (a warning): the sidecar serves.
    // (While every connection was stuck on the lock, a probe round may have found nothing
    // answering; the next one passes.)
    let v = wait_health(&s, "the refusal", |status, v| {
        status == 200
            && v["checks"]["postgres:responseTime"][0]["status"] == "pass"
            && v["checks"]["postgres:connections"][0]["output"]
                .as_str()
                .is_some_and(|o| o.contains("too many clients"))
    })
    .await;
    assert_eq!(v["checks"]["postgres:connections"][0]["status"], "warn");
    assert_eq!(get_json(&s, "/ready").await.0, 200);
    let (ok, unavailable) = traffic(&s, "full", 12, 30).await;
    eprintln!("while full: {ok} served, {unavailable} answered 503");
    assert!(
        ok >= 9 * (ok + unavailable) / 10,
        "served on its open connections: {ok} ok, {unavailable} 503"
    );

    // A sidecar starting now cannot get any connection: alive, not ready, saying why.
    let mut late = Sidecar::builder()
        .db(&pg.url())
        .env("PGSIDECAR_DATABASE__CONNECT_TIMEOUT_SECONDS", 1)
        .env("PGSIDECAR_DATABASE__ACQUIRE_TIMEOUT_MS", 500)
        .no_wait()
        .start()
        .await;
    let v = wait_health(&late, "the refusal", |status, v| {
        status == 503
            && v["checks"]["postgres:connections"][0]["output"]
                .as_str()
                .is_some_and(|o| o.contains("too many clients"))
    })
    .await;
    assert_eq!(v["checks"]["postgres:connections"][0]["status"], "fail");
    assert_eq!(get_json(&late, "/ready").await.0, 503);
    assert!(
        late.logs
            .wait_for("too many clients", Duration::from_secs(5)),
        "the retry says why"
    );

    // Slots free up: both recover without a restart, and the first grows its pool again.
    // Room for both: the first's full pool (6), the second's warm two, and each one's
    // listening connection (change notifications), with the 12 slots.
    while hog.len() > 2 {
        hog.pop().unwrap().close().await.unwrap();
    }
    wait_health(&s, "recovery", |status, v| {
        status == 200 && v["checks"].get("postgres:connections").is_none()
    })
    .await;
    late.wait_ready(Duration::from_secs(30)).await;
    let (ok, unavailable) = traffic(&s, "freed", 12, 30).await;
    assert_eq!(unavailable, 0, "{ok} served");
    assert!(late.child.try_wait().unwrap().is_none(), "never exited");
    let mut s = Arc::into_inner(s).unwrap();
    assert!(s.child.try_wait().unwrap().is_none(), "never exited");
    let starts = s
        .logs
        .lines()
        .iter()
        .filter(|l| l.contains("pgsidecar started"))
        .count();
    assert_eq!(starts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_with_and_without_the_database() {
    let pg = PrivatePostgres::new();
    pg.start();
    let strict = Sidecar::builder().db(&pg.url()).start().await;
    let lenient = Sidecar::builder()
        .db(&pg.url())
        .env("PGSIDECAR_HEALTH__READY_REQUIRES_DATABASE", "false")
        .env("PGSIDECAR_DATABASE__ACQUIRE_TIMEOUT_MS", 500)
        .start()
        .await;

    pg.stop();
    // Both report the database in /health; only the default turns unready.
    for s in [&strict, &lenient] {
        wait_health(s, "the outage", |status, v| {
            status == 503 && v["checks"]["postgres:responseTime"][0]["status"] == "fail"
        })
        .await;
    }
    let (status, v) = get_json(&strict, "/ready").await;
    assert_eq!(
        (status, v["reason"].as_str()),
        (503, Some("postgres unreachable"))
    );
    for _ in 0..5 {
        assert_eq!(
            get_json(&lenient, "/ready").await,
            (200, serde_json::json!({"ready": true}))
        );
        assert_eq!(get_json(&lenient, "/api/ready").await.0, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get_json(&lenient, "/api/health").await.0, 503);
    // Data requests still fail fast and clearly.
    assert_error(lenient.get_cache("k").await, 503, "database_unavailable").await;

    // Still lenient only about the database: before migrations ever ran it is not ready.
    let fresh = Sidecar::builder()
        .db(&pg.url())
        .env("PGSIDECAR_HEALTH__READY_REQUIRES_DATABASE", "false")
        .no_wait()
        .start()
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, v) = get_json(&fresh, "/ready").await;
    assert_eq!(
        (status, v["reason"].as_str()),
        (503, Some("database migrations not applied yet"))
    );

    pg.start();
    for s in [&strict, &lenient, &fresh] {
        s.wait_ready(Duration::from_secs(30)).await;
    }
    assert_eq!(lenient.put_cache("k", "1", "").await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_binary_serves_on_a_schema_migrated_by_a_newer_one() {
    let first = Sidecar::start().await;
    let db = first.db.clone();
    drop(first);
    // What a newer release's additive migration leaves: a ledger row this binary does not
    // know, and a new nullable column.
    let mut c = PgConnection::connect(&db).await.unwrap();
    c.execute(
        "INSERT INTO pgsidecar._sqlx_migrations \
           (version, description, success, checksum, execution_time) \
         VALUES (29991231000000, 'added by a newer pgsidecar', true, '\\x00', 1); \
         ALTER TABLE pgsidecar.cache ADD COLUMN hits bigint; \
         ALTER TABLE pgsidecar.sessions ADD COLUMN device text",
    )
    .await
    .unwrap();

    for migrate_on_start in ["true", "false"] {
        let s = Sidecar::builder()
            .db(&db)
            .env("PGSIDECAR_DATABASE__MIGRATE_ON_START", migrate_on_start)
            .start()
            .await;
        // Log lines reach the pipe up to 100 ms after they are written.
        assert!(s.logs.wait_for("does not know", Duration::from_secs(5)));
        let newer: Vec<Value> = s
            .logs
            .json()
            .into_iter()
            .filter(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("does not know"))
            })
            .collect();
        assert_eq!(newer.len(), 1, "one log line says so: {:?}", s.logs.lines());
        assert_eq!(newer[0]["schema_version"], 29991231000000_i64);
        assert_eq!(newer[0]["level"], "warn");
        assert_eq!(s.put_cache("k", r#"{"v":1}"#, "").await.status(), 204);
        assert_eq!(s.get_cache("k").await.text().await.unwrap(), r#"{"v":1}"#);
        let (token, _) = s.create_session(serde_json::json!({"user_id": "u"})).await;
        let r = s
            .http
            .get(s.url(&format!("/v1/sessions/{token}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // The ledger is as the newer binary left it: nothing re-applied, nothing removed.
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM pgsidecar._sqlx_migrations ORDER BY version")
            .fetch_all(&mut c)
            .await
            .unwrap();
    let mut expected: Vec<i64> = pgsidecar::store::MIGRATOR
        .iter()
        .map(|m| m.version)
        .collect();
    expected.push(29991231000000);
    assert_eq!(versions, expected);
}
