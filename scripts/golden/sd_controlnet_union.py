"""Golden files for SDXL ControlNet-Union (diffusers ControlNetUnionModel, xinsir/controlnet-union-sdxl-1.0 style):
a tiny random union ControlNet made from the tiny SDXL UNet of sd_models.py (8 control types, condition transformer
width 4 = the first level's, 2 heads, conditioning embedding (4, 8)), run in diffusers'
StableDiffusionXLControlNetUnionPipeline on sd_controlnet.py's tiny SDXL pipeline (same prompt, negative prompt,
initial latents, Euler over 4 steps at 32x32, CFG 5): one control (controlnet/control.png, mode 3, strength 0.7,
window [0, 0.75]), and two controls in one call (modes 1 and 6, strengths 0.6 / 0.5, windows [0, 1] / [0.25, 1]).

usage: /work/refvenv/bin/python scripts/golden/sd_controlnet_union.py tests/golden/sd   (after sd_controlnet.py)
Needs torch, diffusers, transformers (not in CI). Writes controlnet_union/model (bf16 weights),
controlnet_union/control2.png and controlnet_union/union_io.safetensors."""
import os
import sys
import tempfile

import numpy as np
import torch
from diffusers import (AutoencoderKL, ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline,
                       UNet2DConditionModel)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flux_pipeline import clip_tokenizer  # noqa: E402
from sd_models import randomize  # noqa: E402
from sd_pipeline import NEGATIVE, PROMPT, scheduler  # noqa: E402


def main(out_root):
    golden = os.path.dirname(os.path.abspath(out_root.rstrip("/")))
    out = os.path.join(out_root, "controlnet_union")
    os.makedirs(out, exist_ok=True)
    f32 = dict(torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(os.path.join(out_root, "sd15", "vae"), **f32).eval()
    clip_l = CLIPTextModel.from_pretrained(os.path.join(golden, "flux", "text_encoder"), **f32).eval()
    big_g = CLIPTextModelWithProjection.from_pretrained(os.path.join(out_root, "sdxl", "pipeline_text_encoder_2"),
                                                        **f32).eval()
    unetxl = UNet2DConditionModel.from_pretrained(os.path.join(out_root, "sdxl", "unet"), **f32).eval()
    base = ControlNetUnionModel.from_unet(unetxl, conditioning_embedding_out_channels=(4, 8))
    c0 = unetxl.config.block_out_channels[0]
    cn = ControlNetUnionModel.from_config(base.config, num_control_type=8, num_trans_channel=c0,
                                          num_proj_channel=c0, num_trans_head=2).eval()
    randomize(cn, 90)
    model_dir = os.path.join(out, "model")
    cn.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    cn = ControlNetUnionModel.from_pretrained(model_dir, **f32).eval()
    control = Image.open(os.path.join(out_root, "controlnet", "control.png")).convert("RGB")
    rng = np.random.default_rng(11)
    control2 = Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))
    control2.save(os.path.join(out, "control2.png"))
    io = {}
    args = dict(height=32, width=32, num_inference_steps=4, output_type="latent", negative_prompt=NEGATIVE,
                guidance_scale=5.0)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tok = clip_tokenizer(tmp)
        tok2 = clip_tokenizer(tmp)
        tok2.pad_token = "!"
        lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
        xl = StableDiffusionXLControlNetUnionPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=big_g,
                                                      tokenizer=tok, tokenizer_2=tok2, unet=unetxl, controlnet=cn,
                                                      scheduler=scheduler(), force_zeros_for_empty_prompt=False)
        io["one"] = xl(PROMPT, latents=lat.clone(), control_image=[control], control_mode=[3],
                       controlnet_conditioning_scale=0.7, control_guidance_start=0.0, control_guidance_end=0.75,
                       **args).images
        io["two"] = xl(PROMPT, latents=lat.clone(), control_image=[control, control2], control_mode=[1, 6],
                       controlnet_conditioning_scale=[0.6, 0.5], control_guidance_start=[0.0, 0.25],
                       control_guidance_end=[1.0, 1.0], **args).images
        io["off"] = xl(PROMPT, latents=lat.clone(), control_image=[control], control_mode=[3],
                       controlnet_conditioning_scale=0.0, **args).images
        for k in ("one", "two"):
            print(k, "moves the latents by", float((io[k] - io["off"]).abs().max()))
    save_file({k: v.float().contiguous() for k, v in io.items()}, os.path.join(out, "union_io.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
