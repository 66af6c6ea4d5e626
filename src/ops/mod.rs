//! The ops API, on its own listener and runtime so probes answer while the data path is busy.
//!
//! | route         | answers |
//! |---------------|---------|
//! | `/health`     | aggregated checks, `application/health+json`; 200 pass/warn, 503 fail |
//! | `/ready`      | 200 `{"ready":true}` or 503 `{"ready":false,"reason":...}` |
//! | `/live`       | 200 while the process serves; never looks at Postgres |
//! | `/metrics`    | Prometheus text |
//! | `/api/health` | `{"database","cache","timestamp"}`, the shape Next.js-style apps expose |
//! | `/api/ready`  | `{"ready":bool}` |

pub mod health;
pub mod process;
pub mod system;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::telemetry::DroppedLines;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{SecondsFormat, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::metrics as m;
use crate::shutdown::Lifecycle;
use crate::store::Store;
use health::{Health, Status};

#[derive(Clone)]
pub struct OpsState {
    pub health: Arc<Health>,
    pub lifecycle: Lifecycle,
    /// Every data thread's store (they share one status).
    pub stores: Arc<[Store]>,
    pub max_connections: u32,
    /// A health snapshot older than this means the probe loop is stuck: not ready.
    pub stale_after: std::time::Duration,
    /// `health.ready_requires_database`: false leaves PostgreSQL's reachability out of `/ready`.
    pub ready_requires_database: bool,
    pub service_id: String,
    pub prometheus: Option<PrometheusHandle>,
    pub log_dropped: Option<DroppedLines>,
    /// The data API's guard and answer budget, for the bytes they hold.
    pub guard: crate::http::Guard,
    pub answers: crate::api::AnswerBudget,
}

/// The ops routes' paths (all GET), for the route label of the access log and metrics.
pub const PATHS: [&str; 6] = [
    "/health",
    "/ready",
    "/live",
    "/metrics",
    "/api/health",
    "/api/ready",
];

pub fn router(state: OpsState) -> Router {
    let [
        health,
        ready_path,
        live_path,
        metrics,
        api_health_path,
        api_ready_path,
    ] = PATHS;
    Router::new()
        .route(health, get(health_json))
        .route(ready_path, get(ready))
        .route(live_path, get(live))
        .route(metrics, get(metrics_text))
        .route(api_health_path, get(api_health))
        .route(api_ready_path, get(api_ready))
        .with_state(state)
}

/// Why the sidecar is not ready, or `None` when it is.
pub fn not_ready_reason(state: &OpsState) -> Option<String> {
    if state.lifecycle.is_draining() {
        return Some("shutting down".into());
    }
    if !state.stores[0].status().migrated.load(Ordering::Acquire) {
        return Some("database migrations not applied yet".into());
    }
    let snap = state.health.snapshot();
    if snap.taken.elapsed() > state.stale_after {
        return Some("health probes stalled".into());
    }
    // With `health.ready_requires_database = false`, a database outage leaves every container
    // in the load balancer (data requests answer 503 fast; pages that need no state work).
    if state.ready_requires_database {
        // The circuit itself, not the last snapshot: readiness turns the moment it opens.
        if state.stores[0].status().circuit.is_open() || !snap.postgres_ok {
            return Some("postgres unreachable".into());
        }
        if !snap.tables_ok {
            return Some("sidecar tables missing".into());
        }
    }
    if !snap.failed_critical.is_empty() {
        return Some(format!(
            "critical upstream failing: {}",
            snap.failed_critical.join(", ")
        ));
    }
    None
}

fn json_status(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn health_json(State(state): State<OpsState>) -> Response {
    let snap = state.health.snapshot();
    let mut status = snap.status;
    if state.lifecycle.is_draining() {
        status = Status::Fail;
    }
    let mut body = json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "releaseId": env!("CARGO_PKG_VERSION"),
        "serviceId": state.service_id,
        "description": "pgsidecar",
        "checks": snap.checks,
    });
    if state.lifecycle.is_draining() {
        body["output"] = json!("shutting down");
    }
    let code = if status == Status::Fail {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let mut resp = (code, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/health+json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn ready(State(state): State<OpsState>) -> Response {
    match not_ready_reason(&state) {
        None => json_status(StatusCode::OK, json!({"ready": true})),
        Some(reason) => json_status(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ready": false, "reason": reason}),
        ),
    }
}

async fn live() -> Response {
    json_status(StatusCode::OK, json!({"live": true}))
}

async fn api_health(State(state): State<OpsState>) -> Response {
    let snap = state.health.snapshot();
    let reachable = snap.postgres_ok && !state.stores[0].status().circuit.is_open();
    let healthy = reachable && snap.tables_ok && !state.lifecycle.is_draining();
    json_status(
        if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        json!({
            "database": reachable,
            "cache": snap.tables_ok,
            "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        }),
    )
}

async fn api_ready(State(state): State<OpsState>) -> Response {
    let ready = not_ready_reason(&state).is_none();
    json_status(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        json!({"ready": ready}),
    )
}

async fn metrics_text(State(state): State<OpsState>) -> Response {
    let Some(handle) = &state.prometheus else {
        return crate::error::error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "metrics are not enabled in this process",
        );
    };
    // Gauges that are cheaper to read at scrape time than to keep updated.
    let (open, idle) = state
        .stores
        .iter()
        .map(Store::pool_connections)
        .fold((0, 0), |(o, i), (open, idle)| (o + open, i + idle));
    metrics::gauge!(m::DB_POOL_CONNECTIONS, "state" => "idle").set(idle as f64);
    metrics::gauge!(m::DB_POOL_CONNECTIONS, "state" => "in_use").set((open - idle) as f64);
    metrics::gauge!(m::DB_POOL_MAX).set(state.max_connections as f64);
    metrics::gauge!(m::HTTP_BODY_BYTES).set(state.guard.body_bytes_held() as f64);
    metrics::gauge!(m::HTTP_ANSWER_BYTES).set(state.answers.held() as f64);
    if let Some(c) = &state.log_dropped {
        metrics::counter!(m::LOG_DROPPED).absolute(c.get());
    }
    let cpu = process::collect();
    let mut text = handle.render();
    text.push_str(&cpu);
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
