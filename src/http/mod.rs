//! HTTP plumbing shared by both listeners.
//!
//! - [`listener`]: binding, and the accept loop that hands each connection to a serving loop
//!   (one per data thread, see `app`).
//! - [`serve`]: the serving loops, with the header-read timeout and graceful shutdown.
//! - [`edge`]: what every request passes: request ids, the guard, the access log, request
//!   metrics, JSON fallbacks.
//! - [`guard`]: the data API's authorization, concurrency limit and request timeout.

pub mod edge;
pub mod guard;
pub mod listener;
pub mod serve;

pub use edge::{Edge, edge};
pub use guard::Guard;
pub use listener::{Accepted, Lane, LaneRx, Listener, accept, lane};
pub use serve::{serve, serve_lane};

pub const REQUEST_ID: &str = "x-request-id";
