#!/usr/bin/env bash
# pgsidecar benchmark: the sidecar over HTTP against the same SQL sent directly (pgbench) and
# against Redis, in one run, on one machine, on one local PostgreSQL with the same rows.
#
#   bench/run.sh                  3 rounds of 5 s runs: about 10 minutes, plus the release build
#   BENCH_QUICK=1 bench/run.sh    1 round of 2 s runs, 1 s warm-ups (about 1 minute): a smoke test
#
# Environment:
#   BENCH_ROUNDS=N           times the whole sequence below is repeated (default 3; quick 1)
#   BENCH_SECONDS=N          seconds per measured run (default 5, or 2 with BENCH_QUICK=1)
#   BENCH_WARMUP_SECONDS=N   seconds of the warm-up run before each measured one (default 2; quick 1)
#   BENCH_CONNECTIONS="1 64" client connections to measure at
#
# Scenarios, for each connection count, in this order (PUTs last: they rewrite rows, keeping
# them valid): sidecar GET, pgbench GET, redis GET, sidecar session, pgbench session,
# sidecar PUT, pgbench PUT, redis SET; then the HTTP floor's GET, session and PUT (the sidecar's
# HTTP layer alone, bench/http_floor.rs: what HTTP costs by itself on this machine). Load
# generators use 1 thread at 1 connection, 2 above.
# Why rounds: on a small shared machine one run's throughput can swing by a third from one
# minute to the next. Each sidecar run sits right next to its baselines, so their ratio within
# a round is fair; the report gives the median over the rounds and the range.
#
# Prints one table (req/s, p50, p99, ratios, the issue's targets) and writes it as JSON to
# bench/results/latest.json plus a timestamped copy. Scratch: bench/work/ (gitignored).
# Installs wrk, redis-server and PostgreSQL from Debian packages when missing and we are root.
# Everything started here is stopped on exit, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- settings ----------------------------------------------------------------------------------
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
  ROUNDS=${BENCH_ROUNDS:-1}
  DURATION=${BENCH_SECONDS:-2}
  WARMUP=${BENCH_WARMUP_SECONDS:-1}
else
  ROUNDS=${BENCH_ROUNDS:-3}
  DURATION=${BENCH_SECONDS:-5}
  WARMUP=${BENCH_WARMUP_SECONDS:-2}
fi
CONNECTIONS=${BENCH_CONNECTIONS:-"1 64"}
ROWS=100000 # also in bench/wrk/common.lua, bench/pgbench/*.sql and bench/seed.sql

WORK=bench/work
RESULTS=bench/results
PG_DIR=$WORK/pg
PG_PORT=54329
DATA_PORT=17070
OPS_PORT=17071
DATA_URL=http://127.0.0.1:$DATA_PORT
# psql and pgbench connect over TCP as the trust-authenticated superuser pg.sh's initdb made.
PG_CONN=(-h 127.0.0.1 -p "$PG_PORT" -U postgres)

# alive PID: running, and not a zombie waiting to be reaped.
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" != Z ]; }
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- cleanup: every process started here, whatever happens --------------------------------------
SIDECAR_PID=""
REDIS_PID=""
FLOOR_PID=""
PG_STARTED=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$SIDECAR_PID" ] && alive "$SIDECAR_PID"; then
    # SIGTERM: the sidecar drains (shutdown.drain_seconds, 5 s by default), then stops.
    kill -TERM "$SIDECAR_PID" 2>/dev/null || true
    for _ in $(seq 1 300); do alive "$SIDECAR_PID" || break; sleep 0.1; done
    kill -KILL "$SIDECAR_PID" 2>/dev/null || true
  fi
  [ -n "$SIDECAR_PID" ] && wait "$SIDECAR_PID" 2>/dev/null || true
  if [ -n "$REDIS_PID" ]; then
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
  fi
  if [ -n "$FLOOR_PID" ]; then
    kill -KILL "$FLOOR_PID" 2>/dev/null || true
    wait "$FLOOR_PID" 2>/dev/null || true
  fi
  if [ -n "$PG_STARTED" ]; then
    scripts/pg.sh stop "$PG_DIR" || true
  fi
  exit "$rc"
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap runs once.
trap 'exit 130' INT
trap 'exit 143' TERM

# --- tools ---------------------------------------------------------------------------------------
APT_UPDATED=""
apt_install() {
  [ "$(id -u)" -eq 0 ] || die "missing $*; install the Debian package(s) $* (or run as root to let this script do it)"
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "$APT_UPDATED" ]; then apt-get update -qq >&2; APT_UPDATED=1; fi
  log "installing $*"
  apt-get install -y -qq "$@" >&2
}
command -v wrk >/dev/null || apt_install wrk
command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || apt_install redis-server
command -v curl >/dev/null || apt_install curl
command -v python3 >/dev/null || apt_install python3
# pg.sh installs the server (and contrib, for pg_prewarm) when missing; pgbench and psql sit in
# the same bin directory on Debian.
PG_BIN=$(scripts/pg.sh bin)
[ -x "$PG_BIN/pgbench" ] || apt_install postgresql-contrib
PSQL=$PG_BIN/psql
PGBENCH=$PG_BIN/pgbench
[ -x "$PSQL" ] || PSQL=$(command -v psql)
[ -x "$PGBENCH" ] || PGBENCH=$(command -v pgbench) || die "pgbench not found"
command -v cargo >/dev/null || die "cargo not found (the sidecar is built from source)"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# wait_port PORT WHAT: up to 10 s for a server just started to listen on PORT.
wait_port() {
  local i
  for i in $(seq 1 100); do
    port_busy "$1" && return 0
    sleep 0.1
  done
  die "$2 did not start"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

mkdir -p "$WORK" "$RESULTS"

# --- build ---------------------------------------------------------------------------------------
log "building the sidecar and the HTTP floor (cargo build --release)"
# The commit is read now, with the build: the tree may change while the benchmark runs.
GIT_COMMIT=$(git describe --always --dirty 2>/dev/null || echo unknown)
cargo build --release --bins --example http_floor >&2
# Run private copies: a rebuild in the same tree during the run must not swap the binaries.
# (Copy, then rename: renaming over a binary that is still running works, writing into it not.)
cp target/release/pgsidecar "$WORK/pgsidecar.new"
mv -f "$WORK/pgsidecar.new" "$WORK/pgsidecar"
cp target/release/examples/http_floor "$WORK/http_floor.new"
mv -f "$WORK/http_floor.new" "$WORK/http_floor"

# --- PostgreSQL ----------------------------------------------------------------------------------
# A fresh cluster every run, so every run starts from the same table contents and layout. A
# cluster left running by an aborted run is stopped first.
scripts/pg.sh stop "$PG_DIR" || true
rm -rf "$PG_DIR" "$PG_DIR.initdb.log"
for p in "$PG_PORT" "$DATA_PORT" "$OPS_PORT"; do
  port_busy "$p" && die "port $p is in use (a previous run still going?)"
done
log "starting PostgreSQL in $PG_DIR on 127.0.0.1:$PG_PORT"
# Durability stays at the defaults (fsync and synchronous_commit on): the honest setting, and the
# one the sidecar is deployed with. 256MB of shared_buffers holds every table and index.
PG_OPTS=(-c shared_buffers=256MB -c max_connections=200)
PG_STARTED=1
scripts/pg.sh start "$PG_DIR" "$PG_PORT" "${PG_OPTS[@]}"

psql_q() { "$PSQL" "${PG_CONN[@]}" -d postgres -X -q -At -v ON_ERROR_STOP=1 "$@"; }

# --- the sidecar ---------------------------------------------------------------------------------
# The shipped default configuration, except where it listens and which database it uses: drop
# any PGSIDECAR_* / RUST_LOG from the caller's environment so nothing else changes it.
for v in $(compgen -e | grep -E '^(PGSIDECAR_|RUST_LOG$)' || true); do unset "$v"; done
log "starting the sidecar (data $DATA_URL, ops 127.0.0.1:$OPS_PORT, log $WORK/sidecar.log)"
PGSIDECAR_SERVER__DATA_LISTEN=127.0.0.1:$DATA_PORT \
PGSIDECAR_SERVER__OPS_LISTEN=127.0.0.1:$OPS_PORT \
DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres \
  "$WORK/pgsidecar" >"$WORK/sidecar.log" 2>&1 &
SIDECAR_PID=$!

# Ready means connected and migrated: the schema exists for the seed.
for i in $(seq 1 600); do
  alive "$SIDECAR_PID" || { tail -n 20 "$WORK/sidecar.log" >&2; die "the sidecar exited during start-up"; }
  curl -fsS -o /dev/null "http://127.0.0.1:$OPS_PORT/ready" 2>/dev/null && break
  [ "$i" -eq 600 ] && { tail -n 20 "$WORK/sidecar.log" >&2; die "the sidecar was not ready after 60 s"; }
  sleep 0.1
done

# --- data ----------------------------------------------------------------------------------------
log "seeding $ROWS cache entries and $ROWS sessions"
psql_q -f bench/seed.sql >/dev/null
# The session tokens for wrk, from the same function the seed hashed.
psql_q -c "SELECT public.bench_token(n) FROM generate_series(1, $ROWS) AS n ORDER BY n" >"$WORK/tokens.txt"
[ "$(wc -l <"$WORK/tokens.txt")" -eq "$ROWS" ] || die "expected $ROWS tokens in $WORK/tokens.txt"

# Sanity checks, so a broken setup is not measured as a fast one: the sidecar answers each
# scenario's request with success, and each pgbench script (with :k = 42) finds its row.
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
PAYLOAD=$(printf 'x%.0s' $(seq 1 998))
tok1=$(head -n 1 "$WORK/tokens.txt")
[ "$(code "$DATA_URL/v1/cache/k1")" = 200 ] || die "GET /v1/cache/k1 is not 200"
[ "$(code "$DATA_URL/v1/sessions/$tok1")" = 200 ] || die "GET /v1/sessions/<token 1> is not 200"
[ "$(code -X PUT -H 'Content-Type: application/json' --data-binary "{\"id\":1,\"payload\":\"$PAYLOAD\"}" \
  "$DATA_URL/v1/cache/k1?ttl_seconds=3600")" = 204 ] || die "PUT /v1/cache/k1 is not 204"
# pgbench sends :k and :payload as bound parameters; psql gets them as literals.
pgb_sql() { grep -v -e '^\\' -e '^--' "bench/pgbench/$1.sql" | sed -e 's/:k\b/42/g' -e "s/:payload\b/'$PAYLOAD'/g"; }
[ "$(pgb_sql cache_get | psql_q | wc -l)" -eq 1 ] || die "pgbench/cache_get.sql finds no row"
[ "$(pgb_sql session_get | psql_q | wc -l)" -eq 1 ] || die "pgbench/session_get.sql finds no row"
[ "$(pgb_sql cache_put | "$PSQL" "${PG_CONN[@]}" -d postgres -X -At -v ON_ERROR_STOP=1)" = "INSERT 0 1" ] \
  || die "pgbench/cache_put.sql did not upsert one row"

# --- Redis ---------------------------------------------------------------------------------------
REDIS_PORT=$(free_port)
log "starting redis-server on 127.0.0.1:$REDIS_PORT (no persistence)"
mkdir -p "$WORK/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK/redis" \
  >"$WORK/redis/redis.log" 2>&1 &
REDIS_PID=$!
wait_port "$REDIS_PORT" redis-server
[ "$(python3 bench/redis_seed.py "$REDIS_PORT" "$ROWS" 1024)" -eq "$ROWS" ] || die "redis seed failed"

# --- the HTTP floor ------------------------------------------------------------------------------
FLOOR_PORT=$(free_port)
FLOOR_URL=http://127.0.0.1:$FLOOR_PORT
log "starting the HTTP floor on 127.0.0.1:$FLOOR_PORT"
"$WORK/http_floor" "127.0.0.1:$FLOOR_PORT" >"$WORK/http_floor.log" 2>&1 &
FLOOR_PID=$!
wait_port "$FLOOR_PORT" "the HTTP floor"
[ "$(code "$FLOOR_URL/v1/cache/k1")" = 200 ] || die "the HTTP floor does not answer"

# --- measuring -----------------------------------------------------------------------------------
RAW=$WORK/raw
rm -rf "$RAW" "$WORK/pgblog"
mkdir -p "$RAW" "$WORK/pgblog"
MANIFEST=$WORK/manifest.tsv
: >"$MANIFEST"

threads_for() { if [ "$1" -le 1 ]; then echo 1; else echo 2; fi; }
sidecar_alive() { alive "$SIDECAR_PID" || die "the sidecar died (see $WORK/sidecar.log)"; }

# CPU accounting, in clock ticks (report.py divides by CLK_TCK). Fields of /proc/PID/stat are
# counted after the ") " that closes the command name (which could contain spaces): utime, stime,
# cutime, cstime are then the 12th to 15th.
# cpu_ticks PID: utime + stime of one process (all its threads).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
# pg_ticks: all of PostgreSQL: the postmaster, its live children (backends, background workers),
# and its exited children (reaped into the postmaster's cutime + cstime). Exited pgbench backends
# thus still count.
pg_ticks() {
  local pm
  pm=$(head -n 1 "$PG_DIR/postmaster.pid")
  { sed 's/.*) //' "/proc/$pm/stat" | awk '{print $12 + $13 + $14 + $15}'
    for c in $(pgrep -P "$pm"); do
      sed 's/.*) //' "/proc/$c/stat" 2>/dev/null | awk '{print $12 + $13}' || true # gone meanwhile
    done
  } | awk '{s += $1} END {print s}'
}

# pg_settle: after a pgbench run, wait until its backends have exited and been reaped (no zombie
# child left), so their CPU time sits in the postmaster's cutime before pg_ticks reads it again;
# otherwise it would be missed, or charged to the next run.
pg_settle() {
  local pm i c z
  pm=$(head -n 1 "$PG_DIR/postmaster.pid")
  sleep 0.3
  for i in $(seq 1 50); do
    z=0
    for c in $(pgrep -P "$pm"); do
      [ "$(sed 's/.*) //' "/proc/$c/stat" 2>/dev/null | cut -c1)" = Z ] && z=1
    done
    [ "$z" = 0 ] && return 0
    sleep 0.1
  done
}

# measured TOOL SCENARIO CONNS RAW SERVER_PID EXTRA CMD...: runs the measured command once, its
# output into RAW, and appends to the manifest: ROUND TOOL SCENARIO CONNS RAW EXTRA, then the CPU used
# meanwhile by the server process (SERVER_PID, or - for none), by all of Postgres, and by the load
# generator itself (user + system seconds, from bash's time). On 2 cores they all compete, so
# these tell where the machine's CPU went.
TIMEFORMAT='%3U %3S'
measured() {
  local tool=$1 scen=$2 conns=$3 raw=$4 spid=$5 extra=$6 s0=0 s1=0 p0 p1
  shift 6
  [ "$spid" = - ] || s0=$(cpu_ticks "$spid")
  p0=$(pg_ticks)
  echo "# $*" >"$raw"
  { time "$@" >>"$raw" 2>&1; } 2>"$raw.time"
  [ "$tool" = pgbench ] && pg_settle
  [ "$spid" = - ] || s1=$(cpu_ticks "$spid")
  p1=$(pg_ticks)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ROUND" "$tool" "$scen" "$conns" "$raw" "$extra" \
    "$([ "$spid" = - ] && echo - || echo $((s1 - s0)))" "$((p1 - p0))" "$(awk '{print $1 + $2}' "$raw.time")" >>"$MANIFEST"
}

# wrk_run TOOL URL SERVER_PID SCENARIO CONNS: wrk, a warm-up run and then the measured one.
wrk_run() {
  local tool=$1 url=$2 spid=$3 scen=$4 conns=$5 wrk
  wrk=(wrk -t"$(threads_for "$conns")" -c"$conns" --latency -s "bench/wrk/$scen.lua" "$url")
  log "$(printf '%-8s %s  @%s' "$tool" "$scen" "$conns")"
  "${wrk[@]}" -d"${WARMUP}s" -- "$WORK/tokens.txt" >/dev/null
  measured "$tool" "$scen" "$conns" "$RAW/${tool}_${scen}_c${conns}_r$ROUND.txt" "$spid" - \
    "${wrk[@]}" -d"${DURATION}s" -- "$WORK/tokens.txt"
}

# sidecar SCENARIO CONNS
sidecar() {
  sidecar_alive
  wrk_run sidecar "$DATA_URL" "$SIDECAR_PID" "$1" "$2"
  sidecar_alive
}

# floor SCENARIO CONNS: the same wrk runs against the HTTP floor.
floor() {
  alive "$FLOOR_PID" || die "the HTTP floor died (see $WORK/http_floor.log)"
  wrk_run floor "$FLOOR_URL" "$FLOOR_PID" "$1" "$2"
}

# pgbench SCENARIO CONNS: the same shape; the measured run logs every transaction's latency
# (one file per -j thread) for p50/p99, which pgbench's summary does not give.
pgbench_run() {
  local scen=$1 conns=$2 logdir pgb
  logdir=$WORK/pgblog/${scen}_c${conns}_r$ROUND
  mkdir -p "$logdir"
  pgb=("$PGBENCH" "${PG_CONN[@]}" -n -M prepared -c "$conns" -j "$(threads_for "$conns")"
    -f "bench/pgbench/$scen.sql" -D "payload=$PAYLOAD")
  log "pgbench  $scen  @$conns"
  "${pgb[@]}" -T "$WARMUP" postgres >/dev/null 2>&1
  pg_settle
  measured pgbench "$scen" "$conns" "$RAW/pgbench_${scen}_c${conns}_r$ROUND.txt" - "$logdir" \
    "${pgb[@]}" -T "$DURATION" --log --log-prefix="$logdir/log" postgres
}

# redis SCENARIO CONNS TEST: redis-benchmark has no duration option, so a short run measures the
# rate (and warms up), and the measured run asks for DURATION seconds' worth of requests.
redis_run() {
  local scen=$1 conns=$2 test=$3 t calib rps n rb
  t=$(threads_for "$conns")
  rb=(redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$conns" -P 1 -r "$ROWS" -d 1024 -t "$test" --csv)
  [ "$t" -gt 1 ] && rb+=(--threads "$t")
  log "redis    $test  @$conns"
  calib=$((conns == 1 ? 5000 : 50000))
  rps=$("${rb[@]}" -n "$calib" | awk -F'","' 'NR > 1 { print int($2) }' | tail -n 1)
  n=$((rps * DURATION))
  [ "$n" -ge 1000 ] || n=1000
  measured redis "$scen" "$conns" "$RAW/redis_${scen}_c${conns}_r$ROUND.txt" "$REDIS_PID" - "${rb[@]}" -n "$n"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ROUND in $(seq 1 "$ROUNDS"); do
  log "round $ROUND of $ROUNDS"
  for c in $CONNECTIONS; do
    sidecar cache_get "$c"
    pgbench_run cache_get "$c"
    redis_run cache_get "$c" get
    sidecar session_get "$c"
    pgbench_run session_get "$c"
    sidecar cache_put "$c"
    pgbench_run cache_put "$c"
    redis_run cache_put "$c" set
    floor cache_get "$c"
    floor session_get "$c"
    floor cache_put "$c"
  done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- machine, versions, sidecar memory ----------------------------------------------------------
# VmHWM is the peak resident set since the sidecar started, so it covers every run.
peak=$(awk '/^VmHWM:/ {print $2}' "/proc/$SIDECAR_PID/status")
rss_end=$(awk '/^VmRSS:/ {print $2}' "/proc/$SIDECAR_PID/status")
misses=$(redis-cli -p "$REDIS_PORT" info stats 2>/dev/null | tr -d '\r' | awk -F: '/^keyspace_misses:/ {print $2}' || true)
{
  echo "timestamp=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "quick=$QUICK"
  echo "seconds=$DURATION"
  echo "rounds=$ROUNDS"
  echo "warmup=$WARMUP"
  echo "rows=$ROWS"
  echo "nproc=$(nproc)"
  echo "cpu_model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "mem_total=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "kernel=$(uname -r)"
  echo "loadavg_start=$LOAD_START"
  echo "loadavg_end=$LOAD_END"
  echo "pg_version=$(psql_q -c 'SHOW server_version')"
  echo "pg_version_full=$(psql_q -c 'SELECT version()')"
  echo "pg_settings=$(printf '%s ' "${PG_OPTS[@]}" | sed 's/-c //g')fsync=$(psql_q -c 'SHOW fsync') synchronous_commit=$(psql_q -c 'SHOW synchronous_commit')"
  echo "redis_version=$(redis-server --version | awk '{print "Redis " $3}' | sed 's/v=//')"
  echo "redis_keyspace_misses=$misses"
  echo "wrk_version=$(wrk -v 2>&1 | head -n 1 | awk '{print "wrk " $2}')"
  echo "pgbench_version=$("$PGBENCH" --version)"
  echo "git_commit=$GIT_COMMIT"
  # The configured batching settings, from the configuration the sidecar logs at start-up.
  echo "sidecar_batch=$(head -n 1 "$WORK/sidecar.log" | python3 -c 'import json, sys
b = json.loads(sys.stdin.read() or "{}").get("config", {}).get("batch", {})
print(" ".join(f"{k}={v}" for k, v in sorted(b.items())))' 2>/dev/null || true)"
  echo "sidecar_sha256=$(sha256sum "$WORK/pgsidecar" | cut -d' ' -f1)"
  echo "sidecar_peak_rss_kib=$peak"
  echo "sidecar_rss_end_kib=$rss_end"
  echo "sidecar_log_bytes=$(stat -c %s "$WORK/sidecar.log")"
  echo "clk_tck=$(getconf CLK_TCK)"
} >"$WORK/meta.env"

echo >&2
python3 bench/report.py "$WORK" "$RESULTS"
