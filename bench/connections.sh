#!/usr/bin/env bash
# How many PostgreSQL connections one sidecar needs: throughput and latency of cache GET, session
# validation and cache PUT at 64 client connections, for database.max_connections 2, 4, 8 and 20,
# directly and through PgBouncer in transaction mode (database.pooler = "transaction").
#
#   bench/connections.sh                   2 rounds of 5 s runs (about 6 minutes plus the build)
#   BENCH_QUICK=1 bench/connections.sh     1 round of 2 s runs: a smoke test of the script
#
# Environment: BENCH_ROUNDS (2; quick 1), BENCH_SECONDS (5; quick 2), BENCH_WARMUP_SECONDS (1),
# BENCH_CLIENTS (64), BENCH_SIZES ("2 4 8 20"), BENCH_POOLER_SIZES ("4 20": sizes also measured
# through PgBouncer; empty to skip), BENCH_MIN_CONNECTIONS (database.min_connections for each run;
# default: the configured default, capped at the size).
#
# Same data and load generator as bench/run.sh (bench/seed.sql, bench/wrk/*.lua): 100,000 cache
# entries of ~1 KiB and 100,000 sessions; uniform random keys; wrk -t2. Everything else is the
# shipped default configuration (so 20 connections run on two data threads, fewer on one; see
# server.worker_threads). Rounds interleave the settings, so drift on a shared machine spreads
# over all of them; the report gives the median over the rounds.
# Writes bench/results/connections-<timestamp>.json and connections-latest.{json,md}.
# Installs wrk, pgbouncer and PostgreSQL from Debian packages when missing and we are root.
# Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then ROUNDS=${BENCH_ROUNDS:-1}; DURATION=${BENCH_SECONDS:-2}
else ROUNDS=${BENCH_ROUNDS:-2}; DURATION=${BENCH_SECONDS:-5}; fi
WARMUP=${BENCH_WARMUP_SECONDS:-1}
CLIENTS=${BENCH_CLIENTS:-64}
SIZES=${BENCH_SIZES:-"2 4 8 20"}
POOLER_SIZES=${BENCH_POOLER_SIZES-"4 20"}
ROWS=100000

WORK=bench/work/connections
RESULTS=bench/results
PG_DIR=$WORK/pg
mkdir -p "$WORK" "$RESULTS"

log() { printf '[connections %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" != Z ]; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

SIDECAR_PID=""
BOUNCER_PID=""
BDIR=""
PG_STARTED=""
stop_sidecar() {
  if [ -n "$SIDECAR_PID" ] && alive "$SIDECAR_PID"; then
    kill -TERM "$SIDECAR_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do alive "$SIDECAR_PID" || break; sleep 0.1; done
    kill -KILL "$SIDECAR_PID" 2>/dev/null || true
  fi
  [ -n "$SIDECAR_PID" ] && wait "$SIDECAR_PID" 2>/dev/null || true
  SIDECAR_PID=""
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_sidecar
  if [ -n "$BOUNCER_PID" ]; then kill -TERM "$BOUNCER_PID" 2>/dev/null || true; wait "$BOUNCER_PID" 2>/dev/null || true; fi
  [ -n "$BDIR" ] && rm -rf "$BDIR"
  [ -n "$PG_STARTED" ] && scripts/pg.sh stop "$PG_DIR" || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

apt_install() {
  [ "$(id -u)" -eq 0 ] || die "missing $*; install the Debian package(s) (or run as root)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "$@" >&2
}
command -v wrk >/dev/null || apt_install wrk
command -v curl >/dev/null || apt_install curl
[ -z "$POOLER_SIZES" ] || [ -x /usr/sbin/pgbouncer ] || apt_install pgbouncer
PG_BIN=$(scripts/pg.sh bin)
PSQL=$PG_BIN/psql
[ -x "$PSQL" ] || PSQL=$(command -v psql)

log "building the sidecar (cargo build --release)"
GIT_COMMIT=$(git describe --always --dirty 2>/dev/null || echo unknown)
cargo build --release --bin pgsidecar >&2
cp target/release/pgsidecar "$WORK/pgsidecar.new" && mv -f "$WORK/pgsidecar.new" "$WORK/pgsidecar"

scripts/pg.sh stop "$PG_DIR" || true
rm -rf "$PG_DIR" "$PG_DIR.initdb.log"
PG_PORT=$(free_port)
log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
PG_STARTED=1
scripts/pg.sh start "$PG_DIR" "$PG_PORT" -c shared_buffers=256MB -c max_connections=200
DIRECT=postgres://postgres@127.0.0.1:$PG_PORT/postgres

if [ -n "$POOLER_SIZES" ]; then
  BOUNCER_PORT=$(free_port)
  BDIR=$(mktemp -d /tmp/pgsidecar-bench-pgbouncer.XXXXXX)
  chmod 755 "$BDIR"
  echo '"postgres" ""' >"$BDIR/userlist.txt"
  cat >"$BDIR/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $BDIR/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 1000
log_connections = 0
log_disconnections = 0
EOF
  chmod 644 "$BDIR"/*
  log "starting PgBouncer (transaction mode, pool 20) on 127.0.0.1:$BOUNCER_PORT"
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- /usr/sbin/pgbouncer "$BDIR/pgbouncer.ini" >"$WORK/pgbouncer.log" 2>&1 &
  else
    /usr/sbin/pgbouncer "$BDIR/pgbouncer.ini" >"$WORK/pgbouncer.log" 2>&1 &
  fi
  BOUNCER_PID=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$BOUNCER_PORT") 2>/dev/null && break; sleep 0.1; done
  POOLED=postgres://postgres@127.0.0.1:$BOUNCER_PORT/postgres
fi

for v in $(compgen -e | grep -E '^(PGSIDECAR_|RUST_LOG$)' || true); do unset "$v"; done
DATA_PORT=$(free_port)
OPS_PORT=$(free_port)

# start_sidecar MODE SIZE: the shipped defaults but the listeners, the URL and the pool size.
start_sidecar() {
  local mode=$1 size=$2 url=$DIRECT min
  local -a env=(PGSIDECAR_SERVER__DATA_LISTEN=127.0.0.1:$DATA_PORT PGSIDECAR_SERVER__OPS_LISTEN=127.0.0.1:$OPS_PORT
    PGSIDECAR_DATABASE__MAX_CONNECTIONS=$size)
  if [ -n "${BENCH_MIN_CONNECTIONS:-}" ]; then min=$BENCH_MIN_CONNECTIONS; else
    min=$("$WORK/pgsidecar" check-config | python3 -c 'import json,sys; print(json.load(sys.stdin)["database"]["min_connections"])'); fi
  [ "$min" -le "$size" ] || min=$size
  env+=(PGSIDECAR_DATABASE__MIN_CONNECTIONS=$min)
  if [ "$mode" = pgbouncer ]; then
    url=$POOLED
    env+=(PGSIDECAR_DATABASE__POOLER=transaction PGSIDECAR_DATABASE__MIGRATE_URL=$DIRECT)
  fi
  env "${env[@]}" DATABASE_URL="$url" "$WORK/pgsidecar" >"$WORK/sidecar-$mode-$size.log" 2>&1 &
  SIDECAR_PID=$!
  for i in $(seq 1 300); do
    alive "$SIDECAR_PID" || { tail -n 5 "$WORK/sidecar-$mode-$size.log" >&2; die "the sidecar exited"; }
    # Ready, and its start line written (logs reach the file up to 100 ms late).
    curl -fsS -o /dev/null "http://127.0.0.1:$OPS_PORT/ready" 2>/dev/null \
      && grep -q '"data_threads"' "$WORK/sidecar-$mode-$size.log" && return 0
    sleep 0.1
  done
  die "the sidecar was not ready after 30 s"
}

log "seeding $ROWS cache entries and $ROWS sessions"
start_sidecar direct 4
"$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -X -q -v ON_ERROR_STOP=1 -f bench/seed.sql >/dev/null
"$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -X -q -At \
  -c "SELECT public.bench_token(n) FROM generate_series(1, $ROWS) AS n ORDER BY n" >"$WORK/tokens.txt"
stop_sidecar

SETTINGS=()
for n in $SIZES; do SETTINGS+=("direct:$n"); done
for n in $POOLER_SIZES; do SETTINGS+=("pgbouncer:$n"); done
OUT=$WORK/runs.tsv
: >"$OUT"
for round in $(seq 1 "$ROUNDS"); do
  for setting in "${SETTINGS[@]}"; do
    mode=${setting%%:*}
    size=${setting##*:}
    start_sidecar "$mode" "$size"
    threads=$(grep -o '"data_threads":[0-9]*' "$WORK/sidecar-$mode-$size.log" | head -n 1 | cut -d: -f2)
    for scen in cache_get session_get cache_put; do
      log "round $round  $mode  max_connections=$size  $scen  @$CLIENTS"
      wrk -t2 -c"$CLIENTS" -d"${WARMUP}s" -s "bench/wrk/$scen.lua" "http://127.0.0.1:$DATA_PORT" -- "$WORK/tokens.txt" >/dev/null
      line=$(wrk -t2 -c"$CLIENTS" -d"${DURATION}s" -s "bench/wrk/$scen.lua" "http://127.0.0.1:$DATA_PORT" -- "$WORK/tokens.txt" | grep '^BENCH ' | cut -c7-)
      # Connections the sidecar holds right after the run (idle ones close only after
      # database.idle_timeout_seconds): how many the load made it open.
      open=$(curl -fsS "http://127.0.0.1:$OPS_PORT/metrics" | awk '/^pgsidecar_db_pool_connections\{/ {s += $2} END {print s + 0}')
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$size" "$threads" "$scen" "$open" "$line" >>"$OUT"
    done
    stop_sidecar
  done
done

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
python3 - "$OUT" "$RESULTS" "$STAMP" "$GIT_COMMIT" "$DURATION" "$ROUNDS" "$CLIENTS" <<'PY'
import json, statistics, sys
out, results, stamp, commit, duration, rounds, clients = sys.argv[1:]
runs = []
for line in open(out):
    rnd, mode, size, threads, scen, opened, js = line.rstrip("\n").split("\t", 6)
    b = json.loads(js)
    errors = sum(b[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    runs.append({"round": int(rnd), "mode": mode, "max_connections": int(size),
                 "data_threads": int(threads or 0), "scenario": scen, "connections_open": int(float(opened)),
                 "req_per_s": b["requests"] / (b["duration_us"] / 1e6),
                 "p50_ms": b["p50_us"] / 1000, "p99_ms": b["p99_us"] / 1000, "errors": errors})
with open("/proc/loadavg") as f:
    load = f.read().split()[:3]
meta = {"timestamp": stamp, "git_commit": commit, "seconds": int(duration), "rounds": int(rounds),
        "clients": int(clients), "loadavg_end": load}
doc = {"meta": meta, "runs": runs}
for name in (f"connections-{stamp}.json", "connections-latest.json"):
    with open(f"{results}/{name}", "w") as f:
        json.dump(doc, f, indent=1)
keys = sorted({(r["mode"], r["max_connections"], r["data_threads"]) for r in runs},
              key=lambda k: (k[0] != "direct", k[1]))
names = {"cache_get": "cache GET", "session_get": "session validate", "cache_put": "cache PUT"}
lines = [f"{stamp}, commit {commit}, {rounds} round(s) of {duration} s per run at {clients} client "
         f"connections (medians over the rounds; \"open\": most connections the sidecar held after a run), "
         f"load average at the end {' '.join(load)}", "",
         "| path | database.max_connections | data threads | " + " | ".join(names.values()) + " |",
         "|---|---:|---:|" + "---|" * len(names)]
for mode, size, threads in keys:
    cells = []
    for scen in names:
        rs = [r for r in runs if (r["mode"], r["max_connections"], r["scenario"]) == (mode, size, scen)]
        rps = statistics.median(r["req_per_s"] for r in rs)
        p50 = statistics.median(r["p50_ms"] for r in rs)
        p99 = statistics.median(r["p99_ms"] for r in rs)
        err = sum(r["errors"] for r in rs)
        held = max(r["connections_open"] for r in rs)
        cells.append(f"{rps:,.0f} req/s, p50 {p50:.2f} / p99 {p99:.2f} ms, {held} open" + (f", {err} errors" if err else ""))
    path = "direct" if mode == "direct" else "PgBouncer (transaction)"
    lines.append(f"| {path} | {size} | {threads} | " + " | ".join(cells) + " |")
text = "\n".join(lines) + "\n"
with open(f"{results}/connections-latest.md", "w") as f:
    f.write(text)
print(text)
PY
