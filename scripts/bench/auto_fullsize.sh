#!/usr/bin/env bash
# `build --precision auto` at full size: a Stable Diffusion 1.5-shaped model (the real UNet, CLIP-L and VAE
# configurations, random fp16 weights made by diffusers/transformers) searched over a sample of its UNet layers
# (`--auto-layers`), to report what one measurement and the whole search cost at full size. Run by hand (needs a
# Python with torch, transformers and diffusers: PYTHON=/path/to/python; about 6 GB of disk and 8 GB of memory).
#
#   PYTHON=/work/refvenv/bin/python bash scripts/bench/auto_fullsize.sh [LAYER_GLOB]
#
# Prints the build's policy table and search time; the model folder stays in $WORK (default /tmp/sd15-fullsize).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
py=${PYTHON:-python3}
work=${WORK:-/tmp/sd15-fullsize}
layers=${1:-down_blocks.1.attentions.0.transformer_blocks.0.attn1.*}
bin=${BIN:-$root/target/debug/trt-diff}
vocab=${CLIP_VOCAB:-$root/../shared/data/tokenizers/bpe_simple_vocab_16e6.txt.gz}
if [ ! -f "$work/model_index.json" ]; then
  "$py" - "$work" <<'PY'
import json, os, sys
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
out = sys.argv[1]
torch.manual_seed(0)
# Stable Diffusion 1.5's configurations (runwayml/stable-diffusion-v1-5), random weights.
unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
unet.to(torch.float16).save_pretrained(os.path.join(out, "unet"))
vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, sample_size=512)
vae.to(torch.float16).save_pretrained(os.path.join(out, "vae"))
te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
te.to(torch.float16).save_pretrained(os.path.join(out, "text_encoder"))
os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
json.dump({"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
           "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1},
          open(os.path.join(out, "scheduler", "scheduler_config.json"), "w"))
json.dump({"_class_name": "StableDiffusionPipeline"}, open(os.path.join(out, "model_index.json"), "w"))
n = sum(p.numel() for p in unet.parameters())
print(f"wrote {out}: UNet {n / 1e6:.0f} M parameters")
PY
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
/usr/bin/time -v "$bin" build "$work" --arch sd15 --precision auto --quality 30 --onnx-only --no-progress \
  --image-px 64,64,128 --calibration-prompt "a watercolor painting of a fox in the snow" --calibration-steps 2 \
  --heldout-prompt "a red vintage car parked in front of a bakery" --clip-tokenizer "$vocab" \
  --auto-layers "$layers" --out "$out/sd15.plan" 2> >(grep -E "Maximum resident|Elapsed|measurements|error" >&2)
