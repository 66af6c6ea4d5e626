//! The benchmark's HTTP floor: what answering the same requests costs with the sidecar's HTTP
//! layer alone.
//!
//! It serves through the sidecar's own accept loop and serving loops (`pgsidecar::http`: the
//! main thread accepts and hands each connection to the least busy of one current-thread
//! runtime per CPU; hyper's HTTP/1 server with the connection timers and TCP_NODELAY), with
//! mimalloc, but behind them only a plain axum router: no database, access log, metrics, request
//! ids or guard. Each route answers a fixed body of the sidecar's size and headers (a cache hit:
//! a 1,020-byte value with `Expires`; a session: its JSON record) and a PUT reads its body and
//! answers 204. `bench/run.sh` drives it with the same wrk scripts, so the sidecar's CPU per
//! request can be read against what its HTTP layer takes by itself on the same machine.
//!
//!     cargo run --release --example http_floor -- 127.0.0.1:17072
//!     cargo run --release --example http_floor -- unix:/tmp/floor.sock

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::routing::get;
use pgsidecar::app::current_thread_runtime;
use pgsidecar::config::{ListenAddr, Settings};
use pgsidecar::http::{ConnTimeouts, Listener, accept, lane, serve_lane};
use pgsidecar::shutdown::Lifecycle;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A session record as the sidecar returns it for the benchmark's rows.
const SESSION: &str = r#"{"id":"0b7f6c3e-8f6a-4d8e-9a53-2f3c0c7c9d11","user_id":"user42","created_at":"2026-11-26T07:00:00.123456Z","updated_at":"2026-11-26T07:00:00.123456Z","expires_at":"2026-12-03T07:00:00.123456Z","ip_address":"127.0.0.1","user_agent":"Mozilla/5.0 (X11; Linux x86_64) pgsidecar-bench","data":{"role":"member"}}"#;

fn main() {
    // host:port, or unix:/path (the data API's unix socket, measured beside TCP).
    let addr = ListenAddr::parse(
        &std::env::args()
            .nth(1)
            .unwrap_or_else(|| "127.0.0.1:17072".into()),
    )
    .expect("usage: http_floor HOST:PORT | unix:/path");
    let listener = Listener::bind(&addr).expect("bind");
    // The sidecar's default connection timers and grace, from its own default config.
    let defaults = Settings::load_from(None, &[]).expect("the default config");
    let timeouts = ConnTimeouts::from_settings(&defaults.server);
    let grace = Duration::from_secs(defaults.shutdown.grace_seconds);
    // The benchmark's cache values: {"id":n,"payload":"x...x"} with 998 x's.
    let value: &'static str = format!("{{\"id\":42,\"payload\":\"{}\"}}", "x".repeat(998)).leak();
    let app = Router::new()
        .route(
            "/v1/cache/{key}",
            get(move || async move {
                (
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::EXPIRES, "Thu, 26 Nov 2026 09:00:00 GMT"),
                    ],
                    value,
                )
            })
            .put(|body: Bytes| async move {
                drop(body);
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/v1/sessions/{token}",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], SESSION) }),
        );

    // As the sidecar: the first lane on the main thread (which also accepts), one more thread
    // per further CPU.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (first, first_rx) = lane();
    let mut lanes = vec![first];
    for i in 1..threads {
        let (l, rx) = lane();
        lanes.push(l);
        let app = app.clone();
        std::thread::Builder::new()
            .name(format!("floor-{i}"))
            .spawn(move || {
                current_thread_runtime()
                    .expect("a tokio runtime")
                    .block_on(serve_lane(rx, app, timeouts, grace))
            })
            .expect("a thread");
    }
    current_thread_runtime()
        .expect("a tokio runtime")
        .block_on(async move {
            tokio::join!(
                accept(listener, lanes, Lifecycle::new()),
                serve_lane(first_rx, app, timeouts, grace)
            );
        });
}
