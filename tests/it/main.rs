//! Integration tests: the real binary (or server), on port 0, against real PostgreSQL, with a
//! fresh database per test. `scripts/test.sh` provides the PostgreSQL server.

mod helpers;

mod cache;
mod cli;
mod concurrency;
mod conditional;
mod http;
mod lifecycle;
mod logs;
mod openapi;
mod ops;
mod session_routes;
mod sessions;
mod tags;
mod values;
