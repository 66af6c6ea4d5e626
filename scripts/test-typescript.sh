#!/usr/bin/env bash
# Tests the TypeScript client (clients/typescript) against the real sidecar and PostgreSQL:
# its unit tests, then the Next.js 16 + BetterAuth end-to-end test (two `next start` instances,
# two sidecars, one database). Run by scripts/test.sh after the Rust tests, with DATABASE_URL (a
# superuser URL: each suite creates its own database) and the sidecar built in target/debug.
# Installs only from the committed lock files (npm ci); the app gets the client as `npm pack` makes it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "test-typescript.sh: node and npm not found; the TypeScript client's tests need Node.js 20 or newer (Debian: apt-get install nodejs npm)" >&2
  exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "test-typescript.sh: Node.js $(node --version) is too old; the TypeScript client needs Node.js 20 or newer" >&2
  exit 1
fi
: "${DATABASE_URL:?test-typescript.sh: DATABASE_URL must point at a PostgreSQL superuser (scripts/test.sh sets it)}"
export PGSIDECAR_BIN="${PGSIDECAR_BIN:-$PWD/target/debug/pgsidecar}"
[ -x "$PGSIDECAR_BIN" ] || { echo "test-typescript.sh: $PGSIDECAR_BIN not found; run cargo build first" >&2; exit 1; }
export NEXT_TELEMETRY_DISABLED=1 npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false

cd clients/typescript
started=$(date +%s)
npm ci --loglevel=error
npm run --silent build
node --test --test-concurrency=1 test/
echo "test-typescript.sh: client unit tests took $(( $(date +%s) - started )) s" >&2

started=$(date +%s)
pack=$(mktemp -d)
trap 'rm -rf "$pack"' EXIT
npm pack --silent --pack-destination "$pack" >/dev/null
# Publish-ready: what `npm publish` would do, short of uploading.
npm publish --dry-run >"$pack/publish.log" 2>&1 || { cat "$pack/publish.log" >&2; exit 1; }
(cd e2e && npm ci --loglevel=error && npm install --no-save --loglevel=error "$pack"/pgsidecar-client-*.tgz)
node --test e2e/driver/
echo "test-typescript.sh: Next.js end-to-end test (install, build, run) took $(( $(date +%s) - started )) s" >&2
