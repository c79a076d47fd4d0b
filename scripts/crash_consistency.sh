#!/usr/bin/env bash
# Crash consistency: runs `build` (an ONNX MLP and the stories260K LLM bundle), `quantize` and `export` (the tiny
# Flux model), kills each at a random moment with SIGKILL, SIGTERM or SIGINT, and checks that
#   - an interrupted run leaves nothing under a final name (no plan, manifest, ONNX, tokenizer, checkpoint), or
#     the complete set when the signal lands after the last file was committed,
#   - SIGTERM/SIGINT leave no temporary (.NAME.partial-PID) and exit with 143/130,
#   - after SIGKILL (which no process can handle), an unfinished bundle's files stay only with a journal listing
#     them, and the next run writing in the folder removes them and the dead run's temporaries: nothing
#     accumulates.
# Run by hand (it takes a few minutes): scripts/crash_consistency.sh [ROUNDS]   (default 20 per command)
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=${1:-20}
data=${TRT_DIFF_SHARED_DATA:-$root/../shared/data}
(cd "$root" && cargo build --quiet) || exit 1
bin="$root/target/debug/trt-diff"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0
note() { echo "[crash] $*"; }
bad() { echo "[crash] FAIL: $*"; fail=$((fail + 1)); }

# Inputs.
python3 - "$work/in.safetensors" <<'PY'
import json, struct, sys
n = 8
tensors = {f"l{i}.weight": [1024, 1024] for i in range(n)}
header, off = {}, 0
for k, shape in tensors.items():
    size = shape[0] * shape[1] * 4
    header[k] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + size]}
    off += size
h = json.dumps(header).encode()
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h)
    row = struct.pack("<1024f", *[((i * 37) % 101 - 50) * 0.01 for i in range(1024)])
    for k, shape in tensors.items():
        f.write(row * shape[0])
PY
"$bin" convert llama2c "$data/llm/stories260K.bin" --tokenizer "$data/llm/tok512.bin" --out "$work/s.gguf" >/dev/null 2>&1
flux="$work/tiny-flux-dev"
mkdir -p "$flux"
for c in transformer vae; do ln -s "$root/tests/golden/flux/pipeline/$c" "$flux/$c"; done
for c in text_encoder text_encoder_2; do ln -s "$root/tests/golden/flux/$c" "$flux/$c"; done
toks=(--clip-tokenizer "$data/tokenizers/bpe_simple_vocab_16e6.txt.gz" --t5-tokenizer "$data/tokenizers/t5_tokenizer.json")
# One scenario: NAME, output folder, the final names to check (globs), and the command.
scenario() {
  local name=$1 out=$2 finals=$3; shift 3
  local sig killed=0 completed=0 stale_max=0
  local t0 t1 full
  # Time one complete run to spread the kill points over it.
  rm -rf "$out"; mkdir -p "$out"
  t0=$(date +%s%N)
  "$@" >/dev/null 2>&1 || { bad "$name: an uninterrupted run failed: $*"; return; }
  t1=$(date +%s%N)
  full=$(( (t1 - t0) / 1000000 ))
  # The complete set of final files: a signal that lands after the last file is committed (while the command
  # prints its summary) leaves exactly this set, which is consistent too.
  local complete
  complete=$(cd "$out" && ls -A $finals 2>/dev/null | tr '\n' ' ')
  for ((r = 0; r < rounds; r++)); do
    rm -rf "$out"; mkdir -p "$out"
    case $((RANDOM % 3)) in 0) sig=KILL ;; 1) sig=TERM ;; 2) sig=INT ;; esac
    local delay_ms=$(( RANDOM % (full + 1) ))
    "$@" >/dev/null 2>"$work/err" &
    local pid=$!
    sleep "$(awk -v ms="$delay_ms" 'BEGIN { printf "%.3f", ms / 1000 }')"
    kill -s "$sig" "$pid" 2>/dev/null
    wait "$pid"; local code=$?
    if [ "$code" = 0 ]; then
      completed=$((completed + 1))
      continue
    fi
    killed=$((killed + 1))
    local left temps journals
    left=$(cd "$out" && ls -A $finals 2>/dev/null | tr '\n' ' ')
    temps=$(find "$out" -name '.*.partial-*' | wc -l)
    journals=$(find "$out" -name '.trt-diff.bundle-*' | wc -l)
    case $sig in
      TERM|INT)
        # Cleaned up by the process itself: nothing under a final name, no temporary, no journal.
        local want=143; [ "$sig" = INT ] && want=130
        [ "$code" = "$want" ] || bad "$name: SIG$sig exit status $code (want $want)"
        [ -z "$left" ] || [ "$left" = "$complete" ] || bad "$name: SIG$sig after ${delay_ms} ms left final files: $left"
        [ "$temps" = 0 ] && [ "$journals" = 0 ] || bad "$name: SIG$sig left $temps temporaries, $journals journals: $(cd "$out" && ls -A | tr "\n" " ")" ;;
      KILL)
        # Nothing can run on SIGKILL: files of an unfinished bundle may stay until the next run in the folder,
        # but only with the journal that lists them; that run (any command writing there) removes them all.
        [ -z "$left" ] || [ "$journals" -gt 0 ] || [ "$left" = "$complete" ] || bad "$name: SIGKILL after ${delay_ms} ms left unjournaled final files: $left"
        "$bin" convert llama2c "$data/llm/stories260K.bin" --tokenizer "$data/llm/tok512.bin" \
          --out "$out/sweep.gguf" >/dev/null 2>&1 || bad "$name: the sweeping run failed"
        left=$(cd "$out" && ls -A $finals 2>/dev/null | tr '\n' ' ')
        temps=$(find "$out" -name '.*.partial-*' | wc -l)
        journals=$(find "$out" -name '.trt-diff.bundle-*' | wc -l)
        [ -z "$left" ] || [ "$left" = "$complete" ] || bad "$name: after SIGKILL (${delay_ms} ms) and the next run, final files remain: $left"
        [ "$temps" = 0 ] && [ "$journals" = 0 ] || bad "$name: $temps temporaries, $journals journals survived the next run" ;;
    esac
  done
  note "$name: full run ${full} ms; $rounds rounds: $killed interrupted, $completed finished before the signal"
}

# The ONNX build's input: the tiny Flux VAE decoder graph (with external data), as `export` writes it.
"$bin" export "$flux" --arch flux-dev "${toks[@]}" --out "$work/flux-onnx" >/dev/null 2>&1 || bad "export of the test input failed"
onnx_in="$work/flux-onnx/vae_decoder.onnx"

scenario build-onnx "$work/o1" "m.plan m.plan.json" \
  "$bin" build "$onnx_in" --out "$work/o1/m.plan" --no-progress
scenario build-llm "$work/o2" "x.plan x.plan.json x.onnx x.onnx.data x.cpu.onnx x.cpu.onnx.data x.tokenizer.gguf" \
  "$bin" build "$work/s.gguf" --out "$work/o2/x.plan" --no-progress
scenario quantize "$work/o3" "q.safetensors" \
  "$bin" quantize "$work/in.safetensors" --format nvfp4 --out "$work/o3/q.safetensors"
scenario export "$work/o4" "*.onnx *.onnx.data" \
  "$bin" export "$flux" --arch flux-dev "${toks[@]}" --out "$work/o4"
# The Flux bundle (several engines) takes longest: fewer rounds.
rounds=${FLUX_ROUNDS:-4}
scenario build-flux "$work/o5" "f.*" \
  "$bin" build "$flux" --arch flux-dev --precision nvfp4 "${toks[@]}" --image-px 32,64,128 --out "$work/o5/f.plan" \
  --no-progress

if [ "$fail" = 0 ]; then note "all scenarios consistent"; else note "$fail failures"; exit 1; fi
