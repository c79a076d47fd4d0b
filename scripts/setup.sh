#!/usr/bin/env bash
# Installs into the project-local cache (.cache/) what a fresh machine lacks:
#   - the TensorRT-RTX builder/parser libraries (PyPI tensorrt-rtx-cu13-libs)
#   - TensorRT headers from the trtx-sys source package (cargo fetch; headers only, never built)
#   - ONNX Runtime (PyPI onnxruntime) for the CPU backend
#   - a Python venv with onnx, onnxruntime, ml-dtypes, numpy for the tests
# Idempotent: a finished step is skipped, so re-running offline works once it has run online.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${TRT_DIFF_CACHE:-$root/.cache}
# A complete cache that is not ours to write (e.g. the nix dev shell's TRT_DIFF_CACHE) is used as it is.
if [ -e "$cache/lib/libtensorrt_rtx.so.1" ] && [ -d "$cache/trt-headers/TRT-RTX-1.7" ] && [ -x "$cache/venv/bin/python" ] \
  && [ ! -w "$cache" ]; then
  printf '[setup] using the read-only cache %s\n' "$cache" >&2
  exit 0
fi
mkdir -p "$cache/lib"
log() { printf '[setup] %s\n' "$*" >&2; }

TRT_RTX_PIN="tensorrt-rtx-cu13-libs==1.7.1.116"
TRTX_SYS_PIN="=0.9.1"
PY_PKGS=(onnx==1.23.2 onnxruntime==1.32.0 ml-dtypes==0.6.0 numpy==2.4.6 openai==3.63.0)

# 1. Python venv with the reference tools and the wheels that carry native libraries.
venv="$cache/venv"
stamp="$venv/.trt-diff-setup-v2"
if [ ! -f "$stamp" ]; then
  log "creating Python venv in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "${PY_PKGS[@]}" "$TRT_RTX_PIN"
  touch "$stamp"
else
  log "venv present ($venv)"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# 2. Native libraries: link them into one cache folder that trt-diff searches.
rtx_dir="$site/tensorrt_rtx_libs"
for so in libtensorrt_rtx.so.1 libtensorrt_onnxparser_rtx.so.1; do
  f=$(ls "$rtx_dir"/$so* 2>/dev/null | head -n1 || true)
  [ -n "$f" ] || { log "error: $so not found in $rtx_dir (is $TRT_RTX_PIN installed?)"; exit 1; }
  ln -sfn "$f" "$cache/lib/$so"
done
ort=$(ls "$site"/onnxruntime/capi/libonnxruntime.so.1.* 2>/dev/null | head -n1 || true)
[ -n "$ort" ] || { log "error: libonnxruntime.so not found under $site/onnxruntime/capi"; exit 1; }
ln -sfn "$ort" "$cache/lib/libonnxruntime.so"

# 3. TensorRT headers from the trtx-sys source package (only its TensorRT-Headers folder is used).
hdr_link="$cache/trt-headers"
if [ ! -d "$hdr_link/TRT-RTX-1.7" ]; then
  log "fetching trtx-sys $TRTX_SYS_PIN sources for the TensorRT headers"
  fetch_dir="$cache/trtx-fetch"
  mkdir -p "$fetch_dir/src"
  cat >"$fetch_dir/Cargo.toml" <<TOML
[package]
name = "trtx-headers-fetch"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
trtx-sys = "$TRTX_SYS_PIN"
[workspace]
TOML
  : >"$fetch_dir/src/lib.rs"
  (cd "$fetch_dir" && cargo fetch --quiet)
  cargo_home=${CARGO_HOME:-$HOME/.cargo}
  src=$(ls -d "$cargo_home"/registry/src/*/trtx-sys-0.9.1* 2>/dev/null | head -n1 || true)
  [ -n "$src" ] && [ -d "$src/TensorRT-Headers" ] || { log "error: trtx-sys sources not found under $cargo_home/registry/src"; exit 1; }
  ln -sfn "$src/TensorRT-Headers" "$hdr_link"
else
  log "TensorRT headers present ($hdr_link)"
fi

# 4. The GPU executor (only with --gpu, or TRT_DIFF_GPU=1): onnxruntime-gpu (a CUDA 13 build, 256 MB) and the CUDA
#    libraries its provider needs (cuBLAS, cudart, cuRAND, cuDNN 9; about 1.5 GB) in their own venv, since
#    onnxruntime and onnxruntime-gpu cannot share one. trt-diff prefers $cache/lib/gpu/libonnxruntime.so when a GPU is
#    present; `source $cache/gpu-env.sh` puts the CUDA libraries on LD_LIBRARY_PATH.
if [ "${1:-}" = "--gpu" ] || [ "${TRT_DIFF_GPU:-0}" = 1 ]; then
  gvenv="$cache/venv-gpu"
  if [ ! -f "$gvenv/.trt-diff-setup-v1" ]; then
    log "creating the GPU venv in $gvenv (onnxruntime-gpu and the CUDA 13 libraries)"
    python3 -m venv "$gvenv"
    "$gvenv/bin/pip" install --quiet onnxruntime-gpu==1.31.1 "nvidia-cublas==13.*" "nvidia-cuda-runtime==13.*" \
      "nvidia-curand==10.*" "nvidia-cudnn-cu13==9.*"
    touch "$gvenv/.trt-diff-setup-v1"
  fi
  gsite=$("$gvenv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$cache/lib/gpu"
  gort=$(ls "$gsite"/onnxruntime/capi/libonnxruntime.so.1.* | head -n1)
  ln -sfn "$gort" "$cache/lib/gpu/libonnxruntime.so"
  dirs=$(find "$gsite/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)
  printf 'export LD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' "$dirs" >"$cache/gpu-env.sh"
  log "GPU executor: $cache/lib/gpu/libonnxruntime.so; run \`source $cache/gpu-env.sh\` before trt-diff"
fi

log "done: libraries in $cache/lib, headers in $hdr_link, venv in $venv"
