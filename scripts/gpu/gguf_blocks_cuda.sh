#!/usr/bin/env bash
# On the lent GPU machine (ONNX Runtime GPU parts carried first, see scripts/gpu/ort_cuda_env.sh; this call carries
# .devcarry/gpu with the binary): the TensorRT graph of `--precision gguf` (a quantized GGUF's blocks as W4A16
# INT4 weight-only DQ, f16 products) run by ONNX Runtime's CUDA provider, against the same file's dequantized f16
# TensorRT graph (`--precision fp16`) on CUDA and the in-place CPU graph: llama.cpp's Q4_K_M file of
# tests/golden/llm/tiny_q4km and its Q8_0 Gemma 2 file (f32 products). 24 greedy tokens each, and decode speed.
# Output: $OUT/gguf_blocks_cuda.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gguf_blocks_cuda.txt") 2>&1
[ -n "${NO_ORT:-}" ] || source scripts/gpu/ort_cuda_env.sh >/dev/null 2>&1
source scripts/gpu/limited.sh
bin=${BIN_DIR:-.devcarry/gpu}/trt-diff
work=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for case in tiny_q4km/model.gguf tiny_gemma2/tiny_gemma2_q8_0.gguf; do
  name=$(dirname "$case")
  cp "$root/tests/golden/llm/$case" "$work/$name.gguf"
  for p in gguf fp16; do
    limited 180 "$bin" build "$work/$name.gguf" --precision "$p" --onnx-only --out "$work/$name.$p.plan" \
      --no-progress | tail -1
  done
  gen() { # PRECISION BACKEND
    RUST_LOG=info limited 120 "$bin" generate --engine "$work/$name.$1.plan.json" --backend "$2" --prompt "the" \
      --max-tokens 24 --ignore-eos --temperature 0 >"$work/$name.$1.$2.txt" 2>"$work/$name.$1.$2.log"
    echo "$name $1 $2 (rc $?): $(tr '\n' ' ' <"$work/$name.$1.$2.txt")"
    grep -iE "running|tok/s|token|provider|assigned|warn" "$work/$name.$1.$2.log" | tail -4
  }
  gen gguf cuda
  gen fp16 cuda
  gen gguf cpu
  if cmp -s "$work/$name.gguf.cuda.txt" "$work/$name.fp16.cuda.txt"; then
    echo "PASS $name: the INT4-block graph on cuda gives the dequantized fp16 graph's 24 tokens"
  else
    echo "DIFF $name: the INT4-block graph and the fp16 graph differ on cuda (f16 rounding of a random model?)"
  fi
  du -b "$work/$name".gguf.plan* "$work/$name".gguf.onnx* 2>/dev/null | sort -k2
done
rm -rf "$work"
