//! The `pgsidecar` command: parses the CLI, loads settings, starts logging, runs. The only place
//! that exits; exit code 64 (EX_USAGE) means a bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use pgsidecar::app::{Application, Telemetry, current_thread_runtime};
use pgsidecar::config::{ListenAddr, Settings};
use pgsidecar::shutdown::Lifecycle;
use pgsidecar::store::Store;

// mimalloc instead of glibc's malloc. A request allocates some 25 times, several of them above
// glibc's per-thread cache (hyper's 8 KiB read buffer, the 1 KiB values), which glibc serves from
// its shared bins and then consolidates: a quarter of the request path's instructions. mimalloc
// cut the sidecar's instructions per request by 7-17% (callgrind, under the bench load) for 1.5 to
// 2.7 MiB more peak resident memory (Cargo.toml builds it without transparent huge pages).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EX_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "pgsidecar",
    version,
    about = "Sessions, cache, health and metrics for stateless app containers, on PostgreSQL"
)]
struct Cli {
    /// Configuration file layered over the defaults (also PGSIDECAR_CONFIG).
    #[arg(long, global = true, env = "PGSIDECAR_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration, secrets redacted, and exit.
    CheckConfig,
    /// Ask the local ops listener; exit 0 when it answers 200 (for Docker HEALTHCHECK).
    Probe {
        #[arg(value_enum, default_value = "live")]
        what: ProbeKind,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ProbeKind {
    Live,
    Ready,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pgsidecar: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Validated with the settings, so this is Ok.
    let tls = settings.database.tls().ok();
    let command = cli.command.unwrap_or(Command::Serve);
    if let (Some(tls), Command::Serve | Command::Migrate) = (&tls, &command) {
        let https_upstreams = settings
            .health
            .upstreams
            .iter()
            .any(|u| u.url.starts_with("https://"));
        // SAFETY: no other thread has started yet: logging, runtimes and data threads come later.
        unsafe { tls.confine_trust(https_upstreams) };
    }
    match command {
        Command::CheckConfig => {
            println!(
                "{}",
                serde_json::to_string_pretty(&settings.redacted_json()).unwrap_or_default()
            );
            // What the database connections will verify, where a person reads it (stdout is JSON).
            if let Some(tls) = &tls {
                eprintln!("pgsidecar: database connections: {}", tls.describe());
            }
            ExitCode::SUCCESS
        }
        Command::Probe { what } => probe(&settings, what),
        Command::Migrate => migrate(settings),
        Command::Serve => serve(settings),
    }
}

fn serve(settings: Settings) -> ExitCode {
    let log = pgsidecar::telemetry::init(&settings.log.level, std::io::stdout());
    // Panics become JSON log lines like everything else. Only the location is logged: a panic
    // message may quote request data, which must never reach a log line.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(location, "panic");
    }));
    let prometheus = match pgsidecar::metrics::install() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the metrics recorder");
            None
        }
    };
    // The main thread's runtime accepts connections, runs the background tasks, and is data
    // thread 0 (see `server.worker_threads` and `app::DataThread`).
    let rt = match current_thread_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let app = match Application::bind(settings) {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            drop(log);
            return ExitCode::FAILURE;
        }
    };
    let telemetry = Telemetry {
        prometheus,
        log_dropped: Some(log.dropped_counter()),
    };
    let result = rt.block_on(app.run_until_stopped(Lifecycle::new(), telemetry));
    rt.shutdown_timeout(Duration::from_secs(1));
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stopped with an error");
            ExitCode::FAILURE
        }
    };
    // Dropping the guard flushes every queued log line.
    drop(log);
    code
}

fn migrate(settings: Settings) -> ExitCode {
    if !settings.database.can_migrate() {
        eprintln!(
            "pgsidecar: database.migrate_url: must be set to a direct PostgreSQL URL to migrate \
             with database.pooler = \"transaction\" (the migration lock is a session advisory \
             lock, which a transaction-mode pooler does not keep)"
        );
        return ExitCode::from(EX_CONFIG);
    }
    let log = pgsidecar::telemetry::init(&settings.log.level, std::io::stdout());
    let Ok(rt) = current_thread_runtime() else {
        return ExitCode::FAILURE;
    };
    let code = rt.block_on(async {
        let store = match Store::new(&settings) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot configure the database pool");
                return ExitCode::FAILURE;
            }
        };
        match store.migrate(&settings.database.schema).await {
            Ok(()) => {
                let d = &settings.database;
                let url = if d.migrate_url.expose().is_empty() { &d.url } else { &d.migrate_url };
                tracing::info!(schema = %d.schema, database = %url.redacted(), "migrations applied");
                ExitCode::SUCCESS
            }
            Err(e) => {
                let error = pgsidecar::config::redact_url(&e.to_string());
                tracing::error!(error = %error, "migration failed");
                ExitCode::FAILURE
            }
        }
    });
    drop(log);
    code
}

/// A minimal HTTP/1.0 GET on the local ops port: no client library, no shell, no curl needed.
/// Prints one line either way (on stdout when the answer is 200, else on stderr), so a Docker
/// health log says why.
fn probe(settings: &Settings, what: ProbeKind) -> ExitCode {
    use std::io::{Read, Write};
    let path = match what {
        ProbeKind::Live => "/live",
        ProbeKind::Ready => "/ready",
    };
    let ListenAddr::Tcp(mut addr) = settings.server.ops_listen.clone() else {
        eprintln!("pgsidecar probe {path}: server.ops_listen is not a TCP address");
        return ExitCode::FAILURE;
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let timeout = Duration::from_secs(2);
    let answer = (|| -> std::io::Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        // The ops answers are small JSON objects; a bound in case something else answers.
        let mut answer = Vec::new();
        s.take(64 * 1024).read_to_end(&mut answer)?;
        Ok(answer)
    })();
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pgsidecar probe {path}: cannot ask the ops listener at {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").trim();
    let ok = status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200");
    let line = format!(
        "pgsidecar probe {path}: {} {}",
        if status.is_empty() {
            "no HTTP answer"
        } else {
            status
        },
        body.trim().replace(['\r', '\n'], " ")
    );
    if ok {
        println!("{}", line.trim_end());
        ExitCode::SUCCESS
    } else {
        eprintln!("{}", line.trim_end());
        ExitCode::FAILURE
    }
}
