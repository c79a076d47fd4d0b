"""Golden files for ControlNet on Stable Diffusion 1.5 and SDXL: tiny random diffusers ControlNetModels made from
the tiny UNets of sd_models.py (`ControlNetModel.from_unet`, weights re-drawn so the zero convolutions are not
zero; conditioning embedding (4, 8): one stride-2 step, as the tiny VAE downsamples 2x), run in diffusers'
StableDiffusionControlNetPipeline and StableDiffusionXLControlNetPipeline on the tiny pipelines of
sd_pipeline.py (same prompts, initial latents, Euler over 4 steps at 32x32) with the control image control.png
(a white square on black), controlnet_conditioning_scale 0.7 and control_guidance_end 0.75.

usage: /work/refvenv/bin/python scripts/golden/sd_controlnet.py tests/golden/sd   (after sd_pipeline.py)
Needs torch, diffusers, transformers (not in CI). Writes controlnet/sd15/, controlnet/sdxl/ (bf16 weights),
controlnet/control.png and controlnet/controlnet_io.safetensors."""
import copy
import os
import sys
import tempfile

import numpy as np
import torch
from diffusers import (AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline,
                       StableDiffusionXLControlNetPipeline, UNet2DConditionModel)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flux_pipeline import clip_tokenizer  # noqa: E402
from sd_models import randomize  # noqa: E402
from sd_pipeline import NEGATIVE, PROMPT, scheduler  # noqa: E402


def controlnet_of(unet, seed, out):
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8)).eval()
    randomize(cn, seed)
    cn.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return ControlNetModel.from_pretrained(out, torch_dtype=torch.float32).eval()


def main(out_root):
    golden = os.path.dirname(os.path.abspath(out_root.rstrip("/")))
    out = os.path.join(out_root, "controlnet")
    os.makedirs(out, exist_ok=True)
    f32 = dict(torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(os.path.join(out_root, "sd15", "vae"), **f32).eval()
    clip_l = CLIPTextModel.from_pretrained(os.path.join(golden, "flux", "text_encoder"), **f32).eval()
    big_g = CLIPTextModelWithProjection.from_pretrained(os.path.join(out_root, "sdxl", "pipeline_text_encoder_2"),
                                                        **f32).eval()
    unet15 = UNet2DConditionModel.from_pretrained(os.path.join(out_root, "sd15", "unet"), **f32).eval()
    unetxl = UNet2DConditionModel.from_pretrained(os.path.join(out_root, "sdxl", "unet"), **f32).eval()
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[8:24, 10:26] = 255
    control = Image.fromarray(img)
    control.save(os.path.join(out, "control.png"))
    # bf16 weights on disk: the references run on the stored values.
    cn15 = controlnet_of(unet15, 80, os.path.join(out, "sd15"))
    cnxl = controlnet_of(unetxl, 81, os.path.join(out, "sdxl"))
    io = {}
    args = dict(height=32, width=32, num_inference_steps=4, output_type="latent", negative_prompt=NEGATIVE)
    ctl = dict(image=control, controlnet_conditioning_scale=0.7, control_guidance_start=0.0,
               control_guidance_end=0.75)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tok = clip_tokenizer(tmp)
        tok2 = clip_tokenizer(tmp)
        tok2.pad_token = "!"
        lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
        sd = StableDiffusionControlNetPipeline(vae=vae, text_encoder=clip_l, tokenizer=tok, unet=unet15,
                                               controlnet=cn15, scheduler=scheduler(), safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
        io["sd15_controlnet"] = sd(PROMPT, guidance_scale=7.5, latents=lat.clone(), **args, **ctl).images
        io["sd15_controlnet_off"] = sd(PROMPT, guidance_scale=7.5, latents=lat.clone(), **args,
                                       **{**ctl, "controlnet_conditioning_scale": 0.0}).images
        latxl = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
        xl = StableDiffusionXLControlNetPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tok,
                                                 tokenizer_2=tok2, unet=unetxl, controlnet=cnxl,
                                                 scheduler=scheduler(), force_zeros_for_empty_prompt=False)
        io["sdxl_controlnet"] = xl(PROMPT, guidance_scale=5.0, latents=latxl.clone(), **args, **ctl).images
        for k in ("sd15", "sdxl"):
            print(k, "controlnet latents", float(io[f"{k}_controlnet"].abs().max()))
        print("sd15 controlnet moves the latents by",
              float((io["sd15_controlnet"] - io["sd15_controlnet_off"]).abs().max()))
    save_file({k: v.float().contiguous() for k, v in io.items()}, os.path.join(out, "controlnet_io.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
