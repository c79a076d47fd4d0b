#!/usr/bin/env bash
# On the lent GPU machine (ONNX Runtime GPU parts carried first, see scripts/gpu/ort_cuda_env.sh; this call carries
# .devcarry/gpu with the binary and the CLIP and T5 vocabularies): the paths added on 2026-12-06 against the CPU
# backend on the tiny golden models: ControlNet-Union for FLUX.1 and SDXL (one and two controls), and the Gemma 2 /
# Gemma 3 decoders (bf16 CUDA graph from the Hugging Face folders; the llama.cpp Q8_0 GGUF run directly).
# Output: $OUT/new_paths_cuda.txt and the images.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
exec > >(tee "$out/new_paths_cuda.txt") 2>&1
[ -n "${NO_ORT:-}" ] || source scripts/gpu/ort_cuda_env.sh >/dev/null 2>&1
source scripts/gpu/image_lib.sh
control=$golden/flux/controlnet/control.png
build fluxunion "$(flux_folder)" --arch flux-dev --clip-tokenizer "$vocab" --t5-tokenizer "$t5_vocab" \
  --controlnet "$golden/flux/controlnet_union/model"
run fluxunion depth --steps 3 --control "$control" --control-mode depth --control-strength 0.7
run fluxunion two --steps 3 --control "$control" --control-mode canny --control "$golden/flux/controlnet_union/control2.png" \
  --control-mode pose
build sdxlunion "$(sd_folder sdxlunion sd/sdxl/unet sd/sdxl/pipeline_text_encoder_2)" --arch sdxl \
  --clip-tokenizer "$vocab" --image-px 32,32,64 --controlnet "$golden/sd/controlnet_union/model"
run sdxlunion canny --steps 4 --control "$control" --control-mode canny --control-strength 0.7
run sdxlunion two --steps 4 --control "$control" --control-mode depth --control "$golden/sd/controlnet_union/control2.png" \
  --control-mode tile
# Gemma: the tiny golden models (bf16 weights) with the vocabulary of their llama.cpp Q8_0 GGUF.
for arch in gemma2 gemma3; do
  d=$golden/llm/tiny_$arch
  vocab_gguf=$d/tiny_${arch}_q8_0.gguf
  limited 120 "$bin" build "$d" --tokenizer "$vocab_gguf" --onnx-only --out "$work/$arch.plan" --no-progress | tail -1
  for b in cpu cuda; do
    limited 60 "$bin" generate --engine "$work/$arch.plan.json" --backend "$b" --prompt "t1 t2 t3" --max-tokens 16 \
      --ignore-eos >"$work/$arch.$b.txt" 2>"$work/$arch.$b.log"
    tail -1 "$work/$arch.$b.log"
  done
  if cmp -s "$work/$arch.cpu.txt" "$work/$arch.cuda.txt"; then
    echo "PASS $arch HF folder: cuda gives the CPU graph's 16 tokens: $(cat "$work/$arch.cuda.txt")"
  else
    echo "FAIL $arch HF folder: cuda '$(cat "$work/$arch.cuda.txt")' vs cpu '$(cat "$work/$arch.cpu.txt")'"
  fi
  TRT_DIFF_MODEL_CACHE=$work/cache limited 120 "$bin" generate --engine "$vocab_gguf" --backend cuda \
    --prompt "t1 t2 t3" --max-tokens 16 --ignore-eos >"$work/$arch.q8.txt" 2>"$work/$arch.q8.log"
  echo "$arch Q8_0 GGUF run directly on cuda (rc $?): $(cat "$work/$arch.q8.txt") / $(tail -1 "$work/$arch.q8.log")"
done
rm -rf "$work"
