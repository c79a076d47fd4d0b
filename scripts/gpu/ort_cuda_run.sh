#!/usr/bin/env bash
# On the lent GPU machine, in the repository root, after scripts/gpu/ort_cuda_pack.sh's folders were carried:
#   bash scripts/gpu/ort_cuda_run.sh [CARRIED_DIR...]
# Reassembles ONNX Runtime (scripts/gpu/ort_cuda_env.sh), shows what the CUDA provider resolves to, and runs
# ort_cuda_check (CUDA EP required, no CPU fallback; host run, IoBinding with device buffers, timings) three ways:
# with no extra library path (expected to fail: shows the error), with the minimal path, with the full recipe.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
t0=$(date +%s.%N)
source scripts/gpu/ort_cuda_env.sh "$@"
echo "ORT_READY=$ORT_READY (reassembly $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s)"
[ "$ORT_READY" = 1 ] || exit 3
ls -la /tmp/ortlib
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
echo "== nvidia dir: $ORT_NVIDIA_DIR"
find "$ORT_NVIDIA_DIR" -name 'lib*.so*' | sed "s|$ORT_NVIDIA_DIR/||" | sort | grep -E 'cublas|cudart|curand|cudnn|cufft|nvrtc|nvJitLink' | tr '\n' ' '; echo
python3 - <<'EOF'
import importlib.metadata as m
for p in ["torch", "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-curand", "nvidia-cudnn-cu13", "nvidia-cufft", "onnxruntime"]:
    try: print(p, m.version(p))
    except Exception as e: print(p, "-", e)
try:
    import torch
    print("torch.backends.cudnn.version()", torch.backends.cudnn.version(), "torch.version.cuda", torch.version.cuda)
except Exception as e:
    print("torch:", e)
EOF
full_path=$LD_LIBRARY_PATH
# the folders holding exactly what the provider needs (NEEDED + cuDNN, which it loads at run time)
min=""
for l in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libcudnn.so.9; do
  d=$(dirname "$(find "$ORT_NVIDIA_DIR" -name "$l" | head -1)")
  case ":$min:" in *":$d:"*) ;; *) min="${min:+$min:}$d" ;; esac
done
min_path="/tmp/ortlib:$min"
echo "== minimal LD_LIBRARY_PATH=$min_path"
echo "== full    LD_LIBRARY_PATH=$full_path"
echo "== ldd libonnxruntime_providers_cuda.so (minimal path)"
LD_LIBRARY_PATH=$min_path ldd /tmp/ortlib/libonnxruntime_providers_cuda.so
chk=/tmp/ortparts/ort_cuda_check
chmod +x "$chk"
echo "== run 1: no LD_LIBRARY_PATH (expected to fail)"
env -u LD_LIBRARY_PATH "$chk" "$ORT_DYLIB_PATH" /tmp/ortparts/model 2>&1 | grep -v '^\[ort' | head -5
echo "== run 2: minimal LD_LIBRARY_PATH"
LD_LIBRARY_PATH=$min_path "$chk" "$ORT_DYLIB_PATH" /tmp/ortparts/model 2>&1 | tee "${OUT:-/tmp}/ort_check_min.txt" | grep -v 'Node placements\|^\[ort Verbose' | head -40
echo "rc=${PIPESTATUS[0]}"
grep -c '^\[ort' "${OUT:-/tmp}/ort_check_min.txt" | sed 's/^/ORT log lines: /'
grep -E 'placed on|All nodes|Node\(s\) placed|Provider' "${OUT:-/tmp}/ort_check_min.txt" | head -12
echo "== run 3: full recipe (all nvidia lib folders)"
LD_LIBRARY_PATH=$full_path "$chk" "$ORT_DYLIB_PATH" /tmp/ortparts/model 2>&1 | grep -E 'PASS|FAIL|median|session|run'
if [ "${STRIP_TEST:-1}" = 1 ]; then
  echo "== run 4: the same provider with only its sm_90 cubins kept (scripts/gpu/fatbin_strip.py), minimal path"
  mkdir -p /tmp/ortlib_sm90
  cp -f /tmp/ortlib/libonnxruntime.so.1.31.1 /tmp/ortlib/libonnxruntime_providers_shared.so /tmp/ortlib_sm90/
  python3 scripts/gpu/fatbin_strip.py /tmp/ortlib/libonnxruntime_providers_cuda.so /tmp/ortlib_sm90/libonnxruntime_providers_cuda.so --keep 90 | tail -1
  sha256sum /tmp/ortlib_sm90/libonnxruntime_providers_cuda.so
  LD_LIBRARY_PATH="/tmp/ortlib_sm90:$min" "$chk" /tmp/ortlib_sm90/libonnxruntime.so.1.31.1 /tmp/ortparts/model 2>&1 | grep -E 'PASS|FAIL|median|session|run|rror'
fi
echo "total $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"
