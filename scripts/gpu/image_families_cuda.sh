#!/usr/bin/env bash
# On the lent GPU machine (ONNX Runtime GPU parts carried first, see scripts/gpu/ort_cuda_env.sh; this call carries
# .devcarry/gpu with the binary and the CLIP and T5 vocabularies): the FLUX.1, SD1.5, SDXL, SD3.5, Z-Image and FLUX.2 GPU paths (latents, noise,
# CFG and sampler state in device buffers) against the CPU backend on the tiny golden models of tests/golden.
# Builds ONNX-only bundles there (no TensorRT needed), generates with --backend cpu and --backend cuda (batch 2,
# CFG, img2img), and compares the images pixel by pixel. Output: $OUT/image_families_cuda.txt and the images.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
exec > >(tee "$out/image_families_cuda.txt") 2>&1
[ -n "${NO_ORT:-}" ] || source scripts/gpu/ort_cuda_env.sh >/dev/null 2>&1
source scripts/gpu/image_lib.sh
build flux "$(flux_folder)" --arch flux-dev --clip-tokenizer "$vocab" --t5-tokenizer "$t5_vocab"
run flux dev --steps 3 --batch 2
build sd15 "$(sd_folder sd15 sd/sd15/unet)" --arch sd15 --clip-tokenizer "$vocab" --image-px 32,32,64
run sd15 cfg --steps 4 --batch 2
run sd15 img2img --steps 4 --init-image "$work/init.png" --strength 0.6
run sd15 inpaint --steps 4 --init-image "$work/init.png" --mask "$work/mask.png" --strength 1.0
build sdxl "$(sd_folder sdxl sd/sdxl/unet sd/sdxl/pipeline_text_encoder_2)" --arch sdxl --clip-tokenizer "$vocab" \
  --image-px 32,32,64
run sdxl cfg --steps 4 --batch 2
build zimage "$(zimage_folder)"
run zimage turbo --steps 3 --batch 2
run zimage cfg --steps 3 --negative-prompt "blurry" --cfg 2
build sd35 "$(sd35_folder)" --clip-tokenizer "$vocab" --t5-tokenizer "$t5_vocab"
run sd35 cfg --steps 3 --batch 2
run sd35 slg --steps 3 --slg-layers 1:2.8:0.0:1.0
build flux2 "$(flux2_folder flux2 true)"
run flux2 distilled --steps 2 --batch 2
run flux2 img2img --steps 2 --init-image "$work/init.png" --strength 0.6
run flux2 reference --steps 2 --control "$golden/flux2/reference.png"
build flux2base "$(flux2_folder flux2base false)"
run flux2base cfg --steps 2 --batch 2 --cfg 3
rm -rf "$work"
