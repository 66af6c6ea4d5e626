//! The benchmark's HTTP floor: what answering the same requests costs with axum on hyper alone.
//!
//! No database, no logging, no metrics, no guard: each route answers a fixed body the size of
//! the sidecar's answer (a cache hit: the 1,026-byte value; a session: its JSON record) and a
//! PUT reads its body and answers 204. It runs as the sidecar does, one current-thread tokio
//! runtime per CPU with mimalloc, here each on its own SO_REUSEPORT listener. `bench/run.sh`
//! drives it with the same wrk scripts, so the sidecar's CPU per request can be read against
//! what the HTTP layer takes by itself on the same machine.
//!
//!     cargo run --release --example http_floor -- 127.0.0.1:17072

use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::routing::get;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A session record as the sidecar returns it for the benchmark's rows.
const SESSION: &str = r#"{"id":"0b7f6c3e-8f6a-4d8e-9a53-2f3c0c7c9d11","user_id":"user42","created_at":"2026-11-26T07:00:00.123456Z","updated_at":"2026-11-26T07:00:00.123456Z","expires_at":"2026-12-03T07:00:00.123456Z","ip_address":"127.0.0.1","user_agent":"Mozilla/5.0 (X11; Linux x86_64) pgsidecar-bench","data":{"role":"member"}}"#;

fn main() {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:17072".into())
        .parse()
        .expect("usage: http_floor HOST:PORT");
    // The benchmark's cache values: {"id":n,"payload":"x...x"} with 998 x's.
    let value: &'static str = format!("{{\"id\":42,\"payload\":\"{}\"}}", "x".repeat(998)).leak();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let app = Router::new()
        .route(
            "/v1/cache/{key}",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], value) }).put(
                |body: Bytes| async move {
                    drop(body);
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .route(
            "/v1/sessions/{token}",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], SESSION) }),
        );
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let app = app.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                rt.block_on(async move {
                    let socket = if addr.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()
                    } else {
                        tokio::net::TcpSocket::new_v6()
                    }
                    .expect("a socket");
                    socket.set_reuseport(true).expect("SO_REUSEPORT");
                    socket.bind(addr).expect("bind");
                    let listener = socket.listen(1024).expect("listen");
                    axum::serve(listener, app).await.expect("serve");
                });
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
}
