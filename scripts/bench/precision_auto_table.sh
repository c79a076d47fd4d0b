#!/usr/bin/env bash
# Issue 22's table, run by hand: on the tiny Flux, the tiny SD1.5 and stories260K, fixed fp8, fixed nvfp4, int8
# and `--precision auto` at three budgets: quality on held-out prompts (worst PSNR in dB of the final images for
# the image models, mean next-token KL in nats for the LLM), the denoiser's / decoder's graph bytes, search time.
#   scripts/bench/precision_auto_table.sh [flux] [sd] [llm]     (default: all three; CPU backend, ONNX graphs)
# Numbers go in docs/precision.md. int8 is `--precision int8` for SD (SmoothQuant, recipe alpha); Flux and the
# LLM have no fixed INT8 build, so theirs is the auto search's layer set all in INT8 through `--policy`.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_PROFILE_DEV_DEBUG=0
cargo build -q --bin trt-diff --example precision_quality
BIN=target/debug/trt-diff
Q=target/debug/examples/precision_quality
DATA=${TRT_DIFF_SHARED_DATA:-$(pwd)/../shared/data}
G=$(pwd)/tests/golden
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
CAL="a watercolor painting of a fox in the snow, 4k"
HELD=("a blue bird on a branch" "a bowl of soup on a wooden table")
HELD_ARGS=(); PROMPTS=()
for h in "${HELD[@]}"; do HELD_ARGS+=(--heldout-prompt "$h"); PROMPTS+=(--prompt "$h"); done

bytes() { local t=0; for f in "$@"; do [ -f "$f" ] && t=$((t + $(stat -c %s "$f"))); done; echo "$t"; }
row() { printf '%-8s %-22s %12s %12s %10s\n' "$@"; }
# All layers of a policy file in one format (`keep` where the format does not fit is left to the build's check).
all_in() { sed -E "/^\[layers\]/,/^\[/ s/= \"(keep|fp8|nvfp4|int8)\"/= \"$2\"/" "$1" | sed '/^\[\[measured\]\]/,$d' > "$3"; }

model() { # name kind out-name graph-file budgets... -- build args...
  local name=$1 kind=$2 out=$3 graph=$4; shift 4
  local budgets=(); while [ "$1" != "--" ]; do budgets+=("$1"); shift; done; shift
  local args=("$@") d="$W/$name"
  mkdir -p "$d"
  b() { local tag=$1; shift; mkdir -p "$d/$tag"; "$BIN" build "${args[@]}" --onnx-only --no-progress --out "$d/$tag/$out" "$@" > "$d/$tag/log" 2>&1; }
  b ref --precision fp32
  local ref=$d/ref/$out
  if [ "$kind" = image ]; then ref=${ref%.plan}.plan.json; else ref=${ref%.plan}.onnx; fi
  local eng=() tags=()
  for p in fp8 nvfp4 int8; do
    if b "$p" --precision "$p"; then tags+=("$p"); else echo "($name $p: $(tail -1 "$d/$p/log"))" >&2; fi
  done
  local start; start=$(date +%s.%N)
  b auto0 --precision auto --quality "${budgets[0]}"
  local pf=$d/auto0/${out%.plan}.policy.toml
  tags+=(auto0)
  local i=1
  for q in "${budgets[@]:1}"; do b "auto$i" --policy "$pf" --quality "$q"; tags+=("auto$i"); i=$((i + 1)); done
  if [[ ! " ${tags[*]} " =~ " int8 " ]]; then
    all_in "$pf" int8 "$d/int8.policy.toml"
    if b int8 --policy "$d/int8.policy.toml"; then tags+=(int8); fi
  fi
  for t in "${tags[@]}"; do
    if [ "$kind" = image ]; then eng+=("$d/$t/${out%.plan}.plan.json"); else eng+=("$d/$t/${out%.plan}.onnx"); fi
  done
  local extra=(); [ "$kind" = llm ] && extra=(--tokenizer "$DATA/llm/tok512.bin")
  "$Q" "$kind" "$ref" "${eng[@]}" "${PROMPTS[@]}" "${extra[@]}" > "$d/quality"
  local refbytes; refbytes=$(bytes "$d/ref/$graph" "$d/ref/$graph.data")
  for t in "${tags[@]}"; do
    local qv; qv=$(grep "/$t/" "$d/quality" | awk '{print $2}')
    local label=$t st=-
    if [[ $t == auto* ]]; then
      local f=$d/$t/${out%.plan}.policy.toml
      label="auto q=$(grep -m1 '^quality' "$f" | awk '{print $3}')"
      st=$(grep -m1 '^search_seconds' "$f" | awk '{printf "%.1f", $3}')
    fi
    row "$name" "$label" "$qv" "$(bytes "$d/$t/$graph" "$d/$t/$graph.data")" "$st"
  done
  row "$name" "fp32" "-" "$refbytes" "-"
}

row model precision quality graph_bytes search_s
for m in "${@:-flux sd llm}"; do for x in $m; do case $x in
  flux)
    mkdir -p "$W/tiny-flux"
    for p in transformer:pipeline/transformer vae:pipeline/vae text_encoder:text_encoder text_encoder_2:text_encoder_2; do
      ln -s "$G/flux/${p#*:}" "$W/tiny-flux/${p%%:*}"; done
    model flux image flux.plan flux.transformer.onnx 50 40 30 -- "$W/tiny-flux" --arch flux-dev \
      --clip-tokenizer "$DATA/tokenizers/bpe_simple_vocab_16e6.txt.gz" --t5-tokenizer "$DATA/tokenizers/t5_tokenizer.json" \
      --image-px 32,32,64 --calibration-prompt "$CAL" --calibration-steps 2 "${HELD_ARGS[@]}" ;;
  sd)
    mkdir -p "$W/tiny-sd/scheduler"
    ln -s "$G/sd/sd15/unet" "$W/tiny-sd/unet"; ln -s "$G/sd/sd15/vae" "$W/tiny-sd/vae"
    ln -s "$G/flux/text_encoder" "$W/tiny-sd/text_encoder"
    echo '{"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"}' > "$W/tiny-sd/scheduler/scheduler_config.json"
    model sd image sd.plan sd.unet.onnx 60 45 35 -- "$W/tiny-sd" --arch sd15 \
      --clip-tokenizer "$DATA/tokenizers/bpe_simple_vocab_16e6.txt.gz" \
      --image-px 32,32,64 --calibration-prompt "$CAL" --calibration-steps 2 "${HELD_ARGS[@]}" ;;
  llm)
    HELD=("One day, a big dog found a red box in the garden." "The sun was shining and the children were happy.")
    HELD_ARGS=(); PROMPTS=()
    for h in "${HELD[@]}"; do HELD_ARGS+=(--heldout-prompt "$h"); PROMPTS+=(--prompt "$h"); done
    model llm llm s.plan s.onnx 0.002 0.02 0.05 -- "$DATA/llm/stories260K.bin" --arch llama2c \
      --tokenizer "$DATA/llm/tok512.bin" "${HELD_ARGS[@]}" \
      --calibration-prompt "Once upon a time, there was a little girl named Lily." \
      --calibration-prompt "Tom and his mom went to the park to play with a ball." ;;
  *) echo "unknown model '$x': flux, sd or llm" >&2; exit 1 ;;
esac; done; done
