#!/usr/bin/env bash
# Runs the GPU checks on a lent H100/H200 (no cargo there): the stripped examples/gpu_check binary built on the
# CPU machine, TensorRT-RTX's libraries (zstd-compressed, in parts, to fit the transfer limit), a plan built on
# the CPU machine, and the PyTorch peer. Output goes to $OUT (default ./gpu-out).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-gpu-out}
mkdir -p "$out" /tmp/trtlib
if ls .devcarry/rtx.zst.* >/dev/null 2>&1 && [ ! -f /tmp/trtlib/libtensorrt_rtx.so.1 ]; then
  z=$(command -v zstd || echo ./.devcarry/zstd)
  cat .devcarry/rtx.zst.* | "$z" -d -q --long=27 -o /tmp/trtlib/libtensorrt_rtx.so.1 || echo "zstd failed" >&2
fi
[ -f .devcarry/libtensorrt_onnxparser_rtx.so.1 ] && cp .devcarry/libtensorrt_onnxparser_rtx.so.1 /tmp/trtlib/
export TRT_LIB_DIR=/tmp/trtlib
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv | tee "$out/nvidia-smi.txt"
./.devcarry/gpu_check .devcarry/plan/mlp.plan 2>&1 | tee "$out/gpu_check.txt"
python3 scripts/gpu/torch_peer.py 2>&1 | tee "$out/torch_peer.txt"
