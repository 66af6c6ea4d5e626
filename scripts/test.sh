#!/usr/bin/env bash
# Runs every test: unit tests and the integration suite against real PostgreSQL.
# Reuses DATABASE_URL when set (a superuser URL: each test creates its own database);
# otherwise starts a throwaway PostgreSQL in .pgdata/test (port 54321) and stops it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ] && ! command -v promtool >/dev/null 2>&1; then
  echo "test.sh: installing promtool (Debian package prometheus) to lint /metrics" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >&2 \
    || echo "test.sh: could not install prometheus; the promtool check will be skipped" >&2
fi

started=""
if [ -z "${DATABASE_URL:-}" ]; then
  # Tests start many sidecars at once (20 connections each at most).
  scripts/pg.sh start .pgdata/test 54321 -c max_connections=500 -c fsync=off -c synchronous_commit=off \
    -c full_page_writes=off
  started=1
  export DATABASE_URL="postgres://postgres@127.0.0.1:54321/postgres"
fi
cleanup() { [ -n "$started" ] && scripts/pg.sh stop .pgdata/test; }
trap cleanup EXIT

# When promtool is here, the metrics test must run it rather than skip it.
if command -v promtool >/dev/null 2>&1; then export PGSIDECAR_REQUIRE_PROMTOOL=1; fi
# The outage test starts and stops its own PostgreSQL through scripts/pg.sh.
export PGSIDECAR_TEST_PG_SCRIPT="$PWD/scripts/pg.sh"
cargo build --quiet
cargo test --quiet -- --test-threads "${TEST_THREADS:-4}" "$@"
