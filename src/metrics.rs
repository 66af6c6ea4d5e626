//! Metric names, defined once, with their help text and the Prometheus recorder.
//!
//! Latencies are histograms with explicit buckets (so quantiles aggregate across a fleet).
//! Label values are route templates, operation names and check names: never a key, a token or
//! a raw path.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "pgsidecar_http_requests_total";
pub const HTTP_DURATION: &str = "pgsidecar_http_request_duration_seconds";
pub const HTTP_IN_FLIGHT: &str = "pgsidecar_http_requests_in_flight";
pub const HTTP_SHED: &str = "pgsidecar_http_requests_shed_total";
pub const HTTP_BODY_BYTES: &str = "pgsidecar_http_body_bytes_in_flight";
pub const HTTP_ANSWER_BYTES: &str = "pgsidecar_http_answer_bytes_in_flight";
pub const HTTP_BODY_BUDGET_SHED: &str = "pgsidecar_http_body_budget_exhausted_total";
pub const HTTP_ANSWER_BUDGET_SHED: &str = "pgsidecar_http_answer_budget_exhausted_total";
pub const HTTP_CONNECTIONS: &str = "pgsidecar_http_connections";
pub const HTTP_CONNECTIONS_REJECTED: &str = "pgsidecar_http_connections_rejected_total";
pub const HTTP_ACCEPT_ERRORS: &str = "pgsidecar_http_accept_errors_total";
pub const ACCESS_LOG_SKIPPED: &str = "pgsidecar_access_log_lines_skipped_total";
pub const SESSIONS_EVICTED: &str = "pgsidecar_sessions_evicted_total";
pub const DB_QUERY_DURATION: &str = "pgsidecar_db_query_duration_seconds";
pub const DB_ERRORS: &str = "pgsidecar_db_errors_total";
pub const DB_POOL_CONNECTIONS: &str = "pgsidecar_db_pool_connections";
pub const DB_POOL_MAX: &str = "pgsidecar_db_pool_max_connections";
pub const BATCH_SIZE: &str = "pgsidecar_db_batch_size";
pub const HEALTH_CHECK_UP: &str = "pgsidecar_health_check_up";
pub const LOG_DROPPED: &str = "pgsidecar_log_lines_dropped_total";
pub const BUILD_INFO: &str = "pgsidecar_build_info";
pub const CACHE_REQUESTS: &str = "pgsidecar_cache_requests_total";
pub const SESSION_VALIDATIONS: &str = "pgsidecar_session_validations_total";
pub const SESSIONS_CREATED: &str = "pgsidecar_sessions_created_total";
pub const SESSIONS_REVOKED: &str = "pgsidecar_sessions_revoked_total";
pub const EXPIRED_ROWS_DELETED: &str = "pgsidecar_expired_rows_deleted_total";
pub const CACHE_EVICTED: &str = "pgsidecar_cache_evicted_total";
pub const NEAR_REQUESTS: &str = "pgsidecar_near_cache_requests_total";
pub const NEAR_BYTES: &str = "pgsidecar_near_cache_bytes";
pub const NOTIFICATIONS_RECEIVED: &str = "pgsidecar_notifications_received_total";
pub const LISTENER_LAG: &str = "pgsidecar_listener_lag_seconds";
pub const LISTENER_UP: &str = "pgsidecar_listener_up";
pub const NOTIFICATIONS_REGISTERED: &str = "pgsidecar_notifications_registered";
pub const EVENT_SUBSCRIBERS: &str = "pgsidecar_events_subscribers";
pub const FILL_LEASES: &str = "pgsidecar_fill_leases_total";
// The standard process metrics (see `ops::process`).
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY_MAX: &str = "process_virtual_memory_max_bytes";
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";
pub const PROCESS_THREADS: &str = "process_threads";

/// From 100 µs (a batched read on loopback) to 10 s (past every timeout).
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Installs the global recorder and describes every metric. Call once per process.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &BATCH_BUCKETS))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    crate::ops::process::describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by listener, method, route template and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request latency, by listener, method and route template."
    );
    describe_gauge!(HTTP_IN_FLIGHT, "Data API requests being handled right now.");
    describe_counter!(
        HTTP_SHED,
        "Data API requests refused with 503 because max_concurrent_requests were in flight."
    );
    describe_gauge!(
        HTTP_BODY_BYTES,
        Unit::Bytes,
        "Bytes of request bodies held right now, of server.max_body_bytes_in_flight."
    );
    describe_gauge!(
        HTTP_ANSWER_BYTES,
        Unit::Bytes,
        "Bytes of _mget and session list answers held right now, of server.max_response_bytes_in_flight."
    );
    describe_counter!(
        HTTP_BODY_BUDGET_SHED,
        "Data API requests refused with 503 because server.max_body_bytes_in_flight of request bodies were held."
    );
    describe_counter!(
        HTTP_ANSWER_BUDGET_SHED,
        "_mget and session list requests refused with 503 because server.max_response_bytes_in_flight of answers were held."
    );
    describe_gauge!(HTTP_CONNECTIONS, "Open connections, by listener.");
    describe_counter!(
        HTTP_CONNECTIONS_REJECTED,
        "Connections answered 503 and closed at once because the listener's connection cap was reached, by listener."
    );
    describe_counter!(
        HTTP_ACCEPT_ERRORS,
        "Failed accepts (e.g. out of file descriptors), by listener."
    );
    describe_counter!(
        ACCESS_LOG_SKIPPED,
        "Requests answered without an access line because of log.access."
    );
    describe_counter!(
        SESSIONS_EVICTED,
        "Live sessions revoked because their user reached sessions.max_per_user."
    );
    describe_histogram!(
        DB_QUERY_DURATION,
        Unit::Seconds,
        "Database statement latency (one batch counts once), by operation."
    );
    describe_counter!(DB_ERRORS, "Database statements that failed, by operation.");
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "Open pooled database connections, by state (idle or in_use)."
    );
    describe_gauge!(DB_POOL_MAX, "Most database connections the pool may open.");
    describe_histogram!(
        BATCH_SIZE,
        "Requests served by one coalesced database statement, by operation."
    );
    describe_gauge!(
        HEALTH_CHECK_UP,
        "1 when the health check passed (or only warned) at the last probe, else 0."
    );
    describe_counter!(
        LOG_DROPPED,
        "Log lines dropped because stdout could not keep up."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
    describe_counter!(
        CACHE_REQUESTS,
        "Cache keys looked up, by operation (get, mget) and result (hit, miss)."
    );
    describe_counter!(
        SESSION_VALIDATIONS,
        "Session validations, by result (valid, not_found)."
    );
    describe_counter!(SESSIONS_CREATED, "Sessions created.");
    describe_counter!(
        SESSIONS_REVOKED,
        "Live sessions revoked (one by one or per user)."
    );
    describe_counter!(
        EXPIRED_ROWS_DELETED,
        "Expired rows deleted by the background cleanup, by table."
    );
    describe_counter!(
        CACHE_EVICTED,
        "Live cache entries evicted, oldest first, to keep the cache within cache.max_bytes."
    );
    describe_counter!(
        NEAR_REQUESTS,
        "Near-cache lookups, by cache (cache, sessions) and result (hit, miss, bypass: the near cache was off because the listener was not current, or the request asked for Postgres)."
    );
    describe_gauge!(
        NEAR_BYTES,
        Unit::Bytes,
        "Bytes held by a near cache (keys, values, bookkeeping), by cache."
    );
    describe_counter!(
        NOTIFICATIONS_RECEIVED,
        "Change notifications received by the listening connection (heartbeats not counted)."
    );
    describe_gauge!(
        LISTENER_LAG,
        Unit::Seconds,
        "Round trip of the last heartbeat: from sending it through the pool to receiving it on the listening connection."
    );
    describe_gauge!(
        LISTENER_UP,
        "1 while the listening connection is up (LISTEN done), else 0."
    );
    describe_gauge!(
        NOTIFICATIONS_REGISTERED,
        "1 while this sidecar's registration makes every writer send change notifications (it needs them: a near cache on, a change-feed subscriber or a lease waiter), else 0."
    );
    describe_gauge!(
        EVENT_SUBSCRIBERS,
        "Open change-feed streams (GET /v1/events)."
    );
    describe_counter!(
        FILL_LEASES,
        "Fill-lease outcomes, by result (granted, waited_hit, waited_timeout, written, voided)."
    );
}

/// Metric handles for names and label values that are all `&'static str`, kept per thread.
///
/// `metrics::counter!(...)` builds, hashes and compares its whole key in the recorder's registry
/// on every call; on a cache hit that bookkeeping cost more than a tenth of the request. Here a
/// handle is looked up once and then found by the addresses of its static strings.
pub mod cached {
    use std::cell::RefCell;
    use std::hash::{Hash, Hasher};

    use foldhash::HashMap;

    use metrics::{Counter, Gauge, Histogram, Label};

    /// A static string compared and hashed by address and length: equal addresses mean equal
    /// text. (Equal text at two addresses makes two entries for the same metric: harmless.)
    #[derive(Clone, Copy)]
    pub(crate) struct ByAddr(pub &'static str);

    impl PartialEq for ByAddr {
        fn eq(&self, other: &Self) -> bool {
            std::ptr::eq(self.0, other.0)
        }
    }
    impl Eq for ByAddr {}
    impl Hash for ByAddr {
        fn hash<H: Hasher>(&self, h: &mut H) {
            h.write_usize(self.0.as_ptr() as usize);
            h.write_usize(self.0.len());
        }
    }

    /// Up to two label pairs; unused slots are empty strings.
    type Key = (ByAddr, [(ByAddr, ByAddr); 2]);

    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        assert!(labels.len() <= 2, "cached metrics take at most two labels");
        let mut pairs = [(ByAddr(""), ByAddr("")); 2];
        for (slot, (k, v)) in pairs.iter_mut().zip(labels) {
            *slot = (ByAddr(k), ByAddr(v));
        }
        (ByAddr(name), pairs)
    }

    fn labels(labels: &[(&'static str, &'static str)]) -> Vec<Label> {
        labels.iter().map(|(k, v)| Label::new(*k, *v)).collect()
    }

    thread_local! {
        static COUNTERS: RefCell<HashMap<Key, Counter>> = RefCell::default();
        static HISTOGRAMS: RefCell<HashMap<Key, Histogram>> = RefCell::default();
        static GAUGES: RefCell<HashMap<Key, Gauge>> = RefCell::default();
    }

    /// `counter!(name, labels...).increment(n)`.
    pub fn increment(name: &'static str, l: &[(&'static str, &'static str)], n: u64) {
        COUNTERS.with(|m| {
            m.borrow_mut()
                .entry(key(name, l))
                .or_insert_with(|| metrics::counter!(name, labels(l)))
                .increment(n)
        });
    }

    /// `histogram!(name, labels...).record(v)`.
    pub fn record(name: &'static str, l: &[(&'static str, &'static str)], v: f64) {
        HISTOGRAMS.with(|m| {
            m.borrow_mut()
                .entry(key(name, l))
                .or_insert_with(|| metrics::histogram!(name, labels(l)))
                .record(v)
        });
    }

    /// `gauge!(name, labels...).increment(d)` (negative `d` decrements).
    pub fn add(name: &'static str, l: &[(&'static str, &'static str)], d: f64) {
        GAUGES.with(|m| {
            m.borrow_mut()
                .entry(key(name, l))
                .or_insert_with(|| metrics::gauge!(name, labels(l)))
                .increment(d)
        });
    }
}
