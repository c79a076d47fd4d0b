#!/usr/bin/env bash
# The main job on this machine: set up, build trt-diff, write an MLP model as ONNX in four precisions and build
# real TensorRT engines from them (the TensorRT-RTX builder runs without a GPU), then show what was built.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
cargo build --release --bins --examples
bin=target/release/trt-diff
out=target/demo
mkdir -p "$out"
"$bin" doctor
for p in f32 f16 fp8 nvfp4; do
  target/release/examples/write_mlp "$out/mlp_$p.onnx" "$p" --dynamic --hidden 256
  "$bin" build "$out/mlp_$p.onnx" --out "$out/mlp_$p.plan" --shapes x=1x64:8x64:64x64 --timing-cache "$out/timing.cache"
done
"$bin" build "$out/mlp_nvfp4.onnx" --out "$out/mlp_nvfp4_blackwell.plan" --shapes x=1x64:8x64:64x64 --targets sm120,sm121
"$bin" inspect "$out/mlp_nvfp4.onnx"
"$bin" inspect "$out/mlp_nvfp4_blackwell.plan"
# A real model: stories260K (llama2.c) as a KV-cache decoder engine, in fp32 and NVFP4, then text from it
# (on the CPU through ONNX Runtime when no TensorRT-capable GPU is present).
data=${TRT_DIFF_SHARED_DATA:-$root/../shared/data}
for p in fp32 nvfp4; do
  "$bin" build "$data/llm/stories260K.bin" --arch llama2c --tokenizer "$data/llm/tok512.bin" --precision "$p" \
    --out "$out/stories_$p.plan"
  "$bin" generate --engine "$out/stories_$p.plan" --prompt "Once upon a time" --max-tokens 60
done
# The same model as an ordinary GGUF (llama architecture, tokenizer in the metadata), built in fp16 and run.
"$bin" convert llama2c "$data/llm/stories260K.bin" --tokenizer "$data/llm/tok512.bin" --out "$out/stories260K.gguf"
"$bin" tokenize --vocab "$out/stories260K.gguf" "Once upon a time"
"$bin" build "$out/stories260K.gguf" --precision fp16 --out "$out/stories_gguf_fp16.plan"
"$bin" generate --engine "$out/stories_gguf_fp16.plan" --prompt "Once upon a time" --max-tokens 60
# Flux: a tiny random FLUX.1-dev in diffusers' folder layout (real formats: safetensors + config.json per component,
# the real CLIP BPE and T5 tokenizers) built into an NVFP4 bundle (TensorRT-RTX engines for every component), then an
# image from it with live previews (on the CPU through ONNX Runtime when no TensorRT-capable GPU is present).
flux="$out/tiny-flux-dev"
rm -rf "$flux"
mkdir -p "$flux"
for c in transformer vae; do ln -s "$root/tests/golden/flux/pipeline/$c" "$flux/$c"; done
for c in text_encoder text_encoder_2; do ln -s "$root/tests/golden/flux/$c" "$flux/$c"; done
"$bin" build "$flux" --arch flux-dev --precision nvfp4 --out "$out/flux.plan" --image-px 32,64,128 \
  --clip-tokenizer "$data/tokenizers/bpe_simple_vocab_16e6.txt.gz" --t5-tokenizer "$data/tokenizers/t5_tokenizer.json" \
  --tae-decoder "$root/tests/golden/flux/pipeline/tae_decoder.safetensors" --no-progress
"$bin" generate --engine "$out/flux.plan" --prompt "a watercolor painting of a fox in the snow" --width 64 --height 64 \
  --steps 4 --seed 1 --preview "$out/flux_preview.png" --out "$out/flux.png"
