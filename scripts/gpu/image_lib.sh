# shellcheck shell=bash
# Sourced by the image scripts of scripts/gpu (after ONNX Runtime's environment): the tiny golden models' folders,
# ONNX-only fp32 builds, `generate` on each backend and the pixel comparison of their images.
source scripts/gpu/limited.sh
g=${BIN_DIR:-.devcarry/gpu}
bin=$g/trt-diff
vocab=${CLIP_VOCAB:-$g/flux_fp32.clip-tokenizer.txt.gz}
t5_vocab=${T5_VOCAB:-$g/flux_fp32.t5-tokenizer.json}
backends=${BACKENDS:-cpu cuda}
work=$(mktemp -d)
golden=$root/tests/golden
sd_folder() { # NAME UNET [TEXT_ENCODER_2]
  local m=$work/$1
  mkdir -p "$m/scheduler"
  ln -s "$golden/sd/sd15/vae" "$m/vae"
  ln -s "$golden/flux/text_encoder" "$m/text_encoder"
  ln -s "$golden/$2" "$m/unet"
  [ -z "${3:-}" ] || ln -s "$golden/$3" "$m/text_encoder_2"
  echo '{"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"}' >"$m/scheduler/scheduler_config.json"
  echo "$m"
}
zimage_folder() {
  local m=$work/zimage
  mkdir -p "$m"
  for c in transformer text_encoder tokenizer scheduler model_index.json; do ln -s "$golden/z_image/$c" "$m/$c"; done
  ln -s "$golden/flux/pipeline/vae" "$m/vae"
  echo "$m"
}
flux2_folder() { # NAME DISTILLED(true|false), as tests/flux2_pipeline.rs
  local m=$work/$1
  mkdir -p "$m"
  for c in transformer text_encoder vae scheduler; do ln -s "$golden/flux2/$c" "$m/$c"; done
  ln -s "$golden/z_image/tokenizer" "$m/tokenizer"
  sed "s/\"is_distilled\": true/\"is_distilled\": $2/" "$golden/flux2/model_index.json" >"$m/model_index.json"
  echo "$m"
}
flux_folder() { # as scripts/gpu/prepare_backend_cuda.sh
  local m=$work/flux
  mkdir -p "$m"
  for c in transformer vae; do ln -s "$golden/flux/pipeline/$c" "$m/$c"; done
  for c in text_encoder text_encoder_2; do ln -s "$golden/flux/$c" "$m/$c"; done
  echo "$m"
}
py=${PYTHON:-python3}
sd35_folder() { # as tests/common/sd35.rs
  local m=$work/sd35
  mkdir -p "$m/text_encoder" "$m/vae"
  ln -s "$golden/sd35/transformer" "$m/transformer"
  ln -s "$golden/sd35/scheduler" "$m/scheduler"
  ln -s "$golden/sd35/model_index.json" "$m/model_index.json"
  ln -s "$golden/sd35/text_encoder/config.json" "$m/text_encoder/config.json"
  ln -s "$golden/sd35/text_encoder/text_projection.safetensors" "$m/text_encoder/text_projection.safetensors"
  ln -s "$golden/flux/text_encoder/model.safetensors" "$m/text_encoder/model.safetensors"
  ln -s "$golden/sd/sdxl/pipeline_text_encoder_2" "$m/text_encoder_2"
  ln -s "$golden/flux/text_encoder_2" "$m/text_encoder_3"
  ln -s "$golden/sd35/vae/config.json" "$m/vae/config.json"
  ln -s "$golden/flux/pipeline/vae/diffusion_pytorch_model.safetensors" "$m/vae/diffusion_pytorch_model.safetensors"
  echo "$m"
}
compare() {
  "$py" - "$@" <<'PY'
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
build() { # NAME FOLDER EXTRA...
  local name=$1 folder=$2
  shift 2
  echo "== build $name (fp32, ONNX-only)"
  limited 120 "$bin" build "$folder" --precision fp32 --onnx-only --out "$work/$name.plan" --no-progress "$@" \
    | tail -1
}
run() { # NAME CASE EXTRA...
  local name=$1 case=$2
  shift 2
  for b in $backends; do
    echo "== $name $case on $b"
    TRT_DIFF_LOG=$([ "$b" = cuda ] && echo debug || echo info) limited 120 "$bin" generate \
      --engine "$work/$name.plan.json" --prompt "a watercolor fox in the snow" --width 32 --height 32 --seed 3 \
      --no-progress --backend "$b" --out "$out/${name}_${case}_$b.png" "$@" 2>&1 | grep -v ' DEBUG .*step [0-9]'
  done
  local f
  for f in "$out/${name}_${case}"_cpu*.png; do
    local c=${f/_cpu/_cuda}
    [ -f "$f" ] && [ -f "$c" ] && compare "$f" "$c" "$name $case $(basename "$c")"
  done
}
"$py" -c "import numpy as np; from PIL import Image; \
  Image.fromarray((np.indices((32, 32)).sum(0) * 4 % 256).astype('uint8')).convert('RGB').save('$work/init.png'); \
  m = np.zeros((32, 32), 'uint8'); m[8:24, 8:24] = 255; Image.fromarray(m).save('$work/mask.png')"
