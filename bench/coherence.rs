//! bench/run.sh's fleet measurements with the near cache on: how long another sidecar serves a
//! value after it was overwritten (`delay`), and how many fetchers a stampede runs (`stampede`).
//!
//! `delay`: for each sample, write an old value through sidecar A, read it on sidecar B until B
//! answers it from its near cache (`Pgsidecar-Cache: near`), then write a new value through A
//! and read on B back to back until the new value comes back. A read is an interval [start,
//! end]; the moment B stopped serving the old value lies between the start of the last read
//! that returned it and the end of the first that returned the new one. Both bounds are
//! reported, relative to the moment A's write was acknowledged (its answer received); the upper
//! one is the delay judged against the targets.
//!
//! `stampede`: CALLERS threads, spread round-robin over the sidecars, each on its own
//! keep-alive connection, ask at the same instant for one missing key the way the TypeScript
//! client's getCached does with fill leases (`GET ?fill_lease_ms&wait_ms`; on 404 with a lease,
//! run the fetcher and `PUT ?lease=`; on 404 without one, run it and PUT plainly), and count the
//! fetcher runs; `--plain` asks without leases, as a per-process single flight would across
//! processes (every caller misses and fetches).
//!
//! `prefill`: reads every benchmark row (with `_mget`) and session once through one sidecar, so
//! its near caches hold them before a run measures it (bench/run.sh).
//!
//! Speaks HTTP/1.1 itself over std's TcpStream or UnixStream (one blocking connection per
//! caller, no runtime), so its own overhead is a few syscalls per request. Prints one JSON object.
//!
//!     coherence delay --writer 127.0.0.1:7070 --reader 127.0.0.1:7080 --samples 1000
//!     coherence stampede --sidecars 127.0.0.1:7070,127.0.0.1:7080 --callers 200 --trials 10
//!     coherence prefill --sidecar unix:/run/pgsidecar.sock --rows 100000 --tokens tokens.txt

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

/// Where a sidecar's data API listens: host:port, or unix:/path.
#[derive(Clone, Debug)]
enum Addr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(p) if !p.is_empty() => Ok(Addr::Unix(p.into())),
            Some(_) => Err("unix: needs a path".into()),
            None => Ok(Addr::Tcp(s.to_string())),
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Parser)]
#[command(about = "Invalidation delay and stampede measurements across sidecars")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Delay between a write acknowledged on WRITER and READER no longer serving the old value.
    Delay {
        #[arg(long)]
        writer: Addr,
        #[arg(long)]
        reader: Addr,
        #[arg(long, default_value_t = 1000)]
        samples: usize,
        /// Distinct keys the samples cycle through.
        #[arg(long, default_value_t = 16)]
        keys: usize,
        /// Give up on one sample after this many ms (recorded as a timeout).
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Label stored with the result ("idle", "load").
        #[arg(long, default_value = "idle")]
        label: String,
        /// Write every sample (bounds in µs) here, one JSON line each.
        #[arg(long)]
        raw: Option<std::path::PathBuf>,
    },
    /// Concurrent getCached-style callers for one missing key: how often the fetcher runs.
    Stampede {
        /// Comma-separated host:port of the sidecars' data APIs.
        #[arg(long, value_delimiter = ',')]
        sidecars: Vec<Addr>,
        #[arg(long, default_value_t = 200)]
        callers: usize,
        #[arg(long, default_value_t = 10)]
        trials: usize,
        /// What one fetcher run takes (the expensive computation the cache saves).
        #[arg(long, default_value_t = 100)]
        fetch_ms: u64,
        #[arg(long, default_value_t = 10000)]
        fill_lease_ms: u64,
        #[arg(long, default_value_t = 3000)]
        wait_ms: u64,
        /// Without leases: a plain GET, and on a miss fetch and PUT (the behaviour before).
        #[arg(long)]
        plain: bool,
    },
    /// Read rows k1..kROWS (with _mget) and every session of TOKENS once through one sidecar.
    Prefill {
        #[arg(long)]
        sidecar: Addr,
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        /// One session token a line (bench/run.sh's tokens.txt); none: only the cache.
        #[arg(long)]
        tokens: Option<PathBuf>,
        /// Connections reading the sessions.
        #[arg(long, default_value_t = 16)]
        threads: usize,
    },
}

fn main() -> io::Result<()> {
    let out = match Cli::parse().cmd {
        Cmd::Delay {
            writer,
            reader,
            samples,
            keys,
            timeout_ms,
            label,
            raw,
        } => delay(DelayArgs {
            writer,
            reader,
            samples,
            keys,
            timeout: Duration::from_millis(timeout_ms),
            label,
            raw,
        })?,
        Cmd::Stampede {
            sidecars,
            callers,
            trials,
            fetch_ms,
            fill_lease_ms,
            wait_ms,
            plain,
        } => stampede(StampedeArgs {
            sidecars,
            callers,
            trials,
            fetch: Duration::from_millis(fetch_ms),
            fill_lease_ms,
            wait_ms,
            plain,
        })?,
        Cmd::Prefill {
            sidecar,
            rows,
            tokens,
            threads,
        } => prefill(sidecar, rows, tokens, threads)?,
    };
    println!("{out}");
    Ok(())
}

// --- a minimal HTTP/1.1 client ------------------------------------------------------------------

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A connected socket of either kind.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One keep-alive connection to one sidecar; reconnects when the server closed it.
struct Conn {
    addr: Addr,
    io: Option<BufReader<Stream>>,
}

impl Conn {
    fn new(addr: Addr) -> Self {
        Self { addr, io: None }
    }

    fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> io::Result<Response> {
        // One retry on a fresh connection: a kept-alive one may have been closed meanwhile.
        match self.try_request(method, path, body) {
            Ok(r) => Ok(r),
            Err(_) => {
                self.io = None;
                self.try_request(method, path, body)
            }
        }
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        if self.io.is_none() {
            let s = match &self.addr {
                Addr::Tcp(a) => {
                    let s = TcpStream::connect(a.as_str())?;
                    s.set_nodelay(true)?;
                    Stream::Tcp(s)
                }
                Addr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            };
            self.io = Some(BufReader::new(s));
        }
        let io = self.io.as_mut().expect("connected above");
        let host = match &self.addr {
            Addr::Tcp(a) => a.as_str(),
            Addr::Unix(_) => "localhost",
        };
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        io.get_mut().write_all(&bytes)?;
        let resp = read_response(io)?;
        if resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.io = None;
        }
        Ok(resp)
    }
}

fn read_response(io: &mut BufReader<Stream>) -> io::Result<Response> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut line = String::new();
    if io.read_line(&mut line)? == 0 {
        return Err(bad("connection closed"));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        io.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad("header line"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(n) = resp.header("content-length") {
        let n: usize = n.parse().map_err(|_| bad("content-length"))?;
        resp.body.resize(n, 0);
        io.read_exact(&mut resp.body)?;
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            line.clear();
            io.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("chunk size"))?;
            let start = resp.body.len();
            resp.body.resize(start + n + 2, 0); // the chunk and its CRLF
            io.read_exact(&mut resp.body[start..])?;
            resp.body.truncate(start + n);
            if n == 0 {
                line.clear();
                io.read_line(&mut line)?; // trailers end: we send none, so one empty line
                break;
            }
        }
    }
    Ok(resp)
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn summary_ms(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let r = |x: Option<f64>| x.map(|x| (x * 1000.0).round() / 1000.0);
    json!({
        "n": v.len(),
        "p50_ms": r(percentile(&v, 50.0)),
        "p99_ms": r(percentile(&v, 99.0)),
        "max_ms": r(v.last().copied()),
        "mean_ms": r((!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)),
    })
}

fn nonce() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

// --- delay --------------------------------------------------------------------------------------

struct DelayArgs {
    writer: Addr,
    reader: Addr,
    samples: usize,
    keys: usize,
    timeout: Duration,
    label: String,
    raw: Option<std::path::PathBuf>,
}

fn expect_write(r: Response, what: &str) -> io::Result<()> {
    if (200..300).contains(&r.status) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what}: HTTP {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )))
    }
}

fn delay(a: DelayArgs) -> io::Result<Value> {
    let mut w = Conn::new(a.writer.clone());
    let mut r = Conn::new(a.reader.clone());
    let run = nonce() % 1_000_000_000;
    let mut raw = a.raw.as_ref().map(std::fs::File::create).transpose()?;
    let (mut upper, mut lower) = (Vec::new(), Vec::new());
    let (mut timeouts, mut not_near, mut reads_total, mut first_read_new) = (0, 0, 0, 0);
    let t0 = Instant::now();
    for i in 0..a.samples {
        let key = format!("coherence-{run}-{}", i % a.keys.max(1));
        let path = format!("/v1/cache/{key}");
        let put = format!("{path}?ttl_seconds=3600");
        let old = format!("{{\"sample\":{i},\"v\":\"old\"}}");
        let new = format!("{{\"sample\":{i},\"v\":\"new\"}}");
        expect_write(w.request("PUT", &put, Some(old.as_bytes()))?, "PUT old")?;
        // B must hold the old value in its near cache, or there is nothing to invalidate.
        let deadline = Instant::now() + a.timeout;
        let cached = loop {
            let resp = r.request("GET", &path, None)?;
            if resp.status == 200
                && resp.body == old.as_bytes()
                && resp.header("pgsidecar-cache") == Some("near")
            {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
        };
        if !cached {
            not_near += 1;
            continue;
        }
        let resp = w.request("PUT", &put, Some(new.as_bytes()))?;
        let acked = Instant::now();
        expect_write(resp, "PUT new")?;
        let mut last_old_start = None;
        let mut reads = 0;
        let first_new_end = loop {
            let start = Instant::now();
            let resp = r.request("GET", &path, None)?;
            let end = Instant::now();
            reads += 1;
            if resp.status == 200 && resp.body == new.as_bytes() {
                break Some(end);
            }
            if resp.status == 200 && resp.body == old.as_bytes() {
                last_old_start = Some(start);
            } else {
                return Err(io::Error::other(format!(
                    "unexpected answer on the reader: HTTP {} {}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body)
                )));
            }
            if end - acked > a.timeout {
                break None;
            }
        };
        reads_total += reads;
        let Some(first_new_end) = first_new_end else {
            timeouts += 1;
            continue;
        };
        if reads == 1 {
            first_read_new += 1;
        }
        let up = (first_new_end - acked).as_secs_f64() * 1e3;
        let lo = last_old_start.map_or(0.0, |s| {
            s.saturating_duration_since(acked).as_secs_f64() * 1e3
        });
        upper.push(up);
        lower.push(lo);
        if let Some(f) = raw.as_mut() {
            writeln!(
                f,
                "{}",
                json!({"sample": i, "lower_ms": lo, "upper_ms": up, "reads": reads})
            )?;
        }
        // A short, varying pause, so samples fall at every phase of the listener's heartbeat.
        std::thread::sleep(Duration::from_micros((i as u64 * 7919) % 2000));
    }
    Ok(json!({
        "label": a.label,
        "writer": a.writer.to_string(),
        "reader": a.reader.to_string(),
        "samples": a.samples,
        "measured": upper.len(),
        "timeouts": timeouts,
        "timeout_ms": a.timeout.as_millis() as u64,
        "not_cached_on_reader": not_near,
        "first_read_already_new": first_read_new,
        "reads_per_sample_mean": if upper.is_empty() { 0.0 } else { reads_total as f64 / (upper.len() + timeouts) as f64 },
        "seconds": t0.elapsed().as_secs_f64(),
        "delay_upper": summary_ms(upper),
        "delay_lower": summary_ms(lower),
    }))
}

// --- stampede -----------------------------------------------------------------------------------

struct StampedeArgs {
    sidecars: Vec<Addr>,
    callers: usize,
    trials: usize,
    fetch: Duration,
    fill_lease_ms: u64,
    wait_ms: u64,
    plain: bool,
}

/// How one caller's getCached ended.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Outcome {
    Hit,
    FetchedWithLease,
    FetchedLeaseVoided,
    FetchedWithoutLease,
    Error,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::FetchedWithLease => "fetched_with_lease",
            Outcome::FetchedLeaseVoided => "fetched_lease_voided",
            Outcome::FetchedWithoutLease => "fetched_without_lease",
            Outcome::Error => "error",
        }
    }
}

fn get_cached(
    c: &mut Conn,
    a: &StampedeArgs,
    key: &str,
    fetches: &AtomicUsize,
) -> io::Result<Outcome> {
    let path = format!("/v1/cache/{key}");
    let get = if a.plain {
        path.clone()
    } else {
        format!(
            "{path}?fill_lease_ms={}&wait_ms={}",
            a.fill_lease_ms, a.wait_ms
        )
    };
    let resp = c.request("GET", &get, None)?;
    match resp.status {
        200 => return Ok(Outcome::Hit),
        404 => {}
        s => {
            return Err(io::Error::other(format!(
                "GET: HTTP {s} {}",
                String::from_utf8_lossy(&resp.body)
            )));
        }
    }
    let lease = resp.header("pgsidecar-fill-lease").map(str::to_string);
    // The fetcher: the expensive computation every miss would run.
    fetches.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(a.fetch);
    let value = format!("{{\"key\":\"{key}\"}}");
    let put = match &lease {
        Some(t) => format!("{path}?ttl_seconds=3600&lease={t}"),
        None => format!("{path}?ttl_seconds=3600"),
    };
    let w = c.request("PUT", &put, Some(value.as_bytes()))?;
    match (w.status, lease.is_some()) {
        (200..=299, true) => Ok(Outcome::FetchedWithLease),
        (200..=299, false) => Ok(Outcome::FetchedWithoutLease),
        (409, true) => Ok(Outcome::FetchedLeaseVoided),
        (s, _) => Err(io::Error::other(format!(
            "PUT: HTTP {s} {}",
            String::from_utf8_lossy(&w.body)
        ))),
    }
}

fn stampede(a: StampedeArgs) -> io::Result<Value> {
    if a.sidecars.is_empty() {
        return Err(io::Error::other("--sidecars: at least one"));
    }
    let a = Arc::new(a);
    let run = nonce() % 1_000_000_000;
    let barrier = Arc::new(Barrier::new(a.callers + 1));
    let fetches: Arc<Vec<AtomicUsize>> =
        Arc::new((0..a.trials).map(|_| AtomicUsize::new(0)).collect());
    // (trial, outcome, latency ms) of every call.
    let calls = Arc::new(Mutex::new(Vec::<(usize, Outcome, f64)>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut threads = Vec::new();
    for i in 0..a.callers {
        let (a, barrier, fetches, calls, errors) = (
            a.clone(),
            barrier.clone(),
            fetches.clone(),
            calls.clone(),
            errors.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut c = Conn::new(a.sidecars[i % a.sidecars.len()].clone());
            // Open the connection before the start line, so the stampede is requests, not connects.
            let _ = c.request("GET", "/v1/cache/stampede-warm-up", None);
            for t in 0..a.trials {
                let key = format!("stampede-{run}-{t}");
                barrier.wait(); // everyone at the start line
                let started = Instant::now();
                let outcome = get_cached(&mut c, &a, &key, &fetches[t]).unwrap_or_else(|e| {
                    errors.lock().expect("not poisoned").push(e.to_string());
                    Outcome::Error
                });
                calls.lock().expect("not poisoned").push((
                    t,
                    outcome,
                    started.elapsed().as_secs_f64() * 1e3,
                ));
                barrier.wait(); // everyone done before the next trial
            }
        }));
    }
    let t0 = Instant::now();
    for _ in 0..a.trials {
        barrier.wait();
        barrier.wait();
    }
    for t in threads {
        let _ = t.join();
    }
    let per_trial: Vec<usize> = fetches.iter().map(|f| f.load(Ordering::SeqCst)).collect();
    let calls = calls.lock().expect("not poisoned");
    let mut outcomes = serde_json::Map::new();
    for o in [
        Outcome::Hit,
        Outcome::FetchedWithLease,
        Outcome::FetchedLeaseVoided,
        Outcome::FetchedWithoutLease,
        Outcome::Error,
    ] {
        outcomes.insert(
            o.name().into(),
            json!(calls.iter().filter(|c| c.1 == o).count()),
        );
    }
    let errors = errors.lock().expect("not poisoned");
    Ok(json!({
        "mode": if a.plain { "plain" } else { "lease" },
        "sidecars": a.sidecars.len(),
        "callers": a.callers,
        "trials": a.trials,
        "fetch_ms": a.fetch.as_millis() as u64,
        "fill_lease_ms": a.fill_lease_ms,
        "wait_ms": a.wait_ms,
        "fetches_per_trial": per_trial,
        "fetches_max": per_trial.iter().max(),
        "trials_with_one_fetch": per_trial.iter().filter(|&&n| n == 1).count(),
        "outcomes": outcomes,
        "errors": errors.len(),
        "first_errors": errors.iter().take(5).collect::<Vec<_>>(),
        "latency": summary_ms(calls.iter().map(|c| c.2).collect()),
        "seconds": t0.elapsed().as_secs_f64(),
    }))
}

// --- prefill ------------------------------------------------------------------------------------

fn prefill(
    sidecar: Addr,
    rows: usize,
    tokens: Option<PathBuf>,
    threads: usize,
) -> io::Result<Value> {
    let t0 = Instant::now();
    // The cache rows with _mget (it fills the near cache like GETs do), 1,000 keys at a time;
    // keys an answer cut at cache.max_mget_bytes ("unprocessed") are asked again.
    let mut c = Conn::new(sidecar.clone());
    let mut keys: Vec<String> = (1..=rows).map(|n| format!("k{n}")).collect();
    let (mut hits, mut misses) = (0usize, 0usize);
    while !keys.is_empty() {
        let batch: Vec<String> = keys.drain(..keys.len().min(1000)).collect();
        let body = json!({ "keys": batch }).to_string();
        let resp = c.request("POST", "/v1/cache/_mget", Some(body.as_bytes()))?;
        if resp.status != 200 {
            return Err(io::Error::other(format!("_mget: HTTP {}", resp.status)));
        }
        let v: Value = serde_json::from_slice(&resp.body).map_err(io::Error::other)?;
        hits += v["hits"].as_object().map_or(0, |m| m.len())
            + v["raw"].as_object().map_or(0, |m| m.len());
        misses += v["misses"].as_array().map_or(0, |a| a.len());
        if let Some(rest) = v["unprocessed"].as_array() {
            keys.extend(rest.iter().filter_map(|k| k.as_str().map(str::to_string)));
        }
    }
    // The sessions one GET each (there is no bulk validation), from several connections.
    let paths: Vec<String> = match tokens {
        Some(t) => std::fs::read_to_string(t)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| format!("/v1/sessions/{l}"))
            .collect(),
        None => Vec::new(),
    };
    let paths = Arc::new(paths);
    let threads = threads.max(1);
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let (paths, sidecar) = (paths.clone(), sidecar.clone());
            std::thread::spawn(move || -> io::Result<(usize, usize)> {
                let mut c = Conn::new(sidecar);
                let (mut ok, mut other) = (0, 0);
                for p in paths.iter().skip(i).step_by(threads) {
                    if c.request("GET", p, None)?.status == 200 {
                        ok += 1;
                    } else {
                        other += 1;
                    }
                }
                Ok((ok, other))
            })
        })
        .collect();
    let (mut ok, mut other) = (0, 0);
    for w in workers {
        let (o, x) = w
            .join()
            .map_err(|_| io::Error::other("a prefill thread panicked"))??;
        ok += o;
        other += x;
    }
    if misses > 0 || other > 0 {
        return Err(io::Error::other(format!(
            "prefill: {misses} cache misses, {other} of {} session reads not 200",
            ok + other
        )));
    }
    Ok(
        json!({"sidecar": sidecar.to_string(), "cache_rows": hits, "sessions": ok, "seconds": t0.elapsed().as_secs_f64()}),
    )
}
