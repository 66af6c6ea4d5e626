//! HTTP plumbing shared by both listeners.
//!
//! - [`listener`]: binding, the connection caps, and the accept loop that hands each connection
//!   to a serving loop (one per data thread, see `app`).
//! - [`serve`]: the serving loops, with the header-read and keep-alive idle timers and graceful
//!   shutdown.
//! - [`edge`]: what every request passes: request ids, the guard, the access log, request
//!   metrics, JSON fallbacks.
//! - [`decode`]: the one strict percent-decoder for paths and query strings.
//! - [`guard`]: the data API's authorization, concurrency limit and request timeout.

pub mod decode;
pub mod edge;
pub mod guard;
pub mod listener;
pub mod serve;

pub use edge::{AccessPolicy, Edge, edge};
pub use guard::Guard;
pub use listener::{Accepted, AcceptedIo, Lane, LaneRx, Listener, Slot, accept, lane};
pub use serve::{ConnTimeouts, Streaming, serve, serve_lane};

pub const REQUEST_ID: &str = "x-request-id";
