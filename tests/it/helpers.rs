//! Test helpers: a fresh database per test, and the real `pgsidecar` binary started on port 0.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};

pub const BIN: &str = env!("CARGO_BIN_EXE_pgsidecar");

/// The server the suite runs against (scripts/test.sh starts one and exports it).
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must point at a PostgreSQL superuser (scripts/test.sh sets it)")
}

/// Replaces the database name of a postgres:// URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Creates an empty database with a unique name and returns its URL.
pub async fn fresh_db() -> String {
    fresh_db_on(&admin_url()).await
}

pub async fn fresh_db_on(admin: &str) -> String {
    let name = format!("pgsidecar_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(admin)
        .await
        .expect("connect to the admin database");
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .expect("create test database");
    with_database(admin, &name)
}

/// Lines the sidecar wrote on stdout.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<String>>>);

impl Logs {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    pub fn json(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
            })
            .collect()
    }
    pub fn contains(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }
    /// Waits until a line containing `needle` appears.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_line(needle, timeout).is_some()
    }

    /// The first line containing `needle`, once one has been written (None after `timeout`).
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return Some(line);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

pub struct Builder {
    env: Vec<(String, String)>,
    db: Option<String>,
    wait_ready: bool,
    before_exec: Vec<fn()>,
}

impl Builder {
    pub fn env(mut self, k: &str, v: impl ToString) -> Self {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.to_string(), v.to_string()));
        self
    }
    pub fn db(mut self, url: &str) -> Self {
        self.db = Some(url.to_string());
        self
    }
    pub fn no_wait(mut self) -> Self {
        self.wait_ready = false;
        self
    }
    /// Runs `f` in the child before it execs the sidecar (to set a umask or a resource limit);
    /// `f` must be async-signal-safe.
    pub fn before_exec(mut self, f: fn()) -> Self {
        self.before_exec.push(f);
        self
    }

    pub async fn start(self) -> Sidecar {
        let db = match self.db {
            Some(d) => d,
            None => fresh_db().await,
        };
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOSTNAME", "test-host")
            .env("DATABASE_URL", &db)
            .env("PGSIDECAR_SERVER__DATA_LISTEN", "127.0.0.1:0")
            .env("PGSIDECAR_SERVER__OPS_LISTEN", "127.0.0.1:0")
            .env("PGSIDECAR_HEALTH__INTERVAL_MS", "200")
            .env("PGSIDECAR_SHUTDOWN__DRAIN_SECONDS", "0")
            .env("PGSIDECAR_SHUTDOWN__GRACE_SECONDS", "5")
            .env("PGSIDECAR_DATABASE__MIN_CONNECTIONS", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // If the test process dies without dropping us, the sidecar dies too.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        let before_exec = self.before_exec.clone();
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                for f in &before_exec {
                    f();
                }
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("start pgsidecar");
        let logs = Logs::default();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(t) = &tx
                    && let Some(addrs) = started_addrs(&line)
                {
                    let _ = t.send(addrs);
                    tx = None;
                }
                sink.0.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let errors = Arc::new(Mutex::new(String::new()));
        let err_sink = errors.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                err_sink.lock().unwrap().push_str(&line);
            }
        });
        let (data, ops) = rx
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| {
                panic!(
                    "pgsidecar did not start; stderr: {}",
                    errors.lock().unwrap()
                )
            });
        let sidecar = Sidecar {
            child,
            data: format!("http://{data}"),
            ops: format!("http://{ops}"),
            logs,
            db,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        };
        if self.wait_ready {
            // Generous: a fresh database's migrations on a loaded CI machine; a pass never waits it.
            sidecar.wait_ready(Duration::from_secs(60)).await;
        }
        sidecar
    }
}

/// A running sidecar process, killed on drop.
pub struct Sidecar {
    pub child: Child,
    /// Base URL of the data API.
    pub data: String,
    /// Base URL of the ops API.
    pub ops: String,
    pub logs: Logs,
    /// URL of the sidecar's own database.
    pub db: String,
    pub http: reqwest::Client,
}

impl Sidecar {
    pub fn builder() -> Builder {
        Builder {
            env: Vec::new(),
            db: None,
            wait_ready: true,
            before_exec: Vec::new(),
        }
    }

    /// A sidecar on a fresh database, ready to serve.
    pub async fn start() -> Sidecar {
        Self::builder().start().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.data)
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("{}{path}", self.ops)
    }

    /// One keep-alive connection to the data API, see [`OneConnection`].
    pub async fn connection(&self) -> OneConnection {
        let addr = self.data.trim_start_matches("http://").to_string();
        let io = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        OneConnection { send, host: addr }
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.http.get(self.ops_url("/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < until,
                "sidecar not ready in time; logs:\n{}",
                self.logs.lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A connection to the sidecar's database with the sidecar's schema on the search path.
    pub async fn sql(&self) -> PgConnection {
        let mut c = PgConnection::connect(&self.db).await.unwrap();
        c.execute("SET search_path = pgsidecar").await.unwrap();
        c
    }

    /// A connection inside a transaction that has run `lock_sql`, so it holds that lock until
    /// it runs `ROLLBACK` (or is dropped).
    pub async fn hold_lock(&self, lock_sql: &'static str) -> PgConnection {
        let mut c = PgConnection::connect(&self.db).await.unwrap();
        c.execute("BEGIN").await.unwrap();
        c.execute(lock_sql).await.unwrap();
        c
    }

    // Shorthands for the data API.

    pub async fn put_cache(&self, key: &str, body: &str, query: &str) -> reqwest::Response {
        self.http
            .put(self.url(&format!("/v1/cache/{}{query}", enc(key))))
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn get_cache(&self, key: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/v1/cache/{}", enc(key))))
            .send()
            .await
            .unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Creates a session and returns (token, session).
    pub async fn create_session(&self, body: Value) -> (String, Value) {
        let r = self.post_json("/v1/sessions", &body).await;
        assert_eq!(r.status(), 201, "create session");
        let v: Value = r.json().await.unwrap();
        (
            v["token"].as_str().unwrap().to_string(),
            v["session"].clone(),
        )
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a path segment (everything but unreserved characters).
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Asserts the response is a JSON error with this status and code; returns the body.
pub async fn assert_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    let got = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "status for body {text}");
    assert!(
        ct.starts_with("application/json"),
        "content type {ct} for body {text}"
    );
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("error body is not JSON: {text}"));
    assert_eq!(v["error"]["code"], code, "error code in {text}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "message in {text}"
    );
    v
}

/// Runs the binary to completion with the given env and args; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run pgsidecar");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How many of the sidecar's statements are blocked on a lock right now, in `conn`'s database
/// (tests run side by side, each on a database of its own).
async fn lock_waits(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'pgsidecar' AND wait_event_type = 'Lock'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

/// The data and ops addresses (host:port) that `line` names, if it is the sidecar's start line.
pub fn started_addrs(line: &str) -> Option<(String, String)> {
    if !line.contains("\"pgsidecar started\"") {
        return None;
    }
    let v: Value = serde_json::from_str(line).unwrap();
    let addr = |k: &str| v[k].as_str().unwrap().to_string();
    Some((addr("data_listen"), addr("ops_listen")))
}

/// Waits until a statement of the sidecar's is blocked on a lock (so a test knows its request
/// reached Postgres).
pub async fn wait_for_lock_wait(conn: &mut PgConnection) {
    for _ in 0..200 {
        if lock_waits(conn).await > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no sidecar statement ever waited on the lock");
}

/// The sidecar's statements blocked on a lock, counted once the number has stopped changing.
pub async fn settled_lock_waits(conn: &mut PgConnection) -> i64 {
    let mut last = -1;
    let mut same = 0;
    for _ in 0..200 {
        let n = lock_waits(conn).await;
        same = if n == last { same + 1 } else { 0 };
        if n > 0 && same >= 10 {
            return n;
        }
        last = n;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!("lock waits never settled (last count {last})");
}

/// One HTTP/1.1 connection that is never replaced: every request goes over it. (A pooling
/// client like reqwest may open a new connection rather than wait for its idle one.)
pub struct OneConnection {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>,
    host: String,
}

impl OneConnection {
    /// Sends one request (`body` as JSON) and returns the status and the JSON body (Null if
    /// none), read to its end.
    pub async fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        use http_body_util::BodyExt;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body =
            http_body_util::Full::new(hyper::body::Bytes::from(body.unwrap_or("").to_string()));
        self.send.ready().await.unwrap();
        let resp = self
            .send
            .send_request(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

/// The value of one sample in Prometheus text: the series `name` with exactly `labels` (in
/// any order). Parsed, not searched for: `} 1` must not match inside `} 10`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let (series, value) = parse_sample(line)?;
            let (n, got) = series;
            (n == name
                && got.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| got.iter().any(|(gk, gv)| gk == k && gv == v)))
            .then_some(value)
        })
}

/// Scrapes the sidecar's `/metrics`.
pub async fn scrape(s: &Sidecar) -> String {
    s.http
        .get(s.ops_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

type Series = (String, Vec<(String, String)>);

/// `name{k="v",...} value` (with the exposition format's escapes in label values).
fn parse_sample(line: &str) -> Option<(Series, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' if key.is_empty() => {
                    rest = &body[i + 1..];
                    break;
                }
                ',' if key.is_empty() => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(((name, labels), value))
}

#[test]
fn metric_values_are_parsed_not_searched() {
    let text = "# HELP x y\n\
        pgsidecar_x_total{a=\"1\",b=\"two, \\\"quoted\\\"\"} 10\n\
        pgsidecar_x_total{a=\"1\"} 3\n\
        pgsidecar_y 2.5\n";
    assert_eq!(metric(text, "pgsidecar_x_total", &[("a", "1")]), Some(3.0));
    assert_eq!(
        metric(
            text,
            "pgsidecar_x_total",
            &[("b", "two, \"quoted\""), ("a", "1")]
        ),
        Some(10.0)
    );
    assert_eq!(metric(text, "pgsidecar_y", &[]), Some(2.5));
    assert_eq!(metric(text, "pgsidecar_x", &[("a", "1")]), None);
    assert_eq!(metric(text, "pgsidecar_x_total", &[("a", "2")]), None);
}
