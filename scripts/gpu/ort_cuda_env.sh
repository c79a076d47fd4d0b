# shellcheck shell=bash
# On the lent GPU machine: `source scripts/gpu/ort_cuda_env.sh [CARRIED_DIR...]`
#
# Collects the parts that scripts/gpu/ort_cuda_pack.sh wrote (carried over one or more chained `run` calls, each
# call naming one `.devcarry/ort/cN` folder in `carry`) into /tmp/ortparts, which survives between calls while
# the machine stays warm. Once every part listed in MANIFEST is there, it reassembles and decompresses ONNX
# Runtime (onnxruntime-gpu 1.31.1, CUDA 13 build) into /tmp/ortlib (once), checks the sha256 sums, and exports
#   LD_LIBRARY_PATH  the folders of PyTorch's nvidia-*-cu13 pip packages (cuBLAS, cudart, cuRAND, cuDNN, cuFFT,
#                    ...) and /tmp/ortlib
#   ORT_DYLIB_PATH   /tmp/ortlib/libonnxruntime.so.1.31.1
#   ORT_READY        1 when the libraries are in place, else 0 (more parts needed)
# Default CARRIED_DIR: every .devcarry/ort/c* folder that exists.
_ort_env_main() {
  local parts=/tmp/ortparts lib=/tmp/ortlib d f
  mkdir -p "$parts" "$lib"
  local dirs=("$@")
  if [ ${#dirs[@]} -eq 0 ]; then dirs=(.devcarry/ort/c*); fi
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    cp -rf "$d"/. "$parts/"
  done
  export ORT_READY=0
  if [ ! -f "$parts/MANIFEST" ]; then
    echo "ort_cuda_env: no MANIFEST yet in $parts (carry .devcarry/ort/c1)" >&2
  elif [ -f "$lib/.complete" ]; then
    ORT_READY=1
  else
    local missing=0 name sum out
    while read -r kind name sum out; do
      [ "$kind" = part ] || continue
      [ -f "$parts/$name" ] || { echo "ort_cuda_env: missing $name" >&2; missing=1; }
    done <"$parts/MANIFEST"
    if [ $missing = 0 ]; then
      local ok=1
      while read -r kind name sum out; do
        [ "$kind" = file ] || continue
        # name: the compressed stream (parts joined in order), out: the library it becomes
        local tmp="$lib/$out.tmp"
        if ls "$parts/$name".part* >/dev/null 2>&1; then
          cat $(ls "$parts/$name".part* | sort) >"$tmp.xz"
        else
          cp "$parts/$name" "$tmp.xz"
        fi
        if command -v xz >/dev/null; then
          xz -d -c "$tmp.xz" >"$tmp" || ok=0
        else
          python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"), 1<<24)' "$tmp.xz" "$tmp" || ok=0
        fi
        rm -f "$tmp.xz"
        if [ "$(sha256sum "$tmp" | cut -d' ' -f1)" = "$sum" ]; then
          mv "$tmp" "$lib/$out"
        else
          echo "ort_cuda_env: sha256 mismatch for $out" >&2
          ok=0
        fi
      done <"$parts/MANIFEST"
      cp -f "$parts/libonnxruntime_providers_shared.so" "$lib/" 2>/dev/null
      chmod +x "$lib"/*.so* 2>/dev/null
      ln -sf libonnxruntime.so.1.31.1 "$lib/libonnxruntime.so"
      [ $ok = 1 ] && touch "$lib/.complete" && ORT_READY=1
    fi
  fi
  # PyTorch's CUDA 13 libraries (nvidia-*-cu13 / nvidia-* pip packages beside torch)
  local py=${ORT_PYTHON:-python3} nv
  nv=$("$py" -c 'import nvidia, os; print(os.path.abspath(list(nvidia.__path__)[0]))' 2>/dev/null)
  local nvdirs=""
  if [ -n "$nv" ]; then
    nvdirs=$(find "$nv" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -)
  fi
  export ORT_NVIDIA_DIR=$nv
  export LD_LIBRARY_PATH="$lib${nvdirs:+:$nvdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export ORT_DYLIB_PATH="$lib/libonnxruntime.so.1.31.1"
}
_ort_env_main "$@"
unset -f _ort_env_main
