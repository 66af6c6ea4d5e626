#!/usr/bin/env bash
# The fuzz targets for longer than scripts/test.sh runs them (ten seconds each there).
#
#   bench/fuzz.sh                 # every target 5 minutes (one per CPU: 15 minutes on two)
#   bench/fuzz.sh 3600 config     # one target for an hour
#   FUZZ_SANITIZER=address bench/fuzz.sh 600   # with AddressSanitizer (RUSTC_BOOTSTRAP=1)
#
# The corpora grow in bench/work/fuzz/<target> from one run to the next (the committed seeds in
# fuzz/corpus/ are read, not written). bench/fuzz.sh --seeds refreshes those seeds from the grown
# corpora: the smallest set of inputs that reaches every edge they reach (libFuzzer -merge with
# -use_counters=0), to commit. A summary line per target goes to bench/results/fuzz-<time>.txt.
# Failing inputs: fuzz/artifacts/<target>/, with the command that reproduces each.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/work/fuzz bench/results

if [ "${1:-}" = "--seeds" ]; then
  scripts/fuzz.sh build
  for t in $(scripts/fuzz.sh list); do
    [ -d "bench/work/fuzz/$t" ] || continue
    new=$(mktemp -d)
    bin=fuzz/target/x86_64-unknown-linux-gnu/debug/$t
    "$bin" -merge=1 -use_counters=0 -max_len=4096 "$new" "fuzz/corpus/$t" "bench/work/fuzz/$t" >/dev/null 2>&1
    rm -rf "fuzz/corpus/$t"
    mv "$new" "fuzz/corpus/$t"
    echo "fuzz/corpus/$t: $(find "fuzz/corpus/$t" -type f | wc -l) files, $(cat "fuzz/corpus/$t"/* 2>/dev/null | wc -c) bytes"
  done
  exit 0
fi

seconds=${1:-300}
shift || true
scripts/fuzz.sh build
out=bench/results/fuzz-$(date -u +%Y%m%dT%H%M%SZ).txt
{
  echo "# $(git rev-parse --short HEAD 2>/dev/null || echo unknown), ${seconds} s per target, sanitizer ${FUZZ_SANITIZER:-none}, load average $(cut -d' ' -f1 /proc/loadavg)"
  FUZZ_CORPUS_DIR=bench/work/fuzz scripts/fuzz.sh run "$seconds" "$@"
} | tee "$out"
