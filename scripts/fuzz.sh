#!/usr/bin/env bash
# The fuzz targets (fuzz/, cargo-fuzz and libFuzzer): build them, run them. docs/fuzzing.md says
# what each one checks and why they run this way on stable Rust.
#
#   scripts/fuzz.sh build                      install cargo-fuzz (pinned) if needed, build all
#   scripts/fuzz.sh run SECONDS [TARGET...]    run each target (default: all) for SECONDS, one per CPU
#   scripts/fuzz.sh list                       the targets
#
# New inputs go to FUZZ_CORPUS_DIR/<target> (default: a temporary directory, removed after);
# the committed seeds in fuzz/corpus/<target> are read, never written. A failing input is kept
# in fuzz/artifacts/<target>/ and the run exits 1 with the command that reproduces it.
# FUZZ_SANITIZER=address builds with AddressSanitizer instead (RUSTC_BOOTSTRAP=1, release
# profile: slower to build, see docs/fuzzing.md); the default is none.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
sanitizer=${FUZZ_SANITIZER:-none}
if [ "$sanitizer" = none ]; then
  # Stable Rust, no -Z flag: the unoptimized profile of fuzz/Cargo.toml (half the build time of
  # a release build; libFuzzer itself and the TOML parser optimized there).
  flags=(--sanitizer none --dev)
else
  # Sanitizers are a nightly feature (-Zsanitizer): RUSTC_BOOTSTRAP lets the stable compiler
  # accept it. Release, as cargo-fuzz defaults to.
  export RUSTC_BOOTSTRAP=1
  flags=(--sanitizer "$sanitizer")
fi

targets() { sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^pgsidecar-fuzz$'; }

ensure_cargo_fuzz() {
  if [ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io" >&2
    # --debug: a command-line wrapper gains nothing from optimization, and unoptimized it
    # installs in about half the time (36 s of CPU instead of 57 s).
    cargo install --quiet --locked --debug cargo-fuzz --version "$CARGO_FUZZ_VERSION" >&2
  fi
}

build() {
  ensure_cargo_fuzz
  cargo fuzz build "${flags[@]}" >&2
}

run() {
  local secs=$1
  shift
  local list=("$@")
  [ ${#list[@]} -gt 0 ] || mapfile -t list < <(targets)
  ensure_cargo_fuzz
  local out=${FUZZ_CORPUS_DIR:-}
  local tmp=""
  if [ -z "$out" ]; then
    tmp=$(mktemp -d)
    out=$tmp
  fi
  # One target per CPU at a time (FUZZ_JOBS): each still gets its SECONDS of a whole CPU, and
  # the six take half the time on a 2-CPU CI machine.
  local jobs=${FUZZ_JOBS:-$(nproc)}
  local failed=0 t log
  for t in "${list[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    mkdir -p "$out/$t" "fuzz/corpus/$t"
    # -max_len: room for a structured input (a configuration, a query of many pairs);
    # -len_control=0: at that length from the start rather than growing to it slowly;
    # -timeout: one input taking 10 s is a hang, reported as a failure.
    (
      rc=0
      cargo fuzz run "${flags[@]}" "$t" "$out/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len=4096 -len_control=0 -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 >"$out/$t.log" 2>&1 || rc=$?
      echo "$rc" >"$out/$t.rc"
    ) &
  done
  wait
  for t in "${list[@]}"; do
    log="$out/$t.log"
    if [ "$(cat "$out/$t.rc" 2>/dev/null)" = 0 ]; then
      echo "fuzz $t: ok, $(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$') inputs in ${secs}s, $(grep -o 'cov: [0-9]*' "$log" | tail -1) edges, corpus $(find "$out/$t" "fuzz/corpus/$t" -type f | wc -l)"
    else
      failed=1
      echo "fuzz $t: FAILED" >&2
      # The panic, the input and the command that reproduces it.
      grep -v '^#[0-9]' "$log" | tail -n 40 >&2
    fi
  done
  [ -z "$tmp" ] || rm -rf "$tmp"
  return "$failed"
}

case "${1:-}" in
  build) build ;;
  run)
    [ $# -ge 2 ] || { echo "usage: $0 run SECONDS [TARGET...]" >&2; exit 2; }
    shift
    run "$@"
    ;;
  list) targets ;;
  *)
    echo "usage: $0 build | run SECONDS [TARGET...] | list" >&2
    exit 2
    ;;
esac
