#!/usr/bin/env bash
# Soak test (bench/soak.py): mixed traffic against a release build of the sidecar for a long time,
# with faults (PostgreSQL restarted and SIGSTOP-ed, slow clients, oversized requests, a connection
# flood), sampling RSS, open descriptors and latency, and telling whether they stayed flat.
#
#   bench/soak.sh            # 30 minutes
#   bench/soak.sh 300        # 5 minutes (every fault once)
#
# Environment: SOAK_PG_PORT (default 54335), SOAK_RATE (requests/s, default 600),
# SOAK_FAULT_EVERY (seconds between faults, default 150, or 45 for runs under 15 minutes),
# PGSIDECAR_BIN (default: cargo build --release). Raw samples and the summary go to
# bench/results/soak-<time>.{jsonl,json,txt}, and soak-latest.txt; the sidecar's log to
# bench/work/soak-sidecar.log. Wants a quiet machine: it reports the load average it saw.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-1800}
WORK=bench/work
PG_DIR=$WORK/pg-soak
PG_PORT=${SOAK_PG_PORT:-54335}
mkdir -p "$WORK" bench/results

BIN=${PGSIDECAR_BIN:-}
if [ -z "$BIN" ]; then
  echo "soak.sh: cargo build --release" >&2
  cargo build --release --quiet --bin pgsidecar
  BIN=target/release/pgsidecar
fi
every=${SOAK_FAULT_EVERY:-$([ "${seconds%.*}" -lt 900 ] && echo 45 || echo 150)}

pg_opts=(max_connections=200 fsync=off synchronous_commit=off)
cleanup() { scripts/pg.sh drop "$PG_DIR" >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cleanup
c_opts=()
for o in "${pg_opts[@]}"; do c_opts+=(-c "$o"); done
PG_PORT_HINT="set SOAK_PG_PORT to a free port" scripts/pg.sh start "$PG_DIR" "$PG_PORT" "${c_opts[@]}" >&2

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=bench/results/soak-$stamp
p_opts=()
for o in "${pg_opts[@]}"; do p_opts+=("--pg-opt=$o"); done
python3 bench/soak.py --bin "$BIN" --pg-dir "$PG_DIR" --pg-port "$PG_PORT" "${p_opts[@]}" \
  --seconds "$seconds" --rate "${SOAK_RATE:-600}" --fault-every "$every" \
  --samples "$out.jsonl" --summary "$out.json" --text "$out.txt" --log "$WORK/soak-sidecar.log" \
  --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)"
cp "$out.txt" bench/results/soak-latest.txt
