#!/usr/bin/env bash
# Runs pgsidecar against a local throwaway PostgreSQL, with the default configuration.
#   scripts/dev.sh                 data API on 127.0.0.1:7070, ops API on 0.0.0.0:7071
# Reuses DATABASE_URL when set; otherwise starts PostgreSQL in .pgdata/dev on port
# PGSIDECAR_DEV_PG_PORT (default 54320) and stops it again when the sidecar exits (Ctrl-C).
# Extra arguments go to pgsidecar (e.g. scripts/dev.sh check-config).
set -euo pipefail
cd "$(dirname "$0")/.."

port=${PGSIDECAR_DEV_PG_PORT:-54320}
if [ -z "${DATABASE_URL:-}" ]; then
  PG_PORT_HINT="set PGSIDECAR_DEV_PG_PORT to a free port (or DATABASE_URL to your own server)" \
    scripts/pg.sh start .pgdata/dev "$port"
  trap 'scripts/pg.sh stop .pgdata/dev; echo "dev.sh: PostgreSQL in .pgdata/dev stopped" >&2' EXIT
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "dev.sh: PostgreSQL running in .pgdata/dev on 127.0.0.1:$port (stopped again on exit)" >&2
fi
# No drain period in development: Ctrl-C stops at once.
export PGSIDECAR_SHUTDOWN__DRAIN_SECONDS=${PGSIDECAR_SHUTDOWN__DRAIN_SECONDS:-0}
if [ ! -x target/release/pgsidecar ]; then
  echo "dev.sh: building the sidecar (cargo build --release; the first build takes a few minutes)" >&2
fi
cargo build --release --quiet
target/release/pgsidecar "$@" &
pid=$!
# Ctrl-C reaches the sidecar too (same process group); a TERM sent to this script is passed on.
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
status=0
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid" && status=0 || status=$?
done
exit "$status"
