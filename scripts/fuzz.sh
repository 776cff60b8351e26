#!/usr/bin/env bash
# Runs the fuzz targets (chaos/fuzz, libFuzzer through cargo-fuzz) for a bounded time each:
#   scripts/fuzz.sh [--seconds N] [target ...]      default: 10 s each, every target
# Inputs that found new coverage stay in a scratch corpus (printed); the kept corpus (chaos/fuzz/corpus/<target>)
# is only read. A crash leaves its reproducer in chaos/fuzz/artifacts/<target>/: commit it with the fix, and
# `cargo nextest run -p shoal-chaos fuzz_corpus` replays it forever after.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=10
if [ "${1:-}" = --seconds ]; then seconds=$2; shift 2; fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(names digest range www_authenticate manifest peer_frame config)
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
# RocksDB's C++ takes ~15 minutes to build: link the copy the workspace build already made (same crate version,
# same options) instead of building it again under the fuzz build's flags.
lib=$(ls -t "$target_dir"/debug/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -1 || true)
if [ -n "$lib" ]; then
  export ROCKSDB_LIB_DIR=$(dirname "$lib") ROCKSDB_STATIC=1
fi
# --sanitizer none: libFuzzer's coverage needs no nightly; the code under test is safe Rust, panics are the bugs.
opts=(--fuzz-dir chaos/fuzz --sanitizer none --target-dir "$target_dir/fuzz")
cargo fuzz build "${opts[@]}"
scratch=$(mktemp -d)
echo "scratch corpus: $scratch"
printf '%-18s %12s %8s %10s\n' target executions corpus result
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "chaos/fuzz/artifacts/$t"
  log="$scratch/$t.log"
  if cargo fuzz run "${opts[@]}" "$t" "$scratch/$t" "chaos/fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -seed=1 -artifact_prefix="chaos/fuzz/artifacts/$t/" >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  printf '%-18s %12s %8s %10s\n' "$t" "${execs:-?}" "$(ls "$scratch/$t" | wc -l)" "$result"
  if [ "$result" = CRASH ]; then
    tail -40 "$log"
    failed=1
  fi
done
[ -z "${failed:-}" ]
