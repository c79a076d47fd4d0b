#!/usr/bin/env bash
# On the CPU machine: builds what scripts/gpu/backend_cuda.sh runs on the GPU machine into .devcarry/gpu (git-ignored):
# the stripped release binary, stories260K plans (fp32, NVFP4), tiny FLUX.1-dev bundles (fp32, NVFP4) and an MLP
# plan with an input. Carry `.devcarry/gpu` together with the last ONNX Runtime part.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
cargo build --release --bin trt-diff --example write_mlp
g=.devcarry/gpu
rm -rf "$g"
mkdir -p "$g"
cp target/release/trt-diff "$g/trt-diff"
strip --strip-debug "$g/trt-diff"
bin=target/release/trt-diff
data=${TRT_DIFF_SHARED_DATA:-$root/../shared/data}
for p in fp32 nvfp4; do
  "$bin" build "$data/llm/stories260K.bin" --arch llama2c --tokenizer "$data/llm/tok512.bin" --precision "$p" \
    --out "$g/stories_$p.plan" --no-progress
done
flux=$(mktemp -d)
for c in transformer vae; do ln -s "$root/tests/golden/flux/pipeline/$c" "$flux/$c"; done
for c in text_encoder text_encoder_2; do ln -s "$root/tests/golden/flux/$c" "$flux/$c"; done
for p in fp32 nvfp4; do
  "$bin" build "$flux" --arch flux-dev --precision "$p" --out "$g/flux_$p.plan" --image-px 32,64,128 \
    --clip-tokenizer "$data/tokenizers/bpe_simple_vocab_16e6.txt.gz" \
    --t5-tokenizer "$data/tokenizers/t5_tokenizer.json" --no-progress
done
rm -rf "$flux"
target/release/examples/write_mlp "$g/mlp_f32.onnx" f32 --dynamic --hidden 256
"$bin" build "$g/mlp_f32.onnx" --out "$g/mlp_f32.plan" --shapes x=1x64:8x64:64x64 --no-progress
"$root/.cache/venv/bin/python" -c "import numpy as np; np.save('$g/x.npy', np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))"
du -sh "$g"
