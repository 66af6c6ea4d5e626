//! Failure is normal: Postgres absent at start, Postgres restarting under a running sidecar,
//! and the SIGTERM drain sequence.

use std::time::{Duration, Instant};

use sqlx::{Connection, Executor};

use crate::helpers::*;
use crate::servers::PrivatePostgres;

/// Stops every process of a PostgreSQL server with SIGSTOP (so connections hang instead of
/// failing) and resumes them with SIGCONT when dropped, also when the test fails.
struct Frozen(Vec<nix::unistd::Pid>);

impl Frozen {
    /// The server `url` points at: its postmaster (the parent of a backend) and every child.
    async fn server(url: &str) -> Self {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut c)
            .await
            .unwrap();
        // Read while the backend lives: once the connection is dropped it exits, and its
        // /proc entry can be gone before we look.
        let postmaster = parent_of(backend).expect("the backend's parent");
        drop(c);
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
                && parent_of(pid) == Some(postmaster)
            {
                pids.push(pid);
            }
        }
        let pids: Vec<_> = pids.into_iter().map(nix::unistd::Pid::from_raw).collect();
        for &pid in &pids {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
        }
        Self(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
    }
}

/// The parent process of `pid`, from /proc/PID/stat (the field after the command in parentheses).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

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
    // Fails at once (well under a millisecond in the sidecar); room for a loaded machine.
    assert!(
        t.elapsed() < Duration::from_secs(2),
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

    // Postgres goes away while the sidecar is idle: the monitor's next check (every 500 ms)
    // meets the closed connection, checks with new ones, is refused three times in a row and
    // opens the circuit. Target: /ready 503 within a second of the stop; asserted with room
    // for a loaded machine.
    pg.stop();
    let took = wait_status(&s, "/ready", 503, Duration::from_secs(10)).await;
    eprintln!("MEASURED stop: /ready 503 {took:?} after pg.sh stop returned");
    assert!(
        took < Duration::from_secs(3),
        "ready turned 503 after {took:?}"
    );
    wait_status(&s, "/health", 503, Duration::from_secs(5)).await;
    assert_eq!(
        status(&s, "/live").await,
        200,
        "liveness never depends on Postgres"
    );
    // While the circuit is open, data requests fail at once (target 100 ms; today's 2 to 4 s
    // was sqlx's acquire timeout). A trial request may pass every 500 ms and wait for its
    // connection: that one is excluded by looking at the fastest of five.
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let r = s.get_cache("acked").await;
        fastest = fastest.min(t.elapsed());
        assert_eq!(r.headers()["retry-after"], "1");
        assert_error(r, 503, "database_unavailable").await;
    }
    eprintln!("MEASURED stop: data request while open answered 503 in {fastest:?}");
    assert!(fastest < Duration::from_secs(1), "fails fast: {fastest:?}");
    let health: serde_json::Value = s
        .http
        .get(s.ops_url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let output = health["checks"]["postgres:responseTime"][0]["output"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(output.contains("connection refused"), "{output}");
    assert!(output.contains("circuit open"), "{output}");

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
    wait_status(&s, "/ready", 503, Duration::from_secs(3)).await;
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

/// The fastest of a few data requests: while the circuit is open they fail at once, but a
/// trial request (one per 500 ms) may pass and wait for its connection.
async fn fastest_503(s: &Sidecar) -> Duration {
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let r = s.get_cache("k").await;
        fastest = fastest.min(t.elapsed());
        assert_error(r, 503, "database_unavailable").await;
    }
    fastest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_postgres_opens_the_circuit_then_recovers() {
    // A stopped (SIGSTOP) server refuses nothing: connections and statements hang. Timeouts
    // count: the monitor's checks (1 s each) and statements without an answer (4.5 s).
    let pg = PrivatePostgres::new();
    pg.start();
    let s = Sidecar::builder()
        .db(&pg.url())
        .env("PGSIDECAR_SERVER__WORKER_THREADS", "2")
        .start()
        .await;
    assert_eq!(s.put_cache("k", "1", "").await.status(), 204);

    let frozen = Frozen::server(&pg.url()).await;
    let frozen_at = Instant::now();
    // A request sent now hangs with its connection: it ends by the store's deadline or the
    // request timeout, never later.
    let http = s.http.clone();
    let url = s.url("/v1/cache/k");
    let hung = tokio::spawn(async move {
        let t = Instant::now();
        let r = http.get(url).send().await.unwrap();
        (r.status().as_u16(), t.elapsed())
    });
    let took = wait_status(&s, "/ready", 503, Duration::from_secs(20)).await;
    eprintln!("MEASURED sigstop: /ready 503 {took:?} after SIGSTOP");
    // Expected about 3.5 s: up to 0.5 s until the next check, then three checks timing out.
    assert!(
        took < Duration::from_secs(10),
        "ready turned 503 after {took:?}"
    );
    let fastest = fastest_503(&s).await;
    eprintln!("MEASURED sigstop: data request while open answered 503 in {fastest:?}");
    assert!(fastest < Duration::from_secs(1), "fails fast: {fastest:?}");
    let (status_code, waited) = hung.await.unwrap();
    eprintln!(
        "MEASURED sigstop: the request in flight at the stop answered {status_code} after {waited:?}"
    );
    assert!([503, 504].contains(&status_code), "{status_code}");
    assert!(
        waited < Duration::from_secs(7),
        "bounded by the request timeout: {waited:?}"
    );
    assert_eq!(status(&s, "/live").await, 200);

    // SIGCONT: the circuit closes by itself.
    drop(frozen);
    let back = wait_status(&s, "/ready", 200, Duration::from_secs(20)).await;
    eprintln!(
        "MEASURED sigstop: /ready 200 {back:?} after SIGCONT ({:?} after SIGSTOP)",
        frozen_at.elapsed()
    );
    let mut ok = false;
    for _ in 0..100 {
        if s.get_cache("k").await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "reads recover after SIGCONT");
    assert_eq!(s.put_cache("k", "2", "").await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_postgres_closes_the_circuit_at_once() {
    // A restart kills every pooled connection of both data threads. Once Postgres accepts
    // connections again, the circuit (opened while it was down) must close within a check
    // interval, and the dead connections must not open it again.
    let pg = PrivatePostgres::new();
    pg.start();
    let s = Sidecar::builder()
        .db(&pg.url())
        .env("PGSIDECAR_SERVER__WORKER_THREADS", "2")
        .env("PGSIDECAR_SERVER__HEADER_READ_TIMEOUT_MS", "60000")
        .start()
        .await;
    let mut conns = [s.connection().await, s.connection().await];
    for c in &mut conns {
        assert_eq!(c.send("PUT", "/v1/cache/k", Some("1")).await.0, 204);
    }
    pg.stop();
    pg.start();
    let restarted = Instant::now();
    // Reads on both threads: the first success comes within about one check interval.
    'first: loop {
        for c in &mut conns {
            if c.send("GET", "/v1/cache/k", None).await.0 == 200 {
                break 'first;
            }
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "no read succeeded within 5 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = restarted.elapsed();
    eprintln!("MEASURED restart: first read answered 200 {first:?} after Postgres was back");
    wait_status(&s, "/ready", 200, Duration::from_secs(5)).await;
    // From then on, nothing fails: the dead pooled connections were dropped, not counted.
    for i in 0..20 {
        for c in &mut conns {
            assert_eq!(c.send("GET", "/v1/cache/k", None).await.0, 200, "read {i}");
            let put = c.send("PUT", "/v1/cache/k", Some("2")).await.0;
            assert_eq!(put, 204, "write {i}");
        }
        assert_eq!(status(&s, "/ready").await, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_pooled_connection_does_not_block_the_data_path() {
    // Every pooled connection of the sidecar is terminated while Postgres stays up: the next
    // health check meets a dead connection. That used to make every data request 503 for a
    // whole probe interval; now the monitor checks again with a new connection at once.
    let s = Sidecar::builder()
        .env("PGSIDECAR_HEALTH__POSTGRES_INTERVAL_MS", "300")
        .start()
        .await;
    assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
    let mut admin = s.sql().await;
    let met = |s: &Sidecar| {
        s.logs
            .lines()
            .iter()
            .filter(|l| l.contains("broken pooled connection"))
            .count()
    };
    for round in 0..3 {
        let before = met(&s);
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'pgsidecar'",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert!(killed > 0, "round {round}: the sidecar had connections");
        // No traffic until the monitor's check has met a dead connection.
        let until = Instant::now() + Duration::from_secs(10);
        while met(&s) == before {
            assert!(
                Instant::now() < until,
                "round {round}: the check never met it"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Over two check intervals: every read succeeds and the sidecar stays ready.
        let until = Instant::now() + Duration::from_millis(800);
        while Instant::now() < until {
            let r = s.get_cache("k").await;
            assert_eq!(
                r.status(),
                200,
                "round {round}: {}",
                r.text().await.unwrap()
            );
            assert_eq!(status(&s, "/ready").await, 200, "round {round}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
