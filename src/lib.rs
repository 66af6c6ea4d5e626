//! pgsidecar: one small binary beside each stateless app container. It holds the container's
//! connections to PostgreSQL, serves sessions and a shared cache to the app over localhost, and
//! answers load balancers (`/health`, `/ready`, `/live`) and Prometheus (`/metrics`).
//!
//! # Layout
//! - [`config`]: settings, layered loading (defaults, file, environment), validation, redaction.
//! - [`telemetry`]: JSON log lines on stdout through a non-blocking writer.
//! - [`app`]: binds the listeners, starts the pool and background tasks, runs until stopped.
//! - [`shutdown`]: the signal future and the draining/stopped state readiness reads.
//! - [`http`]: accept loop, header timeout, request ids, access log, JSON fallbacks.
//! - [`error`]: `ApiError`, mapped to status and JSON body in one place.
//! - [`api`]: the data API handlers (sessions, cache): HTTP only, no SQL.
//! - [`store`]: everything that speaks SQL: pool, migrations, batching, cleanup.
//! - [`ops`]: health probes, readiness, metrics endpoint, system checks.
//! - [`metrics`]: metric names and help text, defined once.
//! - [`tls`]: libpq's TLS settings for Postgres, the upstream checks' TLS, naming TLS failures.
//!
//! Data flows one way: handler (parse, validate) -> store (SQL, batching) -> Postgres.

pub mod api;
pub mod app;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;
