//! Logging: one JSON object per line, written to stdout through a non-blocking writer.
//!
//! Every line carries `timestamp` (RFC 3339 UTC, `Z`), `level`, `message`, `target` and
//! `hostname`, with the event's own fields flattened beside them. The writer is lossy: when the
//! log pipe is full, lines are dropped and counted rather than stalling request handling.

use std::io::Write;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the log writer alive; dropping it flushes what is queued.
pub struct LogGuard {
    _guard: WorkerGuard,
    dropped: ErrorCounter,
}

impl LogGuard {
    /// Lines dropped so far because the output could not keep up.
    pub fn dropped_lines(&self) -> usize {
        self.dropped.dropped_lines()
    }

    pub fn dropped_counter(&self) -> ErrorCounter {
        self.dropped.clone()
    }
}

/// The host name logs are tagged with: `$HOSTNAME` (set per container by Docker and Kubernetes),
/// else the system host name.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| sysinfo::System::host_name().ok())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Installs the global subscriber writing JSON lines to `sink` (stdout in production).
/// `RUST_LOG`, when set, takes precedence over `level`.
pub fn init<W: Write + Send + 'static>(level: &str, sink: W) -> LogGuard {
    // The writer thread flushes after each batch of queued lines, so buffering turns a burst of
    // lines into one write(2) instead of one per line (stdout is line-buffered on its own).
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::BufWriter::with_capacity(64 * 1024, sink));
    let dropped = writer.error_counter();
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")));
    let layer = JsonLines {
        writer,
        hostname: hostname(),
    };
    // A second init (tests that build several apps in one process) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
    LogGuard {
        _guard: guard,
        dropped,
    }
}

struct JsonLines {
    writer: NonBlocking,
    hostname: String,
}

impl<S: Subscriber> Layer<S> for JsonLines {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = FieldMap(Map::new());
        event.record(&mut fields);
        let mut line = Map::with_capacity(fields.0.len() + 5);
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
        line.insert(
            "level".into(),
            Value::String(meta.level().as_str().to_ascii_lowercase()),
        );
        let message = fields
            .0
            .remove("message")
            .unwrap_or(Value::String(String::new()));
        line.insert("message".into(), message);
        line.insert("target".into(), Value::String(meta.target().to_string()));
        line.insert("hostname".into(), Value::String(self.hostname.clone()));
        for (k, v) in fields.0 {
            // Reserved names keep their meaning; an event field of the same name is prefixed.
            let k = if line.contains_key(&k) {
                format!("field_{k}")
            } else {
                k
            };
            line.insert(k, v);
        }
        let mut bytes = serde_json::to_vec(&Value::Object(line)).unwrap_or_default();
        bytes.push(b'\n');
        let mut w = self.writer.clone();
        let _ = w.write_all(&bytes);
    }
}

struct FieldMap(Map<String, Value>);

impl Visit for FieldMap {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        // Structured fields (`config = %settings_json`) stay objects instead of quoted strings.
        let v = match field.name() {
            "config" => serde_json::from_str(&text).unwrap_or(Value::String(text)),
            _ => Value::String(text),
        };
        self.0.insert(field.name().to_string(), v);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_string(), Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_string(), Value::String(value.to_string()));
    }
}
