//! Application: binds both listeners, starts the data threads (each with its own store and
//! router) and the background tasks, and runs until stopped, with the drain-then-grace shutdown
//! sequence.

use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::DroppedLines;
use metrics_exporter_prometheus::PrometheusHandle;
use rand::RngExt;
use tokio::sync::oneshot;

use crate::config::Settings;
use crate::http::{Guard, LaneRx, Listener, serve};
use crate::ops::health::{Health, Prober};
use crate::ops::{self, OpsState};
use crate::shutdown::{self, Lifecycle};
use crate::store::notify::Notifier;
use crate::store::{DbError, DbStatus, Store, cleanup};

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
    /// Raises the open-file limit first, and caps each listener's connections (see
    /// [`connection_caps`]).
    pub fn bind(settings: Settings) -> std::io::Result<Self> {
        let (data_cap, ops_cap) =
            connection_caps(&settings, crate::http::listener::raise_open_file_limit());
        let data = Listener::bind(&settings.server.data_listen)
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot bind server.data_listen {}: {e}",
                        settings.server.data_listen
                    ),
                )
            })?
            .limit("data", data_cap);
        let ops = Listener::bind(&settings.server.ops_listen)
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot bind server.ops_listen {}: {e}",
                        settings.server.ops_listen
                    ),
                )
            })?
            .limit("ops", ops_cap);
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
        let timeouts = crate::http::ConnTimeouts::from_settings(&settings.server);
        let grace = Duration::from_secs(settings.shutdown.grace_seconds);
        let status = Arc::new(DbStatus::new(
            settings.database.circuit_failure_threshold,
            Duration::from_millis(settings.health.postgres_interval_ms),
        ));
        let health = Arc::new(Health::default());
        let service_id = crate::telemetry::hostname();

        // Data thread 0 is this runtime; the others get a thread and a runtime each.
        let threads = settings.data_threads();
        if settings.database.max_connections < 5 * threads as u32 {
            // Below 5, batches may take every connection of a thread (see `batch::Share`).
            tracing::warn!(
                data_threads = threads,
                max_connections = settings.database.max_connections,
                "fewer than 5 pool connections per data thread: unbatched statements (session \
                 create and revoke, deletes, the health probe) may wait behind batches; raise \
                 database.max_connections{}",
                if threads > 1 {
                    " or lower server.worker_threads"
                } else {
                    ""
                }
            );
        }
        let guard = Guard::new(&settings.server);
        let answers = crate::api::AnswerBudget::new(&settings.server);
        // The near caches, the change feed and the lease waiters: one for the process.
        let notifier = Arc::new(Notifier::new(&settings));
        let store = Store::with_status(&settings.for_data_thread(0, threads), status.clone())
            .map_err(|e| e.to_string())?
            .with_notifier(notifier.clone());
        let (first_lane, first_rx) = crate::http::lane();
        let mut lanes = vec![first_lane];
        let mut stores = vec![store.clone()];
        let mut others = Vec::new();
        for i in 1..threads {
            let (lane, rx) = crate::http::lane();
            let (store_tx, store_rx) = oneshot::channel();
            let (done_tx, done) = oneshot::channel::<()>();
            let thread = DataThread {
                settings: settings.for_data_thread(i, threads),
                status: status.clone(),
                notifier: notifier.clone(),
                guard: guard.clone(),
                answers: answers.clone(),
                lifecycle: lifecycle.clone(),
                lane: rx,
            };
            std::thread::Builder::new()
                .name(format!("pgsidecar-data-{i}"))
                .spawn(move || {
                    thread.run(store_tx);
                    let _ = done_tx.send(());
                })
                .map_err(|e| format!("cannot start data thread {i}: {e}"))?;
            stores.push(
                store_rx
                    .await
                    .map_err(|_| format!("data thread {i} did not start"))??,
            );
            lanes.push(lane);
            others.push(done);
        }

        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            data_listen = %data_addr,
            ops_listen = %ops_addr,
            data_threads = threads,
            database_tls = %settings.database.tls().map(|t| t.describe()).unwrap_or_default(),
            config = %settings.redacted_json(),
            "pgsidecar started"
        );

        let mut tasks = vec![tokio::spawn(bootstrap(
            store.clone(),
            settings.clone(),
            lifecycle.clone(),
            health.clone(),
        ))];
        tasks.push(tokio::spawn(keep_warm(store.clone(), lifecycle.clone())));
        match settings.listen_url() {
            Ok(_) => {
                tasks.push(tokio::spawn(crate::store::listen::run(
                    store.clone(),
                    notifier.clone(),
                    settings.clone(),
                    lifecycle.clone(),
                )));
                tasks.push(tokio::spawn(crate::store::registry::run(
                    store.clone(),
                    notifier.clone(),
                    lifecycle.clone(),
                )));
            }
            Err(why) => tracing::warn!("{why}"),
        }
        tasks.push(tokio::spawn(ops::health::watch_postgres(
            store.clone(),
            health.clone(),
            settings.health.clone(),
            lifecycle.clone(),
        )));
        tasks.push(tokio::spawn(ops::health::run(
            health.clone(),
            Prober::new(settings.health.clone()),
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

        // The ops listener gets its own thread and runtime: probes and scrapes answer even when
        // the data runtime is saturated.
        let ops_state = OpsState {
            health: health.clone(),
            lifecycle: lifecycle.clone(),
            stores: stores.into(),
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
            ready_requires_database: settings.health.ready_requires_database,
            service_id,
            prometheus: telemetry.prometheus.clone(),
            log_dropped: telemetry.log_dropped.clone(),
            guard: guard.clone(),
            answers: answers.clone(),
        };
        let ops_router = crate::http::edge(
            ops::router(ops_state),
            "ops",
            ops::PATHS,
            None,
            settings.server.max_body_bytes,
        )
        .access_log(crate::http::AccessPolicy::from_settings(&settings.log));
        let (ops_done_tx, ops_done) = oneshot::channel::<()>();
        let ops_lifecycle = lifecycle.clone();
        std::thread::Builder::new()
            .name("pgsidecar-ops".into())
            .spawn(move || {
                match current_thread_runtime() {
                    Ok(rt) => rt.block_on(serve(ops, ops_router, timeouts, ops_lifecycle, grace)),
                    Err(e) => tracing::error!(error = %e, "cannot start the ops runtime"),
                }
                let _ = ops_done_tx.send(());
            })
            .map_err(|e| format!("cannot start the ops thread: {e}"))?;

        let accept = tokio::spawn(crate::http::accept(data, lanes, lifecycle.clone()));
        let data_server = tokio::spawn(serve_data(
            first_rx,
            store.clone(),
            settings.clone(),
            guard,
            answers,
            lifecycle.clone(),
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
        let stopped = tokio::time::Instant::now();
        let _ = accept.await;
        let _ = data_server.await;
        let _ = tokio::time::timeout_at(stopped + grace + Duration::from_secs(1), ops_done).await;
        // Background loops saw the stop too; give them together 2 s to finish a statement.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        // The other data threads had the same grace and close their own pools (within 2 s):
        // wait for them while this thread closes its pool.
        let others = async {
            for done in others {
                if tokio::time::timeout_at(stopped + grace + Duration::from_secs(3), done)
                    .await
                    .is_err()
                {
                    tracing::warn!("a data thread did not stop in time");
                }
            }
        };
        tokio::join!(close(store), others);
        tracing::info!("pgsidecar stopped");
        Ok(())
    }
}

/// Descriptors kept beside the listeners' connections: the database pool's, the log and
/// standard streams, the runtimes' event descriptors, connections being refused.
const RESERVED_DESCRIPTORS: u64 = 128;

/// The connection caps of the data and ops listeners: as configured, except that the data
/// listener's is lowered (with a warning) when the open-file limit could not hold it beside
/// the ops listener's connections, the pool and [`RESERVED_DESCRIPTORS`]: the data listener
/// then refuses connections before accept runs out of descriptors, and the ops listener keeps
/// answering probes.
fn connection_caps(settings: &Settings, open_files: Option<u64>) -> (usize, usize) {
    let s = &settings.server;
    let Some(limit) = open_files else {
        return (s.max_connections, s.ops_max_connections);
    };
    let others = s.ops_max_connections as u64
        + settings.database.max_connections as u64
        + RESERVED_DESCRIPTORS;
    let room = limit.saturating_sub(others).max(1) as usize;
    if room < s.max_connections {
        tracing::warn!(
            open_file_limit = limit,
            max_connections = s.max_connections,
            lowered_to = room,
            "the open-file limit cannot hold server.max_connections beside the ops listener, the \
             pool and a reserve; the data listener's cap is lowered (raise the limit: ulimit -n, \
             or the container's nofile setting)"
        );
    }
    (s.max_connections.min(room), s.ops_max_connections)
}

/// A current-thread runtime: the main thread's, each data thread's and the ops thread's.
pub fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Serves the data API on one data thread: the connections arriving on `lane`, with the
/// thread's own store, until the acceptor stops and in-flight requests have finished.
async fn serve_data(
    lane: LaneRx,
    store: Store,
    settings: Settings,
    guard: Guard,
    answers: crate::api::AnswerBudget,
    lifecycle: Lifecycle,
) {
    let app = crate::http::edge(
        crate::api::router(store, &settings, answers, lifecycle),
        "data",
        crate::api::route_table().into_iter().map(|(_, path)| path),
        Some(guard),
        settings.server.max_body_bytes,
    )
    .access_log(crate::http::AccessPolicy::from_settings(&settings.log));
    crate::http::serve_lane(
        lane,
        app,
        crate::http::ConnTimeouts::from_settings(&settings.server),
        Duration::from_secs(settings.shutdown.grace_seconds),
    )
    .await;
}

/// A data thread beyond the first: its own current-thread runtime, its own slice of the pool
/// and its own batchers, serving the connections the acceptor hands it.
///
/// Threads share no connection, batcher or task, so a request never wakes another thread (they
/// share only a few atomics: the concurrency limit, metrics, the database status). One
/// multi-thread runtime of two workers had served no more than one thread on a 2-CPU host:
/// work stealing and cross-thread wake-ups cost as much as the second CPU gave.
struct DataThread {
    settings: Settings,
    status: Arc<DbStatus>,
    notifier: Arc<Notifier>,
    guard: Guard,
    answers: crate::api::AnswerBudget,
    lifecycle: Lifecycle,
    lane: LaneRx,
}

impl DataThread {
    /// Builds the store, hands a clone back through `started` (for the pool gauges), serves
    /// until the acceptor stops, then closes the pool.
    fn run(self, started: oneshot::Sender<Result<Store, String>>) {
        let rt = match current_thread_runtime() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = started.send(Err(format!("cannot start a data runtime: {e}")));
                return;
            }
        };
        let Self {
            settings,
            status,
            notifier,
            guard,
            answers,
            lifecycle,
            lane,
        } = self;
        rt.block_on(async move {
            // Built here: the pool's connections and the batchers belong to this runtime.
            let store = match Store::with_status(&settings, status) {
                Ok(s) => s.with_notifier(notifier),
                Err(e) => {
                    let _ = started.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = started.send(Ok(store.clone()));
            let warm = tokio::spawn(keep_warm(store.clone(), lifecycle.clone()));
            serve_data(lane, store.clone(), settings, guard, answers, lifecycle).await;
            warm.abort();
            close(store).await;
        });
    }
}

/// Keeps a data thread's store warm (see [`Store::keep_warm`]) until the sidecar stops.
async fn keep_warm(store: Store, lifecycle: Lifecycle) {
    tokio::select! {
        _ = lifecycle.stopped() => {}
        _ = store.keep_warm() => {}
    }
}

/// Closes a store's pool, waiting at most 2 s for its connections.
async fn close(store: Store) {
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
}

/// Applies migrations (or waits for them) with capped, jittered backoff until Postgres answers,
/// then signals readiness (every data thread then warms its own connections). Postgres being
/// down at start-up is normal: no crash loop.
async fn bootstrap(store: Store, settings: Settings, lifecycle: Lifecycle, health: Arc<Health>) {
    let mut delay = Duration::from_millis(250);
    let mut attempt: u32 = 0;
    // The causes logged so far: the retries meet the same one again and again.
    let mut reported: Vec<String> = Vec::new();
    let d = &settings.database;
    let apply = d.migrate_on_start && d.can_migrate();
    if d.migrate_on_start && !apply {
        tracing::warn!(
            "database.pooler = \"transaction\" without database.migrate_url: not applying \
             migrations (sqlx's migration lock is a session advisory lock, which a \
             transaction-mode pooler does not keep); waiting until `pgsidecar migrate` (with \
             a direct database.migrate_url) or another sidecar has applied them"
        );
    }
    loop {
        attempt += 1;
        let result = if apply {
            store.migrate(&d.schema).await
        } else {
            store.check_migrated().await
        };
        match result {
            Ok(()) => {
                tracing::info!(
                    attempt,
                    migrate_on_start = apply,
                    "database ready: migrations applied"
                );
                // Readiness follows at once rather than at the next probe round. Every data
                // thread warms its own connections (see `keep_warm`).
                health.probe_now();
                return;
            }
            Err(e) => {
                // One line per distinct cause, not one per attempt: a TLS failure as an error
                // (someone must fix a certificate or a setting), any other as a warning.
                let cause = crate::config::redact_url(&e.to_string());
                let retry_in_ms = delay.as_millis() as u64;
                if reported.contains(&cause) {
                    tracing::debug!(attempt, error = %cause, retry_in_ms, "database not ready; retrying");
                } else {
                    match e {
                        DbError::Tls(_) => {
                            tracing::error!(attempt, error = %cause, retry_in_ms, "database not ready; retrying")
                        }
                        _ => {
                            tracing::warn!(attempt, error = %cause, retry_in_ms, "database not ready; retrying")
                        }
                    }
                    reported.push(cause);
                }
            }
        }
        let jittered = delay.mul_f64(rand::rng().random_range(0.5..1.0));
        tokio::select! {
            _ = lifecycle.stopped() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}
