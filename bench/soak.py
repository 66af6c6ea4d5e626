#!/usr/bin/env python3
"""Soak: mixed traffic against one pgsidecar for a long time, faults included, sampling the
sidecar's resident memory, open descriptors and latency, then telling whether they stayed flat.

    bench/soak.py --bin target/release/pgsidecar --pg-dir DIR --pg-port PORT --seconds 1800

bench/soak.sh wraps it (release build, its own PostgreSQL). Standard library only.

Traffic: --rate requests per second in all (paced, over --connections keep-alive connections):
cache GETs (most of them), PUTs with tags, _mget, deletes, tag invalidations, and session
create, validate, update, list and revoke. Faults, one every --fault-every seconds in turn:
a PostgreSQL restart, a SIGSTOP of every PostgreSQL process, a burst of slow clients (bodies at
1 byte/s), a burst of oversized requests, and a flood of idle connections past the cap.

Every --sample seconds one JSON line goes to --samples: the sidecar's RSS, peak RSS, open
descriptors, threads and CPU seconds, and the interval's requests, failures and latency
percentiles. The summary (--summary, and printed) compares the first third with the last third,
over the samples away from any fault, and gives each fault's recovery.
"""

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid

MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
# After a fault ends, samples within this many seconds still count as its aftermath.
SETTLE_S = 20


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def hostport(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


class Sidecar:
    """The binary on ports 0, its stdout to a file; the start line gives the addresses."""

    def __init__(self, binary, db, log_path):
        env = {
            "PATH": os.environ.get("PATH", ""),
            "DATABASE_URL": db,
            "PGSIDECAR_SERVER__DATA_LISTEN": "127.0.0.1:0",
            "PGSIDECAR_SERVER__OPS_LISTEN": "127.0.0.1:0",
        }
        self.proc = subprocess.Popen(
            [binary], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.addrs = None
        self.errors = 0
        started = threading.Event()

        def pump():
            with open(log_path, "wb") as out:
                for line in self.proc.stdout:
                    out.write(line)
                    if b'"level":"ERROR"' in line:
                        self.errors += 1
                    if self.addrs is None and b'"pgsidecar started"' in line:
                        v = json.loads(line)
                        self.addrs = (v["data_listen"], v["ops_listen"])
                        started.set()

        threading.Thread(target=pump, daemon=True).start()
        if not started.wait(60):
            self.stop()
            raise RuntimeError("sidecar did not start; see " + log_path)
        self.data = hostport(self.addrs[0])
        self.ops = hostport(self.addrs[1])

    def status(self, field):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * (1024 if line.rstrip().endswith("kB") else 1)
        except OSError:
            pass
        return 0

    def fds(self):
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return 0

    def cpu_seconds(self):
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except OSError:
            return 0.0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Conn:
    """One keep-alive HTTP/1.1 connection; reconnects after any failure."""

    def __init__(self, addr, timeout):
        self.addr = addr
        self.timeout = timeout
        self.r = self.w = None

    def close(self):
        if self.w is not None:
            self.w.close()
        self.r = self.w = None

    async def request(self, method, path, body=b"", headers=None):
        """(status, body); status is a string for a transport failure."""
        try:
            return await asyncio.wait_for(self._request(method, path, body, headers), self.timeout)
        except asyncio.TimeoutError:
            self.close()
            return "timeout", b""
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            self.close()
            return f"error:{type(e).__name__}", b""

    async def _request(self, method, path, body, headers):
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(*self.addr)
        head = f"{method} {path} HTTP/1.1\r\nHost: soak\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        if body or method in ("PUT", "POST", "PATCH"):
            head += f"Content-Length: {len(body)}\r\n"
        self.w.write(head.encode() + b"\r\n" + body)
        await self.w.drain()
        raw = await self.r.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        if "content-length" in hdrs:
            data = await self.r.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int((await self.r.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.r.readexactly(size + 2)
                if size == 0:
                    break
                data += chunk[:-2]
        else:
            data = b""
        if hdrs.get("connection", "").lower() == "close":
            self.close()
        return status, data


class Stats:
    """Per-second success counts (for recovery) and per-sample latencies."""

    def __init__(self, t0):
        self.t0 = t0
        self.per_second = {}  # second -> [ok, failed]
        self.lat = []
        self.count = 0
        self.failed = 0
        self.codes = {}
        self.total = {"requests": 0, "failed": 0, "codes": {}}

    def record(self, ok, latency, code):
        sec = int(time.monotonic() - self.t0)
        slot = self.per_second.setdefault(sec, [0, 0])
        slot[0 if ok else 1] += 1
        self.lat.append(latency)
        self.count += 1
        self.total["requests"] += 1
        if not ok:
            self.failed += 1
            self.total["failed"] += 1
            self.codes[str(code)] = self.codes.get(str(code), 0) + 1
            self.total["codes"][str(code)] = self.total["codes"].get(str(code), 0) + 1

    def take(self):
        lat, self.lat = sorted(self.lat), []
        out = {
            "requests": self.count,
            "failed": self.failed,
            "fail_codes": self.codes,
            "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2) if lat else None,
            "max_ms": round(lat[-1] * 1000, 2) if lat else None,
        }
        self.count = self.failed = 0
        self.codes = {}
        return out


class Traffic:
    """The mixed workload: what each operation sends and which answers count as success."""

    KEYS = 10_000
    USERS = 500
    TAGS = 50

    def __init__(self, rng):
        self.rng = rng
        self.tokens = []  # (token, user)
        self.value = json.dumps({"pad": "v" * 1000, "n": 1}).encode()

    def key(self):
        return f"soak:{self.rng.randrange(self.KEYS)}"

    def tag(self):
        return f"t{self.rng.randrange(self.TAGS)}"

    def user(self):
        return f"user-{self.rng.randrange(self.USERS)}"

    def pick(self):
        r = self.rng.random()
        for weight, op in (
            (0.45, self.cache_get),
            (0.15, self.cache_put),
            (0.04, self.cache_mget),
            (0.02, self.cache_delete),
            (0.004, self.cache_invalidate),
            (0.18, self.session_validate),
            (0.06, self.session_create),
            (0.05, self.session_update),
            (0.02, self.session_list),
            (0.016, self.session_revoke),
        ):
            if r < weight:
                return op
            r -= weight
        return self.cache_get

    async def cache_get(self, c):
        s, _ = await c.request("GET", f"/v1/cache/{self.key()}")
        return s in (200, 404), s

    async def cache_put(self, c):
        path = f"/v1/cache/{self.key()}?ttl_seconds={self.rng.randrange(60, 600)}&tags={self.tag()},{self.tag()}"
        s, _ = await c.request("PUT", path, self.value, {"Content-Type": "application/json"})
        return s == 204, s

    async def cache_mget(self, c):
        body = json.dumps({"keys": [self.key() for _ in range(20)]}).encode()
        s, _ = await c.request("POST", "/v1/cache/_mget", body)
        return s == 200, s

    async def cache_delete(self, c):
        s, _ = await c.request("DELETE", f"/v1/cache/{self.key()}")
        return s == 204, s

    async def cache_invalidate(self, c):
        s, _ = await c.request("POST", "/v1/cache/_invalidate", json.dumps({"tags": [self.tag()]}).encode())
        return s == 200, s

    async def session_create(self, c):
        user = self.user()
        body = json.dumps(
            {"user_id": user, "ttl_seconds": self.rng.randrange(300, 900), "user_agent": "soak/1", "data": {"cart": 1}}
        ).encode()
        s, data = await c.request("POST", "/v1/sessions", body)
        if s == 201:
            self.tokens.append((json.loads(data)["token"], user))
            if len(self.tokens) > 5000:
                self.tokens.pop(self.rng.randrange(len(self.tokens)))
        return s == 201, s

    def token(self):
        return self.rng.choice(self.tokens) if self.tokens else ("x" * 43, "nobody")

    async def session_validate(self, c):
        s, _ = await c.request("GET", f"/v1/sessions/{self.token()[0]}")
        return s in (200, 404), s

    async def session_update(self, c):
        body = json.dumps({"data": {"cart": self.rng.randrange(100)}}).encode()
        s, _ = await c.request("PATCH", f"/v1/sessions/{self.token()[0]}", body)
        return s in (200, 404), s

    async def session_list(self, c):
        s, _ = await c.request("GET", f"/v1/users/{self.user()}/sessions?limit=20")
        return s == 200, s

    async def session_revoke(self, c):
        if not self.tokens:
            return True, 204
        token, _ = self.tokens.pop(self.rng.randrange(len(self.tokens)))
        s, _ = await c.request("DELETE", f"/v1/sessions/{token}")
        return s == 204, s


async def worker(sc, traffic, stats, rate, stop, timeout):
    """Paced requests on one keep-alive connection: `rate` per second, without catching up on
    time lost in a stall (a burst after an outage would measure the burst, not the sidecar)."""
    c = Conn(sc.data, timeout)
    interval = 1.0 / rate
    nxt = time.monotonic() + random.random() * interval
    while not stop.is_set():
        now = time.monotonic()
        if nxt > now:
            await asyncio.sleep(nxt - now)
        nxt = max(nxt + interval, time.monotonic() - interval)
        op = traffic.pick()
        t = time.monotonic()
        ok, code = await op(c)
        stats.record(ok, time.monotonic() - t, code)
    c.close()


async def ready_poller(sc, t0, ready_log, stop):
    """/ready every 250 ms; (seconds, status) at each change."""
    c = Conn(sc.ops, 5)
    last = None
    while not stop.is_set():
        s, _ = await c.request("GET", "/ready")
        if s != last:
            ready_log.append((round(time.monotonic() - t0, 2), s))
            last = s
        await asyncio.sleep(0.25)
    c.close()


# ------------------------------------------------------------------------------ faults


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Postgres:
    def __init__(self, pg_sh, pg_dir, port, opts):
        self.pg_sh, self.dir, self.port = pg_sh, pg_dir, port
        self.opts = [x for o in opts for x in ("-c", o)]
        self.psql = os.path.join(subprocess.check_output([pg_sh, "bin"], text=True).strip(), "psql")

    def url(self, db="postgres"):
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}"

    def sql(self, statement):
        return subprocess.check_output([self.psql, self.url(), "-qAtX", "-c", statement], text=True).strip()

    def processes(self):
        """The postmaster (first line of its postmaster.pid; a backend's parent would race with
        the backend's exit when psql quits) and its children."""
        data_dir = self.sql("SHOW data_directory")
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        pids = [postmaster]
        for name in os.listdir("/proc"):
            if name.isdigit() and parent_of(int(name)) == postmaster:
                pids.append(int(name))
        return pids


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


async def fault_pg_restart(ctx):
    """PostgreSQL stopped (fast), down 3 s, started again."""
    pg = ctx["pg"]
    await asyncio.to_thread(run, [pg.pg_sh, "stop", pg.dir])
    await asyncio.sleep(3)
    await asyncio.to_thread(run, [pg.pg_sh, "start", pg.dir, str(pg.port), *pg.opts])
    return {}


async def fault_pg_sigstop(ctx):
    """Every PostgreSQL process stopped (SIGSTOP) for 5 s, then continued."""
    pids = await asyncio.to_thread(ctx["pg"].processes)
    for p in pids:
        try:
            os.kill(p, 19)
        except OSError:
            pass
    try:
        await asyncio.sleep(5)
    finally:
        for p in pids:
            try:
                os.kill(p, 18)
            except OSError:
                pass
    return {"processes": len(pids)}


async def fault_slow_clients(ctx):
    """300 clients sending a 1,000-byte body at 1 byte/s, each until answered (or 15 s)."""
    sc = ctx["sc"]

    async def one(i):
        try:
            r, w = await asyncio.open_connection(*sc.data)
        except OSError as e:
            return f"connect:{type(e).__name__}"
        try:
            w.write(f"PUT /v1/cache/slow{i} HTTP/1.1\r\nHost: soak\r\nContent-Length: 1000\r\n\r\n1".encode())
            for _ in range(15):
                await w.drain()
                try:
                    data = await asyncio.wait_for(r.read(64), 1)
                    return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else "closed"
                except asyncio.TimeoutError:
                    w.write(b"1")
            return "no-answer-15s"
        except OSError as e:
            return f"error:{type(e).__name__}"
        finally:
            w.close()

    res = await asyncio.gather(*(one(i) for i in range(300)))
    return {"answers": tally(res)}


async def fault_oversized(ctx):
    """200 requests announcing a 10 MiB body (none sent), and 20 sending 3 MiB."""
    sc = ctx["sc"]

    async def announce():
        try:
            r, w = await asyncio.open_connection(*sc.data)
        except OSError as e:
            return f"connect:{type(e).__name__}"
        try:
            w.write(b"PUT /v1/cache/big HTTP/1.1\r\nHost: soak\r\nContent-Length: 10485760\r\n\r\n")
            await w.drain()
            data = await asyncio.wait_for(r.read(64), 10)
            return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else "closed"
        except (OSError, asyncio.TimeoutError) as e:
            return f"error:{type(e).__name__}"
        finally:
            w.close()

    async def send():
        body = b'"' + b"x" * (3 * MIB) + b'"'
        try:
            r, w = await asyncio.open_connection(*sc.data)
        except OSError as e:
            return f"connect:{type(e).__name__}"
        reader = asyncio.create_task(r.read(64))
        try:
            w.write(f"PUT /v1/cache/big HTTP/1.1\r\nHost: soak\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            await w.drain()
        except OSError:
            pass  # answered (and closed) before the body was all sent
        try:
            data = await asyncio.wait_for(reader, 10)
            return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else "closed"
        except (OSError, asyncio.TimeoutError) as e:
            return f"error:{type(e).__name__}"
        finally:
            w.close()

    res = await asyncio.gather(*([announce() for _ in range(200)] + [send() for _ in range(20)]))
    return {"answers": tally(res)}


async def fault_conn_flood(ctx):
    """5,000 idle connections to the data listener (past the 4,096 cap), held 10 s."""
    sc = ctx["sc"]
    conns = []
    for _ in range(5000):
        try:
            conns.append(await asyncio.wait_for(asyncio.open_connection(*sc.data), 5))
        except (OSError, asyncio.TimeoutError):
            break
    peak_fds = sc.fds()
    await asyncio.sleep(10)
    for _, w in conns:
        w.close()
    return {"opened": len(conns), "sidecar_fds_during": peak_fds}


FAULTS = [
    ("pg_restart", fault_pg_restart),
    ("pg_sigstop", fault_pg_sigstop),
    ("slow_clients", fault_slow_clients),
    ("oversized", fault_oversized),
    ("conn_flood", fault_conn_flood),
]


def tally(results):
    out = {}
    for s in results:
        out[str(s)] = out.get(str(s), 0) + 1
    return out


async def faults(ctx, t0, every, until, log):
    i = 0
    at = every
    while at < until:
        await asyncio.sleep(max(0, t0 + at - time.monotonic()))
        if ctx["stop"].is_set():
            return
        name, fn = FAULTS[i % len(FAULTS)]
        start = time.monotonic() - t0
        print(f"soak: {start:7.1f} s  fault {name}", file=sys.stderr, flush=True)
        try:
            detail = await fn(ctx)
        except Exception as e:  # noqa: BLE001
            detail = {"error": repr(e)}
        log.append({"fault": name, "start_s": round(start, 2), "end_s": round(time.monotonic() - t0, 2), **detail})
        i += 1
        at += every


# ------------------------------------------------------------------------------ report


def recovery(per_second, ready_log, fault, horizon):
    """Seconds from the fault's end until traffic is whole again (three seconds in a row with
    every request answered as expected), and until /ready is 200 again if it was not; failures
    counted from the fault's start until `horizon` (60 s after its end, or the next fault)."""
    end = int(fault["end_s"])
    whole = None
    for s in range(int(fault["start_s"]), end + 300):
        window = [per_second.get(s + k, [0, 0]) for k in range(3)]
        if all(w[0] > 0 and w[1] == 0 for w in window):
            whole = max(0, s - fault["end_s"])
            break
    failed = sum(per_second.get(s, [0, 0])[1] for s in range(int(fault["start_s"]), int(horizon)))
    ready_down = [t for t, st in ready_log if fault["start_s"] <= t < horizon and st != 200]
    ready_back = None
    if ready_down:
        ups = [t for t, st in ready_log if st == 200 and t > ready_down[0]]
        ready_back = round(ups[0] - fault["end_s"], 2) if ups else None
    return {
        "traffic_whole_after_s": None if whole is None else round(whole, 1),
        "failed_requests": failed,
        "ready_503_at_s": round(ready_down[0] - fault["start_s"], 2) if ready_down else None,
        "ready_200_after_end_s": ready_back,
    }


def summarize(samples, fault_log, ready_log, per_second, seconds, warmup):
    def quiet(s):
        return not any(f["start_s"] - 5 <= s["t"] <= f["end_s"] + SETTLE_S for f in fault_log)

    usable = [s for s in samples if s["t"] >= warmup]
    third = (seconds - warmup) / 3
    first = [s for s in usable if s["t"] < warmup + third]
    last = [s for s in usable if s["t"] >= warmup + 2 * third]
    q_first, q_last = [s for s in first if quiet(s)], [s for s in last if quiet(s)]

    def mx(xs, k):
        vals = [x[k] for x in xs if x.get(k) is not None]
        return max(vals) if vals else None

    def med(xs, k):
        vals = [x[k] for x in xs if x.get(k) is not None]
        return statistics.median(vals) if vals else None

    def slope(xs, k):
        """Least-squares slope of k over time, per hour."""
        pts = [(x["t"], x[k]) for x in xs if x.get(k) is not None]
        if len(pts) < 3:
            return None
        mt = statistics.fmean(t for t, _ in pts)
        mv = statistics.fmean(v for _, v in pts)
        den = sum((t - mt) ** 2 for t, _ in pts)
        return None if den == 0 else sum((t - mt) * (v - mv) for t, v in pts) / den * 3600

    quiet_all = [s for s in usable if quiet(s)]
    # The first cycle: until every kind of fault has happened once (and settled). A connection
    # flood raises RSS once (the allocator keeps the memory of 4,096 connections for reuse); a
    # leak keeps growing through the next cycles. Without a whole cycle, the first third.
    kinds = {name for name, _ in FAULTS}
    cycle_end = None
    seen = set()
    for f in fault_log:
        seen.add(f["fault"])
        if seen >= kinds:
            cycle_end = f["end_s"] + SETTLE_S
            break
    if cycle_end is not None and cycle_end < seconds:
        cycle = [s for s in usable if s["t"] <= cycle_end]
        after = [s for s in usable if s["t"] > cycle_end]
    else:
        cycle, after = first, last
    rss = {
        "first_third_max_mib": round(mx(first, "rss") / MIB, 1) if first else None,
        "last_third_max_mib": round(mx(last, "rss") / MIB, 1) if last else None,
        "first_cycle_end_s": cycle_end,
        "first_cycle_max_mib": round(mx(cycle, "rss") / MIB, 1) if cycle else None,
        "after_first_cycle_max_mib": round(mx(after, "rss") / MIB, 1) if after else None,
        "start_mib": round(usable[0]["rss"] / MIB, 1) if usable else None,
        "end_mib": round(usable[-1]["rss"] / MIB, 1) if usable else None,
        "quiet_slope_mib_per_hour": round((slope(quiet_all, "rss") or 0) / MIB, 2),
        "peak_mib": round(max(s["hwm"] for s in samples) / MIB, 1),
    }
    fds = {
        "first_third_quiet_max": mx(q_first, "fds"),
        "last_third_quiet_max": mx(q_last, "fds"),
        "peak": max(s["fds"] for s in samples),
    }
    p99 = {
        "first_third_quiet_median_ms": med(q_first, "p99_ms"),
        "last_third_quiet_median_ms": med(q_last, "p99_ms"),
        "first_third_quiet_max_ms": mx(q_first, "p99_ms"),
        "last_third_quiet_max_ms": mx(q_last, "p99_ms"),
    }
    flat = {
        # A leak grows without bound; allocator reuse and caches settle. 10 % (at least 4 MiB)
        # between the first cycle's maximum and the maximum after it is the tolerance.
        "rss": rss["after_first_cycle_max_mib"] is not None
        and rss["after_first_cycle_max_mib"] <= rss["first_cycle_max_mib"] * 1.10 + 4,
        # Descriptors away from faults: the pool and listeners, within a few.
        "fds": fds["last_third_quiet_max"] is not None
        and fds["last_third_quiet_max"] <= fds["first_third_quiet_max"] + 4,
        # Typical p99 of a quiet interval: within half again (and 2 ms) of the first third's.
        "p99": p99["last_third_quiet_median_ms"] is not None
        and p99["last_third_quiet_median_ms"] <= p99["first_third_quiet_median_ms"] * 1.5 + 2,
    }
    return {
        "rss": rss,
        "fds": fds,
        "p99": p99,
        "flat": flat,
        "faults": [
            {**f, **recovery(per_second, ready_log, f, min(
                [f["end_s"] + 60] + [g["start_s"] for g in fault_log if g["start_s"] > f["start_s"]]))}
            for f in fault_log
        ],
        "samples": {"all": len(samples), "first_third_quiet": len(q_first), "last_third_quiet": len(q_last)},
    }


def print_report(r):
    out = []
    w = out.append
    w(f"soak {r['seconds']} s at {r['rate']} req/s over {r['connections']} connections; commit {r['commit']}; "
      f"load average at start {r['loadavg_start']}, at end {r['loadavg_end']}")
    t = r["totals"]
    w(f"requests {t['requests']}, failed {t['failed']} {json.dumps(t['codes'])}; sidecar ERROR lines {r['sidecar_error_lines']}; "
      f"sidecar CPU {r['sidecar_cpu_s']} s")
    s = r["summary"]
    yes = lambda b: "flat" if b else "NOT FLAT"  # noqa: E731
    w(f"RSS   start {s['rss']['start_mib']} MiB, first third max {s['rss']['first_third_max_mib']} MiB, last third max "
      f"{s['rss']['last_third_max_mib']} MiB, end {s['rss']['end_mib']} MiB; first fault cycle (to {s['rss']['first_cycle_end_s']} s) "
      f"max {s['rss']['first_cycle_max_mib']} MiB, after it max {s['rss']['after_first_cycle_max_mib']} MiB; quiet slope {s['rss']['quiet_slope_mib_per_hour']} MiB/h, peak {s['rss']['peak_mib']} MiB: {yes(s['flat']['rss'])}")
    w(f"fds   first third quiet max {s['fds']['first_third_quiet_max']}, last third quiet max {s['fds']['last_third_quiet_max']}, "
      f"peak {s['fds']['peak']}: {yes(s['flat']['fds'])}")
    w(f"p99   first third quiet median {s['p99']['first_third_quiet_median_ms']} ms (max {s['p99']['first_third_quiet_max_ms']}), "
      f"last third {s['p99']['last_third_quiet_median_ms']} ms (max {s['p99']['last_third_quiet_max_ms']}): {yes(s['flat']['p99'])}")
    w("faults (times in s; 'whole' = every request answered as expected for 3 s in a row):")
    w(f"  {'at':>7} {'fault':<13} {'lasted':>6} {'failed':>7} {'whole after':>11} {'/ready 503 at':>13} {'/ready 200 after':>16}  detail")
    for f in s["faults"]:
        detail = {k: v for k, v in f.items() if k not in (
            "fault", "start_s", "end_s", "traffic_whole_after_s", "failed_requests", "ready_503_at_s", "ready_200_after_end_s")}
        w(f"  {f['start_s']:>7} {f['fault']:<13} {round(f['end_s'] - f['start_s'], 1):>6} {f['failed_requests']:>7} "
          f"{str(f['traffic_whole_after_s']):>11} {str(f['ready_503_at_s']):>13} {str(f['ready_200_after_end_s']):>16}  {json.dumps(detail)}")
    return "\n".join(out)


async def main_async(a):
    raise_nofile()
    pg = Postgres(a.pg_sh, a.pg_dir, a.pg_port, a.pg_opt)
    db = "soak_" + uuid.uuid4().hex[:8]
    pg.sql(f"CREATE DATABASE {db}")
    sc = Sidecar(a.bin, pg.url(db), a.log)
    stop = asyncio.Event()
    t0 = time.monotonic()
    stats = Stats(t0)
    traffic = Traffic(random.Random(a.seed))
    ready_log, fault_log, samples = [], [], []
    ctx = {"sc": sc, "pg": pg, "stop": stop}
    load_start = os.getloadavg()[0]
    tasks = [asyncio.create_task(worker(sc, traffic, stats, a.rate / a.connections, stop, a.timeout))
             for _ in range(a.connections)]
    tasks.append(asyncio.create_task(ready_poller(sc, t0, ready_log, stop)))
    tasks.append(asyncio.create_task(faults(ctx, t0, a.fault_every, a.seconds - a.fault_every / 2, fault_log)))
    try:
        with open(a.samples, "w") as out:
            nxt = t0 + a.sample
            while time.monotonic() - t0 < a.seconds:
                await asyncio.sleep(max(0, nxt - time.monotonic()))
                nxt += a.sample
                row = {
                    "t": round(time.monotonic() - t0, 1),
                    "rss": sc.status("VmRSS"),
                    "hwm": sc.status("VmHWM"),
                    "fds": sc.fds(),
                    "threads": sc.status("Threads"),
                    "cpu_s": round(sc.cpu_seconds(), 2),
                    "ready": ready_log[-1][1] if ready_log else None,
                    **stats.take(),
                }
                samples.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
                if int(row["t"]) % 60 < a.sample:
                    print(f"soak: {row['t']:7.1f} s  rss {row['rss'] / MIB:.1f} MiB  fds {row['fds']}  "
                          f"p99 {row['p99_ms']} ms  req {row['requests']} failed {row['failed']}",
                          file=sys.stderr, flush=True)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cpu = round(sc.cpu_seconds(), 1)
        sc.stop()
        try:
            pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        except subprocess.CalledProcessError:
            pass
    report = {
        "seconds": a.seconds,
        "rate": a.rate,
        "connections": a.connections,
        "commit": a.commit,
        "loadavg_start": round(load_start, 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
        "totals": stats.total,
        "sidecar_error_lines": sc.errors,
        "sidecar_cpu_s": cpu,
        "ready_changes": ready_log,
        "summary": summarize(samples, fault_log, ready_log, stats.per_second, a.seconds, a.warmup),
    }
    with open(a.summary, "w") as f:
        json.dump(report, f, indent=1)
    text = print_report(report)
    print(text)
    if a.text:
        with open(a.text, "w") as f:
            f.write(text + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--pg-sh", default="scripts/pg.sh")
    p.add_argument("--pg-dir", required=True)
    p.add_argument("--pg-port", type=int, required=True)
    p.add_argument("--pg-opt", action="append", default=[], help="NAME=VALUE: a -c option PostgreSQL was started with (the restart uses it again)")
    p.add_argument("--seconds", type=float, default=1800)
    p.add_argument("--rate", type=float, default=600)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--sample", type=float, default=5)
    p.add_argument("--warmup", type=float, default=60)
    p.add_argument("--fault-every", type=float, default=150)
    p.add_argument("--timeout", type=float, default=15, help="a request's own deadline, in the client")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--samples", required=True)
    p.add_argument("--summary", required=True)
    p.add_argument("--text")
    p.add_argument("--log", required=True, help="the sidecar's stdout")
    p.add_argument("--commit", default="unknown")
    a = p.parse_args()
    a.warmup = min(a.warmup, a.seconds / 10)
    asyncio.run(main_async(a))


if __name__ == "__main__":
    main()
