#!/usr/bin/env bash
# On the lent GPU machine, after the ONNX Runtime GPU parts were carried (scripts/gpu/ort_cuda_pack.sh; the last
# call runs this script with the last part's folder): trt-diff's `--backend cuda` against `--backend cpu` on the
# engines built on the CPU machine (scripts/gpu/prepare_backend_cuda.sh put them and the binary in .devcarry/gpu):
#   - stories260K (llama2.c, fp32 plan): greedy text must be identical;
#   - the tiny FLUX.1-dev bundle (fp32 and NVFP4): images compared pixel by pixel;
#   - the MLP plan through `run --compare-with cpu`;
#   - `--backend auto` (TensorRT-RTX refuses Hopper, so auto must pick ONNX Runtime CUDA and say why).
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
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
"$bin" doctor
t() { local s=$(date +%s.%N); "$@"; local rc=$?; echo "  [rc=$rc, $(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $s}") s]"; return $rc; }
for p in ${STORIES:-fp32}; do
  for b in cpu cuda; do
    echo "== stories260K $p on $b"
    t "$bin" generate --engine "$g/stories_$p.plan" --prompt "Once upon a time" --max-tokens 200 --backend "$b" \
      >"$out/stories_${p}_$b.txt"
    cat "$out/stories_${p}_$b.txt"
  done
  if cmp -s "$out/stories_${p}_cpu.txt" "$out/stories_${p}_cuda.txt"; then
    echo "PASS stories260K $p: cuda text identical to cpu"
  else
    echo "FAIL stories260K $p: texts differ"
  fi
done
echo "== stories260K fp32, --backend auto (expect ONNX Runtime CUDA, TensorRT-RTX refusing Hopper)"
"$bin" generate --engine "$g/stories_fp32.plan" --prompt "Once upon a time" --max-tokens 20 2>&1 | head -5
for p in fp32 nvfp4; do
  for b in cpu cuda; do
    echo "== tiny flux $p on $b"
    t "$bin" generate --engine "$g/flux_$p.plan" --prompt "a watercolor painting of a fox in the snow" --width 64 \
      --height 64 --steps 4 --seed 1 --backend "$b" --out "$out/flux_${p}_$b.png" --no-progress
  done
  python3 - "$out/flux_${p}_cpu.png" "$out/flux_${p}_cuda.png" "$p" <<'EOF'
import sys
import numpy as np
from PIL import Image
a = np.asarray(Image.open(sys.argv[1])).astype(int)
b = np.asarray(Image.open(sys.argv[2])).astype(int)
d = np.abs(a - b)
ok = a.shape == b.shape and d.max() <= 2
print(("PASS" if ok else "FAIL"), f"tiny flux {sys.argv[3]}: cuda vs cpu image {a.shape}, max |diff| {d.max()} of 255, "
      f"{(d > 0).mean() * 100:.2f}% pixels differ")
EOF
done
echo "== MLP plan, run --backend cuda --compare-with cpu"
"$bin" run --engine "$g/mlp_f32.plan" --input "x=$g/x.npy" --backend cuda --compare-with cpu --iterations 20
echo "== bad input: --backend trt on Hopper (clear refusal expected)"
"$bin" run --engine "$g/mlp_f32.plan" --input "x=$g/x.npy" --backend trt 2>&1 | tail -2
