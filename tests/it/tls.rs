//! TLS: to Postgres (libpq's sslmode, sslrootcert, sslcert, sslkey) against a real PostgreSQL
//! with `ssl = on` and only `hostssl` lines in pg_hba.conf, and to https:// upstreams
//! (`openssl s_server`), with CAs and certificates the openssl CLI makes here.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};

use crate::helpers::*;
use crate::servers::free_port;

/// CAs and certificates in a temporary directory: `ca` signed the server's certificate (for
/// `localhost` only) and the client's (CN `certuser`); `other-ca` is a stranger's, and signed
/// `stranger` (CN `certuser` too) and `web` (another server certificate for `localhost`).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        pki.ca("ca");
        pki.ca("other-ca");
        pki.leaf(
            "server",
            "ca",
            "localhost",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
        );
        pki.leaf("client", "ca", "certuser", "extendedKeyUsage=clientAuth");
        pki.leaf(
            "stranger",
            "other-ca",
            "certuser",
            "extendedKeyUsage=clientAuth",
        );
        pki.leaf(
            "web",
            "other-ca",
            "localhost",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
        );
        pki
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_str().unwrap().to_string()
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("the openssl CLI (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

    fn ca(&self, name: &str) {
        let (key, crt, subj) = (
            format!("{name}.key"),
            format!("{name}.crt"),
            format!("/CN=pgsidecar test {name}"),
        );
        let mut args = vec!["req", "-x509", "-nodes", "-days", "30"];
        args.extend(Self::EC);
        args.extend(["-keyout", &key, "-out", &crt, "-subj", &subj]);
        args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
        args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        self.openssl(&args);
    }

    fn leaf(&self, name: &str, ca: &str, cn: &str, extensions: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(
            self.dir.path().join(&ext),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}\n"
            ),
        )
        .unwrap();
        let (key, csr, crt, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("/CN={cn}"),
        );
        let mut args = vec!["req", "-new", "-nodes"];
        args.extend(Self::EC);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        self.openssl(&args);
        let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ]);
    }
}

fn pg_script() -> String {
    std::env::var("PGSIDECAR_TEST_PG_SCRIPT")
        .unwrap_or_else(|_| format!("{}/scripts/pg.sh", env!("CARGO_MANIFEST_DIR")))
}

/// A PostgreSQL server of this module's: `ssl = on`, the test CA for client certificates, and
/// a pg_hba.conf with only `hostssl` lines over TCP (`cert` authentication for `certuser` and
/// `other`).
struct TlsPostgres {
    pki: Pki,
    dir: PathBuf,
    port: u16,
}

const HBA: &str = "\
local   all all                   trust
hostssl all certuser,other 127.0.0.1/32 cert
hostssl all certuser,other ::1/128      cert
hostssl all all      127.0.0.1/32 trust
hostssl all all      ::1/128      trust
";

impl TlsPostgres {
    /// The server the tests of this module share while any of them runs (one initdb, not six).
    fn shared() -> Arc<Self> {
        static SHARED: Mutex<Weak<TlsPostgres>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pg) = shared.upgrade() {
            return pg;
        }
        let pg = Arc::new(Self::start());
        *shared = Arc::downgrade(&pg);
        pg
    }

    fn start() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let pki = Pki::new();
        std::fs::write(pki.dir.path().join("pg_hba.conf"), HBA).unwrap();
        // PostgreSQL's user must reach the files, and own the key (it refuses a key others can
        // read): scripts/pg.sh runs the server as another user when we are root.
        std::fs::set_permissions(pki.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let key = pki.dir.path().join("server.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let user = Command::new("bash")
            .args([&pg_script(), "user"])
            .output()
            .unwrap();
        let user = String::from_utf8_lossy(&user.stdout).trim().to_string();
        if !user.is_empty() {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id").args([flag, &user]).output().unwrap();
                String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
            };
            std::os::unix::fs::chown(&key, Some(id("-u")), Some(id("-g"))).unwrap();
        }
        let port = free_port();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(".pgdata")
            .join(format!("tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let pg = Self { pki, dir, port };
        let setting = |k: &str, file: &str| format!("{k}={}", pg.pki.path(file));
        let out = Command::new("bash")
            .args([
                &pg_script(),
                "start",
                pg.dir.to_str().unwrap(),
                &port.to_string(),
            ])
            .args([
                "-c",
                "ssl=on",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=100",
            ])
            .args(["-c", &setting("ssl_cert_file", "server.crt")])
            .args(["-c", &setting("ssl_key_file", "server.key")])
            .args(["-c", &setting("ssl_ca_file", "ca.crt")])
            .args(["-c", &setting("hba_file", "pg_hba.conf")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    /// A URL of this server, as `user` at `host`, on database `db`, with `query`.
    fn url(&self, user: &str, host: &str, db: &str, query: &str) -> String {
        format!("postgres://{user}@{host}:{}/{db}?{query}", self.port)
    }

    /// `sslrootcert=` the test CA (or another file of the PKI).
    fn root(&self, file: &str) -> String {
        format!("sslrootcert={}", self.pki.path(file))
    }

    async fn admin(&self) -> PgConnection {
        let url = self.url(
            "postgres",
            "localhost",
            "postgres",
            &format!("sslmode=verify-full&{}", self.root("ca.crt")),
        );
        PgConnection::connect(&url).await.expect("admin connection")
    }

    /// A fresh database; returns its name.
    async fn create_db(&self) -> String {
        let name = format!("pgsidecar_tls_{}", uuid::Uuid::new_v4().simple());
        let mut c = self.admin().await;
        c.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        name
    }

    /// The sidecar's connections to `db` on this server: (all, over TLS).
    async fn sidecar_connections(&self, db: &str) -> (i64, i64) {
        sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'pgsidecar' AND a.datname = $1",
        )
        .bind(db)
        .fetch_one(&mut self.admin().await)
        .await
        .unwrap()
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .args([&pg_script(), "stop", self.dir.to_str().unwrap()])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("initdb.log"));
    }
}

/// The body of `/health`.
async fn health(s: &Sidecar) -> String {
    match s.http.get(s.ops_url("/health")).send().await {
        Ok(r) => r.text().await.unwrap(),
        Err(e) => panic!("GET /health: {e}; logs:\n{}", s.logs.lines().join("\n")),
    }
}

/// The `/health` entry of a check: (status, output).
async fn check(s: &Sidecar, name: &str) -> (String, String) {
    let v: Value = serde_json::from_str(&health(s).await).unwrap();
    let entry = &v["checks"][name][0];
    (
        entry["status"].as_str().unwrap_or_default().to_string(),
        entry["output"].as_str().unwrap_or_default().to_string(),
    )
}

/// Waits until the output of check `name` contains `want`.
async fn wait_output(s: &Sidecar, name: &str, want: &str) {
    wait_check(s, name, None, want).await
}

/// Waits until check `name` has `status` (when given) and an output containing `want`.
async fn wait_check(s: &Sidecar, name: &str, status: Option<&str>, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (String::new(), String::new());
    while Instant::now() < deadline {
        last = check(s, name).await;
        if last.1.contains(want) && status.is_none_or(|st| last.0 == st) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{name} never said {want:?}; last {last:?}; logs:\n{}",
        s.logs.lines().join("\n")
    );
}

/// A sidecar that cannot connect for a TLS reason: `/health` names `reason`, it is not ready,
/// data requests get 503 database_unavailable, and the log names the reason in one error line
/// however often the sidecar retried.
async fn assert_refused(s: &Sidecar, reason: &str) {
    // A failing check warns until enough failures in a row open the circuit; then it fails.
    wait_check(s, "postgres:responseTime", Some("fail"), reason).await;
    let ready = s.http.get(s.ops_url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_error(s.get_cache("k").await, 503, "database_unavailable").await;
    // Several probe rounds (every 200 ms here) and bootstrap retries later: still one line.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines: Vec<Value> = s
        .logs
        .json()
        .into_iter()
        .filter(|l| l["error"].as_str().is_some_and(|e| e.contains(reason)))
        .collect();
    assert_eq!(lines.len(), 1, "one line for {reason:?}: {lines:?}");
    assert_eq!(lines[0]["level"], "error", "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_serves_with_every_connection_over_tls() {
    let pg = TlsPostgres::shared();
    let root = pg.root("ca.crt");
    // verify-full, then libpq's default (prefer) and require, which take TLS when it is offered.
    for query in [
        format!("sslmode=verify-full&{root}"),
        String::new(),
        "sslmode=require".into(),
    ] {
        let db = pg.create_db().await;
        let s = Sidecar::builder()
            .db(&pg.url("postgres", "localhost", &db, &query))
            .env("PGSIDECAR_DATABASE__MIN_CONNECTIONS", "2")
            .start()
            .await;
        assert_eq!(s.put_cache("k", r#"{"v":1}"#, "").await.status(), 204);
        let r = s.get_cache("k").await;
        assert_eq!(r.status(), 200, "{query}");
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            serde_json::json!({"v": 1})
        );
        let (all, tls) = pg.sidecar_connections(&db).await;
        assert!(all >= 1, "{query}: the sidecar holds connections");
        assert_eq!(all, tls, "{query}: every connection uses TLS");
        if query.starts_with("sslmode=verify-full") {
            let start = s
                .logs
                .json()
                .into_iter()
                .find(|l| l["message"] == "pgsidecar started");
            let described = start.unwrap()["database_tls"].as_str().unwrap().to_string();
            assert!(
                described.contains("sslmode=verify-full") && described.contains("host name"),
                "{described}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_problems_are_reported_as_what_they_are() {
    let pg = TlsPostgres::shared();
    let db = pg.create_db().await;
    let (ca, other) = (pg.root("ca.crt"), pg.root("other-ca.crt"));

    // The certificate is for localhost; 127.0.0.1 is the same server under another name. The
    // password (ignored: trust) must not show anywhere.
    let url = pg
        .url(
            "postgres",
            "127.0.0.1",
            &db,
            &format!("sslmode=verify-full&{ca}"),
        )
        .replace("postgres@", "postgres:pw-s3cret@");
    let s = Sidecar::builder().db(&url).no_wait().start().await;
    assert_refused(&s, "tls: server certificate not valid for the host name").await;
    assert!(!health(&s).await.contains("pw-s3cret"));
    assert!(!s.logs.contains("pw-s3cret"));
    drop(s);

    let s = Sidecar::builder()
        .db(&pg.url(
            "postgres",
            "localhost",
            &db,
            &format!("sslmode=verify-full&{other}"),
        ))
        .no_wait()
        .start()
        .await;
    assert_refused(&s, "tls: server certificate not trusted (unknown issuer)").await;
    drop(s);

    // sslrootcert is the only trust anchor, as in libpq: a system store (here SSL_CERT_FILE)
    // that holds the server's CA does not rescue a wrong sslrootcert. Without sslrootcert, that
    // store is what verifies.
    let s = Sidecar::builder()
        .db(&pg.url(
            "postgres",
            "localhost",
            &db,
            &format!("sslmode=verify-ca&{other}"),
        ))
        .env("SSL_CERT_FILE", pg.pki.path("ca.crt"))
        .no_wait()
        .start()
        .await;
    assert_refused(&s, "tls: server certificate not trusted (unknown issuer)").await;
    drop(s);
    let s = Sidecar::builder()
        .db(&pg.url("postgres", "localhost", &db, "sslmode=verify-full"))
        .env("SSL_CERT_FILE", pg.pki.path("ca.crt"))
        .start()
        .await;
    assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_never_used_where_tls_is_required() {
    // require against a server without TLS (the suite's): no fallback, not one connection.
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(ssl, "off", "the suite's server must be one without TLS");
    let db = fresh_db().await;
    let name = db.rsplit('/').next().unwrap().to_string();
    let s = Sidecar::builder()
        .db(&format!("{db}?sslmode=require"))
        .no_wait()
        .start()
        .await;
    assert_refused(&s, "tls: the server does not offer TLS").await;
    let connections: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgsidecar' \
         AND datname = $1",
    )
    .bind(&name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(connections, 0, "no plaintext connection");
    drop(s);

    // disable against a server that accepts only TLS: refused, and said so.
    let pg = TlsPostgres::shared();
    let db = pg.create_db().await;
    let s = Sidecar::builder()
        .db(&pg.url("postgres", "localhost", &db, "sslmode=disable"))
        .no_wait()
        .start()
        .await;
    assert_refused(&s, "tls: the server accepts only TLS connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates() {
    let pg = TlsPostgres::shared();
    pg.admin()
        .await
        .execute(
            "DO $$ BEGIN CREATE ROLE certuser LOGIN SUPERUSER; CREATE ROLE other LOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
        )
        .await
        .unwrap();
    let db = pg.create_db().await;
    let verify = format!("sslmode=verify-full&{}", pg.root("ca.crt"));
    let keys = |name: &str| {
        format!(
            "sslcert={}&sslkey={}",
            pg.pki.path(&format!("{name}.crt")),
            pg.pki.path(&format!("{name}.key"))
        )
    };

    // pg_hba.conf says "cert" for certuser: the certificate is the credential.
    let s = Sidecar::builder()
        .db(&pg.url(
            "certuser",
            "localhost",
            &db,
            &format!("{verify}&{}", keys("client")),
        ))
        .start()
        .await;
    assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
    assert_eq!(s.get_cache("k").await.status(), 200);
    let dns: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT s.client_dn FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name = 'pgsidecar' AND a.datname = $1",
    )
    .bind(&db)
    .fetch_all(&mut pg.admin().await)
    .await
    .unwrap();
    assert!(!dns.is_empty());
    assert!(
        dns.iter().all(|dn| dn.as_deref() == Some("/CN=certuser")),
        "{dns:?}"
    );
    drop(s);

    // Refused: no certificate; certuser's certificate presented for another user; one signed
    // by a CA the server does not know (its ssl_ca_file is the test CA).
    for (user, params, reason) in [
        ("certuser", verify.clone(), "none sent"),
        (
            "other",
            format!("{verify}&{}", keys("client")),
            "not accepted for this user",
        ),
        (
            "certuser",
            format!("{verify}&{}", keys("stranger")),
            "its issuer is unknown to the server",
        ),
    ] {
        let s = Sidecar::builder()
            .db(&pg.url(user, "localhost", &db, &params))
            .no_wait()
            .start()
            .await;
        let reason = format!("tls: client certificate refused by the server ({reason})");
        assert_refused(&s, &reason).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_and_check_config_name_tls_problems() {
    let pg = TlsPostgres::shared();
    let db = pg.create_db().await;
    let url = |query: &str| pg.url("postgres", "localhost", &db, query);

    let bad = url(&format!("sslmode=verify-full&{}", pg.root("other-ca.crt")));
    let (code, out, err) = run_cli(&["migrate"], &[("DATABASE_URL", &bad)]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("migration failed")
            && out.contains("tls: server certificate not trusted (unknown issuer)"),
        "{out}"
    );
    let good = url(&format!("sslmode=verify-full&{}", pg.root("ca.crt")));
    let (code, out, err) = run_cli(&["migrate"], &[("DATABASE_URL", &good)]);
    assert_eq!(code, 0, "{out}{err}");

    // check-config says what the connections verify...
    let (code, _, err) = run_cli(&["check-config"], &[("DATABASE_URL", &good)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("sslmode=verify-full: TLS; certificate chain verified against sslrootcert"),
        "{err}"
    );
    let (code, _, err) = run_cli(&["check-config"], &[("DATABASE_URL", &url(""))]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("sslmode=prefer: TLS when the server offers it"),
        "{err}"
    );
    // ... and refuses what it cannot honour, naming the key and the reason.
    let missing = format!(
        "sslmode=verify-full&sslrootcert={}",
        pg.pki.path("nope.pem")
    );
    let cases = [
        (missing.as_str(), "nope.pem: cannot read"),
        ("sslmode=verify-ca", "needs sslrootcert"),
        ("sslmode=allow", "sslmode=allow is not supported"),
        ("sslmode=sometimes", "\"sometimes\" is not one of"),
    ];
    for (query, want) in cases {
        let (code, _, err) = run_cli(&["check-config"], &[("DATABASE_URL", &url(query))]);
        assert_eq!(code, 64, "{query}: {err}");
        assert!(
            err.contains("database.url") && err.contains(want),
            "{query}: {err}"
        );
    }
    let key_of_another = format!(
        "sslmode=require&sslcert={}&sslkey={}",
        pg.pki.path("client.crt"),
        pg.pki.path("stranger.key")
    );
    let (code, _, err) = run_cli(
        &["check-config"],
        &[("DATABASE_URL", &url(&key_of_another))],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("cannot be used with sslcert"), "{err}");
}

/// `openssl s_server -www` with a certificate of the PKI (`server` or `web`), killed on drop.
struct HttpsServer {
    child: Child,
    port: u16,
}

impl HttpsServer {
    fn start(pki: &Pki, cert: &str) -> Self {
        let port = free_port();
        let child = Command::new("openssl")
            .args(["s_server", "-www", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .args([
                "-cert",
                &pki.path(&format!("{cert}.crt")),
                "-key",
                &pki.path(&format!("{cert}.key")),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "openssl s_server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_trust_the_system_and_their_ca_file() {
    let pki = Pki::new();
    let server = HttpsServer::start(&pki, "server");
    let url = format!("https://localhost:{}/", server.port);
    let upstreams = format!(
        r#"[{{name="trusted", url="{url}", timeout_ms=3000, ca_file="{}"}},
            {{name="untrusted", url="{url}", timeout_ms=3000, critical=false}}]"#,
        pki.path("ca.crt")
    );
    let s = Sidecar::builder()
        .env("PGSIDECAR_HEALTH__UPSTREAMS", upstreams)
        .no_wait()
        .start()
        .await;
    wait_output(
        &s,
        "upstream:untrusted",
        "tls: server certificate not trusted (unknown issuer)",
    )
    .await;
    assert_eq!(check(&s, "upstream:untrusted").await.0, "warn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while check(&s, "upstream:trusted").await.0 != "pass" {
        assert!(
            Instant::now() < deadline,
            "trusted upstream never passed: {:?}",
            check(&s, "upstream:trusted").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.wait_ready(Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_keep_the_system_store_when_sslrootcert_confines_postgres() {
    // The system store (SSL_CERT_FILE) holds other-ca, which signed the upstream's certificate;
    // Postgres trusts only its sslrootcert (ca). Each must keep its own trust.
    let pg = TlsPostgres::shared();
    let db = pg.create_db().await;
    let server = HttpsServer::start(&pg.pki, "web");
    let upstreams = format!(
        r#"[{{name="web", url="https://localhost:{}/", timeout_ms=3000}}]"#,
        server.port
    );
    let s = Sidecar::builder()
        .db(&pg.url(
            "postgres",
            "localhost",
            &db,
            &format!("sslmode=verify-full&{}", pg.root("ca.crt")),
        ))
        .env("SSL_CERT_FILE", pg.pki.path("other-ca.crt"))
        .env("PGSIDECAR_HEALTH__UPSTREAMS", upstreams)
        .start()
        .await;
    assert_eq!(check(&s, "upstream:web").await.0, "pass");
    assert_eq!(s.put_cache("k", "1", "").await.status(), 204);
}
