//! Servers a test starts and stops itself: a private PostgreSQL cluster (through scripts/pg.sh,
//! also as a streaming standby of another), and PgBouncer from Debian's package, each on a port
//! chosen at run time.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A port nobody listens on right now, for a server that binds it later (PostgreSQL, PgBouncer).
///
/// Chosen at random below Linux's ephemeral range (32768-60999), never from it: a port the
/// kernel hands out for `bind(0)` is released here and may then be taken, before the server
/// binds it, as the source port of one of the suite's many outgoing connections or by another
/// test's `bind(0)`, and twice the server failed to start with "Address already in use". Below
/// the range only another call of this function competes, and no port is handed out twice.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// A private PostgreSQL server this test may stop and start (through scripts/pg.sh).
pub struct PrivatePostgres {
    dir: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    pub fn new() -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(".pgdata")
            .join(format!("outage-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        Self {
            dir,
            port: free_port(),
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The URL of database `db` on this server.
    pub fn db_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn script() -> String {
        std::env::var("PGSIDECAR_TEST_PG_SCRIPT")
            .unwrap_or_else(|_| format!("{}/scripts/pg.sh", env!("CARGO_MANIFEST_DIR")))
    }

    fn pg_sh(args: &[&str]) {
        let out = Command::new("bash")
            .arg(Self::script())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start(&self) {
        self.start_with(&[]);
    }

    /// Starts the server with extra `postgres` options (`["-c", "max_connections=50"]`).
    pub fn start_with(&self, options: &[&str]) {
        let port = self.port.to_string();
        let mut args = vec![
            "start",
            self.dir.to_str().unwrap(),
            &port,
            "-c",
            "fsync=off",
        ];
        args.extend_from_slice(options);
        Self::pg_sh(&args);
    }

    pub fn stop(&self) {
        Self::pg_sh(&["stop", self.dir.to_str().unwrap()]);
    }

    /// A streaming standby of this (running) server, not started yet (`pg_basebackup -R`).
    pub fn standby(&self) -> PrivatePostgres {
        let standby = PrivatePostgres::new();
        Self::pg_sh(&[
            "basebackup",
            &self.port.to_string(),
            standby.dir.to_str().unwrap(),
        ]);
        standby
    }

    /// Promotes this standby to a primary and waits until it accepts writes.
    pub fn promote(&self) {
        Self::pg_sh(&["promote", self.dir.to_str().unwrap()]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .args([&Self::script(), "stop", self.dir.to_str().unwrap()])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("initdb.log"));
    }
}

/// PgBouncer from Debian's package (`/usr/sbin/pgbouncer`), with a configuration this test
/// writes: trust authentication for `postgres` (from a userlist), every database name passed
/// through to one PostgreSQL server, listening on a free port. As root it runs as the
/// `postgres` user (PgBouncer refuses to run as root). Stopped on drop.
pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    pub port: u16,
    mode: String,
    pool_size: u32,
    log: Arc<Mutex<String>>,
}

impl PgBouncer {
    /// The binary, or None (the test then returns early) when PgBouncer is not installed and
    /// `PGSIDECAR_REQUIRE_PGBOUNCER` is unset (scripts/test.sh sets it once it has installed
    /// PgBouncer, so there the tests always run).
    pub fn binary() -> Option<PathBuf> {
        let found = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        if found.is_none() {
            assert!(
                std::env::var_os("PGSIDECAR_REQUIRE_PGBOUNCER").is_none(),
                "PGSIDECAR_REQUIRE_PGBOUNCER is set but pgbouncer is not installed"
            );
            eprintln!("skipped: pgbouncer is not installed (Debian package pgbouncer)");
        }
        found
    }

    /// Starts PgBouncer in `mode` ("session" or "transaction") in front of the PostgreSQL on
    /// `pg_port`, with `pool_size` server connections per database and user.
    pub fn start(bin: &std::path::Path, mode: &str, pg_port: u16, pool_size: u32) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "pgsidecar-pgbouncer-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let mut me = Self {
            child: Command::new("true").spawn().unwrap(),
            dir,
            port,
            mode: mode.to_string(),
            pool_size,
            log: Arc::default(),
        };
        me.write_config(pg_port);
        std::fs::write(me.dir.join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        make_readable(&me.dir);
        let mut cmd = Command::new(bin);
        cmd.arg(me.dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = postgres_user() {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        // Dies with the test process (set after the uid change, which clears it).
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        me.child = cmd.spawn().expect("start pgbouncer");
        let stderr = me.child.stderr.take().unwrap();
        let sink = me.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let until = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("pgbouncer exited ({status}): {}", me.log());
            }
            assert!(
                Instant::now() < until,
                "pgbouncer did not listen: {}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }

    /// `query_wait_timeout = 1`: a client waiting longer for a server connection gets an error
    /// (which the sidecar answers 503), well inside the sidecar's request timeout even when a
    /// read is retried once.
    fn write_config(&self, pg_port: u16) {
        let ini = format!(
            "[databases]\n\
             * = host=127.0.0.1 port={pg_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             admin_users = postgres\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool}\n\
             max_client_conn = 2000\n\
             server_login_retry = 1\n\
             server_connect_timeout = 2\n\
             query_wait_timeout = 1\n\
             log_connections = 0\n\
             log_disconnections = 0\n",
            port = self.port,
            dir = self.dir.display(),
            mode = self.mode,
            pool = self.pool_size,
        );
        let tmp = self.dir.join("pgbouncer.ini.new");
        std::fs::write(&tmp, ini).unwrap();
        make_readable(&tmp);
        std::fs::rename(&tmp, self.dir.join("pgbouncer.ini")).unwrap();
    }

    /// Re-points every database at the PostgreSQL on `pg_port`: rewrites `[databases]` and
    /// reloads (SIGHUP, as the admin console's RELOAD does).
    pub fn repoint(&self, pg_port: u16) {
        self.write_config(pg_port);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }

    /// A URL for database `db` through this PgBouncer.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// What PgBouncer wrote on stderr.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `postgres` user's uid and gid when we are root (PgBouncer refuses to run as root).
fn postgres_user() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"]) != Some(0) {
        return None;
    }
    let uid = id(&["-u", "postgres"]).expect("as root, PgBouncer needs a postgres user");
    Some((uid, id(&["-g", "postgres"]).unwrap()))
}

fn make_readable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
