//! bench/run.sh's remote-database mode: a TCP proxy that holds every chunk it relays a fixed time
//! in each direction, so PostgreSQL on loopback behaves like one a fraction of a millisecond away.
//!
//! The kernel here has no netem, and tokio's timers are millisecond-grained (a 0.25 ms sleep
//! rounds up to 1 ms or more), so the delay is made with a timerfd per direction: its expiry is
//! set to the chunk's due time (CLOCK_MONOTONIC, nanoseconds) and tokio waits for it through
//! epoll. What that adds beyond the delay is the kernel's wake-up latency; `ping` measures it.
//! `--spin-us N` arms the timer N µs early and spins the rest, trading CPU for precision.
//!
//! Each connection: one reader per direction timestamps what it reads (due = now + delay) and
//! queues it; one writer per direction waits for the head's due time, then writes every chunk
//! that is due. Chunks keep their boundaries and order, as packets would.
//!
//!     delay_proxy serve 127.0.0.1:0 127.0.0.1:5432 --delay-us 250   # prints "listening on ADDR"
//!     delay_proxy ping --delay-us 250 --count 2000                   # added round trip, as JSON

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(
    about = "A TCP proxy that delays every chunk in each direction (bench/run.sh's remote mode)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone, Copy)]
struct Delay {
    /// Time each chunk is held, in each direction (a round trip pays it twice).
    #[arg(long, default_value_t = 250)]
    delay_us: u64,
    /// Arm each timer this many µs early and spin until the due time (0: no spinning).
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// Worker threads (1: one current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Relay connections from LISTEN to UPSTREAM until killed.
    Serve {
        listen: SocketAddr,
        upstream: SocketAddr,
        #[command(flatten)]
        delay: Delay,
    },
    /// Measure the round trip a proxy adds: an echo server, a proxy in front of it (this same
    /// code, these settings), and COUNT pings of 64 bytes each way, direct and proxied in turn.
    Ping {
        #[command(flatten)]
        delay: Delay,
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
}

fn main() -> io::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve {
            listen,
            upstream,
            delay,
        } => runtime(delay.threads)?.block_on(async move {
            let listener = TcpListener::bind(listen).await?;
            println!("listening on {}", listener.local_addr()?);
            io::stdout().flush()?;
            serve(listener, upstream, delay).await
        }),
        Cmd::Ping { delay, count } => ping(delay, count),
    }
}

fn runtime(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_io()
            .build()
    }
}

async fn serve(listener: TcpListener, upstream: SocketAddr, delay: Delay) -> io::Result<()> {
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            // A failed connection or relay only ends that connection (the client sees it closed).
            let _ = relay(client, upstream, delay).await;
        });
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, delay: Delay) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    // Chunks are written as they fall due: Nagle would hold the small ones back.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let (a, b) = tokio::join!(pump(cr, sw, delay), pump(sr, cw, delay));
    a.and(b)
}

/// One direction: reads chunks from `rd` and writes each to `wr` once it is due.
async fn pump(mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf, delay: Delay) -> io::Result<()> {
    let delay_ns = delay.delay_us * 1000;
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Bytes)>();
    let reader = async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            if buf.capacity() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
            if rd.read_buf(&mut buf).await? == 0 {
                return Ok::<_, io::Error>(()); // EOF: dropping tx lets the writer finish
            }
            let due = mono_ns() + delay_ns;
            if tx.send((due, buf.split().freeze())).is_err() {
                return Ok(()); // the writer is gone (its side failed)
            }
        }
    };
    let writer = async move {
        let timer = Timer::new()?;
        while let Some((due, chunk)) = rx.recv().await {
            timer.wait_until(due, delay.spin_us * 1000).await?;
            wr.write_all(&chunk).await?;
            // Whatever else is due by now goes out at once, without another timer.
            while let Ok((due, chunk)) = rx.try_recv() {
                timer.wait_until(due, delay.spin_us * 1000).await?;
                wr.write_all(&chunk).await?;
            }
        }
        wr.shutdown().await
    };
    let (r, w) = tokio::join!(reader, writer);
    r.and(w)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock timerfd's absolute expiries are set in.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A timerfd registered with tokio's reactor: a nanosecond-precise sleep.
struct Timer(AsyncFd<OwnedFd>);

impl Timer {
    fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create has no memory arguments; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns; the OwnedFd keeps it open, and
        // the same, for as long as the AsyncFd that owns it lives.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let registered = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) };
        Ok(Self(registered.map_err(io::Error::from)?))
    }

    /// Returns at `due_ns` (CLOCK_MONOTONIC), or at once if that has passed. With `spin_ns`,
    /// the timer fires that much earlier and the rest is spun.
    async fn wait_until(&self, due_ns: u64, spin_ns: u64) -> io::Result<()> {
        let wake = due_ns.saturating_sub(spin_ns);
        if mono_ns() < wake {
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: (wake / 1_000_000_000) as libc::time_t,
                    tv_nsec: (wake % 1_000_000_000) as libc::c_long,
                },
            };
            // SAFETY: the fd is ours and open; spec outlives the call; no old value is asked for.
            let rc = unsafe {
                libc::timerfd_settime(
                    self.0.as_raw_fd(),
                    libc::TFD_TIMER_ABSTIME,
                    &spec,
                    std::ptr::null_mut(),
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            loop {
                let mut guard = self.0.readable().await?;
                let fired = guard.try_io(|fd| {
                    let mut ticks = [0u8; 8];
                    // SAFETY: reads at most 8 bytes into the array we own.
                    let n = unsafe { libc::read(fd.as_raw_fd(), ticks.as_mut_ptr().cast(), 8) };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
                match fired {
                    Ok(r) => {
                        r?;
                        break;
                    }
                    Err(_would_block) => continue, // readiness cleared; wait again
                }
            }
        }
        while mono_ns() < due_ns {
            std::hint::spin_loop();
        }
        Ok(())
    }
}

// --- ping ----------------------------------------------------------------------------------------

fn ping(delay: Delay, count: usize) -> io::Result<()> {
    // The echo server: a blocking thread per connection.
    let echo = StdListener::bind("127.0.0.1:0")?;
    let echo_addr = echo.local_addr()?;
    std::thread::spawn(move || {
        for conn in echo.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    // The proxy in front of it, on its own runtime and thread(s), as `serve` runs.
    let rt = runtime(delay.threads)?;
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let proxy_addr = listener.local_addr()?;
    std::thread::spawn(move || rt.block_on(serve(listener, echo_addr, delay)));

    let mut direct = StdStream::connect(echo_addr)?;
    let mut proxied = StdStream::connect(proxy_addr)?;
    direct.set_nodelay(true)?;
    proxied.set_nodelay(true)?;
    let msg = [7u8; 64];
    let round_trip = |s: &mut StdStream| -> io::Result<f64> {
        let t = Instant::now();
        s.write_all(&msg)?;
        let mut got = [0u8; 64];
        s.read_exact(&mut got)?;
        Ok(t.elapsed().as_secs_f64() * 1e6)
    };
    // Warm-up, then the pings in turn, so both see the same machine.
    for _ in 0..50 {
        round_trip(&mut direct)?;
        round_trip(&mut proxied)?;
    }
    let (mut d, mut p) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for _ in 0..count {
        d.push(round_trip(&mut direct)?);
        p.push(round_trip(&mut proxied)?);
    }
    d.sort_by(f64::total_cmp);
    p.sort_by(f64::total_cmp);
    let pct = |v: &[f64], q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let added = |q: f64| pct(&p, q) - pct(&d, q);
    println!(
        "{}",
        serde_json::json!({
            "delay_us": delay.delay_us,
            "spin_us": delay.spin_us,
            "threads": delay.threads,
            "count": count,
            "nominal_added_rtt_us": 2 * delay.delay_us,
            "direct_p50_us": pct(&d, 0.5),
            "direct_p99_us": pct(&d, 0.99),
            "proxied_p50_us": pct(&p, 0.5),
            "proxied_p99_us": pct(&p, 0.99),
            "proxied_max_us": p[p.len() - 1],
            "added_p50_us": added(0.5),
            "added_p99_us": added(0.99),
        })
    );
    Ok(())
}
