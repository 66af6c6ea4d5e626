//! Behind PgBouncer (Debian's 1.18), in session and in transaction mode: the data API behaves as
//! it does directly (a mixed workload checked against a sequential model, batches included),
//! the statement timeout still holds, and migrations go over a direct URL or wait for one.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor, PgConnection};

use crate::helpers::*;
use crate::servers::PgBouncer;

/// The port of the suite's PostgreSQL.
pub fn suite_pg_port() -> u16 {
    admin_url().parse::<PgConnectOptions>().unwrap().get_port()
}

/// The database name of a postgres:// URL.
pub fn db_name(url: &str) -> String {
    url.parse::<PgConnectOptions>()
        .unwrap()
        .get_database()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_api_through_pgbouncer_in_session_mode() {
    data_api_through_pgbouncer("session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_api_through_pgbouncer_in_transaction_mode() {
    data_api_through_pgbouncer("transaction").await;
}

async fn data_api_through_pgbouncer(mode: &str) {
    let Some(bin) = PgBouncer::binary() else {
        return;
    };
    // In transaction mode, fewer server connections than the sidecar has client connections
    // (2 threads x 4): consecutive transactions of one sidecar connection land on different
    // server connections, which named prepared statements would not survive. Session mode
    // needs one server connection per client connection (and one for the migrations).
    let pool = if mode == "session" { 10 } else { 3 };
    let bouncer = PgBouncer::start(&bin, mode, suite_pg_port(), pool);
    let direct = fresh_db().await;
    let mut b = Sidecar::builder()
        .db(&bouncer.url(&db_name(&direct)))
        .env("PGSIDECAR_DATABASE__POOLER", mode)
        .env("PGSIDECAR_SERVER__WORKER_THREADS", 2)
        .env("PGSIDECAR_DATABASE__MAX_CONNECTIONS", 8)
        .env("PGSIDECAR_BATCH__MAX_IN_FLIGHT", 2)
        .env("PGSIDECAR_DATABASE__STATEMENT_TIMEOUT_MS", 1000)
        .env("PGSIDECAR_SESSIONS__UPDATE_AGE_SECONDS", 1);
    if mode == "transaction" {
        // Migrations need their advisory lock on one server connection: a direct URL. In
        // session mode they go through the pooler.
        b = b.env("PGSIDECAR_DATABASE__MIGRATE_URL", &direct);
    }
    let s = Arc::new(b.start().await);
    assert!(
        s.logs.contains(&format!("\"pooler\":\"{mode}\"")),
        "the start line shows the mode"
    );

    // The same mixed workload as directly, checked against a sequential model.
    let (single, all) = crate::concurrency::mixed_operations_on(s.clone()).await;
    assert!(
        single < all,
        "batches of more than one read formed ({single} of {all} had one); pgbouncer: {}",
        bouncer.log()
    );

    every_route_answers_as_directly(&s).await;

    // The statement timeout holds behind the pooler too (SET per session, or SET LOCAL in
    // each transaction): a write stuck on a row lock is cancelled.
    assert_eq!(s.put_cache("locked", "1", "").await.status(), 204);
    let mut blocker = PgConnection::connect(&direct).await.unwrap();
    blocker.execute("BEGIN").await.unwrap();
    blocker
        .execute("SELECT * FROM pgsidecar.cache WHERE key = 'locked' FOR UPDATE")
        .await
        .unwrap();
    assert_error(
        s.put_cache("locked", "2", "").await,
        503,
        "database_timeout",
    )
    .await;
    blocker.execute("ROLLBACK").await.unwrap();
    // Nothing was left open on the server connection: the pooler's few server connections
    // keep serving everything.
    for i in 0..20 {
        assert_eq!(
            s.put_cache(&format!("after{i}"), "3", "").await.status(),
            204
        );
        assert_eq!(s.get_cache(&format!("after{i}")).await.status(), 200);
    }
    assert_eq!(s.put_cache("locked", "4", "").await.status(), 204);

    // Every acknowledged write is in the database (read directly, not through the pooler).
    let mut c = PgConnection::connect(&direct).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pgsidecar.cache WHERE key LIKE 'after%'")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 20);
    let v: String = sqlx::query_scalar("SELECT value FROM pgsidecar.cache WHERE key = 'locked'")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(v, "4");
    // PgBouncer never opened more server connections than its pool.
    let servers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'pgsidecar'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert!(servers <= pool as i64, "{servers} server connections");
    assert!(
        !bouncer.log().contains("unsupported startup parameter"),
        "{}",
        bouncer.log()
    );
}

/// One pass over the data API's routes, with the answers a direct connection gives.
async fn every_route_answers_as_directly(s: &Sidecar) {
    // Cache: values round-trip exactly, TTL, tags, prefixes, _mget, bad input.
    for (i, v) in [r#"{"a":[1,2.50,"é"]}"#, "1e400", "null", r#""x""#]
        .iter()
        .enumerate()
    {
        assert_eq!(
            s.put_cache(&format!("v{i}"), v, "?ttl_seconds=60&tags=t1,t2")
                .await
                .status(),
            204
        );
        let r = s.get_cache(&format!("v{i}")).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("expires"));
        assert_eq!(&r.text().await.unwrap(), v);
    }
    let r = s
        .post_json("/v1/cache/_mget", &json!({"keys": ["v0", "nope", "v0"]}))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["hits"]["v0"], json!({"a":[1,2.50,"é"]}));
    assert_eq!(v["misses"], json!(["nope"]));
    let r = s
        .post_json("/v1/cache/_invalidate", &json!({"tags": ["t2"]}))
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"], 4);
    for k in ["p:1", "p:2", "q:1"] {
        assert_eq!(s.put_cache(k, "0", "").await.status(), 204);
    }
    let r = s
        .http
        .delete(s.url("/v1/cache?prefix=p%3A"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"], 2);
    let r = s
        .http
        .delete(s.url("/v1/cache/q%3A1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(s.get_cache("q:1").await.status(), 404);
    assert_error(s.put_cache("_reserved", "1", "").await, 400, "invalid_key").await;
    assert_error(s.put_cache("k", "{not json", "").await, 400, "invalid_json").await;

    // Sessions: create, validate (with a sliding refresh), update, list, revoke.
    let (token, session) = s
        .create_session(json!({"user_id": "u1", "ttl_seconds": 3600, "data": {"r": 1}}))
        .await;
    let (other, _) = s.create_session(json!({"user_id": "u1"})).await;
    let validate = |t: String| async move {
        s.http
            .get(s.url(&format!("/v1/sessions/{t}")))
            .send()
            .await
            .unwrap()
    };
    assert_eq!(validate(token.clone()).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = validate(token.clone()).await;
    assert_eq!(r.status(), 200);
    let slid: Value = r.json().await.unwrap();
    assert!(
        slid["expires_at"].as_str() > session["expires_at"].as_str(),
        "slid: {slid}"
    );
    let r = s
        .http
        .patch(s.url(&format!("/v1/sessions/{token}")))
        .json(&json!({"data": {"r": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["data"], json!({"r": 2}));
    let r = s
        .http
        .get(s.url("/v1/users/u1/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["sessions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let id = session["id"].as_str().unwrap();
    let r = s
        .http
        .delete(s.url(&format!("/v1/users/u1/sessions?except={id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["revoked"], 1);
    assert_eq!(validate(other).await.status(), 404);
    let r = s
        .http
        .delete(s.url(&format!("/v1/sessions/{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(validate(token).await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_without_a_migrate_url_waits_for_the_schema() {
    let Some(bin) = PgBouncer::binary() else {
        return;
    };
    let bouncer = PgBouncer::start(&bin, "transaction", suite_pg_port(), 2);
    let direct = fresh_db().await;
    let pooled = bouncer.url(&db_name(&direct));
    let s = Sidecar::builder()
        .db(&pooled)
        .env("PGSIDECAR_DATABASE__POOLER", "transaction")
        .no_wait()
        .start()
        .await;
    assert!(
        s.logs
            .wait_for("not applying migrations", Duration::from_secs(5)),
        "says why it does not migrate: {:?}",
        s.logs.lines()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = s.http.get(s.ops_url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap()["reason"],
        "database migrations not applied yet"
    );

    // `pgsidecar migrate` refuses to migrate through the pooler...
    let env = [
        ("DATABASE_URL", pooled.as_str()),
        ("PGSIDECAR_DATABASE__POOLER", "transaction"),
    ];
    let (code, _, stderr) = run_cli(&["migrate"], &env);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("database.migrate_url"), "{stderr}");
    // ...and migrates over the direct URL; the waiting sidecar then becomes ready by itself.
    let mut env = env.to_vec();
    env.push(("PGSIDECAR_DATABASE__MIGRATE_URL", direct.as_str()));
    let (code, stdout, stderr) = run_cli(&["migrate"], &env);
    assert_eq!(code, 0, "{stdout}{stderr}");
    s.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
    assert_eq!(s.get_cache("k").await.text().await.unwrap(), "1");
}
