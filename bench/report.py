#!/usr/bin/env python3
"""Turns the raw outputs of bench/run.sh into one table and a JSON record. Python 3 stdlib only.

usage: report.py WORK_DIR RESULTS_DIR

WORK_DIR holds what run.sh left:
  manifest.tsv   one line per measured run: round, tool, scenario, connections, raw output file,
                 extra (pgbench: its --log directory), then CPU clock ticks of the server and of
                 Postgres and the load generator's CPU seconds during the run
With several rounds, every figure shown is the median over the rounds, and each ratio is the
median of the per-round ratios (a sidecar run against the baseline runs next to it in time), with
its range; the JSON keeps every round.
  meta.env       key=value lines: machine, versions, settings, sidecar memory
Writes RESULTS_DIR/latest.json, RESULTS_DIR/<timestamp>.json, latest.txt (the printed tables) and
latest.md (the main table in Markdown, for docs/performance.md).
"""
import glob
import json
import math
import os
import re
import sys

SCENARIOS = [
    ("cache_get", "cache GET"),
    ("session_get", "session validate"),
    ("cache_put", "cache PUT"),
]
TOOLS = ("sidecar", "pgbench", "redis")


def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


# --- wrk ---------------------------------------------------------------------------------------

WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_latency_ms(text, pct):
    """Fallback: the --latency distribution line for pct ("50%", "99%"), in ms."""
    m = re.search(r"^\s*" + re.escape(pct) + r"\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    return float(m.group(1)) * WRK_UNITS[m.group(2)] if m else None


def parse_wrk(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    m = re.search(r"^BENCH (\{.*\})\s*$", text, re.M)
    if m:
        b = json.loads(m.group(1))
        duration_s = b["duration_us"] / 1e6
        requests = b["requests"]
        p50, p99 = b["p50_us"] / 1e3, b["p99_us"] / 1e3
        errors = b["err_connect"] + b["err_read"] + b["err_write"] + b["err_status"] + b["err_timeout"]
        non2xx = b["err_status"]
    else:
        # No done() line (e.g. a wrk without Lua done support): parse the text summary instead.
        rm = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", text, re.M)
        if not rm:
            return None
        requests = int(rm.group(1))
        duration_s = float(rm.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[rm.group(3)]
        p50, p99 = wrk_latency_ms(text, "50%"), wrk_latency_ms(text, "99%")
        nm = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        non2xx = int(nm.group(1)) if nm else 0
        sm = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
        errors = non2xx + (sum(int(x) for x in sm.groups()) if sm else 0)
    r = {
        "throughput_rps": requests / duration_s if duration_s else None,
        "p50_ms": p50,
        "p99_ms": p99,
        "requests": requests,
        "duration_s": round(duration_s, 3),
        "errors": errors,
        "non_2xx": non2xx,
    }
    return r


# --- pgbench -----------------------------------------------------------------------------------


def wrk_corrected(lat_us, runtime_us, connections):
    """pgbench's latencies with wrk's coordinated-omission correction (stats_correct in wrk.c).

    wrk reports percentiles after adding, for every latency of at least twice the expected
    interval between one connection's requests (runtime / (requests / connections)), the
    latencies the requests it held up would have seen: L - interval, L - 2 * interval, ...
    while above one interval. One 100 ms stall thus weighs in the sidecar's p99 as hundreds of
    slow requests, but as one in pgbench's raw log. The same correction on pgbench's latencies
    makes the two percentiles comparable. It is not small at 64 connections, where the interval
    is a couple of milliseconds: in the 08:10 run it raised pgbench's p50 by 7% to 20% and its
    p99 1.2 to 2.3 times, so pgbench percentiles from before this correction (runs before
    136de00) cannot be compared with later ones.
    """
    per_conn = len(lat_us) // connections if connections else 0
    if not per_conn or not runtime_us:
        return lat_us
    expected = int(runtime_us) // per_conn
    if expected <= 0:
        return lat_us
    out = list(lat_us)
    for v in lat_us:
        m = v - expected
        while v >= 2 * expected and m > expected:
            out.append(m)
            m -= expected
    out.sort()
    return out



def parse_pgbench(path, log_dir):
    text = open(path, encoding="utf-8", errors="replace").read()
    tps = re.search(r"^tps = ([\d.]+)", text, re.M)
    done = re.search(r"number of transactions actually processed: (\d+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    dur = re.search(r"^duration: (\d+) s", text, re.M)
    if not tps:
        return None
    # Per-transaction log (--log): "client_id transaction_no time script_no epoch epoch_us",
    # time = latency in microseconds; one file per worker thread (-j), merged here.
    lat = []
    failed_in_log = 0
    for f in sorted(glob.glob(os.path.join(log_dir, "*"))):
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                try:
                    lat.append(int(parts[2]))
                except ValueError:  # "failed", "skipped", ...
                    failed_in_log += 1
    lat.sort()
    clients = re.search(r"^number of clients: (\d+)", text, re.M)
    runtime_us = int(dur.group(1)) * 1e6 if dur else None
    corrected = wrk_corrected(lat, runtime_us, int(clients.group(1)) if clients else 0)
    p50, p99 = percentile(corrected, 50), percentile(corrected, 99)
    raw50, raw99 = percentile(lat, 50), percentile(lat, 99)
    return {
        "throughput_rps": float(tps.group(1)),
        "p50_ms": p50 / 1e3 if p50 is not None else None,
        "p99_ms": p99 / 1e3 if p99 is not None else None,
        # As logged, without wrk's correction.
        "p50_raw_ms": raw50 / 1e3 if raw50 is not None else None,
        "p99_raw_ms": raw99 / 1e3 if raw99 is not None else None,
        "max_ms": lat[-1] / 1e3 if lat else None,
        "requests": int(done.group(1)) if done else len(lat),
        "duration_s": int(dur.group(1)) if dur else None,
        "errors": (int(failed.group(1)) if failed else 0) + failed_in_log,
        "latency_samples": len(lat),
    }


# --- redis-benchmark ---------------------------------------------------------------------------


def parse_redis(path):
    lines = [l for l in open(path, encoding="utf-8", errors="replace").read().splitlines() if l.startswith('"')]
    header, row = None, None
    for l in lines:
        cells = [c.strip('"') for c in l.split('","')]
        if cells[0] == "test":
            header = cells
        elif header:
            row = dict(zip(header, cells))
    if not row:
        return None

    def num(k):
        try:
            return float(row[k])
        except (KeyError, ValueError):
            return None  # older redis-benchmark: no percentiles in the CSV

    rps = num("rps")
    n = re.search(r"-n (\d+)", open(path, encoding="utf-8", errors="replace").read())
    return {
        "throughput_rps": rps,
        "p50_ms": num("p50_latency_ms"),
        "p99_ms": num("p99_latency_ms"),
        "requests": int(n.group(1)) if n else None,
        "duration_s": round(int(n.group(1)) / rps, 3) if n and rps else None,
        "errors": 0,  # redis-benchmark stops on errors rather than counting them
    }


# --- assembling ----------------------------------------------------------------------------------


def read_meta(path):
    meta = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if "=" in line:
            k, v = line.split("=", 1)
            meta[k] = v
    return meta


def ratio(a, b):
    return a / b if a is not None and b else None


def median(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


# Figures that are summarized as the median over the rounds.
MEDIAN_KEYS = ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_us_per_request",
               "postgres_cpu_us_per_request", "client_cpu_us_per_request",
               "p50_raw_ms", "p99_raw_ms", "max_ms")


def summarize(rounds):
    """One tool's runs of one scenario: the median of each figure, the counts summed, every round kept."""
    if not rounds:
        return None
    s = {k: median(r.get(k) for r in rounds) for k in MEDIAN_KEYS}
    s["requests"] = sum(r.get("requests") or 0 for r in rounds)
    s["errors"] = sum(r.get("errors") or 0 for r in rounds)
    if all("server_cpu_seconds" in r for r in rounds):
        s["server_cpu_seconds"] = sum(r["server_cpu_seconds"] for r in rounds)
    s["rounds"] = rounds
    return s


def round_ratios(a, b, key):
    """Per-round a/b of one figure, for the rounds both tools completed, in round order."""
    if not a or not b:
        return []
    bs = {r["round"]: r.get(key) for r in b["rounds"]}
    return [x for x in (ratio(r.get(key), bs.get(r["round"])) for r in a["rounds"]) if x is not None]


def fmt_range(values):
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else ""


def fmt(v, spec, width):
    return (format(v, spec) if v is not None else "n/a").rjust(width)


def fmt_rps(v, width=8):
    return fmt(round(v) if v is not None else None, ",d", width)


def fmt_ratio(v, width=6):
    return ((f"{v:.2f}x") if v is not None else "n/a").rjust(width)


def markdown(record):
    """The main table as Markdown, for the bench-table block of docs/performance.md."""

    def trio(r):
        if not r:
            return "n/a"
        return (f"{fmt_rps(r.get('throughput_rps'), 0)} req/s, p50 {fmt(r.get('p50_ms'), '.2f', 0)}"
                f" / p99 {fmt(r.get('p99_ms'), '.2f', 0)} ms")

    def with_range(median_ratio, per_round):
        r = fmt_range(per_round)
        return fmt_ratio(median_ratio, 0) + (f" ({r})" if r else "")

    m = record["machine"]
    rounds = record.get("rounds", 1)
    lines = [
        f"{record['timestamp']}, {rounds} rounds of {record['seconds_per_run']} s runs"
        f"{' (medians; ratio ranges over the rounds in brackets)' if rounds > 1 else ''}, {m['nproc']} CPUs ({m['cpu_model']}),"
        f" PostgreSQL {record['versions']['postgres']}, {record['versions']['redis']}, sidecar {record['versions']['sidecar_commit']}"
        + (f" (batch: {record['sidecar']['batch_settings']})" if record["sidecar"].get("batch_settings") else ""),
        "",
        "| scenario | conn | sidecar | pgbench (direct SQL) | Redis | sidecar/pgbench req/s | sidecar/Redis req/s |",
        "|---|---:|---|---|---|---:|---:|",
    ]
    for e in record["scenarios"]:
        ra = e["ratios"]
        lines.append(
            f"| {e['label']} | {e['connections']} | {trio(e['sidecar'])} | {trio(e['pgbench'])} | {trio(e['redis'])}"
            f" | {with_range(ra['sidecar_over_pgbench_throughput'], e['ratio_rounds']['sidecar_over_pgbench_throughput'])}"
            f" | {with_range(ra['sidecar_over_redis_throughput'], e['ratio_rounds']['sidecar_over_redis_throughput'])} |"
        )
    floor = [(e["label"], e["connections"], (e.get("http_floor") or {}).get("server_cpu_us_per_request"),
              (e["sidecar"] or {}).get("server_cpu_us_per_request")) for e in record["scenarios"]]
    floor = [f for f in floor if f[2] is not None and f[3] is not None]
    if floor:
        lines += ["", "CPU µs per request, sidecar against the HTTP floor (its HTTP layer alone, no database,"
                  " `bench/http_floor.rs`): " + "; ".join(f"{l} @{c} {s:.1f} / {f:.1f}" for l, c, f, s in floor) + "."]
    peak = record["sidecar"]["peak_rss_kib"]
    lines += ["", f"Sidecar peak RSS {peak / 1024:.1f} MiB." if peak else ""]
    if rounds > 1:
        lines[-1] += (" A ratio is the median of the per-round ratios (each sidecar run against the"
                      " baseline runs next to it), so it can differ from the quotient of the medians shown.")
    return "\n".join(lines).rstrip()


def floor_table(rows):
    """The HTTP floor's throughput, latency and CPU per request, beside the sidecar's CPU."""
    out = ["HTTP floor (the sidecar's HTTP layer alone: its accept and serving loops, threads and allocator,"
           " fixed answers, no database, log, metrics or guard; bench/http_floor.rs):"]
    h = (f"{'scenario':<17}{'conn':>4} | {'floor req/s':>11}  {'p50 ms':>9} {'p99 ms':>9} {'CPU µs/r':>9} |"
         f" {'sidecar CPU µs/r':>16} {'above floor':>11}")
    out += [h, "-" * len(h)]
    for e in rows:
        fl, sc = e["http_floor"] or {}, e["sidecar"] or {}
        f_cpu, s_cpu = fl.get("server_cpu_us_per_request"), sc.get("server_cpu_us_per_request")
        flag = "!" if fl.get("errors") else " "
        out.append(
            f"{e['label']:<17}{e['connections']:>4} | {fmt_rps(fl.get('throughput_rps'), 11)}{flag}"
            f" {fmt(fl.get('p50_ms'), '.3f', 9)} {fmt(fl.get('p99_ms'), '.3f', 9)} {fmt(f_cpu, '.1f', 9)} |"
            f" {fmt(s_cpu, '.1f', 16)} {fmt(s_cpu - f_cpu if s_cpu is not None and f_cpu is not None else None, '+.1f', 11)}"
        )
    out.append("")
    return out


def main():
    work, results_dir = sys.argv[1], sys.argv[2]
    meta = read_meta(os.path.join(work, "meta.env"))
    clk_tck = int(meta.get("clk_tck", "100"))
    rounds_by_run = {}
    for line in open(os.path.join(work, "manifest.tsv"), encoding="utf-8"):
        rnd, tool, scen, conns, raw, extra, server_ticks, pg_ticks, client_s = line.rstrip("\n").split("\t")
        conns = int(conns)
        if tool in ("sidecar", "floor"):
            r = parse_wrk(raw)
        elif tool == "pgbench":
            r = parse_pgbench(raw, extra)
        else:
            r = parse_redis(raw)
        if r is None:
            print(f"report: could not parse {raw}", file=sys.stderr)
        elif r.get("requests"):
            # CPU seconds used during the measured run, per request, in microseconds.
            per_req = lambda seconds: seconds / r["requests"] * 1e6
            if server_ticks != "-":
                r["server_cpu_seconds"] = int(server_ticks) / clk_tck
                r["server_cpu_us_per_request"] = per_req(r["server_cpu_seconds"])
            if tool in ("sidecar", "pgbench"):
                r["postgres_cpu_us_per_request"] = per_req(int(pg_ticks) / clk_tck)
            r["client_cpu_us_per_request"] = per_req(float(client_s))
        if r is not None:
            r["round"] = int(rnd)
            rounds_by_run.setdefault((scen, conns, tool), []).append(r)
    runs = {k: summarize(v) for k, v in rounds_by_run.items()}

    conn_list = sorted({k[1] for k in runs})
    rows = []
    for conns in conn_list:
        for scen, label in SCENARIOS:
            entry = {"scenario": scen, "label": label, "connections": conns}
            for tool in TOOLS:
                entry[tool] = runs.get((scen, conns, tool))
            # The sidecar's HTTP layer alone (bench/http_floor.rs): a reference, not a baseline.
            entry["http_floor"] = runs.get((scen, conns, "floor"))
            sc, pg, rd = (entry[t] or {} for t in TOOLS)
            entry["ratios"] = {
                "sidecar_over_pgbench_throughput": ratio(sc.get("throughput_rps"), pg.get("throughput_rps")),
                "sidecar_over_pgbench_p50": ratio(sc.get("p50_ms"), pg.get("p50_ms")),
                "sidecar_over_pgbench_p99": ratio(sc.get("p99_ms"), pg.get("p99_ms")),
                "sidecar_over_redis_throughput": ratio(sc.get("throughput_rps"), rd.get("throughput_rps")),
                "sidecar_over_redis_p50": ratio(sc.get("p50_ms"), rd.get("p50_ms")),
                "sidecar_over_redis_p99": ratio(sc.get("p99_ms"), rd.get("p99_ms")),
            }
            # Throughput ratios round by round; the median of these is the one reported.
            entry["ratio_rounds"] = {
                "sidecar_over_pgbench_throughput": round_ratios(sc, pg, "throughput_rps"),
                "sidecar_over_redis_throughput": round_ratios(sc, rd, "throughput_rps"),
            }
            for k, per_round in entry["ratio_rounds"].items():
                if per_round:
                    entry["ratios"][k] = median(per_round)
            rows.append(entry)

    def get(scen, conns, tool, key):
        r = runs.get((scen, conns, tool))
        return r.get(key) if r else None

    # --- the table ---
    out = []
    seconds = meta.get("seconds", "?")
    rounds = int(meta.get("rounds", "1"))
    out.append(
        f"pgsidecar benchmark, {meta.get('timestamp', '')}: {rounds} round(s) of {seconds} s runs"
        + (" (BENCH_QUICK)" if meta.get("quick") == "1" else "")
        + f", {meta.get('rows', '100000')} rows, warm-up {meta.get('warmup', '?')} s"
    )
    out.append(
        f"machine: {meta.get('nproc')} CPUs ({meta.get('cpu_model')}), {meta.get('mem_total')}, "
        f"Linux {meta.get('kernel')}; load average before/after: {meta.get('loadavg_start')} / {meta.get('loadavg_end')}"
    )
    out.append(
        f"PostgreSQL {meta.get('pg_version')}, {meta.get('redis_version')}, {meta.get('wrk_version')}, "
        f"sidecar {meta.get('git_commit')}"
        + (f" (batch: {meta['sidecar_batch']})" if meta.get("sidecar_batch") else "")
    )
    out.append("")
    head1 = (
        f"{'scenario':<17}{'conn':>4} | {'sidecar':^30} | {'pgbench (direct SQL)':^30} | {'redis-benchmark':^30} |"
        f" {'sidecar/pgbench':^25} | {'sidecar/redis':^15}"
    )
    sub = f"{'req/s':>10} {'p50 ms':>9} {'p99 ms':>9}"
    head2 = (
        f"{'':<17}{'':>4} | {sub} | {sub} | {sub} | {'req/s':>7} {'range':>9} {'p50':>7} | {'req/s':>7} {'p50':>7}"
    )
    out += [head1, head2, "-" * len(head2)]

    def cells(r):
        if not r:
            return f"{'n/a':>10} {'n/a':>9} {'n/a':>9}"
        flag = "!" if r.get("errors") else " "
        return f"{fmt_rps(r.get('throughput_rps'), 9)}{flag} {fmt(r.get('p50_ms'), '.3f', 9)} {fmt(r.get('p99_ms'), '.3f', 9)}"

    for e in rows:
        ra = e["ratios"]
        out.append(
            f"{e['label']:<17}{e['connections']:>4} | {cells(e['sidecar'])} | {cells(e['pgbench'])} | {cells(e['redis'])} |"
            f" {fmt_ratio(ra['sidecar_over_pgbench_throughput'], 7)} {fmt_range(e['ratio_rounds']['sidecar_over_pgbench_throughput']):>9}"
            f" {fmt_ratio(ra['sidecar_over_pgbench_p50'], 7)} |"
            f" {fmt_ratio(ra['sidecar_over_redis_throughput'], 7)} {fmt_ratio(ra['sidecar_over_redis_p50'], 7)}"
        )
    out.append("")

    # Where the CPU went, per request: each server and each load generator, measured around the
    # same runs. "sidecar+pg" against "pg (pgbench)" is the server-side cost of the two paths.
    out.append("CPU µs per request (utime+stime during each measured run / requests; all share the same CPUs):")
    h = (f"{'scenario':<17}{'conn':>4} | {'sidecar':>8} {'postgres':>8} {'sc+pg':>8} {'wrk':>8} |"
         f" {'postgres':>8} {'pgbench':>8} | {'redis':>8} {'r-bench':>8} | {'floor':>8} {'f-wrk':>8}")
    out += [h, "-" * len(h)]
    for e in rows:
        sc, pg, rd = (e[t] or {} for t in TOOLS)
        fl = e["http_floor"] or {}
        both = (sc["server_cpu_us_per_request"] + sc["postgres_cpu_us_per_request"]
                if sc.get("server_cpu_us_per_request") is not None and sc.get("postgres_cpu_us_per_request") is not None else None)
        out.append(
            f"{e['label']:<17}{e['connections']:>4} | {fmt(sc.get('server_cpu_us_per_request'), '.1f', 8)}"
            f" {fmt(sc.get('postgres_cpu_us_per_request'), '.1f', 8)} {fmt(both, '.1f', 8)}"
            f" {fmt(sc.get('client_cpu_us_per_request'), '.1f', 8)} | {fmt(pg.get('postgres_cpu_us_per_request'), '.1f', 8)}"
            f" {fmt(pg.get('client_cpu_us_per_request'), '.1f', 8)} | {fmt(rd.get('server_cpu_us_per_request'), '.1f', 8)}"
            f" {fmt(rd.get('client_cpu_us_per_request'), '.1f', 8)}"
            f" | {fmt(fl.get('server_cpu_us_per_request'), '.1f', 8)} {fmt(fl.get('client_cpu_us_per_request'), '.1f', 8)}"
        )
    out.append("")

    # The HTTP floor's own figures, beside the sidecar's (older work directories have none).
    if any(e["http_floor"] for e in rows):
        out += floor_table(rows)

    peak_kib = int(meta["sidecar_peak_rss_kib"]) if meta.get("sidecar_peak_rss_kib", "").isdigit() else None
    peak_mib = peak_kib / 1024 if peak_kib is not None else None
    cpu_runs = [(e["label"], e["connections"], e["sidecar"]["server_cpu_us_per_request"]) for e in rows
                if e["sidecar"] and e["sidecar"].get("server_cpu_us_per_request") is not None]
    total_cpu = sum(e["sidecar"].get("server_cpu_seconds", 0) for e in rows if e["sidecar"])
    total_req = sum(e["sidecar"]["requests"] for e in rows if e["sidecar"] and "server_cpu_seconds" in e["sidecar"])
    overall_cpu = total_cpu / total_req * 1e6 if total_req else None
    worst_cpu = max(cpu_runs, key=lambda t: t[2]) if cpu_runs else None
    errors = [(e["label"], e["connections"], t, e[t]["errors"]) for e in rows for t in TOOLS + ("http_floor",)
              if e[t] and e[t].get("errors")]

    notes = [
        f"{rounds} round(s): each figure is the median over the rounds; a ratio is the median of the per-round ratios,"
        " range = lowest-highest per-round ratio.",
        "req/s: completed requests (or transactions) per second; p50/p99: per-request latency seen by the client.",
        "ratios: sidecar value divided by the baseline's (req/s above 1 = sidecar faster; p50 below 1 = sidecar faster).",
        "sidecar: wrk over HTTP/1.1 keep-alive; CPU µs/r = sidecar process utime+stime during the run / requests."
        " Postgres CPU counts every Postgres process (also background ones) during the run.",
        "pgbench: -M prepared, one statement per transaction, -n; p50/p99 from its per-transaction --log, with"
        " wrk's coordinated-omission correction applied (as wrk applies it to the sidecar's and the floor's): a"
        " stall then weighs the same in both; the JSON keeps the uncorrected figures (p50_raw_ms, p99_raw_ms).",
        "pgbench session validate derives each token and its SHA-256 in SQL (no helper-table join): about 0.2 µs"
        " of extra server CPU per query on the baseline's side.",
        "redis-benchmark: -P 1 -r 100000 -d 1024, all GETs are hits; there is no Redis session scenario.",
        "HTTP floor: the same wrk runs against the sidecar's HTTP layer alone (bench/http_floor.rs: its accept and"
        " serving loops, threads and allocator, answers of the same size, but no database, log, metrics or guard):"
        " the CPU HTTP takes by itself here. The sidecar's CPU above it is, roughly, what its own work costs (the"
        " floor answers about twice as many requests per second, which spreads its wake-ups further).",
        "all three share this machine's CPUs with their load generator; Postgres runs with fsync and synchronous_commit on.",
        f"sidecar peak RSS (VmHWM over the whole run): {fmt(peak_mib, '.1f', 0)} MiB; log written: "
        f"{int(meta.get('sidecar_log_bytes', '0')) / 1e6:.1f} MB (default log level info: one access-log line per request).",
    ]
    if errors:
        notes.append("runs with errors (marked !): " + ", ".join(f"{l} @{c} {t}: {n}" for l, c, t, n in errors))
    if meta.get("redis_keyspace_misses", "0") not in ("0", ""):
        notes.append(f"redis GET misses: {meta['redis_keyspace_misses']} (expected 0)")
    out.append("notes:")
    out += ["  - " + n for n in notes]
    out.append("")

    # --- the issue's targets ---
    targets = []

    def target(name, goal, measured_text, met, stretch=False):
        targets.append({"target": name, "goal": goal, "measured": measured_text,
                        "met": met, "stretch": stretch})

    for scen, label, need in (("cache_get", "cache GET", 1.3), ("session_get", "session validation", 1.3),
                              ("cache_put", "cache PUT", 1.5)):
        e = next((e for e in rows if e["scenario"] == scen and e["connections"] == 64), None)
        r = e["ratios"]["sidecar_over_pgbench_throughput"] if e else None
        per_round = e["ratio_rounds"]["sidecar_over_pgbench_throughput"] if e else []
        shown = fmt_ratio(r, 0) + (" (rounds: " + ", ".join(f"{x:.2f}x" for x in per_round) + ")" if len(per_round) > 1 else "")
        target(f"{label} @64 throughput vs pgbench", f">= {need:.1f}x", shown, None if r is None else r >= need)
    sp, pp = get("cache_get", 1, "sidecar", "p50_ms"), get("cache_get", 1, "pgbench", "p50_ms")
    target("cache GET @1 p50 vs pgbench p50 + 0.06 ms", "<= pgbench + 0.060 ms",
           f"{sp:.3f} ms vs {pp + 0.06:.3f} ms (pgbench {pp:.3f})" if sp is not None and pp is not None else "n/a",
           None if sp is None or pp is None else sp <= pp + 0.06)
    target("sidecar peak RSS", "<= 30 MiB", f"{peak_mib:.1f} MiB" if peak_mib is not None else "n/a",
           None if peak_mib is None else peak_mib <= 30)
    # Judged on the worst scenario; the worst at each connection count is shown too, since at 1
    # connection the per-request wake-ups dominate and at 64 batching spreads them.
    def worst_by_conns(runs):
        """"@1: 80.8 (cache PUT); @64: ...": the worst (label, conns, value) at each count."""
        worst = {}
        for label, conns, v in runs:
            if conns not in worst or v > worst[conns][1]:
                worst[conns] = (label, v)
        return "; ".join(f"@{c}: {v:.1f} ({l})" for c, (l, v) in sorted(worst.items()))

    detail = worst_by_conns(cpu_runs)
    floor_runs = [(e["label"], e["connections"], e["http_floor"]["server_cpu_us_per_request"]) for e in rows
                  if e["http_floor"] and e["http_floor"].get("server_cpu_us_per_request") is not None]
    if floor_runs:
        detail += "; HTTP floor worst " + worst_by_conns(floor_runs)
    target("sidecar CPU per request (worst scenario)", "<= 15 µs",
           f"{worst_cpu[2]:.1f} µs; worst {detail}; all runs {overall_cpu:.1f}" if worst_cpu else "n/a",
           None if worst_cpu is None else worst_cpu[2] <= 15)
    e = next((e for e in rows if e["scenario"] == "cache_get" and e["connections"] == 64), None)
    r = e["ratios"]["sidecar_over_redis_throughput"] if e else None
    target("stretch: cache GET @64 throughput vs Redis GET", ">= 1.00x", fmt_ratio(r, 0), None if r is None else r >= 1.0, True)

    out.append("targets (from the issue; a benchmark reports, it does not fail):")
    w = max(len(t["target"]) for t in targets)
    for t in targets:
        status = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        out.append(f"  {t['target']:<{w}}  {t['goal']:<22}  {status:<12}  {t['measured']}")

    text = "\n".join(out)
    print(text)

    record = {
        "timestamp": meta.get("timestamp"),
        "quick": meta.get("quick") == "1",
        "seconds_per_run": int(seconds) if str(seconds).isdigit() else seconds,
        "rounds": rounds,
        "warmup_seconds": meta.get("warmup"),
        "rows": int(meta.get("rows", "100000")),
        "machine": {
            "nproc": int(meta["nproc"]) if meta.get("nproc", "").isdigit() else meta.get("nproc"),
            "cpu_model": meta.get("cpu_model"),
            "mem_total": meta.get("mem_total"),
            "kernel": meta.get("kernel"),
            "loadavg_start": meta.get("loadavg_start"),
            "loadavg_end": meta.get("loadavg_end"),
        },
        "versions": {
            "postgres": meta.get("pg_version"),
            "postgres_full": meta.get("pg_version_full"),
            "redis": meta.get("redis_version"),
            "wrk": meta.get("wrk_version"),
            "pgbench": meta.get("pgbench_version"),
            "sidecar_commit": meta.get("git_commit"),
            "sidecar_binary_sha256": meta.get("sidecar_sha256"),
        },
        "postgres_settings": meta.get("pg_settings"),
        "sidecar": {
            "peak_rss_kib": peak_kib,
            "rss_at_end_kib": int(meta["sidecar_rss_end_kib"]) if meta.get("sidecar_rss_end_kib", "").isdigit() else None,
            "cpu_us_per_request_all_runs": overall_cpu,
            "log_bytes": int(meta.get("sidecar_log_bytes", "0")),
            "batch_settings": meta.get("sidecar_batch") or None,
        },
        "scenarios": rows,
        "targets": targets,
        "notes": notes,
    }
    os.makedirs(results_dir, exist_ok=True)
    stamp = re.sub(r"[^0-9A-Za-z]", "", meta.get("timestamp", "unknown"))
    name = stamp + ("-quick" if record["quick"] else "") + ".json"
    for path in (os.path.join(results_dir, name), os.path.join(results_dir, "latest.json")):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, ensure_ascii=False)
            f.write("\n")
    with open(os.path.join(results_dir, "latest.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(results_dir, "latest.md"), "w", encoding="utf-8") as f:
        f.write(markdown(record) + "\n")
    print(f"\nwritten: {os.path.join(results_dir, name)} and latest.json, latest.txt, latest.md", file=sys.stderr)


if __name__ == "__main__":
    main()
