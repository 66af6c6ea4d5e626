//! Failure is normal: Postgres absent at start, Postgres restarting under a running sidecar,
//! and the SIGTERM drain sequence.

use std::time::{Duration, Instant};

use sqlx::{Connection, Executor};

use crate::helpers::*;
use crate::servers::PrivatePostgres;

async fn status(s: &Sidecar, path: &str) -> u16 {
    s.http
        .get(s.ops_url(path))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn wait_status(s: &Sidecar, path: &str, want: u16, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if status(s, path).await == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{path} did not turn {want} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_at_start_then_restarted_under_the_sidecar() {
    let pg = PrivatePostgres::new();
    let mut s = Sidecar::builder()
        .db(&pg.url())
        .env("PGSIDECAR_DATABASE__CONNECT_TIMEOUT_SECONDS", "2")
        .env("PGSIDECAR_DATABASE__ACQUIRE_TIMEOUT_MS", "1000")
        .env("PGSIDECAR_SERVER__WORKER_THREADS", "2")
        // The client connections below stay idle across the outage; the header-read timeout
        // also closes idle keep-alive connections.
        .env("PGSIDECAR_SERVER__HEADER_READ_TIMEOUT_MS", "60000")
        .no_wait()
        .start()
        .await;

    // Down at start: alive, not ready, data requests fail fast with 503 + Retry-After.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(&s, "/live").await, 200);
    assert_eq!(status(&s, "/ready").await, 503);
    assert_eq!(status(&s, "/health").await, 503);
    assert_eq!(status(&s, "/api/health").await, 503);
    let t = Instant::now();
    let r = s.get_cache("k").await;
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "fails fast, took {:?}",
        t.elapsed()
    );
    assert_eq!(r.headers()["retry-after"], "1");
    assert_error(r, 503, "database_unavailable").await;

    // Postgres appears: the sidecar becomes ready by itself.
    pg.start();
    wait_status(&s, "/ready", 200, Duration::from_secs(20)).await;
    // Two client connections open at once land on different data threads; each thread then
    // holds a Postgres connection.
    let mut conns = [s.connection().await, s.connection().await];
    for c in &mut conns {
        assert_eq!(c.send("PUT", "/v1/cache/w", Some("0")).await.0, 204);
    }
    assert_eq!(s.put_cache("acked", r#"{"v":1}"#, "").await.status(), 204);

    // Postgres goes away: 503 within two probe intervals (plus the probe timeout), data fails fast.
    pg.stop();
    let took = wait_status(&s, "/ready", 503, Duration::from_secs(3)).await;
    assert!(
        took < Duration::from_millis(1500),
        "ready turned 503 after {took:?}"
    );
    assert_eq!(status(&s, "/health").await, 503);
    assert_eq!(
        status(&s, "/live").await,
        200,
        "liveness never depends on Postgres"
    );
    let t = Instant::now();
    let r = s.get_cache("acked").await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "no hang past the request timeout"
    );
    assert_error(r, 503, "database_unavailable").await;

    // Back again: recovery without a restart, and the acknowledged write is there.
    pg.start();
    wait_status(&s, "/ready", 200, Duration::from_secs(20)).await;
    // Writes are never retried on a broken connection, so a data thread still holding one from
    // before the outage would fail its first write. The probe (on thread 0) dropped thread 0's;
    // the other thread sent no statement during the outage, and dropped its own when it saw
    // that the outage had been recorded.
    for c in &mut conns {
        assert_eq!(c.send("PUT", "/v1/cache/w", Some("1")).await.0, 204);
    }
    let mut ok = false;
    for _ in 0..20 {
        let r = s.get_cache("acked").await;
        if r.status() == 200 {
            assert_eq!(r.text().await.unwrap(), r#"{"v":1}"#);
            ok = true;
            break;
        }
        // Readiness follows the probe; a read may still race it.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "reads recover after the restart");
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the sidecar never exited"
    );
    assert!(s.logs.contains("database ready"));
    s.sigterm();
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).and_then(|e| e.code()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_finishes_in_flight_requests_and_exits_zero() {
    let mut s = Sidecar::builder()
        .env("PGSIDECAR_SHUTDOWN__DRAIN_SECONDS", "2")
        // The held request below waits ~3 s on a lock: longer than the default timeouts.
        .env("PGSIDECAR_DATABASE__STATEMENT_TIMEOUT_MS", "20000")
        .env("PGSIDECAR_SERVER__REQUEST_TIMEOUT_MS", "30000")
        .start()
        .await;
    assert_eq!(s.put_cache("slow", "1", "").await.status(), 204);

    // Hold a row lock so a PUT on that key stays in flight across the end of the drain.
    let mut blocker = s
        .hold_lock("SELECT * FROM pgsidecar.cache WHERE key = 'slow' FOR UPDATE")
        .await;

    s.sigterm();
    wait_status(&s, "/ready", 503, Duration::from_millis(500)).await;
    assert_eq!(status(&s, "/api/ready").await, 503);
    assert_eq!(status(&s, "/live").await, 200);
    // Still serving during the drain, so the load balancer has time to notice.
    assert_eq!(s.put_cache("during-drain", "2", "").await.status(), 204);

    let http = s.http.clone();
    let url = s.url("/v1/cache/slow");
    let in_flight = tokio::spawn(async move {
        http.put(url)
            .body("3")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    let mut watcher = sqlx::PgConnection::connect(&s.db).await.unwrap();
    wait_for_lock_wait(&mut watcher).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The drain is over: new connections are refused.
    let fresh = reqwest::Client::new();
    assert!(
        fresh.get(s.url("/v1/cache/slow")).send().await.is_err(),
        "listener closed after the drain"
    );
    blocker.execute("ROLLBACK").await.unwrap();
    let status = in_flight.await.unwrap().unwrap();
    assert_eq!(
        status,
        204,
        "in-flight request finished; logs:\n{}",
        s.logs.lines().join("\n")
    );

    let code = s.wait_exit(Duration::from_secs(10)).and_then(|e| e.code());
    assert_eq!(code, Some(0));
    // The exit can be seen before the test's reader thread has stored the last line.
    assert!(s.logs.wait_for("pgsidecar stopped", Duration::from_secs(2)));
    let lines = s.logs.lines();
    assert!(
        lines.last().unwrap().contains("pgsidecar stopped"),
        "logs flushed to the last line: {lines:?}"
    );

    let mut c = sqlx::PgConnection::connect(&s.db).await.unwrap();
    let v: String = sqlx::query_scalar("SELECT value FROM pgsidecar.cache WHERE key = 'slow'")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(v, "3", "the acknowledged write is stored");
}
