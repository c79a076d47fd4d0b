#!/usr/bin/env bash
# Fuzzes trt-diff's readers (ONNX, GGUF, safetensors, quantized checkpoints, plan manifests, the SPM/BPE/WPM/CLIP/
# T5/llama2.c tokenizers, chat templates) for a fixed time each. Run by hand or on a schedule, not in CI.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      default 600 s, every target
#   JOBS=N scripts/fuzz.sh ...                             N targets at once (default: number of CPUs)
#   EXECS=N scripts/fuzz.sh ...                            also stop a target after N executions
#
# The fuzzer is fuzz/ (its own workspace, never built by the main build; stable Rust: cargo-fuzz needs nightly).
# It builds into the repository's target/ so the main build's dependencies are reused. Findings go to
# fuzz/artifacts/TARGET/ (crash-*: a panic; oom-current: an allocation above 4 GiB; slow-*: over 2 s); a summary
# line per target goes to fuzz/artifacts/summary.txt. Reproduce with
#   target/debug/fuzz replay TARGET FILE
# and, once fixed, copy the file to fuzz/regressions/TARGET/ so tests/hardening.rs replays it in CI.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
secs=${1:-600}
shift || true
export CARGO_TARGET_DIR="$root/target"
(cd "$root/fuzz" && cargo build --quiet)
bin="$root/target/debug/fuzz"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <("$bin" list)
jobs=${JOBS:-$(nproc)}
mkdir -p "$root/fuzz/artifacts"
summary="$root/fuzz/artifacts/summary.txt"
: > "$summary"
status=0
run_one() {
  local t=$1 log="$root/fuzz/artifacts/$1.log"
  # A fresh seed per run, so repeated runs explore different mutants.
  if "$bin" run "$t" --secs "$secs" ${EXECS:+--execs "$EXECS"} --seed "$RANDOM$RANDOM" > "$log.out" 2> "$log"; then :; else
    echo "$t: exit status $? (see $log)" >> "$log.out"
  fi
  cat "$log.out" >> "$summary"
}
running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n || true; running=$((running - 1)); fi
done
wait
cat "$summary"
if grep -qE "[1-9][0-9]* panics|exit status" "$summary"; then status=1; fi
exit $status
