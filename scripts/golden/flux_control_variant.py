"""Golden files for the channel-concatenated Flux control variants (FLUX.1 Canny-dev / Depth-dev): a tiny random
FluxTransformer2DModel taking 128 input channels (64 of packed latents, 64 of packed control latents) and giving
64, in flux_pipeline.py's tiny pipeline, run by diffusers' FluxControlPipeline on controlnet/control.png.

usage: /work/refvenv/bin/python scripts/golden/flux_control_variant.py tests/golden/flux   (after
flux_pipeline.py and flux_controlnet.py). Needs torch and diffusers (not in CI).

Writes control_variant/transformer (save_pretrained, bf16) and control_variant/control_io.safetensors
(`final_latents`). The control image's latents are the VAE's mean (diffusers samples them; trt-diff takes the mean)."""
import os
import sys
import tempfile

import torch
from diffusers import FluxControlPipeline, FluxTransformer2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flux_pipeline  # noqa: E402


def main(golden):
    out = os.path.join(golden, "control_variant")
    os.makedirs(out, exist_ok=True)
    _, vae = flux_pipeline.build(golden)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=128, out_channels=64, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=True,
                                         axes_dims_rope=[4, 6, 6]).eval()
    flux_pipeline.randomize(transformer, 80, 0.08, torch.bfloat16)
    ref = load_file(os.path.join(golden, "pipeline_io.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        base = flux_pipeline.pipeline(transformer, vae, tmp, golden)
        pipe = FluxControlPipeline(**{k: v for k, v in base.components.items()
                                      if k not in ("image_encoder", "feature_extractor")})
        control = Image.open(os.path.join(golden, "controlnet", "control.png")).convert("RGB")
        DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
        with torch.no_grad():
            lat = pipe(prompt=flux_pipeline.PROMPT, control_image=control, height=32, width=32,
                       num_inference_steps=4, guidance_scale=3.5, max_sequence_length=512,
                       latents=ref["initial_latents"].clone(), output_type="latent").images
    transformer.to(torch.bfloat16).save_pretrained(os.path.join(out, "transformer"))
    save_file({"final_latents": lat.float().contiguous()}, os.path.join(out, "control_io.safetensors"))
    print("final latents", tuple(lat.shape), float(lat.abs().max()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/flux")
