#!/usr/bin/env bash
# Bounded fuzzing run (CI-sized): every fuzz target for FUZZ_SECONDS seconds
# (default 20), one line per target, then "N passed, M failed". Exits
# non-zero when a target crashes, hangs or fails to build.
#
#   bash fuzz/run.sh                      # all targets, 20 s each
#   FUZZ_SECONDS=300 bash fuzz/run.sh     # a longer run
#   FUZZ_TARGETS="startup_packet relay_framer" bash fuzz/run.sh
#   FUZZ_SANITIZER=address bash fuzz/run.sh   # ASan build (slower per exec)
#
# Works on the stable toolchain: with the default FUZZ_SANITIZER=none every
# flag cargo-fuzz passes to rustc is stable (-Cpasses=sancov-module,
# -Cllvm-args=..., --cfg fuzzing, -Cdebug-assertions). A sanitizer build
# needs -Zsanitizer=..., so for one this script sets RUSTC_BOOTSTRAP=1.
# The crate has no unsafe code (#![forbid(unsafe_code)]) and what the
# targets look for is panics, overflows (debug assertions are on), hangs and
# broken invariants: without a sanitizer a target runs 3-6x more inputs.
#
# Seeds are read from corpus/<target>/ (committed, never written to); what a
# run discovers goes to target/corpus/<target>/ and crashes to
# artifacts/<target>/ (both ignored by git).
set -uo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-20}
sanitizer=${FUZZ_SANITIZER:-none}
if [ "$sanitizer" != none ]; then
  export RUSTC_BOOTSTRAP=1
fi
# ASan's leak checker reports the process's global allocations at exit.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked >/dev/null 2>&1 || {
    echo "fuzz build: FAIL (cargo install cargo-fuzz --locked)"
    echo "0 passed, 1 failed"
    exit 1
  }
fi

if [ -n "${FUZZ_TARGETS:-}" ]; then
  targets=$FUZZ_TARGETS
else
  targets=$(cargo fuzz list)
fi

# Separate target dirs per sanitizer: switching would rebuild everything.
target_dir=target/$sanitizer
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
started=$(date +%s)
if ! cargo fuzz build --sanitizer "$sanitizer" --target-dir "$target_dir" >"$build_log" 2>&1; then
  tail -30 "$build_log"
  echo "fuzz build: FAIL"
  echo "0 passed, 1 failed"
  exit 1
fi
echo "== built in $(( $(date +%s) - started )) s (sanitizer: $sanitizer, ${seconds} s per target)"

passed=0
failed=0
mkdir -p target/logs
for t in $targets; do
  mkdir -p "target/corpus/$t" "corpus/$t"
  log="target/logs/$t.log"
  cargo fuzz run --sanitizer "$sanitizer" --target-dir "$target_dir" "$t" \
    "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  if [ "$rc" = 0 ] && [ -n "$execs" ]; then
    # libFuzzer's own count: the inputs of its corpus that add coverage.
    corpus=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | sed -n 's/.* corp: \([0-9]*\).*/\1/p' | tail -1)
    echo "fuzz $t: ok ${execs} execs (corpus ${corpus:-?})"
    passed=$((passed + 1))
  else
    echo "fuzz $t: FAIL (exit $rc, ${execs:-?} execs; log fuzz/$log)"
    grep -m1 -A2 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log" | sed 's/^/    /'
    grep -m1 -o "Test unit written to .*" "$log" | sed 's/^/    /'
    failed=$((failed + 1))
  fi
done

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
