#!/usr/bin/env bash
# On the lent GPU machine, after the ONNX Runtime GPU parts were carried (scripts/gpu/ort_cuda_pack.sh; the last
# call runs this script with the last part's folder): trt-diff's `--backend cuda` against `--backend cpu` on the
# engines built on the CPU machine (scripts/gpu/prepare_backend_cuda.sh put them and the binary in .devcarry/gpu):
#   - stories260K (llama2.c, fp32 plan): greedy text must be identical;
#   - the tiny FLUX.1-dev bundle (fp32 and NVFP4): images compared pixel by pixel; a bf16 ONNX-only bundle built
#     there (no TensorRT needed) run on the GPU;
#   - the MLP plan through `run --compare-with cpu`;
#   - `--backend auto` (TensorRT-RTX refuses Hopper, so auto must pick ONNX Runtime CUDA and say why).
# Every command has a time limit, and the GPU runs log at debug level (where a hang sits shows in the log).
# Output: $OUT/backend_cuda.txt plus the images.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
exec > >(tee "$out/backend_cuda.txt") 2>&1
source scripts/gpu/ort_cuda_env.sh "$@"
[ "${ORT_READY:-0}" = 1 ] || { echo "ONNX Runtime GPU parts incomplete"; exit 3; }
g=.devcarry/gpu
bin=$g/trt-diff
chmod +x "$bin"
limit=${LIMIT:-60}
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
"$bin" doctor
source scripts/gpu/limited.sh
# Runs a command under the time limit (stacks printed if it hangs); the timing goes to stderr so that stdout can
# be compared.
t() { limited "$limit" "$@"; }
for b in cpu cuda; do
  echo "== stories260K fp32 on $b"
  t "$bin" generate --engine "$g/stories_fp32.plan" --prompt "Once upon a time" --max-tokens 200 --backend "$b" \
    >"$out/stories_fp32_$b.txt"
  cat "$out/stories_fp32_$b.txt"
done
if cmp -s "$out/stories_fp32_cpu.txt" "$out/stories_fp32_cuda.txt"; then
  echo "PASS stories260K fp32: cuda text identical to cpu"
else
  echo "FAIL stories260K fp32: texts differ"
fi
echo "== stories260K fp32, --backend auto (expect ONNX Runtime CUDA, TensorRT-RTX refusing Hopper)"
t "$bin" generate --engine "$g/stories_fp32.plan" --prompt "Once upon a time" --max-tokens 20 2>&1 | grep -v '^  /'
echo "== MLP plan, run --backend cuda --compare-with cpu"
t "$bin" run --engine "$g/mlp_f32.plan" --input "x=$g/x.npy" --backend cuda --compare-with cpu --iterations 20
echo "== bad input: --backend trt on Hopper (clear refusal expected)"
t "$bin" run --engine "$g/mlp_f32.plan" --input "x=$g/x.npy" --backend trt 2>&1 | tail -2
compare() {
  python3 - "$@" <<'PY'
import sys
import numpy as np
from PIL import Image
a = np.asarray(Image.open(sys.argv[1])).astype(int)
b = np.asarray(Image.open(sys.argv[2])).astype(int)
d = np.abs(a - b)
ok = a.shape == b.shape and d.max() <= 2
print(("PASS" if ok else "FAIL"), f"{sys.argv[3]}: cuda vs cpu image {a.shape}, max |diff| {d.max()} of 255, "
      f"{(d > 0).mean() * 100:.2f}% pixels differ")
PY
}
flux_args=(--prompt "a watercolor painting of a fox in the snow" --width 64 --height 64 --steps 4 --seed 1 --no-progress)
for p in ${FLUX:-fp32 nvfp4}; do
  for b in cpu cuda; do
    echo "== tiny flux $p on $b"
    TRT_DIFF_LOG=$([ $b = cuda ] && echo debug || echo info) \
      t "$bin" generate --engine "$g/flux_$p.plan" "${flux_args[@]}" --backend "$b" --out "$out/flux_${p}_$b.png"
  done
  [ -f "$out/flux_${p}_cuda.png" ] && compare "$out/flux_${p}_cpu.png" "$out/flux_${p}_cuda.png" "tiny flux $p"
done
echo "== tiny flux bf16, ONNX-only bundle built here, on cuda"
m=/tmp/tinyflux
mkdir -p $m
for c in transformer vae; do ln -sfn "$PWD/tests/golden/flux/pipeline/$c" "$m/$c"; done
for c in text_encoder text_encoder_2; do ln -sfn "$PWD/tests/golden/flux/$c" "$m/$c"; done
t "$bin" build $m --arch flux-dev --precision bf16 --onnx-only --out /tmp/fluxbf16/flux.plan --image-px 32,64,128 \
  --clip-tokenizer "$g/flux_fp32.clip-tokenizer.txt.gz" --t5-tokenizer "$g/flux_fp32.t5-tokenizer.json" --no-progress
TRT_DIFF_LOG=debug t "$bin" generate --engine /tmp/fluxbf16/flux.plan.json "${flux_args[@]}" --backend cuda \
  --out "$out/flux_bf16_cuda.png"
