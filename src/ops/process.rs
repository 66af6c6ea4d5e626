//! The standard Prometheus process metrics (`process_*`), read from /proc by metrics-process's
//! raw collector at each scrape.
//!
//! The gauges go through the `metrics` recorder like every other metric. The CPU counter does
//! not: the recorder's counters hold whole numbers, so `process_cpu_seconds_total` moved in
//! whole seconds and a sidecar using a tenth of a CPU showed no CPU at all in a short `rate()`.
//! It is written into the exposition by hand instead, with the kernel's tick precision.

use std::fmt::Write;

use metrics::{Unit, describe_gauge, gauge};

use crate::metrics as m;

/// Describes the gauges; call once, after the recorder is installed.
pub fn describe() {
    describe_gauge!(
        m::PROCESS_OPEN_FDS,
        Unit::Count,
        "Number of open file descriptors."
    );
    describe_gauge!(
        m::PROCESS_MAX_FDS,
        Unit::Count,
        "Maximum number of open file descriptors (the soft limit; 0 = unlimited)."
    );
    describe_gauge!(
        m::PROCESS_VIRTUAL_MEMORY,
        Unit::Bytes,
        "Virtual memory size in bytes."
    );
    describe_gauge!(
        m::PROCESS_VIRTUAL_MEMORY_MAX,
        Unit::Bytes,
        "Maximum amount of virtual memory available in bytes (0 = unlimited)."
    );
    describe_gauge!(
        m::PROCESS_RESIDENT_MEMORY,
        Unit::Bytes,
        "Resident memory size in bytes."
    );
    describe_gauge!(
        m::PROCESS_START_TIME,
        Unit::Seconds,
        "Start time of the process since the Unix epoch in seconds."
    );
    describe_gauge!(
        m::PROCESS_THREADS,
        Unit::Count,
        "Number of OS threads in the process."
    );
}

/// Reads the process's figures, sets the gauges and returns the CPU counter as exposition
/// text (HELP, TYPE and the sample), to append to the recorder's.
pub fn collect() -> String {
    let p = metrics_process::collector::collect();
    let set = |name: &'static str, v: Option<u64>| {
        if let Some(v) = v {
            gauge!(name).set(v as f64);
        }
    };
    set(m::PROCESS_OPEN_FDS, p.open_fds);
    set(m::PROCESS_MAX_FDS, p.max_fds);
    set(m::PROCESS_VIRTUAL_MEMORY, p.virtual_memory_bytes);
    set(m::PROCESS_VIRTUAL_MEMORY_MAX, p.virtual_memory_max_bytes);
    set(m::PROCESS_RESIDENT_MEMORY, p.resident_memory_bytes);
    set(m::PROCESS_START_TIME, p.start_time_seconds);
    set(m::PROCESS_THREADS, p.threads);
    let mut text = String::new();
    if let Some(cpu) = p.cpu_seconds_total {
        let _ = write!(
            text,
            "# HELP {name} Total user and system CPU time spent in seconds.\n\
             # TYPE {name} counter\n\
             {name} {cpu}\n",
            name = m::PROCESS_CPU_SECONDS,
        );
    }
    text
}
