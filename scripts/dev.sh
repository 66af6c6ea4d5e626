#!/usr/bin/env bash
# Runs pgsidecar against a local throwaway PostgreSQL, with the default configuration.
#   scripts/dev.sh                 data API on 127.0.0.1:7070, ops API on 0.0.0.0:7071
# Reuses DATABASE_URL when set; otherwise starts PostgreSQL in .pgdata/dev (port 54320).
# Extra arguments go to pgsidecar (e.g. scripts/dev.sh check-config).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${DATABASE_URL:-}" ]; then
  scripts/pg.sh start .pgdata/dev 54320
  export DATABASE_URL="postgres://postgres@127.0.0.1:54320/postgres"
  echo "dev.sh: PostgreSQL running in .pgdata/dev on 127.0.0.1:54320 (stop: scripts/pg.sh stop .pgdata/dev)" >&2
fi
cargo build --release --quiet
exec target/release/pgsidecar "$@"
