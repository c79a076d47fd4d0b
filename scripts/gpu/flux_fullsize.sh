#!/usr/bin/env bash
# On the lent GPU machine (ONNX Runtime GPU parts carried first, see scripts/gpu/ort_cuda_env.sh; this call carries
# .devcarry/gpu and .devcarry/wheels with the diffusers wheel): FLUX.1-dev shapes, 1024x1024, 28 steps, bf16,
# random weights (scripts/gpu/flux_fullsize.py), diffusers' FluxPipeline beside trt-diff's `--backend cuda` on the
# same folder. Needs about 50 GB of disk (the bf16 checkpoint, then the ONNX export of it).
# PHASE=peer (weights + diffusers) or PHASE=ours (build + trt-diff) splits it over two calls (10 minutes each at
# most); ROUNDS (default 2) alternating rounds of the fusion variants below; PROFILE=1 adds ONNX Runtime's
# per-node profile of a 2-step run. Output: $OUT/flux_fullsize[_PHASE].txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
phase=${PHASE:-all}
exec > >(tee "$out/flux_fullsize${PHASE:+_$PHASE}.txt") 2>&1
source scripts/gpu/ort_cuda_env.sh >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .devcarry/wheels/*.whl && export PYTHONPATH=/tmp/site
g=.devcarry/gpu
bin=$g/trt-diff
chmod +x "$bin"
d=/tmp/fluxfs
size=${SIZE:-1024}
steps=${STEPS:-28}
t() { local s=$(date +%s.%N); "$@"; local rc=$?; echo "  [rc=$rc, $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $s}") s]"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
[ -d $d/transformer ] || t python3 scripts/gpu/flux_fullsize.py make $d
if [ "$phase" != ours ]; then
  echo "== diffusers"
  t python3 scripts/gpu/flux_fullsize.py bench $d --size $size --steps $steps --rounds 2 2>&1 | grep -v '%|'
fi
[ "$phase" != peer ] || exit 0
echo "== trt-diff build (bf16, ONNX-only)"
[ -f /tmp/fb/flux.plan.json ] || t "$bin" build $d --arch flux-dev --precision bf16 --onnx-only --out /tmp/fb/flux.plan \
  --image-px $size,$size,$size --clip-tokenizer "$g/flux_fp32.clip-tokenizer.txt.gz" \
  --t5-tokenizer "$g/flux_fp32.t5-tokenizer.json" --no-progress
df -h /tmp | tail -1
# The CUDA path's graph fusions (TRT_DIFF_CUDA_FUSION): all of them (the default: attention, GELU, RMSNorm), the
# attention alone, none; alternating. FUSIONS picks the variants.
for r in $(seq 0 $(( ${ROUNDS:-2} - 1 ))); do
  for f in ${FUSIONS:-attention,gelu,rmsnorm attention none}; do
    tag=${f//,/_}
    echo "== trt-diff generate --backend cuda, fusions $f, round $r"
    TRT_DIFF_CUDA_FUSION=$f t timeout 600 "$bin" -v generate --engine /tmp/fb/flux.plan.json --backend cuda \
      --prompt "a fox in the snow" --width $size --height $size --steps $steps --seed $r --no-progress \
      --out "$out/flux_fullsize_${tag}_$r.png" 2>&1 | grep -v "DEBUG.*\(step\|uploading\)"
  done
done
if [ -n "${PROFILE:-}" ]; then
  # Where the time goes: ONNX Runtime's per-node profile of a 2-step run (fused attention).
  rm -rf /tmp/fprof; mkdir -p /tmp/fprof
  TRT_DIFF_ORT_PROFILE=/tmp/fprof t timeout 600 "$bin" generate --engine /tmp/fb/flux.plan.json --backend cuda \
    --prompt "a fox in the snow" --width $size --height $size --steps 2 --seed 0 --no-progress --out /tmp/fprof.png
  python3 scripts/gpu/ort_profile_summary.py /tmp/fprof/*transformer*.json --top 15
fi
