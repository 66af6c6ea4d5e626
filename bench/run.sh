#!/usr/bin/env bash
# pgsidecar benchmark: the sidecar over HTTP against the same SQL sent directly (pgbench) and
# against Redis, in one run, on one machine, on one local PostgreSQL with the same rows.
#
#   bench/run.sh                  3 rounds of 5 s runs, both modes: about 30 minutes plus the build
#   BENCH_QUICK=1 bench/run.sh    1 round of 2 s runs, 1 s warm-ups: a smoke test (about 7 minutes)
# (2-CPU VM; the release build adds about 5 minutes when target/release is stale.)
#
# Environment:
#   BENCH_ROUNDS=N           times the whole sequence below is repeated (default 3; quick 1)
#   BENCH_SECONDS=N          seconds per measured run (default 5, or 2 with BENCH_QUICK=1)
#   BENCH_WARMUP_SECONDS=N   seconds of the warm-up run before each measured one (default 2; quick 1)
#   BENCH_CONNECTIONS="1 64" client connections to measure at
#   BENCH_MODES="local remote"  local: PostgreSQL on loopback; remote: reached through
#                            bench/delay_proxy.rs, which holds every chunk BENCH_REMOTE_DELAY_US
#                            (250) in each direction, for pgbench and the sidecar alike
#   BENCH_PROXY_THREADS=1    the proxy's threads; BENCH_PROXY_CALIBRATE=1 (default) sets its delay so
#                            that its measured added round trip is twice BENCH_REMOTE_DELAY_US
#   BENCH_NEAR=auto          also measure with cache.near and sessions.near on (auto: when this
#                            tree's config/default.toml has them; 0: never)
#   BENCH_NEAR_MAX_BYTES     cache.near.max_bytes for those runs (default 268435456: every row fits);
#                            BENCH_NEAR_SESSIONS_MAX_BYTES sessions.near.max_bytes (67108864: all fit).
#                            The coherence runs' sidecars keep the shipped sizes.
#   BENCH_UNIX=1             cache GET with oha over TCP and over the data API's unix socket
#   BENCH_COHERENCE=auto     invalidation delay between two sidecars and the stampede over four
#                            (auto: when the near cache and fill leases exist; 0: never);
#                            BENCH_DELAY_SAMPLES (1000; quick 200), BENCH_DELAY_LOAD_SAMPLES
#                            (300; quick 100), BENCH_STAMPEDE_TRIALS (10; quick 3)
#   BENCH_PGBENCH_TRIGGERS=0 pgbench's writes skip the sidecar's change-notification triggers
#                            (session_replication_role = replica), as an application writing its
#                            own table would have none; 1: they fire, as for every other writer
#   BENCH_PG_PORT=N          PostgreSQL's port (default: a free one); every other port is free
#                            ones chosen at run time
#
# Scenarios, for each connection count, in this order in each round (PUTs last: they rewrite
# rows, keeping them valid):
#   local:  sidecar GET, near GET, pgbench GET, redis GET, sidecar session, near session,
#           pgbench session; oha GET over TCP and the unix socket (sidecar, near, HTTP floor);
#           sidecar PUT, pgbench PUT, redis SET; then the HTTP floor's GET, session and PUT (the
#           sidecar's HTTP layer alone, bench/http_floor.rs: what HTTP costs by itself here);
#   remote: pgbench SELECT 1 at one connection directly and through the proxy (what the proxy
#           adds to a round trip), then sidecar GET, pgbench GET, sidecar session, pgbench
#           session, sidecar PUT, pgbench PUT, near GET, near session, all through the proxy.
# "near" is a sidecar with the near caches on, filled (every row read once) before it is
# measured; each sidecar configuration runs alone, started when needed. After the rounds, with
# four sidecars with the near caches on (per mode): the invalidation delay, idle and under load,
# and the stampede (bench/coherence.rs).
# Load generators use 1 thread at 1 connection, 2 above.
# Why rounds: on a small shared machine one run's throughput can swing by a third from one
# minute to the next. Each sidecar run sits right next to its baselines, so their ratio within
# a round is fair; the report gives the median over the rounds and the range.
#
# Prints the tables and the issue's targets and writes them as JSON to bench/results/latest.json
# plus a timestamped copy. Scratch: bench/work/ (gitignored).
# Installs wrk, redis-server and PostgreSQL from Debian packages when missing and we are root,
# and oha (pinned) with cargo install --locked when BENCH_UNIX=1.
# Everything started here is stopped on exit, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- settings ----------------------------------------------------------------------------------
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
  ROUNDS=${BENCH_ROUNDS:-1}
  DURATION=${BENCH_SECONDS:-2}
  WARMUP=${BENCH_WARMUP_SECONDS:-1}
  DELAY_SAMPLES=${BENCH_DELAY_SAMPLES:-200}
  DELAY_LOAD_SAMPLES=${BENCH_DELAY_LOAD_SAMPLES:-100}
  STAMPEDE_TRIALS=${BENCH_STAMPEDE_TRIALS:-3}
else
  ROUNDS=${BENCH_ROUNDS:-3}
  DURATION=${BENCH_SECONDS:-5}
  WARMUP=${BENCH_WARMUP_SECONDS:-2}
  DELAY_SAMPLES=${BENCH_DELAY_SAMPLES:-1000}
  DELAY_LOAD_SAMPLES=${BENCH_DELAY_LOAD_SAMPLES:-300}
  STAMPEDE_TRIALS=${BENCH_STAMPEDE_TRIALS:-10}
fi
CONNECTIONS=${BENCH_CONNECTIONS:-"1 64"}
MODES=${BENCH_MODES:-"local remote"}
DELAY_US=${BENCH_REMOTE_DELAY_US:-250}
PROXY_THREADS=${BENCH_PROXY_THREADS:-1}
PROXY_CALIBRATE=${BENCH_PROXY_CALIBRATE:-1}
NEAR=${BENCH_NEAR:-auto}
NEAR_MAX_BYTES=${BENCH_NEAR_MAX_BYTES:-268435456}
NEAR_SESSIONS_MAX_BYTES=${BENCH_NEAR_SESSIONS_MAX_BYTES:-67108864}
UNIX_RUNS=${BENCH_UNIX:-1}
PGBENCH_TRIGGERS=${BENCH_PGBENCH_TRIGGERS:-0}
COHERENCE=${BENCH_COHERENCE:-auto}
OHA_VERSION=1.16.0 # pinned: its JSON output is parsed
ROWS=100000 # also in bench/wrk/common.lua, bench/pgbench/*.sql and bench/seed.sql

# The near cache and the fill leases exist in this tree (issue 17's server side)?
HAVE_NEAR=0
grep -Eq '^max_staleness_ms' config/default.toml && HAVE_NEAR=1
HAVE_LEASES=0
grep -rqs 'fill_lease_ms' src/ && HAVE_LEASES=1
case $NEAR in auto) NEAR=$HAVE_NEAR ;; 1) [ "$HAVE_NEAR" = 1 ] || { echo "BENCH_NEAR=1, but this tree has no near cache" >&2; exit 1; } ;; *) NEAR=0 ;; esac
case $COHERENCE in auto) COHERENCE=$(( NEAR == 1 && HAVE_LEASES == 1 ? 1 : 0 )) ;; 1) [ "$NEAR" = 1 ] || { echo "BENCH_COHERENCE=1 needs the near cache" >&2; exit 1; } ;; *) COHERENCE=0 ;; esac
has_mode() { case " $MODES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

WORK=bench/work
RESULTS=bench/results
PG_DIR=$WORK/pg
RAW=$WORK/raw

# alive PID: running, and not a zombie waiting to be reaped.
# (It may exit between the test and the read: sed's complaint is then noise.)
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" != Z ]; }
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- cleanup: every process started here, whatever happens --------------------------------------
declare -A SC_PID=() SC_OPS=() SC_TARGET=() SC_HWM=() SC_NEAR_BYTES=() SC_NEAR_HELD=()
REDIS_PID=""
FLOOR_PID=""
FLOOR_UNIX_PID=""
PROXY_PID=""
LOAD_PIDS=()
PG_STARTED=""
cleanup() {
  local rc=$? n p
  trap - EXIT INT TERM
  for p in "${LOAD_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for n in "${!SC_PID[@]}"; do kill -TERM "${SC_PID[$n]}" 2>/dev/null || true; done
  for n in "${!SC_PID[@]}"; do
    p=${SC_PID[$n]}
    # SIGTERM: the sidecar drains (shutdown.drain_seconds: 0 here), then stops.
    for _ in $(seq 1 300); do alive "$p" || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  for p in "$REDIS_PID" "$FLOOR_PID" "$FLOOR_UNIX_PID" "$PROXY_PID"; do
    [ -n "$p" ] || continue
    kill -TERM "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
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
# oha: an HTTP load generator that also speaks HTTP over a unix socket (wrk does not). Pinned,
# since its JSON output is parsed. (It does not build without a TLS feature: default features.)
OHA=""
if [ "$UNIX_RUNS" = 1 ]; then
  for cand in "$(command -v oha || true)" "$HOME/.cargo/bin/oha"; do
    [ -n "$cand" ] && [ -x "$cand" ] && "$cand" --version 2>/dev/null | grep -q " $OHA_VERSION" && { OHA=$cand; break; }
  done
  if [ -z "$OHA" ]; then
    log "installing oha $OHA_VERSION (cargo install --locked; a few minutes)"
    cargo install --locked --version "$OHA_VERSION" oha >&2
    OHA=$HOME/.cargo/bin/oha
  fi
fi

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
log "building the sidecar, the HTTP floor, the delay proxy and the coherence tool (cargo build --release)"
# The commit is read now, with the build: the tree may change while the benchmark runs.
GIT_COMMIT=$(git describe --always --dirty 2>/dev/null || echo unknown)
cargo build --release --bins --example http_floor --example delay_proxy --example coherence >&2
# Run private copies: a rebuild in the same tree during the run must not swap the binaries.
# (Copy, then rename: renaming over a binary that is still running works, writing into it not.)
for b in pgsidecar examples/http_floor examples/delay_proxy examples/coherence; do
  cp "target/release/$b" "$WORK/$(basename "$b").new"
  mv -f "$WORK/$(basename "$b").new" "$WORK/$(basename "$b")"
done

# --- PostgreSQL ----------------------------------------------------------------------------------
# A fresh cluster every run, so every run starts from the same table contents and layout. A
# cluster left running by an aborted run is stopped first.
PG_PORT=${BENCH_PG_PORT:-$(free_port)}
# psql and pgbench connect over TCP as the trust-authenticated superuser pg.sh's initdb made.
PG_CONN=(-h 127.0.0.1 -p "$PG_PORT" -U postgres)
LOCAL_DB=postgres://postgres@127.0.0.1:$PG_PORT/postgres
scripts/pg.sh stop "$PG_DIR" || true
rm -rf "$PG_DIR" "$PG_DIR.initdb.log"
port_busy "$PG_PORT" && die "port $PG_PORT is in use (BENCH_PG_PORT)"
log "starting PostgreSQL in $PG_DIR on 127.0.0.1:$PG_PORT"
# Durability stays at the defaults (fsync and synchronous_commit on): the honest setting, and the
# one the sidecar is deployed with. 256MB of shared_buffers holds every table and index.
PG_OPTS=(-c shared_buffers=256MB -c max_connections=200)
PG_STARTED=1
scripts/pg.sh start "$PG_DIR" "$PG_PORT" "${PG_OPTS[@]}"

psql_q() { "$PSQL" "${PG_CONN[@]}" -d postgres -X -q -At -v ON_ERROR_STOP=1 "$@"; }

# --- the delay proxy (remote mode) ---------------------------------------------------------------
PROXY_PORT=""
PROXY_DELAY=$DELAY_US
if has_mode remote; then
  # ping: an echo server with this proxy's code and settings in front, 2,000 pings each way.
  ping_json() { "$WORK/delay_proxy" ping --delay-us "$1" --threads "$PROXY_THREADS" --count 2000; }
  ping_json "$DELAY_US" >"$WORK/proxy_ping_nominal.json"
  if [ "$PROXY_CALIBRATE" = 1 ]; then
    # The proxy's own relay hop and each timer's wake-up add to the delay; take what they added
    # at the median off the delay, so the round trip it adds is twice BENCH_REMOTE_DELAY_US.
    PROXY_DELAY=$(python3 -c 'import json, sys
p = json.load(open(sys.argv[1])); d = int(sys.argv[2])
print(max(0, round(d - (p["added_p50_us"] - 2 * d) / 2)))' "$WORK/proxy_ping_nominal.json" "$DELAY_US")
  fi
  ping_json "$PROXY_DELAY" >"$WORK/proxy_ping.json"
  log "delay proxy: $DELAY_US µs each way asked, $PROXY_DELAY µs set; ping: $(cat "$WORK/proxy_ping.json")"
  "$WORK/delay_proxy" serve 127.0.0.1:0 "127.0.0.1:$PG_PORT" --delay-us "$PROXY_DELAY" \
    --threads "$PROXY_THREADS" >"$WORK/proxy.out" 2>&1 &
  PROXY_PID=$!
  for _ in $(seq 1 100); do grep -q '^listening on ' "$WORK/proxy.out" && break; sleep 0.1; done
  PROXY_PORT=$(sed -n 's/^listening on .*://p' "$WORK/proxy.out")
  [ -n "$PROXY_PORT" ] || die "the delay proxy did not start: $(cat "$WORK/proxy.out")"
fi
REMOTE_DB=postgres://postgres@127.0.0.1:${PROXY_PORT:-0}/postgres

# --- sidecars ------------------------------------------------------------------------------------
# Each configuration has a name; one is started when a scenario needs it and stopped when the next
# needs another, so each is measured alone:
#   sidecar, sidecar_unix   the shipped defaults (over TCP; over the data API's unix socket)
#   near, near_unix         the same with cache.near and sessions.near on
#   remote, remote_near     defaults / near caches on, PostgreSQL through the delay proxy
#   fleetN, rfleetN         near caches on, local / through the proxy: the coherence runs
# Everything else is the shipped default configuration: drop any PGSIDECAR_* / RUST_LOG from the
# caller's environment so nothing else changes it. shutdown.drain_seconds is 0 so that a stop
# between scenarios does not wait 5 s with /ready at 503 (no load balancer here to tell).
for v in $(compgen -e | grep -E '^(PGSIDECAR_|RUST_LOG$)' || true); do unset "$v"; done
mkdir -p "$WORK/logs" "$WORK/sock"
rm -f "$WORK"/sock/*.sock "$WORK"/logs/*.log
# toml_int SECTION KEY: an integer setting of the shipped config/default.toml.
toml_int() { awk -v s="[$1]" -v k="$2" '$0 == s {f = 1; next} /^\[/ {f = 0} f && $1 == k {print $3; exit}' config/default.toml; }
is_near() { case $1 in near* | remote_near | fleet* | rfleet*) return 0 ;; *) return 1 ;; esac; }

start_sidecar() {
  local name=$1 db=$LOCAL_DB listen ops env=() i
  case $name in remote* | rfleet*) db=$REMOTE_DB ;; esac
  ops=$(free_port)
  case $name in
    *_unix) listen=unix:$PWD/$WORK/sock/$name.sock; SC_TARGET[$name]=$PWD/$WORK/sock/$name.sock ;;
    *) listen=127.0.0.1:$(free_port); SC_TARGET[$name]=http://$listen ;;
  esac
  if is_near "$name"; then
    env+=(PGSIDECAR_CACHE__NEAR__ENABLED=true PGSIDECAR_SESSIONS__NEAR__ENABLED=true)
    case $name in
      fleet* | rfleet*) # the shipped sizes (smaller than the rows: full, evicting, after a prefill)
        SC_NEAR_BYTES[$name]=$(( $(toml_int cache.near max_bytes) + $(toml_int sessions.near max_bytes) )) ;;
      *)
        env+=(PGSIDECAR_CACHE__NEAR__MAX_BYTES="$NEAR_MAX_BYTES" PGSIDECAR_SESSIONS__NEAR__MAX_BYTES="$NEAR_SESSIONS_MAX_BYTES")
        SC_NEAR_BYTES[$name]=$((NEAR_MAX_BYTES + NEAR_SESSIONS_MAX_BYTES)) ;;
    esac
  fi
  echo "=== $(date -u +%H:%M:%S) start $name ($listen) ===" >>"$WORK/logs/$name.log"
  env "${env[@]}" PGSIDECAR_SERVER__DATA_LISTEN="$listen" PGSIDECAR_SERVER__OPS_LISTEN="127.0.0.1:$ops" \
    PGSIDECAR_SHUTDOWN__DRAIN_SECONDS=0 DATABASE_URL="$db" \
    "$WORK/pgsidecar" >>"$WORK/logs/$name.log" 2>&1 &
  SC_PID[$name]=$!
  SC_OPS[$name]=$ops
  # Ready means connected and migrated (and, with a near cache, listening).
  for i in $(seq 1 600); do
    alive "${SC_PID[$name]}" || { tail -n 20 "$WORK/logs/$name.log" >&2; die "sidecar $name exited during start-up"; }
    curl -fsS -o /dev/null "http://127.0.0.1:$ops/ready" 2>/dev/null && break
    [ "$i" -eq 600 ] && { tail -n 20 "$WORK/logs/$name.log" >&2; die "sidecar $name was not ready after 60 s"; }
    sleep 0.1
  done
}

stop_sidecar() {
  local name=$1 p=${SC_PID[$1]} hwm held
  # VmHWM: the peak resident set of this instance; the report keeps the highest per name.
  hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
  [ "${hwm:-0}" -gt "${SC_HWM[$name]:-0}" ] && SC_HWM[$name]=$hwm
  # What its near caches hold at the end (pgsidecar_near_cache_bytes, both caches): beside the
  # peak RSS, it tells the entries' own bytes from the rest.
  if is_near "$name"; then
    held=$(curl -fsS "http://127.0.0.1:${SC_OPS[$name]}/metrics" 2>/dev/null \
      | awk '/^pgsidecar_near_cache_bytes\{/ {s += $NF} END {printf "%d", s}')
    [ "${held:-0}" -gt "${SC_NEAR_HELD[$name]:-0}" ] && SC_NEAR_HELD[$name]=$held
  fi
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 1 300); do alive "$p" || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  unset 'SC_PID[$name]'
}

# use_sidecars NAME...: exactly these sidecars run afterwards.
use_sidecars() {
  local n want=" $* "
  for n in "${!SC_PID[@]}"; do
    case $want in *" $n "*) ;; *) stop_sidecar "$n" ;; esac
  done
  for n in "$@"; do
    [ -n "${SC_PID[$n]:-}" ] && alive "${SC_PID[$n]}" || start_sidecar "$n"
  done
}

log "starting the sidecar (the shipped defaults; logs in $WORK/logs/)"
use_sidecars sidecar
DATA_URL=${SC_TARGET[sidecar]}

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
if has_mode remote; then
  [ "$("$PSQL" -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d postgres -X -At -c 'SELECT 42')" = 42 ] \
    || die "PostgreSQL does not answer through the delay proxy"
fi

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
if [ "$UNIX_RUNS" = 1 ]; then
  FLOOR_SOCK=$PWD/$WORK/sock/floor.sock
  "$WORK/http_floor" "unix:$FLOOR_SOCK" >"$WORK/http_floor_unix.log" 2>&1 &
  FLOOR_UNIX_PID=$!
  for _ in $(seq 1 100); do [ -S "$FLOOR_SOCK" ] && break; sleep 0.1; done
  [ "$(code --unix-socket "$FLOOR_SOCK" http://localhost/v1/cache/k1)" = 200 ] || die "the HTTP floor on a unix socket does not answer"
  # oha picks a URL at random from a file per request: one per row, uniform like the wrk scripts.
  seq 1 "$ROWS" | sed 's|^|http://localhost/v1/cache/k|' >"$WORK/urls_unix.txt"
fi

# --- measuring -----------------------------------------------------------------------------------
rm -rf "$RAW" "$WORK/pgblog" "$WORK/fleet"
mkdir -p "$RAW" "$WORK/pgblog" "$WORK/fleet"
MANIFEST=$WORK/manifest.tsv
: >"$MANIFEST"

threads_for() { if [ "$1" -le 1 ]; then echo 1; else echo 2; fi; }

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

# near_counts NAME: the sidecar's near-cache counters "cache_hit cache_miss cache_bypass
# sessions_hit sessions_miss sessions_bypass" (zeros without a near cache).
near_counts() {
  curl -fsS "http://127.0.0.1:${SC_OPS[$1]}/metrics" 2>/dev/null | awk '
    /^pgsidecar_near_cache_requests_total\{/ {
      c = $0; sub(/.*cache="/, "", c); sub(/".*/, "", c)
      r = $0; sub(/.*result="/, "", r); sub(/".*/, "", r)
      n[c "_" r] += $NF
    }
    END { printf "%d %d %d %d %d %d\n", n["cache_hit"], n["cache_miss"], n["cache_bypass"],
          n["sessions_hit"], n["sessions_miss"], n["sessions_bypass"] }'
}

# server_pid NAME: the process serving a run: a sidecar by name, redis, floor, floor_unix, or -.
server_pid() {
  case $1 in
    -) echo - ;;
    redis) echo "$REDIS_PID" ;;
    floor) echo "$FLOOR_PID" ;;
    floor_unix) echo "$FLOOR_UNIX_PID" ;;
    *) echo "${SC_PID[$1]}" ;;
  esac
}

# measured PARSER TOOL SCENARIO CONNS RAW SERVER EXTRA CMD...: runs the measured command once, its
# output into RAW, and appends to the manifest: ROUND TOOL SCENARIO CONNS RAW EXTRA, then the CPU
# used meanwhile by the server process (SERVER, a name for server_pid, or - for none), by all of
# Postgres, and by the load generator itself (user + system seconds, from bash's time), then the
# parser (wrk, oha, pgbench, redis) and the delay proxy's CPU (ticks, or - without it). On 2
# cores they all compete, so these tell where the machine's CPU went. For a sidecar with a near
# cache, its hit and miss counters before and after go to RAW.near.
TIMEFORMAT='%3U %3S'
measured() {
  local parser=$1 tool=$2 scen=$3 conns=$4 raw=$5 server=$6 extra=$7 spid s0=0 s1=0 p0 p1 x0=0 x1=0 n0=""
  shift 7
  spid=$(server_pid "$server")
  [ "$spid" = - ] || s0=$(cpu_ticks "$spid")
  [ -n "$PROXY_PID" ] && x0=$(cpu_ticks "$PROXY_PID")
  is_near "$server" && n0=$(near_counts "$server")
  p0=$(pg_ticks)
  echo "# $*" >"$raw"
  { time "$@" >>"$raw" 2>&1; } 2>"$raw.time"
  case $tool in *pgbench) pg_settle ;; esac
  [ "$spid" = - ] || s1=$(cpu_ticks "$spid")
  [ -n "$PROXY_PID" ] && x1=$(cpu_ticks "$PROXY_PID")
  p1=$(pg_ticks)
  [ -n "$n0" ] && echo "$n0 $(near_counts "$server")" >"$raw.near"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ROUND" "$tool" "$scen" "$conns" "$raw" "$extra" \
    "$([ "$spid" = - ] && echo - || echo $((s1 - s0)))" "$((p1 - p0))" "$(awk '{print $1 + $2}' "$raw.time")" \
    "$parser" "$([ -n "$PROXY_PID" ] && echo $((x1 - x0)) || echo -)" >>"$MANIFEST"
}

# wrk_run TOOL URL SERVER SCENARIO CONNS: wrk, a warm-up run and then the measured one.
wrk_run() {
  local tool=$1 url=$2 server=$3 scen=$4 conns=$5 wrk
  wrk=(wrk -t"$(threads_for "$conns")" -c"$conns" --latency -s "bench/wrk/$scen.lua" "$url")
  log "$(printf '%-14s %s  @%s' "$tool" "$scen" "$conns")"
  "${wrk[@]}" -d"${WARMUP}s" -- "$WORK/tokens.txt" >/dev/null
  measured wrk "$tool" "$scen" "$conns" "$RAW/${tool}_${scen}_c${conns}_r$ROUND.txt" "$server" - \
    "${wrk[@]}" -d"${DURATION}s" -- "$WORK/tokens.txt"
}

# oha_run TOOL TARGET SERVER CONNS: cache GETs with oha, over TCP (TARGET http://host:port) or a
# unix socket (TARGET a socket path): a warm-up run, then the measured one.
oha_run() {
  local tool=$1 target=$2 server=$3 conns=$4 urls oha
  if [ "${target#http}" != "$target" ]; then
    urls=$WORK/urls_${target##*:}.txt
    [ -s "$urls" ] || seq 1 "$ROWS" | sed "s|^|$target/v1/cache/k|" >"$urls"
    oha=("$OHA" --urls-from-file "$urls")
  else
    oha=("$OHA" --urls-from-file "$WORK/urls_unix.txt" --unix-socket "$target")
  fi
  # -w: requests still in flight at the deadline finish (and count) rather than being aborted.
  oha+=(--no-tui --output-format json -w -c "$conns" --worker-threads "$(threads_for "$conns")")
  log "$(printf '%-14s %s  @%s' "$tool" cache_get "$conns")"
  "${oha[@]}" -z "${WARMUP}s" >/dev/null
  measured oha "$tool" cache_get "$conns" "$RAW/${tool}_cache_get_c${conns}_r$ROUND.txt" "$server" - \
    "${oha[@]}" -z "${DURATION}s"
}

# pgbench_run TOOL SCENARIO CONNS PORT: the same shape, against PostgreSQL at PORT (directly, or
# the delay proxy's); the measured run logs every transaction's latency (one file per -j thread)
# for p50/p99, which pgbench's summary does not give.
pgbench_run() {
  local tool=$1 scen=$2 conns=$3 port=$4 logdir pgb
  logdir=$WORK/pgblog/${tool}_${scen}_c${conns}_r$ROUND
  mkdir -p "$logdir"
  pgb=("$PGBENCH" -h 127.0.0.1 -p "$port" -U postgres -n -M prepared -c "$conns" -j "$(threads_for "$conns")"
    -f "bench/pgbench/$scen.sql" -D "payload=$PAYLOAD")
  # The direct client writes like an application writing its own table: without the sidecar's
  # change-notification triggers (issue 17), which would otherwise fire for its upserts too.
  [ "$PGBENCH_TRIGGERS" = 1 ] || pgb=(env PGOPTIONS="-c session_replication_role=replica" "${pgb[@]}")
  log "$(printf '%-14s %s  @%s' "$tool" "$scen" "$conns")"
  "${pgb[@]}" -T "$WARMUP" postgres >/dev/null 2>&1
  pg_settle
  measured pgbench "$tool" "$scen" "$conns" "$RAW/${tool}_${scen}_c${conns}_r$ROUND.txt" - "$logdir" \
    "${pgb[@]}" -T "$DURATION" --log --log-prefix="$logdir/log" postgres
}

# redis SCENARIO CONNS TEST: redis-benchmark has no duration option, so a short run measures the
# rate (and warms up), and the measured run asks for DURATION seconds' worth of requests.
redis_run() {
  local scen=$1 conns=$2 test=$3 t calib rps n rb
  t=$(threads_for "$conns")
  rb=(redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$conns" -P 1 -r "$ROWS" -d 1024 -t "$test" --csv)
  [ "$t" -gt 1 ] && rb+=(--threads "$t")
  log "$(printf '%-14s %s  @%s' redis "$test" "$conns")"
  calib=$((conns == 1 ? 5000 : 50000))
  rps=$("${rb[@]}" -n "$calib" | awk -F'","' 'NR > 1 { print int($2) }' | tail -n 1)
  n=$((rps * DURATION))
  [ "$n" -ge 1000 ] || n=1000
  measured redis redis "$scen" "$conns" "$RAW/redis_${scen}_c${conns}_r$ROUND.txt" redis - "${rb[@]}" -n "$n"
}

# prefill NAME: read every cache row and every session once through sidecar NAME, so its near
# caches hold them all before it is measured (its start, or the PUTs since, left them empty).
# A near cache is emptied and bypassed while its listener lags more than max_staleness_ms (a
# loaded machine can do that): a prefill that saw a bypass is done again, up to 3 times.
prefill() {
  local target=${SC_TARGET[$1]} try b0 b1
  case $target in http://*) target=${target#http://} ;; *) target=unix:$target ;; esac
  for try in 1 2 3; do
    b0=$(near_counts "$1" | awk '{print $3 + $6}')
    "$WORK/coherence" prefill --sidecar "$target" --rows "$ROWS" --tokens "$WORK/tokens.txt" \
      >>"$WORK/prefill.log" || die "prefilling $1 failed (see $WORK/prefill.log)"
    b1=$(near_counts "$1" | awk '{print $3 + $6}')
    [ "$b1" = "$b0" ] && return 0
    log "prefill of $1: $((b1 - b0)) reads bypassed the near cache (listener lagging), again ($try)"
  done
}

# sidecar_runs NAME TOOL CONNS SCENARIO...: wrk against sidecar NAME (started if needed).
sidecar_runs() {
  local name=$1 tool=$2 conns=$3 scen
  shift 3
  for scen in "$@"; do
    alive "${SC_PID[$name]}" || die "sidecar $name died (see $WORK/logs/$name.log)"
    wrk_run "$tool" "${SC_TARGET[$name]}" "$name" "$scen" "$conns"
  done
  alive "${SC_PID[$name]}" || die "sidecar $name died (see $WORK/logs/$name.log)"
}

# The local sequence at one connection count.
local_block() {
  local c=$1 n
  use_sidecars sidecar
  sidecar_runs sidecar sidecar "$c" cache_get
  if [ "$NEAR" = 1 ]; then
    use_sidecars near
    prefill near
    sidecar_runs near near "$c" cache_get
  fi
  pgbench_run pgbench cache_get "$c" "$PG_PORT"
  redis_run cache_get "$c" get
  use_sidecars sidecar
  sidecar_runs sidecar sidecar "$c" session_get
  if [ "$NEAR" = 1 ]; then
    use_sidecars near
    prefill near
    sidecar_runs near near "$c" session_get
  fi
  pgbench_run pgbench session_get "$c" "$PG_PORT"
  if [ "$UNIX_RUNS" = 1 ]; then
    for n in sidecar $([ "$NEAR" = 1 ] && echo near); do
      use_sidecars "$n"
      [ "$n" = near ] && prefill near
      oha_run "oha_${n}_tcp" "${SC_TARGET[$n]}" "$n" "$c"
      use_sidecars "${n}_unix"
      [ "$n" = near ] && prefill near_unix
      oha_run "oha_${n}_unix" "${SC_TARGET[${n}_unix]}" "${n}_unix" "$c"
    done
    oha_run oha_floor_tcp "$FLOOR_URL" floor "$c"
    oha_run oha_floor_unix "$FLOOR_SOCK" floor_unix "$c"
  fi
  use_sidecars sidecar
  sidecar_runs sidecar sidecar "$c" cache_put
  pgbench_run pgbench cache_put "$c" "$PG_PORT"
  redis_run cache_put "$c" set
  alive "$FLOOR_PID" || die "the HTTP floor died (see $WORK/http_floor.log)"
  for scen in cache_get session_get cache_put; do
    wrk_run floor "$FLOOR_URL" floor "$scen" "$c"
  done
}

# The remote sequence at one connection count: everything reaches PostgreSQL through the proxy.
remote_block() {
  local c=$1
  use_sidecars remote
  sidecar_runs remote remote "$c" cache_get
  pgbench_run remote_pgbench cache_get "$c" "$PROXY_PORT"
  sidecar_runs remote remote "$c" session_get
  pgbench_run remote_pgbench session_get "$c" "$PROXY_PORT"
  sidecar_runs remote remote "$c" cache_put
  pgbench_run remote_pgbench cache_put "$c" "$PROXY_PORT"
  if [ "$NEAR" = 1 ]; then
    use_sidecars remote_near
    prefill remote_near
    sidecar_runs remote_near remote_near "$c" cache_get session_get
  fi
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ROUND in $(seq 1 "$ROUNDS"); do
  log "round $ROUND of $ROUNDS"
  if has_mode local; then
    for c in $CONNECTIONS; do local_block "$c"; done
  fi
  if has_mode remote; then
    # What the proxy adds to one query's round trip, measured on the real path.
    pgbench_run pgbench ping 1 "$PG_PORT"
    pgbench_run remote_pgbench ping 1 "$PROXY_PORT"
    for c in $CONNECTIONS; do remote_block "$c"; done
  fi
done

# --- coherence: invalidation delay and stampede, across sidecars with the near cache -------------
# delay_under_load WRITER READER OUT: the delay measured while wrk keeps both sidecars busy: cache
# GETs at 32 connections on the reader, PUTs of other keys at 16 on the writer (each PUT also
# notifies the reader, which must process it).
coherence_block() {
  local prefix=$1 mode=$2 f=() n
  for n in 1 2 3 4; do f+=("$prefix$n"); done
  use_sidecars "${f[@]}"
  # The writer's and the reader's near caches full (the rows outweigh the shipped sizes), as
  # they would be in service: evicting while the delay is measured, at their peak memory.
  prefill "${f[0]}"
  prefill "${f[1]}"
  local a=${SC_TARGET[${f[0]}]#http://} b=${SC_TARGET[${f[1]}]#http://}
  local sts=""
  for n in "${f[@]}"; do sts+="${SC_TARGET[$n]#http://},"; done
  log "coherence ($mode): invalidation delay, idle ($DELAY_SAMPLES samples)"
  "$WORK/coherence" delay --writer "$a" --reader "$b" --samples "$DELAY_SAMPLES" --label idle \
    --raw "$WORK/fleet/delay_${mode}_idle.jsonl" >"$WORK/fleet/delay_${mode}_idle.json"
  log "coherence ($mode): invalidation delay, under load ($DELAY_LOAD_SAMPLES samples)"
  wrk -t2 -c32 -d600s --latency -s bench/wrk/cache_get.lua "${SC_TARGET[${f[1]}]}" \
    >"$WORK/fleet/load_${mode}_get.txt" 2>&1 &
  LOAD_PIDS+=($!)
  wrk -t1 -c16 -d600s --latency -s bench/wrk/cache_put.lua "${SC_TARGET[${f[0]}]}" \
    >"$WORK/fleet/load_${mode}_put.txt" 2>&1 &
  LOAD_PIDS+=($!)
  sleep 2
  local t0 t1
  t0=$(date +%s%N)
  "$WORK/coherence" delay --writer "$a" --reader "$b" --samples "$DELAY_LOAD_SAMPLES" --label load \
    --raw "$WORK/fleet/delay_${mode}_load.jsonl" >"$WORK/fleet/delay_${mode}_load.json"
  t1=$(date +%s%N)
  # wrk prints its summary on SIGINT: what the load amounted to while the delay was measured.
  for n in "${LOAD_PIDS[@]}"; do kill -INT "$n" 2>/dev/null || true; done
  for n in "${LOAD_PIDS[@]}"; do wait "$n" 2>/dev/null || true; done
  LOAD_PIDS=()
  echo "{\"seconds\": $(( (t1 - t0) / 1000000 ))e-3}" >"$WORK/fleet/load_${mode}_window.json"
  log "coherence ($mode): stampede, 200 callers over 4 sidecars, $STAMPEDE_TRIALS trials"
  "$WORK/coherence" stampede --sidecars "${sts%,}" --callers 200 --trials "$STAMPEDE_TRIALS" \
    >"$WORK/fleet/stampede_${mode}_lease.json"
  "$WORK/coherence" stampede --sidecars "${sts%,}" --callers 200 --trials 1 --plain \
    >"$WORK/fleet/stampede_${mode}_plain.json"
  use_sidecars
}
if [ "$COHERENCE" = 1 ]; then
  has_mode local && coherence_block fleet local
  has_mode remote && coherence_block rfleet remote
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- machine, versions, sidecar memory ----------------------------------------------------------
use_sidecars # stops them all, keeping each one's peak RSS (VmHWM) in SC_HWM
misses=$(redis-cli -p "$REDIS_PORT" info stats 2>/dev/null | tr -d '\r' | awk -F: '/^keyspace_misses:/ {print $2}' || true)
{
  echo "timestamp=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "quick=$QUICK"
  echo "seconds=$DURATION"
  echo "rounds=$ROUNDS"
  echo "warmup=$WARMUP"
  echo "rows=$ROWS"
  echo "modes=$MODES"
  echo "near=$NEAR"
  echo "near_max_bytes=$NEAR_MAX_BYTES"
  echo "near_sessions_max_bytes=$NEAR_SESSIONS_MAX_BYTES"
  echo "unix_runs=$UNIX_RUNS"
  echo "coherence=$COHERENCE"
  echo "pgbench_triggers=$PGBENCH_TRIGGERS"
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
  echo "oha_version=$([ -n "$OHA" ] && "$OHA" --version 2>/dev/null | head -n 1)"
  echo "pgbench_version=$("$PGBENCH" --version)"
  echo "git_commit=$GIT_COMMIT"
  # The configured batching settings, from the configuration the sidecar logs at start-up.
  echo "sidecar_batch=$(sed -n 2p "$WORK/logs/sidecar.log" | python3 -c 'import json, sys
b = json.loads(sys.stdin.read() or "{}").get("config", {}).get("batch", {})
print(" ".join(f"{k}={v}" for k, v in sorted(b.items())))' 2>/dev/null || true)"
  echo "sidecar_sha256=$(sha256sum "$WORK/pgsidecar" | cut -d' ' -f1)"
  echo "sidecar_peak_rss_kib=${SC_HWM[sidecar]:-}"
  for n in "${!SC_HWM[@]}"; do echo "peak_rss_kib_$n=${SC_HWM[$n]}"; done
  for n in "${!SC_NEAR_BYTES[@]}"; do echo "near_bytes_$n=${SC_NEAR_BYTES[$n]}"; done
  for n in "${!SC_NEAR_HELD[@]}"; do echo "near_held_bytes_$n=${SC_NEAR_HELD[$n]}"; done
  echo "sidecar_log_bytes=$(stat -c %s "$WORK/logs/sidecar.log")"
  echo "proxy_delay_us_asked=$DELAY_US"
  echo "proxy_delay_us_set=$PROXY_DELAY"
  echo "proxy_threads=$PROXY_THREADS"
  echo "proxy_ping_nominal=$(cat "$WORK/proxy_ping_nominal.json" 2>/dev/null)"
  echo "proxy_ping=$(cat "$WORK/proxy_ping.json" 2>/dev/null)"
  echo "clk_tck=$(getconf CLK_TCK)"
} >"$WORK/meta.env"
if has_mode remote; then
  # The proxy's added round trip again, after the run (same code and settings, fresh process).
  "$WORK/delay_proxy" ping --delay-us "$PROXY_DELAY" --threads "$PROXY_THREADS" --count 2000 \
    >"$WORK/proxy_ping_after.json" && echo "proxy_ping_after=$(cat "$WORK/proxy_ping_after.json")" >>"$WORK/meta.env"
fi
# The access logs hold one line per request: gigabytes after a full run. Keep each one's head
# (the configuration it logged) and tail.
for f in "$WORK"/logs/*.log; do
  [ "$(stat -c %s "$f")" -gt 2000000 ] || continue
  { head -n 200 "$f"; echo "... (cut by run.sh: $(stat -c %s "$f") bytes in all) ..."; tail -n 200 "$f"; } >"$f.cut"
  mv -f "$f.cut" "$f"
done

echo >&2
python3 bench/report.py "$WORK" "$RESULTS"
