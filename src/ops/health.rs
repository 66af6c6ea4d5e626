//! Health: a background probe loop and the snapshot that `/health`, `/ready` and `/api/*` read.
//!
//! Probes run every `health.interval_ms`, each with its own timeout, so an ops request never
//! waits on Postgres or an upstream: it answers from the last snapshot.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use super::system::SystemProbe;
use crate::config::{HealthSettings, UpstreamSettings};
use crate::metrics as m;
use crate::shutdown::Lifecycle;
use crate::store::{DbError, Store};

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

/// The results of one probe round.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub status: Status,
    pub checks: BTreeMap<String, Vec<CheckEntry>>,
    /// Postgres answered the last probe.
    pub postgres_ok: bool,
    /// The sidecar's tables are present.
    pub tables_ok: bool,
    /// Names of critical upstreams that failed.
    pub failed_critical: Vec<String>,
    /// When the round finished.
    pub taken: Instant,
}

impl Snapshot {
    fn initial() -> Self {
        let mut checks = BTreeMap::new();
        checks.insert(
            "postgres:responseTime".to_string(),
            vec![CheckEntry {
                component_id: None,
                component_type: "datastore",
                observed_value: None,
                observed_unit: None,
                status: Status::Fail,
                time: now(),
                output: Some("not probed yet".into()),
            }],
        );
        Self {
            status: Status::Fail,
            checks,
            postgres_ok: false,
            tables_ok: false,
            failed_critical: Vec::new(),
            taken: Instant::now(),
        }
    }
}

/// The shared health state.
pub struct Health {
    snapshot: RwLock<Arc<Snapshot>>,
    /// Asks the probe loop for a round now (e.g. right after migrations were applied).
    wake: tokio::sync::Notify,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            snapshot: RwLock::new(Arc::new(Snapshot::initial())),
            wake: tokio::sync::Notify::new(),
        }
    }
}

impl Health {
    /// Runs the next probe round now instead of at the end of the interval.
    pub fn probe_now(&self) {
        self.wake.notify_one();
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn publish(&self, s: Snapshot) {
        match self.snapshot.write() {
            Ok(mut guard) => *guard = Arc::new(s),
            Err(p) => *p.into_inner() = Arc::new(s),
        }
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Runs the checks and publishes a snapshot; one round.
pub struct Prober {
    store: Store,
    settings: HealthSettings,
    client: Client<HttpConnector, Empty<Bytes>>,
    // Behind a mutex so the blocking /proc and statvfs reads can run on the blocking pool.
    system: Arc<std::sync::Mutex<SystemProbe>>,
    /// The tables check of the previous round, kept when a round could not run it.
    last_tables_ok: bool,
    /// Whether PostgreSQL answered the previous round.
    last_postgres_ok: bool,
}

impl Prober {
    pub fn new(store: Store, settings: HealthSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            store,
            system: Arc::new(std::sync::Mutex::new(SystemProbe::new(&settings))),
            last_tables_ok: false,
            last_postgres_ok: true,
            settings,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// One probe round: every check, concurrently, each bounded by its own timeout.
    pub async fn round(&mut self) -> Snapshot {
        let timeout = Duration::from_millis(self.settings.check_timeout_ms);
        let store = self.store.clone();
        let pg = async move {
            let start = Instant::now();
            let r = tokio::time::timeout(timeout, store.probe()).await;
            (r, start.elapsed())
        };
        let upstreams = futures_util::future::join_all(
            self.settings
                .upstreams
                .iter()
                .map(|u| self.check_upstream(u)),
        );
        // While PostgreSQL refuses new connections (too many clients), try one each round: the
        // stores open new ones again once it accepts. After a failed round, find out whether
        // that is why (sqlx's pool retries such refusals silently until its timeout).
        let status = self.store.status().clone();
        let pool = self.store.pool().clone();
        let diagnose = status.refusal().is_some() || !self.last_postgres_ok;
        let slots = async move {
            if diagnose {
                crate::store::conns::diagnose_connect(&pool, &status, timeout).await;
            }
            status.refusal()
        };
        let ((pg_result, elapsed), upstream_results, refusal) = tokio::join!(pg, upstreams, slots);

        let t = now();
        let mut checks = BTreeMap::new();
        // A probe that only waited for a busy pool is not an outage: when other statements
        // succeeded during this round, Postgres is up and the sidecar merely loaded (shedding
        // is the concurrency limit's job, not readiness').
        let busy_but_answering = || {
            self.store
                .answered_within(timeout + Duration::from_millis(self.settings.interval_ms))
        };
        let (postgres_ok, tables_ok, pg_output) = match pg_result {
            Ok(Ok(present)) => (true, present, None),
            Ok(Err(DbError::PoolExhausted)) | Err(_) if busy_but_answering() => (
                true,
                self.last_tables_ok,
                Some("every pooled connection busy; other statements are succeeding".to_string()),
            ),
            Ok(Err(e)) => (false, false, Some(e.to_string())),
            Err(_) => (
                false,
                false,
                Some(format!("no answer within {} ms", timeout.as_millis())),
            ),
        };
        self.last_tables_ok = tables_ok;
        self.last_postgres_ok = postgres_ok;
        self.store.status().set_reachable(postgres_ok);
        checks.insert(
            "postgres:responseTime".to_string(),
            vec![CheckEntry {
                component_id: None,
                component_type: "datastore",
                observed_value: postgres_ok
                    .then(|| (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0),
                observed_unit: postgres_ok.then_some("ms"),
                status: if postgres_ok {
                    Status::Pass
                } else {
                    Status::Fail
                },
                time: t.clone(),
                output: pg_output.map(|o| crate::config::redact_url(&o)),
            }],
        );
        checks.insert(
            "postgres:tables".to_string(),
            vec![CheckEntry {
                component_id: None,
                component_type: "datastore",
                observed_value: None,
                observed_unit: None,
                status: if tables_ok {
                    Status::Pass
                } else {
                    Status::Fail
                },
                time: t.clone(),
                output: (!tables_ok).then(|| {
                    if postgres_ok {
                        "sidecar tables missing: migrations not applied"
                    } else {
                        "postgres unreachable"
                    }
                    .to_string()
                }),
            }],
        );
        if let Some(cause) = refusal {
            // The sidecar keeps serving on the connections it has: a warning, unless nothing
            // answers at all.
            let open = self.store.pool_connections().0;
            checks.insert(
                "postgres:connections".to_string(),
                vec![CheckEntry {
                    component_id: None,
                    component_type: "datastore",
                    observed_value: Some(open as f64),
                    observed_unit: Some("connections"),
                    status: if postgres_ok {
                        Status::Warn
                    } else {
                        Status::Fail
                    },
                    time: t.clone(),
                    output: Some(format!(
                        "PostgreSQL refuses new connections: {cause}; serving on the \
                         connections already open, retrying every probe round"
                    )),
                }],
            );
        }
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
        Snapshot {
            status,
            checks,
            postgres_ok,
            tables_ok,
            failed_critical,
            taken: Instant::now(),
        }
    }

    async fn check_upstream(&self, u: &UpstreamSettings) -> (Status, Option<f64>, Option<String>) {
        let uri = match u.url.parse::<hyper::Uri>() {
            Ok(uri) => uri,
            Err(e) => return (Status::Fail, None, Some(e.to_string())),
        };
        let start = Instant::now();
        let timeout = Duration::from_millis(u.timeout_ms);
        match tokio::time::timeout(timeout, self.client.get(uri)).await {
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
            Ok(Err(e)) => (Status::Fail, None, Some(format!("request failed: {e}"))),
            Err(_) => (
                Status::Fail,
                None,
                Some(format!("no answer within {} ms", u.timeout_ms)),
            ),
        }
    }
}

/// The probe loop: a round at once, then one per interval, until shutdown.
pub async fn run(
    health: Arc<Health>,
    mut prober: Prober,
    interval: Duration,
    lifecycle: Lifecycle,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) {
    let mut last_status = None;
    loop {
        let snapshot = prober.round().await;
        if last_status != Some(snapshot.status) {
            let failing: Vec<&str> = snapshot
                .checks
                .iter()
                .filter(|(_, e)| e.iter().any(|c| c.status != Status::Pass))
                .map(|(n, _)| n.as_str())
                .collect();
            tracing::info!(status = ?snapshot.status, failing = ?failing, "health status changed");
            last_status = Some(snapshot.status);
        }
        health.publish(snapshot);
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
