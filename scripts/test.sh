#!/usr/bin/env bash
# Runs every test: the Rust unit tests and the integration suite against real PostgreSQL and
# PgBouncer; the TypeScript client's tests (clients/typescript, node --test) and the Next.js +
# BetterAuth end-to-end test (scripts/test-typescript.sh); and, on a full run, the deployment
# snippets, the schemathesis contract test and the fuzz targets.
# Reuses DATABASE_URL when set (a superuser URL: each test creates its own database);
# otherwise starts a throwaway PostgreSQL in .pgdata/test on port PGSIDECAR_TEST_PG_PORT (default
# 54321), new for each run (the tests leave their databases behind), and deletes it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ] && ! command -v promtool >/dev/null 2>&1; then
  echo "test.sh: installing promtool (Debian package prometheus) to lint /metrics" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >&2 \
    || echo "test.sh: could not install prometheus; the promtool check will be skipped" >&2
fi

# The TLS tests make their CA and certificates, and an HTTPS server, with the openssl CLI.
if [ "$(id -u)" -eq 0 ] && ! command -v openssl >/dev/null 2>&1; then
  echo "test.sh: installing the openssl CLI (Debian package openssl) for the TLS tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends openssl; } >&2
fi

# PgBouncer (Debian's package) for the pooler, fleet and failover tests; they run as the
# postgres user when we are root, since PgBouncer refuses root.
if [ "$(id -u)" -eq 0 ] && [ ! -x /usr/sbin/pgbouncer ]; then
  echo "test.sh: installing PgBouncer (Debian package pgbouncer) for the pooler tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends pgbouncer; } >&2 \
    || echo "test.sh: could not install pgbouncer; the pooler tests will be skipped" >&2
fi

started=""
if [ -z "${DATABASE_URL:-}" ]; then
  # Tests start many sidecars at once (20 connections each at most).
  port=${PGSIDECAR_TEST_PG_PORT:-54321}
  scripts/pg.sh drop .pgdata/test
  PG_PORT_HINT="set PGSIDECAR_TEST_PG_PORT to a free port (or DATABASE_URL to your own server)" \
    scripts/pg.sh start .pgdata/test "$port" -c max_connections=500 -c fsync=off -c synchronous_commit=off \
    -c full_page_writes=off
  started=1
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
fi
# (An `if`, not `&&`: under set -e a false test would make the script's exit status 1.)
cleanup() { if [ -n "$started" ]; then scripts/pg.sh drop .pgdata/test; fi; }
trap cleanup EXIT

# When promtool is here, the metrics test must run it rather than skip it; likewise PgBouncer.
if command -v promtool >/dev/null 2>&1; then export PGSIDECAR_REQUIRE_PROMTOOL=1; fi
if [ -x /usr/sbin/pgbouncer ]; then export PGSIDECAR_REQUIRE_PGBOUNCER=1; fi
# The outage test starts and stops its own PostgreSQL through scripts/pg.sh.
export PGSIDECAR_TEST_PG_SCRIPT="$PWD/scripts/pg.sh"
cargo build --quiet
cargo test --quiet -- --test-threads "${TEST_THREADS:-4}" "$@"

# The TypeScript client (clients/typescript: npm ci, build, node --test) and the Next.js/BetterAuth
# end-to-end test, against the binary built above.
scripts/test-typescript.sh

# With test names given, only those run (the deployment check, the contract test and the
# fuzzers are for a full run).
if [ $# -eq 0 ]; then
  # The deployment snippets of docs/deploy.md against the Kubernetes and Compose schemas and
  # promtool (about 20 s the first time: a venv of pinned PyPI packages).
  scripts/deploy-check.sh

  # The contract test: schemathesis drives every route of openapi.json against the binary just
  # built (docs/fuzzing.md). About two minutes.
  step=$SECONDS
  scripts/contract.sh
  echo "test.sh: contract test passed in $((SECONDS - step)) s" >&2

  # The fuzz targets, briefly: ten seconds each (bench/fuzz.sh runs them for longer).
  step=$SECONDS
  scripts/fuzz.sh build
  scripts/fuzz.sh run "${FUZZ_SECONDS:-10}"
  echo "test.sh: fuzz targets built and run in $((SECONDS - step)) s" >&2
fi
