//! Health: two background loops and the snapshot that `/health`, `/ready` and `/api/*` read.
//!
//! The probe round (system checks, upstreams) runs every `health.interval_ms`; the Postgres
//! monitor, which also drives the circuit (see `store::circuit`), every
//! `health.postgres_interval_ms` and at once when the data path suspects trouble. Each check
//! has its own timeout, so an ops request never waits on Postgres or an upstream: it answers
//! from the last snapshot.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use super::system::SystemProbe;
use crate::config::{HealthSettings, UpstreamSettings};
use crate::metrics as m;
use crate::shutdown::Lifecycle;
use crate::store::conns::diagnose_connect;
use crate::store::error::describe;
use crate::store::{CheckError, DbError, Store};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One entry of the `checks` object (draft-inadarei-api-health-check).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component_id: Option<String>,
    pub component_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_unit: Option<&'static str>,
    pub status: Status,
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// What `/health`, `/ready` and `/api/*` answer from: the latest results of the probe round
/// (system checks, upstreams) merged with the Postgres monitor's latest check.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub status: Status,
    pub checks: BTreeMap<String, Vec<CheckEntry>>,
    /// Postgres answered the monitor (at least once, and the circuit is not open).
    pub postgres_ok: bool,
    /// The sidecar's tables are present.
    pub tables_ok: bool,
    /// Names of critical upstreams that failed.
    pub failed_critical: Vec<String>,
    /// When the last probe round finished.
    pub taken: Instant,
}

/// The Postgres monitor's latest findings, as `/health` shows them.
#[derive(Clone, Debug)]
struct PostgresReport {
    /// `postgres:responseTime` and `postgres:tables`.
    entries: [CheckEntry; 2],
    /// `postgres:connections`, only while PostgreSQL refuses new connections.
    connections: Option<CheckEntry>,
    postgres_ok: bool,
    tables_ok: bool,
}

impl PostgresReport {
    /// The entries for a check of status `check` (with `output`, or its `latency` when it
    /// answered), Postgres `reachable` (answered once and the circuit closed) and the tables
    /// last seen present or not.
    fn new(
        check: Status,
        output: Option<String>,
        latency: Option<Duration>,
        reachable: bool,
        tables_ok: bool,
    ) -> Self {
        let t = now();
        let response_time = CheckEntry {
            component_id: None,
            component_type: "datastore",
            observed_value: latency.map(|l| (l.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0),
            observed_unit: latency.map(|_| "ms"),
            status: check,
            time: t.clone(),
            output,
        };
        let tables = CheckEntry {
            component_id: None,
            component_type: "datastore",
            observed_value: None,
            observed_unit: None,
            status: if reachable && tables_ok {
                Status::Pass
            } else {
                Status::Fail
            },
            time: t,
            output: match (reachable, tables_ok) {
                (true, true) => None,
                (true, false) => Some("sidecar tables missing: migrations not applied".into()),
                (false, _) => Some("postgres unreachable".into()),
            },
        };
        Self {
            entries: [response_time, tables],
            connections: None,
            postgres_ok: reachable,
            tables_ok: reachable && tables_ok,
        }
    }

    fn initial() -> Self {
        let entry = |output: &str| CheckEntry {
            component_id: None,
            component_type: "datastore",
            observed_value: None,
            observed_unit: None,
            status: Status::Fail,
            time: now(),
            output: Some(output.into()),
        };
        Self {
            entries: [entry("not probed yet"), entry("not probed yet")],
            connections: None,
            postgres_ok: false,
            tables_ok: false,
        }
    }
}

/// The parts a snapshot is built from, each replaced by its own loop.
struct Parts {
    /// The probe round's checks (everything but Postgres).
    round: BTreeMap<String, Vec<CheckEntry>>,
    failed_critical: Vec<String>,
    round_taken: Instant,
    postgres: PostgresReport,
    /// The overall status last published, to log its changes.
    status: Option<Status>,
}

/// The shared health state.
pub struct Health {
    snapshot: RwLock<Arc<Snapshot>>,
    parts: Mutex<Parts>,
    /// Asks the probe loop for a round now (e.g. right after migrations were applied).
    wake: tokio::sync::Notify,
    /// Asks the Postgres monitor for a check now (likewise).
    wake_monitor: tokio::sync::Notify,
}

impl Default for Health {
    fn default() -> Self {
        let parts = Parts {
            round: BTreeMap::new(),
            failed_critical: Vec::new(),
            round_taken: Instant::now(),
            postgres: PostgresReport::initial(),
            status: None,
        };
        let health = Self {
            snapshot: RwLock::new(Arc::new(Snapshot {
                status: Status::Fail,
                checks: BTreeMap::new(),
                postgres_ok: false,
                tables_ok: false,
                failed_critical: Vec::new(),
                taken: Instant::now(),
            })),
            parts: Mutex::new(parts),
            wake: tokio::sync::Notify::new(),
            wake_monitor: tokio::sync::Notify::new(),
        };
        // The first snapshot, unlogged: the first check or round logs the first status.
        let mut parts = health.parts.lock().unwrap_or_else(|p| p.into_inner());
        health.publish(&mut parts, false);
        drop(parts);
        health
    }
}

impl Health {
    /// Runs the next probe round and Postgres check now instead of at the end of their
    /// intervals.
    pub fn probe_now(&self) {
        self.wake.notify_one();
        self.wake_monitor.notify_one();
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Changes the parts with `change` and publishes the snapshot they make, under one lock so
    /// the two loops cannot publish each other's older parts.
    fn update(&self, change: impl FnOnce(&mut Parts)) {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut parts);
        self.publish(&mut parts, true);
    }

    /// Publishes the snapshot `parts` make; logs a change of the overall status if `log`.
    fn publish(&self, parts: &mut Parts, log: bool) {
        let mut checks = parts.round.clone();
        let [time, tables] = parts.postgres.entries.clone();
        checks.insert("postgres:responseTime".into(), vec![time]);
        checks.insert("postgres:tables".into(), vec![tables]);
        if let Some(connections) = &parts.postgres.connections {
            checks.insert("postgres:connections".into(), vec![connections.clone()]);
        }
        let status = checks
            .values()
            .flatten()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Pass);
        for (name, entries) in &checks {
            let up = entries.iter().all(|c| c.status != Status::Fail);
            metrics::gauge!(m::HEALTH_CHECK_UP, "check" => name.clone()).set(if up {
                1.0
            } else {
                0.0
            });
        }
        if log && parts.status != Some(status) {
            let failing: Vec<&str> = checks
                .iter()
                .filter(|(_, e)| e.iter().any(|c| c.status != Status::Pass))
                .map(|(n, _)| n.as_str())
                .collect();
            // A JSON array in the log line (see `telemetry`'s JSON fields), not a quoted string.
            tracing::info!(status = ?status, failing = %serde_json::json!(failing), "health status changed");
            parts.status = Some(status);
        }
        let snapshot = Snapshot {
            status,
            checks,
            postgres_ok: parts.postgres.postgres_ok,
            tables_ok: parts.postgres.tables_ok,
            failed_critical: parts.failed_critical.clone(),
            taken: parts.round_taken,
        };
        match self.snapshot.write() {
            Ok(mut guard) => *guard = Arc::new(snapshot),
            Err(p) => *p.into_inner() = Arc::new(snapshot),
        }
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The text `/health` shows for a failed Postgres check: a fixed phrase per kind of failure,
/// never the server's own words, which name roles, databases and hosts (the ops port answers
/// anyone). The full error goes to the log, once per change. New kinds of failure (TLS, ...)
/// get their phrase here.
pub fn public_cause(e: &sqlx::Error) -> Cow<'static, str> {
    use std::io::ErrorKind;
    // TLS failures have fixed texts of their own (see `tls::TlsFailure`), whichever layer of
    // sqlx's error carries them.
    if let DbError::Tls(tls) = DbError::of(e) {
        return tls.to_string().into();
    }
    let text = match e {
        sqlx::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => "connection refused",
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => "connection closed by the server",
            ErrorKind::TimedOut => "connection timed out",
            ErrorKind::NotFound => "server not found",
            _ => "network error",
        },
        sqlx::Error::Tls(_) => "TLS error",
        sqlx::Error::Protocol(_) => "protocol error",
        sqlx::Error::Configuration(_) => "invalid connection settings",
        sqlx::Error::PoolTimedOut => "no connection free within the acquire timeout",
        sqlx::Error::PoolClosed => "connection pool closed",
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01" | "28000") => "authentication failed",
            Some("3D000") => "database does not exist",
            Some("57P03") => "server not accepting connections (starting up or shutting down)",
            Some(c) if c.starts_with("57P") => "server shutting down",
            Some("53300") => "too many connections",
            Some(c) if c.starts_with("53") => "server out of resources",
            Some("42501") => "permission denied",
            Some(c) if c.starts_with("08") => "connection failure",
            _ => "database error",
        },
        _ => "database error",
    };
    text.into()
}

/// Runs the round's checks (system, upstreams) and publishes them; one round.
pub struct Prober {
    settings: HealthSettings,
    /// One client per upstream (each may trust its own CA), in `settings.upstreams`' order.
    clients: Vec<Result<UpstreamClient, String>>,
    // Behind a mutex so the blocking /proc and statvfs reads can run on the blocking pool.
    system: Arc<std::sync::Mutex<SystemProbe>>,
}

impl Prober {
    pub fn new(settings: HealthSettings) -> Self {
        Self {
            system: Arc::new(std::sync::Mutex::new(SystemProbe::new(&settings))),
            clients: settings.upstreams.iter().map(upstream_client).collect(),
            settings,
        }
    }

    /// One probe round: every check, concurrently, each bounded by its own timeout; then
    /// publishes the results (with the Postgres monitor's latest) to `health`.
    pub async fn round(&mut self, health: &Health) {
        let timeout = Duration::from_millis(self.settings.check_timeout_ms);
        let upstream_results = futures_util::future::join_all(
            self.settings
                .upstreams
                .iter()
                .zip(&self.clients)
                .map(|(u, client)| self.check_upstream(u, client)),
        )
        .await;

        let t = now();
        let mut checks = BTreeMap::new();
        let mut failed_critical = Vec::new();
        for (u, (status, ms, output)) in self.settings.upstreams.iter().zip(upstream_results) {
            if status == Status::Fail && u.critical {
                failed_critical.push(u.name.clone());
            }
            // A non-critical upstream's failure only warns.
            let status = if status == Status::Fail && !u.critical {
                Status::Warn
            } else {
                status
            };
            checks.insert(
                format!("upstream:{}", u.name),
                vec![CheckEntry {
                    component_id: Some(u.name.clone()),
                    component_type: "component",
                    observed_value: ms,
                    observed_unit: ms.map(|_| "ms"),
                    status,
                    time: t.clone(),
                    output,
                }],
            );
        }
        // Off the async threads: a hung filesystem must not stall the data path.
        let system = self.system.clone();
        let settings = self.settings.clone();
        let job = tokio::task::spawn_blocking(move || {
            let mut probe = system.lock().unwrap_or_else(|p| p.into_inner());
            probe.check(&settings)
        });
        match tokio::time::timeout(timeout, job).await {
            Ok(Ok(results)) => {
                for (name, entries) in results {
                    checks.insert(name.to_string(), entries);
                }
            }
            _ => {
                checks.insert(
                    "system".to_string(),
                    vec![CheckEntry {
                        component_id: None,
                        component_type: "system",
                        observed_value: None,
                        observed_unit: None,
                        status: Status::Warn,
                        time: t.clone(),
                        output: Some(format!(
                            "system checks did not finish within {} ms",
                            timeout.as_millis()
                        )),
                    }],
                );
            }
        }
        health.update(|parts| {
            parts.round = checks;
            parts.failed_critical = failed_critical;
            parts.round_taken = Instant::now();
        });
    }

    async fn check_upstream(
        &self,
        u: &UpstreamSettings,
        client: &Result<UpstreamClient, String>,
    ) -> (Status, Option<f64>, Option<String>) {
        let client = match client {
            Ok(c) => c,
            Err(e) => return (Status::Fail, None, Some(e.clone())),
        };
        let uri = match u.url.parse::<hyper::Uri>() {
            Ok(uri) => uri,
            Err(e) => return (Status::Fail, None, Some(e.to_string())),
        };
        let start = Instant::now();
        let timeout = Duration::from_millis(u.timeout_ms);
        match tokio::time::timeout(timeout, client.get(uri)).await {
            Ok(Ok(resp)) => {
                let ms = (start.elapsed().as_secs_f64() * 1_000_000.0).round() / 1000.0;
                if resp.status().is_success() {
                    (Status::Pass, Some(ms), None)
                } else {
                    (
                        Status::Fail,
                        Some(ms),
                        Some(format!("answered HTTP {}", resp.status().as_u16())),
                    )
                }
            }
            Ok(Err(e)) => (Status::Fail, None, Some(request_failure(&e))),
            Err(_) => (
                Status::Fail,
                None,
                Some(format!("no answer within {} ms", u.timeout_ms)),
            ),
        }
    }
}

type UpstreamClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The client of one upstream: plain HTTP, or TLS trusting the system CAs and its `ca_file`.
fn upstream_client(u: &UpstreamSettings) -> Result<UpstreamClient, String> {
    let tls = if u.url.starts_with("https://") {
        crate::tls::upstream_config(u.ca_file.as_deref())?
    } else {
        // Never used for http:// (no handshake); spares loading the system CAs.
        rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    };
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// Why an upstream request failed: a TLS failure by name, else the error and its causes (which
/// name the connection's trouble, never the URL).
fn request_failure(e: &hyper_util::client::legacy::Error) -> String {
    if let Some(tls) = crate::tls::TlsFailure::find(e) {
        return tls.to_string();
    }
    let mut text = format!("request failed: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// The probe loop: a round at once, then one per interval, until shutdown.
pub async fn run(
    health: Arc<Health>,
    mut prober: Prober,
    interval: Duration,
    lifecycle: Lifecycle,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) {
    loop {
        prober.round(&health).await;
        if let Some(h) = &metrics {
            // Drains histogram buffers; the exporter needs this called periodically.
            h.run_upkeep();
        }
        tokio::select! {
            _ = lifecycle.stopped() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = health.wake.notified() => {}
        }
    }
}

/// Least time between two Postgres checks, however often the data path asks for one.
const CHECK_SPACING: Duration = Duration::from_millis(100);

/// What one Postgres check found.
enum Finding {
    /// Postgres answered; whether the sidecar's tables are present.
    Answered(bool),
    /// The pooled check only waited for a busy pool while other statements succeeded:
    /// Postgres is up, the sidecar loaded. Neither a success nor a failure.
    Busy,
    /// A reused connection broke: not a failure (see `store::circuit`), but check again at
    /// once, with a fresh connection.
    BrokenConnection {
        public: Cow<'static, str>,
        detail: String,
    },
    /// Postgres could not be reached: counts for the circuit. `tls`: for a TLS reason, which
    /// someone must fix (a certificate, a setting), so it is logged as an error.
    Failed {
        public: String,
        detail: String,
        tls: bool,
    },
}

/// Watches Postgres for the circuit (see `store::circuit`) and `/health`: a check every
/// `health.postgres_interval_ms`, at once when the data path suspects trouble, and every
/// `CHECK_SPACING` while failures are piling up but the circuit is not open yet. Checks use a
/// pooled connection while all is well, and a fresh connection of their own once something
/// looked wrong, so what a new connection meets shows at once. Runs until shutdown.
pub async fn watch_postgres(
    store: Store,
    health: Arc<Health>,
    settings: HealthSettings,
    lifecycle: Lifecycle,
) {
    let interval = Duration::from_millis(settings.postgres_interval_ms);
    let timeout = Duration::from_millis(settings.check_timeout_ms);
    let status = store.status().clone();
    let circuit = &status.circuit;
    let mut tables_ok = false;
    let mut answered_once = false;
    // The public text of the last failure logged, so each change is logged once.
    let mut logged: Option<String> = None;
    loop {
        let started = Instant::now();
        // While PostgreSQL refuses new connections for lack of slots (too many clients), try
        // one each check: the stores open new ones again once it accepts (see `conns`).
        if status.refusal().is_some() {
            diagnose_connect(store.pool(), &status, timeout).await;
        }
        // Once something looked wrong, check with a new connection, unless new ones are
        // refused: then the ones already open tell whether PostgreSQL answers.
        let fresh = circuit.is_suspect() && status.refusal().is_none();
        let finding = if fresh {
            match store.check_fresh(timeout).await {
                Ok(present) => Finding::Answered(present),
                // Up, but out of connection slots: not an outage while the pool's own
                // connections answer.
                Err(CheckError::Db(sqlx::Error::Database(e)))
                    if e.code().as_deref() == Some("53300") =>
                {
                    status.record_refusal(format!("{} (SQLSTATE 53300)", e.message()));
                    check_pooled(&store, timeout, interval).await
                }
                Err(CheckError::Db(e)) => failed(&e),
                Err(_) => no_answer(answer_text(timeout)),
            }
        } else {
            check_pooled(&store, timeout, interval).await
        };
        let elapsed = started.elapsed();
        let (check, output) = match finding {
            Finding::Answered(present) => {
                status.record_success();
                tables_ok = present;
                answered_once = true;
                if logged.take().is_some() {
                    tracing::info!(
                        latency_ms = elapsed.as_secs_f64() * 1000.0,
                        "postgres check passed again"
                    );
                }
                (Status::Pass, None)
            }
            Finding::Busy => (
                Status::Pass,
                Some("every pooled connection busy; other statements are succeeding".to_string()),
            ),
            Finding::BrokenConnection { public, detail } => {
                tracing::info!(error = %detail, "postgres check met a broken pooled connection; checking with a new one");
                circuit.suspect();
                (Status::Warn, Some(format!("{public}; checking again")))
            }
            Finding::Failed {
                public,
                detail,
                tls,
            } => {
                status.record_failure(&detail);
                if logged.as_deref() != Some(public.as_str()) {
                    if tls {
                        tracing::error!(error = %detail, "postgres check failed");
                    } else {
                        tracing::warn!(error = %detail, "postgres check failed");
                    }
                    logged = Some(public.clone());
                }
                let state = if circuit.is_open() {
                    "circuit open: data requests are refused".to_string()
                } else {
                    format!(
                        "{} of {} consecutive failures open the circuit",
                        circuit.failures(),
                        circuit.threshold()
                    )
                };
                (Status::Warn, Some(format!("{public}; {state}")))
            }
        };
        let open = circuit.is_open();
        let reachable = answered_once && !open;
        let check = if open { Status::Fail } else { check };
        let latency = (check == Status::Pass && output.is_none()).then_some(elapsed);
        let mut report = PostgresReport::new(check, output, latency, reachable, tables_ok);
        if let Some(cause) = status.refusal() {
            // The sidecar keeps serving on the connections it has: a warning, unless nothing
            // answers at all.
            let open = store.pool_connections().0;
            report.connections = Some(CheckEntry {
                component_id: None,
                component_type: "datastore",
                observed_value: Some(open as f64),
                observed_unit: Some("connections"),
                status: if reachable {
                    Status::Warn
                } else {
                    Status::Fail
                },
                time: now(),
                output: Some(format!(
                    "PostgreSQL refuses new connections: {cause}; serving on the connections \
                     already open, retrying every check"
                )),
            });
        }
        health.update(|parts| parts.postgres = report);

        // Next: soon while failures pile up below the threshold, else after the interval (or
        // when the data path asks), never sooner than CHECK_SPACING after this one began.
        let wait = if circuit.is_suspect() && !circuit.is_open() {
            CHECK_SPACING
        } else {
            interval
        };
        tokio::select! {
            _ = lifecycle.stopped() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = circuit.woken() => {}
            _ = health.wake_monitor.notified() => {}
        }
        tokio::time::sleep((started + CHECK_SPACING).saturating_duration_since(Instant::now()))
            .await;
    }
}

/// A check on a pooled connection, as the monitor judges it.
async fn check_pooled(store: &Store, timeout: Duration, interval: Duration) -> Finding {
    // No pooled connection in time is not an outage when other statements succeeded
    // meanwhile: the pool is busy, the sidecar loaded.
    let busy = || store.status().succeeded_within(timeout + interval);
    match store.check_pooled(timeout).await {
        Ok(present) => Finding::Answered(present),
        Err(CheckError::NoConnection | CheckError::Db(sqlx::Error::PoolTimedOut)) if busy() => {
            Finding::Busy
        }
        Err(CheckError::Db(e)) if matches!(DbError::of(&e), DbError::ConnectionLost(_)) => {
            Finding::BrokenConnection {
                public: public_cause(&e),
                detail: crate::config::redact_url(&describe(&e)),
            }
        }
        Err(CheckError::Db(e)) => failed(&e),
        Err(CheckError::NoConnection) => {
            no_answer(format!("no connection within {} ms", timeout.as_millis()))
        }
        Err(CheckError::NoAnswer) => no_answer(answer_text(timeout)),
    }
}

fn failed(e: &sqlx::Error) -> Finding {
    Finding::Failed {
        public: public_cause(e).into_owned(),
        detail: crate::config::redact_url(&describe(e)),
        tls: matches!(DbError::of(e), DbError::Tls(_)),
    }
}

fn answer_text(timeout: Duration) -> String {
    format!("no answer within {} ms", timeout.as_millis())
}

fn no_answer(text: String) -> Finding {
    Finding::Failed {
        public: text.clone(),
        detail: text,
        tls: false,
    }
}
