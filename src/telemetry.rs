//! Logging: one JSON object per line on stdout, through tracing-appender's non-blocking writer.
//!
//! Every line carries `timestamp` (RFC 3339 UTC, `Z`), `level`, `message`, `target` and
//! `hostname`, with the event's own fields flattened beside them.
//!
//! Lines are written into a shared buffer and handed to the non-blocking writer in chunks (when
//! 16 KiB have gathered, and at least every 100 ms), not one by one: on small VMs a thread
//! wake-up per line cost more CPU than serving the request it logs. Nothing on the request
//! path ever blocks on output: when stdout cannot keep up and the writer's queue is full, whole
//! chunks are dropped and their lines counted (`pgsidecar_log_lines_dropped_total`).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// A chunk is handed to the writer once it holds this much.
const CHUNK_BYTES: usize = 16 * 1024;
/// Longest a line waits in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Keeps the log writer alive; dropping it flushes every queued line.
pub struct LogGuard {
    lines: Arc<Lines>,
    // Dropped after the last chunk is handed over (field order), which flushes the writer thread.
    _guard: WorkerGuard,
}

impl LogGuard {
    /// A handle for reading the dropped-line count elsewhere (the metrics endpoint).
    pub fn dropped_counter(&self) -> DroppedLines {
        DroppedLines(self.lines.clone())
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.lines.stopped.store(true, Ordering::Relaxed);
        self.lines.flush();
    }
}

/// Reads the number of dropped log lines.
#[derive(Clone)]
pub struct DroppedLines(Arc<Lines>);

impl DroppedLines {
    pub fn get(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
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
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        // Chunks, not lines: up to 256 x 16 KiB queued before chunks are dropped.
        .buffered_lines_limit(256)
        .finish(sink);
    let lines = Arc::new(Lines {
        pending: Mutex::new(Pending::default()),
        writer: Mutex::new(writer.clone()),
        writer_errors: writer.error_counter(),
        dropped: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
    });
    let ticker = lines.clone();
    let _ = std::thread::Builder::new()
        .name("pgsidecar-log-flush".into())
        .spawn(move || {
            while !ticker.stopped.load(Ordering::Relaxed) {
                std::thread::sleep(FLUSH_EVERY);
                ticker.flush();
            }
        });
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")));
    let layer = JsonLines {
        lines: lines.clone(),
        hostname: json_string(&hostname()),
    };
    // A second init (tests that build several apps in one process) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
    LogGuard {
        lines,
        _guard: guard,
    }
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: u64,
}

struct Lines {
    pending: Mutex<Pending>,
    writer: Mutex<NonBlocking>,
    writer_errors: ErrorCounter,
    dropped: AtomicU64,
    stopped: AtomicBool,
}

impl Lines {
    fn push(&self, line: &[u8]) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.bytes.capacity() == 0 {
            p.bytes.reserve(CHUNK_BYTES + 1024);
        }
        p.bytes.extend_from_slice(line);
        p.lines += 1;
        if p.bytes.len() >= CHUNK_BYTES {
            self.send(&mut p);
        }
    }

    fn flush(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.lines > 0 {
            self.send(&mut p);
        }
    }

    /// Hands the pending lines to the writer (which copies them) and empties the buffer,
    /// keeping its allocation. Called with `pending` locked, so chunks go out in order and a
    /// rise of the writer's drop counter is this chunk's.
    fn send(&self, p: &mut Pending) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.writer_errors.dropped_lines();
        let _ = w.write_all(&p.bytes);
        if self.writer_errors.dropped_lines() > before {
            self.dropped.fetch_add(p.lines, Ordering::Relaxed);
        }
        p.bytes.clear();
        p.lines = 0;
    }
}

struct JsonLines {
    lines: Arc<Lines>,
    /// Already JSON-encoded.
    hostname: String,
}

/// Per-thread buffers for building a line: the line, its fields, its message.
#[derive(Default)]
struct Scratch {
    line: Vec<u8>,
    fields: Vec<u8>,
    message: String,
    /// The last timestamp written, and the millisecond it stands for: consecutive lines
    /// within one millisecond reuse it instead of formatting the date again.
    stamp: String,
    stamp_ms: i64,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

fn timestamp(s: &mut Scratch) {
    let now = chrono::Utc::now();
    let ms = now.timestamp_millis();
    if ms != s.stamp_ms || s.stamp.is_empty() {
        s.stamp.clear();
        s.stamp
            .push_str(&now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        s.stamp_ms = ms;
    }
}

impl<S: Subscriber> Layer<S> for JsonLines {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        SCRATCH.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return;
            };
            let scratch = &mut *scratch;
            timestamp(scratch);
            let Scratch {
                line,
                fields,
                message,
                stamp,
                ..
            } = scratch;
            line.clear();
            fields.clear();
            message.clear();
            event.record(&mut FieldWriter {
                out: fields,
                message,
            });
            line.extend_from_slice(b"{\"timestamp\":\"");
            line.extend_from_slice(stamp.as_bytes());
            line.extend_from_slice(b"\",\"level\":\"");
            line.extend_from_slice(level_name(meta.level()).as_bytes());
            line.extend_from_slice(b"\",\"message\":");
            write_str(line, message);
            line.extend_from_slice(b",\"target\":");
            write_str(line, meta.target());
            line.extend_from_slice(b",\"hostname\":");
            line.extend_from_slice(self.hostname.as_bytes());
            line.extend_from_slice(fields);
            line.extend_from_slice(b"}\n");
            self.lines.push(line);
        });
    }
}

/// Writes a finite float as JSON. Durations in milliseconds with microsecond precision (the
/// common case: `duration_ms`) are written from integers, which is several times cheaper
/// than the general float formatting; anything else goes through `Display`.
fn write_f64(out: &mut Vec<u8>, value: f64) {
    let thousandths = (value * 1000.0).round();
    // `t / 1000.0 == value`: the decimal text of t/1000 reads back as exactly this float,
    // so it is what `Display` (shortest round trip) would print too.
    if (0.0..1e12).contains(&thousandths) && thousandths / 1000.0 == value {
        let t = thousandths as u64;
        let (whole, mut frac) = (t / 1000, t % 1000);
        let _ = write!(out, "{whole}");
        if frac != 0 {
            out.push(b'.');
            let digits = [
                b'0' + (frac / 100) as u8,
                b'0' + (frac / 10 % 10) as u8,
                b'0' + (frac % 10) as u8,
            ];
            let mut n = 3;
            while frac % 10 == 0 {
                frac /= 10;
                n -= 1;
            }
            out.extend_from_slice(&digits[..n]);
        }
    } else {
        let _ = write!(out, "{value}");
    }
}

fn level_name(l: &tracing::Level) -> &'static str {
    match *l {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        tracing::Level::DEBUG => "debug",
        tracing::Level::TRACE => "trace",
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Writes `s` as a JSON string. Most values (routes, methods, ids) need no escaping and are
/// copied as they are; the rest go through serde_json.
fn write_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Fields whose value is written as JSON already (with `%`), copied into the line as it is.
const JSON_FIELDS: [&str; 2] = ["config", "failing"];

/// Writes each field as `,"name":value`. Names that the fixed fields use get a `field_` prefix.
struct FieldWriter<'a> {
    out: &'a mut Vec<u8>,
    message: &'a mut String,
}

impl FieldWriter<'_> {
    fn key(&mut self, field: &Field) {
        let name = field.name();
        self.out.extend_from_slice(b",\"");
        if matches!(name, "timestamp" | "level" | "target" | "hostname") {
            self.out.extend_from_slice(b"field_");
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }
}

impl Visit for FieldWriter<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            use std::fmt::Write as _;
            let _ = write!(self.message, "{value:?}");
            return;
        }
        let text = format!("{value:?}");
        self.key(field);
        // Structured fields (`config = %settings_json`, `failing = %json_array`) stay JSON
        // values instead of quoted strings.
        if JSON_FIELDS.contains(&field.name())
            && serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok()
        {
            self.out.extend_from_slice(text.as_bytes());
        } else {
            write_str(self.out, &text);
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
            return;
        }
        self.key(field);
        write_str(self.out, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            write_f64(self.out, value);
        } else {
            self.out.extend_from_slice(b"null");
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.key(field);
        write_str(self.out, &value.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::write_f64;

    #[test]
    fn strings_are_json_strings() {
        for s in [
            "",
            "plain /v1/cache/{key}",
            "quo\"te",
            "back\\slash",
            "new\nline",
            "tab\t",
            "\u{7f}",
            "é ü 日本",
            "\u{1}",
        ] {
            let mut out = Vec::new();
            super::write_str(&mut out, s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn floats_print_like_display() {
        for v in [
            0.0,
            0.001,
            0.01,
            0.1,
            1.0,
            1.5,
            1.234,
            12.05,
            0.123,
            999.999,
            1234567.891,
            0.0005,
            1.0 / 3.0,
            2.5e-7,
            1e20,
            123456789012.5,
            -1.25,
        ] {
            let mut out = Vec::new();
            write_f64(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{v}"), "{v}");
        }
        // What the access log writes: whole microseconds, as milliseconds.
        for us in (0..20_000u64).chain(4_990_000..5_010_000) {
            let v = us as f64 / 1000.0;
            let mut out = Vec::new();
            write_f64(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{v}"), "{v}");
        }
    }
}
