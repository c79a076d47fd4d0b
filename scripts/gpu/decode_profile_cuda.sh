#!/usr/bin/env bash
# On the lent GPU machine (ONNX Runtime GPU parts carried first, see scripts/gpu/ort_cuda_env.sh; this call carries
# .devcarry/gpu with the binary): where a decode step of a tiny model's CUDA graphs goes. llama.cpp's Q4_K_M file
# of tests/golden/llm/tiny_q4km built `--precision gguf` (INT4 blocked DQs) and `--precision fp16`, each generating
# 48 tokens (the file's context is 64) on ONNX Runtime's CUDA provider with its CUDA-graph replay of decode steps (the default) and without
# (`TRT_DIFF_CUDA_GRAPHS=0`, kernel by kernel), three runs each; then ONNX Runtime's per-node profile of the runs
# without replay (`TRT_DIFF_ORT_PROFILE`), summed by operator type. Output: $OUT/decode_profile_cuda.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
exec > >(tee "$out/decode_profile_cuda.txt") 2>&1
[ -n "${NO_ORT:-}" ] || source scripts/gpu/ort_cuda_env.sh >/dev/null 2>&1
source scripts/gpu/limited.sh
bin=${BIN_DIR:-.devcarry/gpu}/trt-diff
work=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cp "$root/tests/golden/llm/tiny_q4km/model.gguf" "$work/q4km.gguf"
for p in gguf fp16; do
  limited 180 "$bin" build "$work/q4km.gguf" --precision "$p" --onnx-only --out "$work/q4km.$p.plan" --no-progress |
    tail -1
done
gen() { # PRECISION CUDA_GRAPHS [PROFILE_DIR]
  TRT_DIFF_CUDA_GRAPHS=$2 TRT_DIFF_ORT_PROFILE=${3:-} limited 120 "$bin" generate \
    --engine "$work/q4km.$1.plan.json" --backend cuda --prompt "the" --max-tokens 48 --ignore-eos \
    --temperature 0 2>&1 >/dev/null | grep -E "per decode step" | sed "s/^/$1 graphs=$2: /"
}
for round in 1 2 3; do
  for p in gguf fp16; do
    gen "$p" 1
    gen "$p" 0
  done
done
for p in gguf fp16; do
  mkdir -p "$work/prof_$p"
  gen "$p" 0 "$work/prof_$p"
  echo "== profile, $p, kernel by kernel"
  python3 scripts/gpu/ort_profile_summary.py "$work/prof_$p"/*.json --top 20
done
rm -rf "$work"
