#!/usr/bin/env bash
# A longer fleet run: the suite's fleet test (tests/it/fleet.rs) with more sidecars and more
# traffic. N sidecars (pool 2 each) start at once on an empty database, behind PgBouncer in
# transaction mode (default_pool_size 20), on one PostgreSQL with max_connections = 50, and serve
# mixed reads and writes; the test checks that every request succeeds or gets a clear 503, that
# PostgreSQL never sees more connections than PgBouncer's pool, and that no acknowledged write
# is lost, and prints one summary line.
#
#   bench/fleet.sh                                  200 sidecars, 64 clients x 150 requests
#   FLEET_SIDECARS=100 FLEET_CLIENTS=48 FLEET_ROUNDS=24 bench/fleet.sh   (the suite's size)
#   BENCH_PROFILE=debug bench/fleet.sh              skip the release build of the test binary
#
# Needs what the suite needs (PostgreSQL and PgBouncer from Debian; scripts/test.sh installs
# them as root). Writes the summary to bench/results/fleet-<timestamp>.txt and fleet-latest.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

export PGSIDECAR_FLEET_SIDECARS=${FLEET_SIDECARS:-200}
export PGSIDECAR_FLEET_CLIENTS=${FLEET_CLIENTS:-64}
export PGSIDECAR_FLEET_ROUNDS=${FLEET_ROUNDS:-150}
export PGSIDECAR_REQUIRE_PGBOUNCER=1
export PGSIDECAR_TEST_PG_SCRIPT="$PWD/scripts/pg.sh"
profile=()
[ "${BENCH_PROFILE:-release}" = release ] && profile=(--release)

mkdir -p bench/results bench/work
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log=bench/work/fleet-$stamp.log
echo "fleet: $PGSIDECAR_FLEET_SIDECARS sidecars, $PGSIDECAR_FLEET_CLIENTS clients x $PGSIDECAR_FLEET_ROUNDS requests (${BENCH_PROFILE:-release} build)" >&2
# Many processes: raise the open-file limit where allowed (each sidecar and PgBouncer hold sockets).
ulimit -n 65536 2>/dev/null || true
cargo test "${profile[@]}" --test it -- fleet::a_fleet --nocapture --test-threads 1 2>&1 | tee "$log" >&2
{
  echo "$stamp commit $(git describe --always --dirty 2>/dev/null || echo unknown), ${BENCH_PROFILE:-release} build, $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "settings: sidecars=$PGSIDECAR_FLEET_SIDECARS clients=$PGSIDECAR_FLEET_CLIENTS requests_per_client=$PGSIDECAR_FLEET_ROUNDS (pool 2 per sidecar, PgBouncer transaction mode default_pool_size 20, PostgreSQL max_connections 50)"
  grep -E "sidecars ready after|^fleet: |acknowledged writes checked|test result" "$log"
} | tee "bench/results/fleet-$stamp.txt" >"bench/results/fleet-latest.txt"
cat bench/results/fleet-latest.txt
