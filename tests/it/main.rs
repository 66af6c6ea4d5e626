//! Integration tests: the real binary (or server), on port 0, against real PostgreSQL, with a
//! fresh database per test. `scripts/test.sh` provides the PostgreSQL server.

mod helpers;

mod cache;
mod cli;
mod concurrency;
mod conditional;
mod database;
mod docs;
mod events;
mod failover;
mod fleet;
mod http;
mod leases;
mod lifecycle;
mod limits;
mod logs;
mod near;
mod on_demand;
mod openapi;
mod ops;
mod pooler;
mod servers;
mod session_routes;
mod sessions;
mod tags;
mod tls;
mod values;
