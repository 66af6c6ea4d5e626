//! Application: binds both listeners, builds the pool, router and background tasks, and runs
//! until stopped, with the drain-then-grace shutdown sequence.

use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::DroppedLines;
use metrics_exporter_prometheus::PrometheusHandle;
use rand::RngExt;
use tokio::sync::oneshot;

use crate::config::Settings;
use crate::http::{Listener, serve};
use crate::ops::health::{Health, Prober};
use crate::ops::{self, OpsState};
use crate::shutdown::{self, Lifecycle};
use crate::store::{Store, cleanup};

/// A sidecar with its listeners bound but nothing running yet.
pub struct Application {
    settings: Settings,
    data: Listener,
    ops: Listener,
}

/// Process-wide handles that exist once per process (the metrics recorder, the log writer).
#[derive(Clone, Default)]
pub struct Telemetry {
    pub prometheus: Option<PrometheusHandle>,
    pub log_dropped: Option<DroppedLines>,
}

impl Application {
    /// Binds both listeners first, so port 0 works and a busy port fails before anything starts.
    pub fn bind(settings: Settings) -> std::io::Result<Self> {
        let data = Listener::bind(&settings.server.data_listen).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot bind server.data_listen {}: {e}",
                    settings.server.data_listen
                ),
            )
        })?;
        let ops = Listener::bind(&settings.server.ops_listen).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot bind server.ops_listen {}: {e}",
                    settings.server.ops_listen
                ),
            )
        })?;
        Ok(Self {
            settings,
            data,
            ops,
        })
    }

    pub fn data_addr(&self) -> String {
        self.data.local_addr()
    }

    pub fn ops_addr(&self) -> String {
        self.ops.local_addr()
    }

    /// Runs until SIGTERM/SIGINT or until `lifecycle` is stopped by the caller.
    pub async fn run_until_stopped(
        self,
        lifecycle: Lifecycle,
        telemetry: Telemetry,
    ) -> Result<(), String> {
        let Self {
            settings,
            data,
            ops,
        } = self;
        let data_addr = data.local_addr();
        let ops_addr = ops.local_addr();
        let store = Store::new(&settings).map_err(|e| e.to_string())?;
        let health = Arc::new(Health::default());
        let service_id = crate::telemetry::hostname();

        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            data_listen = %data_addr,
            ops_listen = %ops_addr,
            config = %settings.redacted_json(),
            "pgsidecar started"
        );

        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(bootstrap(
            store.clone(),
            settings.clone(),
            lifecycle.clone(),
            health.clone(),
        )));
        tasks.push(tokio::spawn(ops::health::run(
            health.clone(),
            Prober::new(store.clone(), settings.health.clone()),
            Duration::from_millis(settings.health.interval_ms),
            lifecycle.clone(),
            telemetry.prometheus.clone(),
        )));
        if settings.cleanup.enabled {
            let holder = format!(
                "{service_id}:{}:{:08x}",
                std::process::id(),
                rand::rng().random::<u32>()
            );
            tasks.push(tokio::spawn(cleanup::run(
                store.clone(),
                holder,
                Duration::from_secs(settings.cleanup.interval_seconds),
                lifecycle.clone(),
            )));
        }

        let header_timeout = Duration::from_millis(settings.server.header_read_timeout_ms);
        let grace = Duration::from_secs(settings.shutdown.grace_seconds);

        // The ops listener gets its own thread and runtime: probes and scrapes answer even when
        // the data runtime is saturated.
        let ops_state = OpsState {
            health: health.clone(),
            lifecycle: lifecycle.clone(),
            store: store.clone(),
            max_connections: settings.database.max_connections,
            // Three missed rounds; a round lasts as long as its slowest check.
            stale_after: Duration::from_millis(
                3 * settings.health.interval_ms
                    + 2 * settings
                        .health
                        .upstreams
                        .iter()
                        .map(|u| u.timeout_ms)
                        .fold(settings.health.check_timeout_ms, u64::max),
            ),
            service_id,
            prometheus: telemetry.prometheus.clone(),
            process: Arc::new(process_collector()),
            log_dropped: telemetry.log_dropped.clone(),
        };
        let ops_router = crate::http::edge(
            ops::router(ops_state),
            "ops",
            ops::PATHS,
            None,
            settings.server.max_body_bytes,
        );
        let (ops_done_tx, ops_done) = oneshot::channel::<()>();
        let ops_lifecycle = lifecycle.clone();
        std::thread::Builder::new()
            .name("pgsidecar-ops".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        rt.block_on(serve(ops, ops_router, header_timeout, ops_lifecycle, grace))
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start the ops runtime"),
                }
                let _ = ops_done_tx.send(());
            })
            .map_err(|e| format!("cannot start the ops thread: {e}"))?;

        let data_router = crate::http::edge(
            crate::api::router(store.clone(), &settings),
            "data",
            crate::api::route_table().into_iter().map(|(_, path)| path),
            Some(crate::http::Guard::new(&settings.server)),
            settings.server.max_body_bytes,
        );
        let data_server = tokio::spawn(serve(
            data,
            data_router,
            header_timeout,
            lifecycle.clone(),
            grace,
        ));

        // Wait for a signal (or a stop from the embedding code, e.g. a test).
        tokio::select! {
            sig = shutdown::signal() => {
                lifecycle.begin_drain();
                tracing::info!(signal = sig, drain_seconds = settings.shutdown.drain_seconds, "shutdown requested; draining (ready = false)");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(settings.shutdown.drain_seconds)) => {}
                    _ = shutdown::signal() => tracing::warn!("second signal: skipping the rest of the drain period"),
                }
            }
            _ = lifecycle.stopped() => {}
        }
        tracing::info!(
            grace_seconds = settings.shutdown.grace_seconds,
            "no longer accepting connections; finishing in-flight requests"
        );
        lifecycle.stop();
        let _ = data_server.await;
        let _ = tokio::time::timeout(grace + Duration::from_secs(1), ops_done).await;
        // Background loops saw the stop too; give them together 2 s to finish a statement.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        // Free connections go back to the pool so closing it does not wait for them.
        store.release_connections();
        let pool = store.pool().clone();
        drop(store);
        if tokio::time::timeout(Duration::from_secs(2), pool.close())
            .await
            .is_err()
        {
            tracing::warn!("database pool did not close within 2 s");
        }
        tracing::info!("pgsidecar stopped");
        Ok(())
    }
}

fn process_collector() -> metrics_process::Collector {
    let c = metrics_process::Collector::default();
    c.describe();
    c
}

/// Applies migrations (or waits for them) with capped, jittered backoff until Postgres answers,
/// then warms the pool. Postgres being down at start-up is normal: no crash loop.
async fn bootstrap(store: Store, settings: Settings, lifecycle: Lifecycle, health: Arc<Health>) {
    let mut delay = Duration::from_millis(250);
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let result = if settings.database.migrate_on_start {
            store.migrate(&settings.database.schema).await
        } else {
            store.check_migrated().await
        };
        match result {
            Ok(()) => {
                tracing::info!(
                    attempt,
                    migrate_on_start = settings.database.migrate_on_start,
                    "database ready: migrations applied"
                );
                // Readiness follows at once rather than at the next probe round.
                health.probe_now();
                store.warm_up(settings.database.min_connections).await;
                return;
            }
            Err(e) => tracing::warn!(
                attempt,
                error = %crate::config::redact_url(&e.to_string()),
                retry_in_ms = delay.as_millis() as u64,
                "database not ready; retrying"
            ),
        }
        let jittered = delay.mul_f64(rand::rng().random_range(0.5..1.0));
        tokio::select! {
            _ = lifecycle.stopped() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}
