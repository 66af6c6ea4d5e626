//! A fleet: 100 sidecars with small pools, started at once on an empty database, on one
//! PostgreSQL with `max_connections = 50`, through PgBouncer in transaction mode, under mixed
//! reads and writes. bench/fleet.sh runs the same test longer (the knobs below).
//!
//! Knobs (environment): PGSIDECAR_FLEET_SIDECARS (100), PGSIDECAR_FLEET_CLIENTS (concurrent
//! client tasks, 48), PGSIDECAR_FLEET_ROUNDS (requests per client task, 24).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};

use crate::helpers::*;
use crate::servers::{PgBouncer, PrivatePostgres};

/// PgBouncer's server connections (default_pool_size): all PostgreSQL ever sees of the fleet.
const POOL_SIZE: u32 = 20;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one client task saw.
#[derive(Default)]
struct Seen {
    /// Keys written and acknowledged (204), with their values.
    acked: Vec<(String, String)>,
    ok: usize,
    unavailable: usize,
}

#[test]
fn a_fleet_of_sidecars_through_pgbouncer_shares_one_small_postgres() {
    // The sidecars are started from blocking-pool threads, and each dies with the thread that
    // started it (the harness's parent-death signal): keep those threads for the whole test.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
        .unwrap()
        .block_on(fleet());
}

async fn fleet() {
    let Some(bin) = PgBouncer::binary() else {
        return;
    };
    let sidecars = knob("PGSIDECAR_FLEET_SIDECARS", 100);
    let clients = knob("PGSIDECAR_FLEET_CLIENTS", 48);
    let rounds = knob("PGSIDECAR_FLEET_ROUNDS", 24);
    let started = Instant::now();

    let pg = PrivatePostgres::new();
    pg.start_with(&["-c", "max_connections=50"]);
    let mut admin = PgConnection::connect(&pg.url()).await.unwrap();
    admin.execute("CREATE DATABASE fleet").await.unwrap();
    let bouncer = PgBouncer::start(&bin, "transaction", pg.port, POOL_SIZE);

    // Every sidecar at once, on the empty database: each tries to migrate over the direct URL
    // (PostgreSQL refuses some of those connections: 50 slots for 100 sidecars), one applies the
    // migrations under sqlx's lock, the others find them applied.
    let handle = tokio::runtime::Handle::current();
    let starting: Vec<_> = (0..sidecars)
        .map(|_| {
            let b = Sidecar::builder()
                .db(&bouncer.url("fleet"))
                .env("PGSIDECAR_DATABASE__POOLER", "transaction")
                .env("PGSIDECAR_DATABASE__MIGRATE_URL", pg.db_url("fleet"))
                .env("PGSIDECAR_DATABASE__MAX_CONNECTIONS", 2)
                .env("PGSIDECAR_DATABASE__MIN_CONNECTIONS", 1)
                .env("PGSIDECAR_DATABASE__CONNECT_TIMEOUT_SECONDS", 2)
                .env("PGSIDECAR_SERVER__WORKER_THREADS", 1)
                .env("PGSIDECAR_HEALTH__INTERVAL_MS", 1000)
                // The header-read timeout also closes idle keep-alive connections; with 100
                // sidecars the client reuses each of its connections seconds apart, and would
                // race those closes.
                .env("PGSIDECAR_SERVER__HEADER_READ_TIMEOUT_MS", 120000)
                .env("PGSIDECAR_LOG__LEVEL", "warn,pgsidecar=info")
                .no_wait();
            let handle = handle.clone();
            // The harness waits for each start line synchronously: one blocking thread each,
            // so the processes really start together.
            tokio::task::spawn_blocking(move || handle.block_on(b.start()))
        })
        .collect();
    let mut fleet = Vec::new();
    for s in starting {
        fleet.push(Arc::new(s.await.unwrap()));
    }
    futures_util::future::join_all(fleet.iter().map(|s| s.wait_ready(Duration::from_secs(90))))
        .await;
    eprintln!("{sidecars} sidecars ready after {:?}", started.elapsed());

    // Exactly one migration run: each embedded version once in the ledger, applied
    // successfully; no sidecar failed to start.
    let mut db = PgConnection::connect(&pg.db_url("fleet")).await.unwrap();
    let ledger: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM pgsidecar._sqlx_migrations ORDER BY version")
            .fetch_all(&mut db)
            .await
            .unwrap();
    let embedded: Vec<(i64, bool)> = pgsidecar::store::MIGRATOR
        .iter()
        .map(|m| (m.version, true))
        .collect();
    assert_eq!(ledger, embedded);
    for s in &fleet {
        assert!(
            !s.logs.contains("migration failed") && !s.logs.contains("\"level\":\"error\""),
            "{:?}",
            s.logs.lines()
        );
    }

    // PostgreSQL's connections, sampled while the fleet works: never more than PgBouncer's pool
    // (this test's own connections closed or left out).
    db.close().await.unwrap();
    let sampling = Arc::new(AtomicBool::new(true));
    let most = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (sampling, most) = (sampling.clone(), most.clone());
        let mut c = PgConnection::connect(&pg.db_url("fleet")).await.unwrap();
        tokio::spawn(async move {
            while sampling.load(Ordering::Acquire) {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'fleet' \
                     AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                )
                .fetch_one(&mut c)
                .await
                .unwrap();
                most.fetch_max(n, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Mixed reads and writes across the fleet: each write read back through another sidecar,
    // each session created on one sidecar and validated on another.
    let traffic = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|t| {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                let mut seen = Seen::default();
                for i in 0..rounds {
                    let n = fleet.len();
                    let (a, b) = (
                        &fleet[(t * 7 + i * 13) % n],
                        &fleet[(t * 11 + i * 5 + 1) % n],
                    );
                    match i % 3 {
                        0 | 1 => {
                            let key = format!("c{t}-{i}");
                            let value = format!("{{\"t\":{t},\"i\":{i}}}");
                            let r = a.put_cache(&key, &value, "").await;
                            if expect(r, 204, &mut seen).await.is_some() {
                                seen.acked.push((key.clone(), value.clone()));
                                let r = b.get_cache(&key).await;
                                if let Some(body) = expect(r, 200, &mut seen).await {
                                    assert_eq!(body, value, "a write is visible fleet-wide");
                                }
                            }
                        }
                        _ => {
                            let r = a
                                .post_json("/v1/sessions", &json!({"user_id": format!("u{t}")}))
                                .await;
                            if let Some(body) = expect(r, 201, &mut seen).await {
                                let v: Value = serde_json::from_str(&body).unwrap();
                                let token = v["token"].as_str().unwrap();
                                let r = b
                                    .http
                                    .get(b.url(&format!("/v1/sessions/{token}")))
                                    .send()
                                    .await
                                    .unwrap();
                                expect(r, 200, &mut seen).await;
                            }
                        }
                    }
                }
                seen
            })
        })
        .collect();
    let mut acked = Vec::new();
    let (mut ok, mut unavailable) = (0, 0);
    for t in tasks {
        let seen = t.await.unwrap();
        acked.extend(seen.acked);
        ok += seen.ok;
        unavailable += seen.unavailable;
    }
    let took = traffic.elapsed();
    sampling.store(false, Ordering::Release);
    sampler.await.unwrap();
    eprintln!(
        "fleet: {ok} requests served, {unavailable} answered 503, in {took:?} ({:.0} req/s); \
         at most {} server connections (pool {POOL_SIZE}); {:?} in all",
        (ok + unavailable) as f64 / took.as_secs_f64(),
        most.load(Ordering::Acquire),
        started.elapsed()
    );
    assert!(ok > 0);
    assert!(
        most.load(Ordering::Acquire) <= POOL_SIZE as i64,
        "PostgreSQL saw {} connections",
        most.load(Ordering::Acquire)
    );

    // No acknowledged write is lost.
    let mut db = PgConnection::connect(&pg.db_url("fleet")).await.unwrap();
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT key, value FROM pgsidecar.cache WHERE key LIKE 'c%'")
            .fetch_all(&mut db)
            .await
            .unwrap();
    let stored: std::collections::HashMap<_, _> = stored.into_iter().collect();
    for (key, value) in &acked {
        assert_eq!(stored.get(key), Some(value), "acknowledged write {key}");
    }
    for s in &fleet {
        assert!(
            s.http
                .get(s.ops_url("/live"))
                .send()
                .await
                .unwrap()
                .status()
                == 200
        );
    }
    drop(fleet);
    eprintln!(
        "{} acknowledged writes checked; bouncer log:\n{}",
        acked.len(),
        tail(&bouncer.log())
    );
}

/// Checks a response: `want` (returns the body), or a clear 503 (counted; returns None).
/// Anything else fails the test.
async fn expect(r: reqwest::Response, want: u16, seen: &mut Seen) -> Option<String> {
    let status = r.status().as_u16();
    if status == want {
        seen.ok += 1;
        return Some(r.text().await.unwrap());
    }
    if status == 503 {
        let v: Value = r.json().await.unwrap();
        let code = v["error"]["code"].as_str().unwrap_or_default();
        assert!(
            code.starts_with("database_") || code == "overloaded",
            "a 503 says why: {v}"
        );
        seen.unavailable += 1;
        return None;
    }
    panic!(
        "answered {status} where {want} or 503 was expected: {}",
        r.text().await.unwrap()
    );
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
