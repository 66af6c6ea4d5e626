#!/usr/bin/env bash
# Replays issue 16's hostile clients (bench/attacks.py) against a release build of the sidecar
# and a throwaway PostgreSQL, and prints one JSON line per attack (peak RSS, descriptors,
# answers). About 3 minutes plus the build.
#
#   bench/attacks.sh                          # the working tree's sidecar
#   PGSIDECAR_BIN=/path/to/old/pgsidecar bench/attacks.sh   # another binary (before/after)
#   bench/attacks.sh --only mget sessions     # some attacks (names: see ATTACKS in attacks.py)
#
# Environment: PGSIDECAR_ATTACKS_PG_PORT (default 54332), PGSIDECAR_BIN, ATTACKS_LABEL.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=bench/work
PG_DIR=$WORK/pg-attacks
PG_PORT=${PGSIDECAR_ATTACKS_PG_PORT:-54332}
mkdir -p "$WORK"

BIN=${PGSIDECAR_BIN:-}
if [ -z "$BIN" ]; then
  echo "attacks.sh: cargo build --release" >&2
  cargo build --release --quiet --bin pgsidecar
  BIN=target/release/pgsidecar
fi

cleanup() { scripts/pg.sh stop "$PG_DIR" >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
PG_PORT_HINT="set PGSIDECAR_ATTACKS_PG_PORT to a free port" \
  scripts/pg.sh start "$PG_DIR" "$PG_PORT" -c max_connections=200 -c fsync=off \
  -c synchronous_commit=off >&2

python3 bench/attacks.py --bin "$BIN" --label "${ATTACKS_LABEL:-$(basename "$BIN")}" \
  --database-url "postgres://postgres@127.0.0.1:$PG_PORT/postgres" --logs "$WORK" "$@"
