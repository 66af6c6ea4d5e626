#!/usr/bin/env python3
"""Replays issue 16's hostile clients against one pgsidecar binary and measures it.

    bench/attacks.py --bin target/release/pgsidecar --database-url postgres://... [--only NAME]

Each attack runs against a fresh sidecar process (its own schema in the given database); the
peak resident memory (VmHWM, reset through /proc/PID/clear_refs once any seeding is done) is that
of the attack proper, as is the start figure. While it runs, resident memory and open
descriptors are sampled every 50 ms. Prints one JSON object per attack and a table; the
same script measures an older binary (keys it does not know are not set), for before/after.
Standard library only. bench/attacks.sh wraps it with a release build and a PostgreSQL.
"""

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
import uuid

MIB = 1 << 20


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Sidecar:
    """The binary on ports 0, its stdout to a file; the start line gives the addresses."""

    def __init__(self, binary, db, env, log_path, nofile=None):
        e = {
            "PATH": os.environ.get("PATH", ""),
            "DATABASE_URL": db,
            "PGSIDECAR_SERVER__DATA_LISTEN": "127.0.0.1:0",
            "PGSIDECAR_SERVER__OPS_LISTEN": "127.0.0.1:0",
            "PGSIDECAR_DATABASE__SCHEMA": "atk_" + uuid.uuid4().hex[:12],
            "PGSIDECAR_SHUTDOWN__DRAIN_SECONDS": "0",
            "PGSIDECAR_SHUTDOWN__GRACE_SECONDS": "1",
        }
        e.update(env)
        # Extra settings for every sidecar of a run (only for a binary that has them).
        e.update(json.loads(os.environ.get("ATTACKS_ENV", "{}")))
        self.log_path = log_path
        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [binary], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=limit
        )
        self.log_bytes = 0
        started = threading.Event()
        self.addrs = None

        def pump():
            with open(log_path, "wb") as out:
                for line in self.proc.stdout:
                    out.write(line)
                    self.log_bytes += len(line)
                    if self.addrs is None and b'"pgsidecar started"' in line:
                        v = json.loads(line)
                        self.addrs = (v["data_listen"], v["ops_listen"])
                        started.set()

        threading.Thread(target=pump, daemon=True).start()
        if not started.wait(30):
            self.stop()
            raise RuntimeError("sidecar did not start; see " + log_path)
        self.data = hostport(self.addrs[0])
        self.ops = hostport(self.addrs[1])

    def status(self, field):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def begin(self):
        """Marks the start of the attack proper (after seeding): resets the peak (VmHWM) and
        the sampled figures."""
        try:
            with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.rss_start = self.status("VmRSS")
        self.peak = {"rss": 0, "fds": 0}

    def fds(self):
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return 0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def hostport(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


async def request(addr, method, path, body=b"", headers=None, timeout=60):
    """One request on its own connection; (status, body) or (error text, b"")."""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(*addr), timeout)
    except Exception as e:  # noqa: BLE001
        return f"connect:{type(e).__name__}", b""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    try:
        w.write(head.encode() + body)
        await asyncio.wait_for(w.drain(), timeout)
        data = await asyncio.wait_for(r.read(), timeout)
    except Exception as e:  # noqa: BLE001
        w.close()
        return f"error:{type(e).__name__}", b""
    w.close()
    if not data.startswith(b"HTTP/1.1 "):
        return "no-answer", b""
    status = int(data[9:12])
    return status, data.split(b"\r\n\r\n", 1)[-1]


def tally(results):
    out = {}
    for s in results:
        out[str(s)] = out.get(str(s), 0) + 1
    return out


async def sample(sc, stop):
    while not stop.is_set():
        sc.peak["rss"] = max(sc.peak["rss"], sc.status("VmRSS"))
        sc.peak["fds"] = max(sc.peak["fds"], sc.fds())
        await asyncio.sleep(0.05)


async def put_many(sc, items, concurrency=8):
    sem = asyncio.Semaphore(concurrency)

    async def one(method, path, body):
        async with sem:
            s, b = await request(sc.data, method, path, body)
            if s not in (200, 201, 204):
                raise RuntimeError(f"seeding failed: {s} {b[:200]}")
            return b

    return await asyncio.gather(*(one(*i) for i in items))


# ---------------------------------------------------------------- attacks


async def mget(sc, new):
    """10 concurrent _mget of 100 keys holding 1 MiB values."""
    value = b'"' + b"x" * (MIB - 16) + b'"'
    await put_many(sc, [("PUT", f"/v1/cache/big{i}?ttl_seconds=3600", value) for i in range(100)])
    body = json.dumps({"keys": [f"big{i}" for i in range(100)]}).encode()
    sc.begin()
    res = await asyncio.gather(
        *(request(sc.data, "POST", "/v1/cache/_mget", body) for _ in range(10))
    )
    sizes = [len(b) for _, b in res]
    unprocessed = [len(json.loads(b).get("unprocessed", [])) for s, b in res if s == 200]
    return {
        "answers": tally(s for s, _ in res),
        "answer_mib": round(max(sizes) / MIB, 1),
        "unprocessed_keys": max(unprocessed, default=None),
    }


async def sessions(sc, new):
    """2,000 sessions of 60 KB for one user, then the list asked 10 times at once."""
    data = {"pad": "p" * 60_000}
    body = json.dumps({"user_id": "victim", "data": data}).encode()
    await put_many(sc, [("POST", "/v1/sessions", body)] * 2000)
    sc.begin()
    res = await asyncio.gather(
        *(request(sc.data, "GET", "/v1/users/victim/sessions") for _ in range(10))
    )
    counts = [len(json.loads(b)["sessions"]) for s, b in res if s == 200]
    return {
        "answers": tally(s for s, _ in res),
        "answer_mib": round(max(len(b) for _, b in res) / MIB, 1),
        "sessions_in_answer": max(counts, default=None),
    }


async def big_bodies(sc, new):
    """256 bodies of 2 MiB (server.max_body_bytes) at once: all but the last byte sent, held
    3 s, then completed."""
    body = b"[" + b"1," * (MIB - 2) + b"1]"  # 2 MiB of valid JSON
    n = int(os.environ.get("ATTACKS_BODIES", "256"))
    head = (
        f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )

    async def one():
        try:
            r, w = await asyncio.open_connection(*sc.data)
        except Exception as e:  # noqa: BLE001
            return f"connect:{type(e).__name__}"
        # Read while writing: an early answer (503) comes before the body is sent.
        reader = asyncio.create_task(r.read())
        try:
            w.write(head.encode() + body[:-1])
            await w.drain()
            await asyncio.sleep(3)
            w.write(body[-1:])
            await w.drain()
        except Exception:  # noqa: BLE001
            pass
        try:
            data = await asyncio.wait_for(reader, 30)
        except Exception as e:  # noqa: BLE001
            return f"error:{type(e).__name__}"
        finally:
            w.close()
        return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else "closed"

    res = await asyncio.gather(*(one() for _ in range(n)))
    return {"answers": tally(res)}


async def slow_bodies(sc, new):
    """2,100 bodies at 1 byte/s; meanwhile 20 ordinary requests."""
    conns = []
    for _ in range(2100):
        try:
            r, w = await asyncio.open_connection(*sc.data)
        except OSError:
            break
        w.write(b"PUT /v1/cache/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n1")
        conns.append((r, w))
    await asyncio.sleep(1)
    normal = []
    for i in range(20):
        s, _ = await request(sc.data, "PUT", f"/v1/cache/n{i}", b"1", timeout=10)
        normal.append(s)

    async def trickle(r, w):
        try:
            for _ in range(30):
                w.write(b"1")
                await w.drain()
                try:
                    data = await asyncio.wait_for(r.read(), 1)
                    if data:
                        return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else "garbled"
                    return "closed"
                except asyncio.TimeoutError:
                    pass
            return "no-answer-30s"
        except Exception as e:  # noqa: BLE001
            return f"error:{type(e).__name__}"
        finally:
            w.close()

    slow = await asyncio.gather(*(trickle(r, w) for r, w in conns))
    return {"ordinary_requests": tally(normal), "slow_bodies": tally(slow)}


async def connection_flood(sc, new):
    """6,000 idle connections (past the 4,096 default cap), then probes and a request; the
    log lines about failed accepts are counted."""
    conns = []
    for _ in range(6000):
        try:
            conns.append(await asyncio.wait_for(asyncio.open_connection(*sc.data), 5))
        except Exception:  # noqa: BLE001
            break
    await asyncio.sleep(1)
    ready, _ = await request(sc.ops, "GET", "/ready", timeout=10)
    live, _ = await request(sc.ops, "GET", "/live", timeout=10)
    data, _ = await request(sc.data, "GET", "/v1/cache/k", timeout=10)
    for _, w in conns:
        w.close()
    await asyncio.sleep(0.5)
    with open(sc.log_path, "rb") as f:
        accept_lines = sum(1 for line in f if b"accept failed" in line)
    return {
        "connections_opened": len(conns),
        "ready": ready,
        "live": live,
        "data_request": data,
        "accept_failed_log_lines": accept_lines,
    }


async def keep_alive(sc, new):
    """One connection reused after 10 s idle."""
    r, w = await asyncio.open_connection(*sc.data)
    get = b"GET /v1/cache/k HTTP/1.1\r\nHost: x\r\n\r\n"
    out = []
    for pause in (0, 10):
        await asyncio.sleep(pause)
        try:
            w.write(get)
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            length = int(
                [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0]
                .split(b":")[1]
            )
            await r.readexactly(length)
            out.append(int(head[9:12]))
        except Exception as e:  # noqa: BLE001
            out.append(f"error:{type(e).__name__}")
    w.close()
    return {"first": out[0], "after_10s_idle": out[1]}


async def parsing(sc, new):
    """Escapes: %FF in a prefix, %G1 in a key, and a tag with a + written by a form encoder."""
    await put_many(sc, [("PUT", "/v1/cache/%EF%BF%BDx", b"1")])
    prefix, body = await request(sc.data, "DELETE", "/v1/cache?prefix=%FF")
    bad_key, _ = await request(sc.data, "GET", "/v1/cache/a%G1")
    await put_many(sc, [("PUT", "/v1/cache/t?tags=c%2B%2B", b"1")])
    _, inv = await request(sc.data, "POST", "/v1/cache/_invalidate", b'{"tags":["c++"]}')
    return {
        "delete_prefix_%FF": f"{prefix} {body.decode()[:60]}",
        "get_a%G1": bad_key,
        "invalidate_c++": inv.decode(),
    }


async def access_log(sc, new):
    """5,000 cache GETs (hits and misses): bytes of log written."""
    await put_many(sc, [("PUT", "/v1/cache/k", b"1")])
    sc.begin()
    before = sc.log_bytes
    sem = asyncio.Semaphore(32)

    async def one(i):
        async with sem:
            return (await request(sc.data, "GET", f"/v1/cache/{'k' if i % 2 else 'miss'}"))[0]

    res = await asyncio.gather(*(one(i) for i in range(5000)))
    await asyncio.sleep(0.5)
    return {"answers": tally(res), "log_bytes": sc.log_bytes - before}


ATTACKS = {
    "mget": (mget, {}),
    "sessions": (sessions, {}),
    "sessions_uncapped": (sessions, {"PGSIDECAR_SESSIONS__MAX_PER_USER": "0"}),
    "big_bodies": (big_bodies, {}),
    "slow_bodies": (slow_bodies, {}),
    "connection_flood": (connection_flood, {}),
    # The same with an open-file limit of 1024 (soft and hard), common in containers.
    "connection_flood_nofile_1024": (connection_flood, {}),
    "keep_alive": (keep_alive, {}),
    "parsing": (parsing, {}),
    "access_log": (access_log, {}),
}


def supports(binary, env):
    e = {"PATH": os.environ.get("PATH", ""), **env}
    return subprocess.run([binary, "check-config"], env=e, capture_output=True).returncode == 0


async def run(args):
    raise_nofile()
    results = []
    for name, (attack, env) in ATTACKS.items():
        if args.only and name not in args.only:
            continue
        new = supports(args.bin, {"PGSIDECAR_LOG__ACCESS": "errors"})
        if env and not supports(args.bin, env):
            continue  # a key this binary does not have
        sc = Sidecar(
            args.bin,
            args.database_url,
            env,
            f"{args.logs}/{args.label}-{name}.log",
            nofile=1024 if name.endswith("nofile_1024") else None,
        )
        try:
            for _ in range(100):
                s, _ = await request(sc.ops, "GET", "/ready", timeout=5)
                if s == 200:
                    break
                await asyncio.sleep(0.1)
            sc.begin()  # attacks that seed data begin again after seeding
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(sc, stop))
            t = time.monotonic()
            outcome = await attack(sc, new)
            stop.set()
            await sampler
            r = {
                "binary": args.label,
                "attack": name,
                "seconds": round(time.monotonic() - t, 1),
                "rss_start_mib": round(sc.rss_start / MIB, 1),
                "rss_peak_mib": round(max(sc.status("VmHWM"), sc.peak["rss"]) / MIB, 1),
                "fds_peak": sc.peak["fds"],
                **outcome,
            }
        finally:
            sc.stop()
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--label", default="sidecar")
    p.add_argument("--logs", default="bench/work")
    p.add_argument("--only", nargs="*")
    args = p.parse_args()
    os.makedirs(args.logs, exist_ok=True)
    asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
