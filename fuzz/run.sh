#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each) and prints, per
# target, how long it ran and how many inputs it executed. Exit status is non-zero
# if any target crashed (the crashing input is kept under fuzz/artifacts/<target>/).
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# cargo-fuzz drives libFuzzer with `-Z` sanitizer flags, which stable rustc only
# accepts with RUSTC_BOOTSTRAP=1 (set here). Install it with
# `cargo install cargo-fuzz --locked`. New inputs go to a temporary corpus so the
# committed seeds under fuzz/corpus/ stay small.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(validate_json output_prefix jsonl)
export RUSTC_BOOTSTRAP=1
# Sanitizer builds must not share the workspace's target dir (different flags
# would invalidate it).
TARGET_DIR=${PIXFARM_FUZZ_TARGET_DIR:-${PIXFARM_CI_CACHE:-/var/cache/pixfarm}/fuzz-target}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "$WORK/$t" "corpus/$t"
  log="$WORK/$t.log"
  start=$(date +%s)
  if cargo fuzz run --target-dir "$TARGET_DIR" "$t" "$WORK/$t" "corpus/$t" -- \
      -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=4096 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
    status=1
    tail -40 "$log"
  fi
  end=$(date +%s)
  runs=$(grep -oE 'Done [0-9]+ runs' "$log" | tail -1 | grep -oE '[0-9]+' || echo '?')
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo '?')
  printf '%-14s %-5s %4ss  %10s execs  cov %s  corpus %s\n' "$t" "$result" "$((end - start))" "$runs" "$cov" \
    "$(ls "$WORK/$t" | wc -l)"
done
exit $status
