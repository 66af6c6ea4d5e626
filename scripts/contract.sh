#!/usr/bin/env bash
# The contract test: schemathesis drives every route of openapi.json against a live sidecar (the
# debug binary `cargo build` made) on a fresh database, and fails on any 5xx and on any response
# the document does not describe (status code, content type, headers, body schema).
#
#   scripts/contract.sh [extra schemathesis options...]
#
# Needs DATABASE_URL (a superuser URL: a database is created for the run and dropped after);
# scripts/test.sh provides it. Installs schemathesis, pinned with its dependencies
# (tests/contract/requirements.txt), into .venv/ on first use. Bounded: at most
# CONTRACT_MAX_EXAMPLES examples per operation and phase, and CONTRACT_MAX_TIME seconds; the
# seed is fixed, so a run is repeatable.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${DATABASE_URL:?DATABASE_URL must point at a PostgreSQL superuser (scripts/test.sh sets it)}"
max_examples=${CONTRACT_MAX_EXAMPLES:-40}
max_time=${CONTRACT_MAX_TIME:-90}
seed=${CONTRACT_SEED:-16}
bin=${PGSIDECAR_BIN:-target/debug/pgsidecar}

venv=.venv
req=tests/contract/requirements.txt
if ! cmp -s "$req" "$venv/.installed" 2>/dev/null; then
  # Debian's python3 comes without venv and ensurepip (package python3-venv); a fresh CI
  # machine may have no python3 at all.
  if [ "$(id -u)" -eq 0 ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "contract.sh: installing python3 and python3-venv (Debian packages)" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv; } >&2
  fi
  rm -rf "$venv"
  echo "contract.sh: installing schemathesis into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$req" >&2
  cp "$req" "$venv/.installed"
fi

[ -x "$bin" ] || cargo build --quiet

work=$(mktemp -d)
db="pgsidecar_contract_$$"
psql_bin="$(scripts/pg.sh bin)/psql"
admin() { "$psql_bin" "$DATABASE_URL" -v ON_ERROR_STOP=1 -qAtX -c "$1" >/dev/null; }
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  admin "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -rf "$work"
}
trap cleanup EXIT
admin "CREATE DATABASE $db"
# DATABASE_URL with the database replaced (any query string kept).
db_url=$(python3 - "$DATABASE_URL" "$db" <<'EOF'
import sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
print(urllib.parse.urlunsplit(u._replace(path="/" + sys.argv[2])))
EOF
)

# A sidecar of its own on free ports; the start line names them. Values up to 64 KiB and a
# short request timeout keep what schemathesis generates quick to answer.
DATABASE_URL="$db_url" \
  PGSIDECAR_SERVER__DATA_LISTEN=127.0.0.1:0 PGSIDECAR_SERVER__OPS_LISTEN=127.0.0.1:0 \
  PGSIDECAR_LOG__ACCESS=errors PGSIDECAR_CLEANUP__INTERVAL_SECONDS=5 \
  "$bin" >"$work/sidecar.log" 2>&1 &
pid=$!
data=""
for _ in $(seq 1 300); do
  data=$(grep -m1 '"pgsidecar started"' "$work/sidecar.log" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["data_listen"])' 2>/dev/null || true)
  [ -n "$data" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/sidecar.log" >&2; echo "contract.sh: the sidecar exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$data" ] || { cat "$work/sidecar.log" >&2; echo "contract.sh: the sidecar did not start" >&2; exit 1; }

# All checks, every phase (examples, coverage of each schema's edges, random fuzzing, and
# stateful sequences that follow the document's links). One worker: with two, hypothesis's
# lambda descriptions hit CPython 3.11's thread-unsafe AST builder ("AST constructor recursion
# depth mismatch", gh-106905), and one keeps the order of requests, so the run, repeatable.
status=0
SCHEMATHESIS_HOOKS=tests/contract/hooks.py "$venv/bin/schemathesis" --config-file tests/contract/schemathesis.toml run openapi.json \
  --url "http://$data" \
  --checks all \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$max_examples" \
  --max-time "$max_time" \
  --seed "$seed" \
  --generation-deterministic \
  --workers 1 \
  --request-timeout 10 \
  --no-color \
  --suppress-health-check all \
  --report junit --report-dir "$work/report" \
  "$@" || status=$?

# A panic or a 500 the checks did not catch still shows in the log.
if grep -q '"level":"ERROR"' "$work/sidecar.log"; then
  echo "contract.sh: the sidecar logged errors:" >&2
  grep '"level":"ERROR"' "$work/sidecar.log" | head -20 >&2
  status=1
fi
exit "$status"
