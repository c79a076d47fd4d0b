"""Golden files for FLUX.1 Fill (inpainting): a tiny random FluxTransformer2DModel taking 64 + 64 + 16 input
channels (packed latents, packed masked-image latents, the mask folded 2x2 per latent and packed: the tiny VAE
downsamples 2x) and giving 64, in flux_pipeline.py's tiny pipeline, run by diffusers' FluxFillPipeline on init.png
with a mask whose left half is white (repainted), strength 1.

usage: /work/refvenv/bin/python scripts/golden/flux_fill.py tests/golden/flux   (after flux_pipeline.py). Needs
torch and diffusers (not in CI).

Writes fill/transformer (save_pretrained, bf16), fill/mask.png and fill/fill_io.safetensors (`final_latents`). The
masked image's latents are the VAE's mean (diffusers samples them; trt-diff takes the mean)."""
import os
import sys
import tempfile

import numpy as np
import torch
import diffusers.pipelines.flux.pipeline_flux_fill as fill_module
from diffusers import FluxFillPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flux_pipeline  # noqa: E402


def main(golden):
    out = os.path.join(golden, "fill")
    os.makedirs(out, exist_ok=True)
    _, vae = flux_pipeline.build(golden)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=144, out_channels=64, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=True,
                                         axes_dims_rope=[4, 6, 6]).eval()
    flux_pipeline.randomize(transformer, 90, 0.08, torch.bfloat16)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255
    Image.fromarray(mask).save(os.path.join(out, "mask.png"))
    ref = load_file(os.path.join(golden, "pipeline_io.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        base = flux_pipeline.pipeline(transformer, vae, tmp, golden)
        pipe = FluxFillPipeline(**{k: v for k, v in base.components.items()
                                   if k not in ("image_encoder", "feature_extractor")})
        orig = fill_module.retrieve_latents
        fill_module.retrieve_latents = lambda e, generator=None, sample_mode="sample": orig(e, generator, "argmax")
        with torch.no_grad():
            lat = pipe(prompt=flux_pipeline.PROMPT, image=Image.open(os.path.join(golden, "init.png")),
                       mask_image=Image.open(os.path.join(out, "mask.png")), height=32, width=32,
                       num_inference_steps=4, guidance_scale=3.5, max_sequence_length=512,
                       latents=ref["initial_latents"].clone(), output_type="latent").images
        fill_module.retrieve_latents = orig
    transformer.to(torch.bfloat16).save_pretrained(os.path.join(out, "transformer"))
    save_file({"final_latents": lat.float().contiguous()}, os.path.join(out, "fill_io.safetensors"))
    print("final latents", tuple(lat.shape), float(lat.abs().max()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/flux")
