//! Failover: a real streaming standby (`pg_basebackup -R`), the primary stopped, the standby
//! promoted, PgBouncer re-pointed; read-only servers; connections that outlive their lifetime.

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};

use crate::helpers::*;
use crate::servers::{PgBouncer, PrivatePostgres};

/// A PUT of a unique key: the status and the error code, if any.
async fn put(s: &Sidecar, key: &str) -> (u16, Option<String>) {
    let r = s.put_cache(key, &format!("\"{key}\""), "").await;
    let status = r.status().as_u16();
    if status == 204 {
        return (status, None);
    }
    let v: Value = r.json().await.unwrap();
    (status, v["error"]["code"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_promoted_standby_behind_pgbouncer() {
    let Some(bin) = PgBouncer::binary() else {
        return;
    };
    let primary = PrivatePostgres::new();
    primary.start();
    let mut c = PgConnection::connect(&primary.url()).await.unwrap();
    c.execute("CREATE DATABASE app").await.unwrap();
    c.close().await.unwrap();
    let standby = primary.standby();
    standby.start();

    let bouncer = PgBouncer::start(&bin, "transaction", primary.port, 4);
    let s = Sidecar::builder()
        .db(&bouncer.url("app"))
        .env("PGSIDECAR_DATABASE__POOLER", "transaction")
        .env("PGSIDECAR_DATABASE__MIGRATE_URL", primary.db_url("app"))
        .env("PGSIDECAR_DATABASE__ACQUIRE_TIMEOUT_MS", 1000)
        .env("PGSIDECAR_DATABASE__CONNECT_TIMEOUT_SECONDS", 2)
        .start()
        .await;

    let mut acked = Vec::new();
    for i in 0..20 {
        let key = format!("before{i}");
        assert_eq!(put(&s, &key).await, (204, None));
        acked.push(key);
    }

    // The primary goes away: writes get a clear 503.
    primary.stop();
    let mut seen = Vec::new();
    for i in 0..10 {
        let key = format!("down{i}");
        match put(&s, &key).await {
            (204, _) => acked.push(key),
            (503, Some(code)) => seen.push(code),
            other => panic!("while the primary is down: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.iter().any(|c| c == "database_unavailable"),
        "writes answered {seen:?}"
    );

    // PgBouncer re-pointed at the standby before it is promoted: reads work, writes are refused
    // as read-only.
    bouncer.repoint(standby.port);
    let until = Instant::now() + Duration::from_secs(30);
    let mut read_only = false;
    while Instant::now() < until && !read_only {
        let key = format!("switch{}", acked.len());
        match put(&s, &key).await {
            (204, _) => panic!("a standby acknowledged a write"),
            (503, Some(code)) if code == "database_read_only" => read_only = true,
            (503, Some(code)) if code == "database_unavailable" => {}
            other => panic!("during the switch: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        read_only,
        "writes reached the standby; logs: {:?}",
        s.logs.lines()
    );
    assert_eq!(
        s.get_cache("before0").await.status(),
        200,
        "reads work on the standby"
    );

    // Promoted: writes succeed again within 5 s of the new primary accepting them.
    standby.promote();
    let promoted = Instant::now();
    let mut first = None;
    for i in 0.. {
        let key = format!("after{i}");
        match put(&s, &key).await {
            (204, _) => {
                acked.push(key);
                first.get_or_insert(promoted.elapsed());
                if i >= 20 {
                    break;
                }
            }
            (503, Some(_)) if first.is_none() => {}
            other => panic!("after the promotion: {other:?}"),
        }
        assert!(
            promoted.elapsed() < Duration::from_secs(5) || first.is_some(),
            "no write succeeded within 5 s of the promotion; logs: {:?}",
            s.logs.lines()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("first write after the promotion: {:?}", first.unwrap());

    // No acknowledged write is lost: those acknowledged by the new primary, and those
    // acknowledged by the old one (a fast shutdown sends all WAL to the standby before it ends).
    let mut c = PgConnection::connect(&standby.db_url("app")).await.unwrap();
    let stored: Vec<String> = sqlx::query_scalar("SELECT key FROM pgsidecar.cache")
        .fetch_all(&mut c)
        .await
        .unwrap();
    let lost: Vec<&String> = acked.iter().filter(|k| !stored.contains(k)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_meets_a_read_only_server_is_closed() {
    let primary = PrivatePostgres::new();
    primary.start();
    let bootstrap = Sidecar::builder().db(&primary.url()).start().await;
    drop(bootstrap);
    let standby = primary.standby();
    standby.start();
    // Directly on the standby, one connection: the schema is there (replicated).
    let s = Sidecar::builder()
        .db(&standby.url())
        .env("PGSIDECAR_DATABASE__MIGRATE_ON_START", "false")
        .env("PGSIDECAR_DATABASE__MAX_CONNECTIONS", 1)
        .env("PGSIDECAR_DATABASE__MIN_CONNECTIONS", 1)
        .env("PGSIDECAR_SERVER__WORKER_THREADS", 1)
        .start()
        .await;
    let mut c = PgConnection::connect(&standby.url()).await.unwrap();
    // One pooled connection, once start-up's extra ones (a health check's) have gone.
    let mut before = sidecar_pids(&mut c).await;
    for _ in 0..100 {
        if before.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        before = sidecar_pids(&mut c).await;
    }
    assert_eq!(before.len(), 1, "one pooled connection: {before:?}");
    assert_error(s.put_cache("k", "1", "").await, 503, "database_read_only").await;
    // That connection is closed; the next statement opens another.
    assert_eq!(s.get_cache("k").await.status(), 404);
    let mut closed = false;
    for _ in 0..100 {
        if !sidecar_pids(&mut c).await.contains(&before[0]) {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        closed,
        "the connection that met the read-only server was closed"
    );
}

async fn sidecar_pids(c: &mut PgConnection) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = 'pgsidecar'")
        .fetch_all(c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connections_are_replaced_after_their_lifetime() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_DATABASE__MAX_LIFETIME_SECONDS", 1)
        .env("PGSIDECAR_DATABASE__MAX_CONNECTIONS", 2)
        .env("PGSIDECAR_SERVER__WORKER_THREADS", 1)
        .start()
        .await;
    let mut c = PgConnection::connect(&s.db).await.unwrap();
    let started = Instant::now();
    // Steady traffic keeps the connections in the store's own free list, which sqlx never sees.
    while started.elapsed() < Duration::from_secs(4) {
        assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
        assert_eq!(s.get_cache("k").await.status(), 200);
    }
    let oldest: f64 = sqlx::query_scalar(
        "SELECT coalesce(max(extract(epoch FROM now() - backend_start)), 0)::float8 \
         FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'pgsidecar'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert!(
        oldest < 3.0,
        "a connection lived {oldest} s with max_lifetime_seconds = 1"
    );
}
