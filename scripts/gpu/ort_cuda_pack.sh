#!/usr/bin/env bash
# On the CPU machine: packs ONNX Runtime's CUDA build (PyPI onnxruntime-gpu 1.31.1, CUDA 13) for the lent GPU
# machine, whose transfer limit is 64 MiB a call (working tree included).
#
#   scripts/gpu/ort_cuda_pack.sh              # unmodified provider: 4 calls (.devcarry/ort/c1 .. c4)
#   KEEP_SM=90 scripts/gpu/ort_cuda_pack.sh   # sm_90 cubins only (H100/H200; not yet verified on a GPU): 2 calls
#
# Steps: pip download the wheel (cached in $ORT_CACHE), extract libonnxruntime.so.1.31.1,
# libonnxruntime_providers_shared.so and libonnxruntime_providers_cuda.so; with KEEP_SM (e.g. 90) zero the
# cubins of every other GPU architecture in the CUDA provider (scripts/gpu/fatbin_strip.py: same file layout,
# 218 MB of cubins for sm_75..sm_120 shrink to the 77 MB of sm_90 ones; the cubins are already compressed
# inside the fatbin, so xz gains little on them); xz -9e each library; split the provider's
# stream into parts; lay the parts out as one folder per call, .devcarry/ort/c1 .. cN, each under CALL_MIB
# together with the working tree; c1 also holds MANIFEST (sha256 of each decompressed library), the shared
# provider library, the check program (scripts/gpu/ort_cuda_check, built here) and its model
# (scripts/gpu/ort_cuda_model.py).
#
# There: call k carries .devcarry/ort/ck and runs `source scripts/gpu/ort_cuda_env.sh .devcarry/ort/ck`; chain the
# calls quickly (the machine stays warm 30 s). The last one can run `bash scripts/gpu/ort_cuda_run.sh`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
VERSION=1.31.1
KEEP_SM=${KEEP_SM-}
ORT_CACHE=${ORT_CACHE:-/tmp/ortgpu}
OUTDIR=${ORT_OUTDIR:-.devcarry/ort}
PY=${ORT_PY:-.cache/venv/bin/python}   # needs numpy + onnx (for the model only)

# working tree that travels with every call (tracked + untracked-not-ignored files)
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
CALL_MIB=${CALL_MIB:-$(( 62 - (tree + 1048575) / 1048576 ))}
echo "working tree ${tree} bytes; budget ${CALL_MIB} MiB of carried files per call"

mkdir -p "$ORT_CACHE"
whl=$(ls "$ORT_CACHE"/onnxruntime_gpu-$VERSION-cp312-*.whl 2>/dev/null | head -1 || true)
if [ -z "$whl" ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 "onnxruntime-gpu==$VERSION" -d "$ORT_CACHE"
  whl=$(ls "$ORT_CACHE"/onnxruntime_gpu-$VERSION-cp312-*.whl | head -1)
fi
x="$ORT_CACHE/x"
if [ ! -f "$x/onnxruntime/capi/libonnxruntime_providers_cuda.so" ]; then
  unzip -o -q "$whl" 'onnxruntime/capi/libonnxruntime*' -d "$x"
fi
capi="$x/onnxruntime/capi"
for f in libonnxruntime.so.$VERSION libonnxruntime_providers_cuda.so; do
  echo "== NEEDED of $f"; readelf -d "$capi/$f" | grep NEEDED | sed 's/.*\[\(.*\)\]/  \1/' | tr '\n' ' '; echo
done

w="$ORT_CACHE/work${KEEP_SM:+-sm$KEEP_SM}"
mkdir -p "$w"
prov="$capi/libonnxruntime_providers_cuda.so"
if [ -n "$KEEP_SM" ]; then
  if [ ! -f "$w/libonnxruntime_providers_cuda.so" ]; then
    python3 scripts/gpu/fatbin_strip.py "$prov" "$w/libonnxruntime_providers_cuda.so" --keep "$KEEP_SM"
  fi
  prov="$w/libonnxruntime_providers_cuda.so"
fi
compress() { # src dst
  if [ ! -f "$2" ] || [ "$1" -nt "$2" ]; then
    echo "xz -9e $(basename "$1") ($(stat -c %s "$1") bytes) ..."
    xz -9e -T0 -c "$1" >"$2.tmp" && mv "$2.tmp" "$2"
  fi
}
compress "$capi/libonnxruntime.so.$VERSION" "$w/ort.xz"
compress "$prov" "$w/cuda.xz"

# check program and model
cargo build --release --offline --quiet --manifest-path scripts/gpu/ort_cuda_check/Cargo.toml \
  --target-dir "$ORT_CACHE/check-target"
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR/c1"
cp "$ORT_CACHE/check-target/release/ort_cuda_check" "$OUTDIR/c1/"
"$PY" scripts/gpu/ort_cuda_model.py "$OUTDIR/c1/model" >/dev/null
cp "$capi/libonnxruntime_providers_shared.so" "$OUTDIR/c1/"
{
  echo "file ort.xz $(sha256sum "$capi/libonnxruntime.so.$VERSION" | cut -d' ' -f1) libonnxruntime.so.$VERSION"
  echo "file cuda.xz $(sha256sum "$prov" | cut -d' ' -f1) libonnxruntime_providers_cuda.so"
  echo "part ort.xz - -"
} >"$OUTDIR/c1/MANIFEST"
cp "$w/ort.xz" "$OUTDIR/c1/"

# split cuda.xz across the calls
total=$(stat -c %s "$w/cuda.xz")
budget=$(( CALL_MIB * 1048576 ))
off=0; call=1; i=0
while [ $off -lt $total ]; do
  used=$(du -cb "$OUTDIR/c$call" | tail -1 | cut -f1)
  room=$(( budget - used ))
  if [ $room -lt 1048576 ]; then call=$((call + 1)); mkdir -p "$OUTDIR/c$call"; continue; fi
  n=$(( total - off < room ? total - off : room ))
  name=$(printf 'cuda.xz.part%02d' $i)
  dd if="$w/cuda.xz" of="$OUTDIR/c$call/$name" bs=1M iflag=skip_bytes,count_bytes skip=$off count=$n status=none
  echo "part $name - -" >>"$OUTDIR/c1/MANIFEST"
  off=$((off + n)); i=$((i + 1))
done
echo "== layout (carry one folder per call, in order; KEEP_SM='${KEEP_SM}')"
for d in "$OUTDIR"/c*; do
  echo "$d: $(du -cb "$d" | tail -1 | cut -f1) bytes: $(cd "$d" && ls | tr '\n' ' ')"
done
