"""Golden files for Flux ControlNet-Union (diffusers FluxControlNetModel with num_mode, InstantX / Shakker-Labs
style): a tiny random union ControlNet of the tiny pipeline's width (flux_pipeline.py; 1 double, 1 single block,
num_mode 7) run directly on random inputs (batch 2, modes 3 and 5, non-zero txt_ids so that the copied first row
shows), and the whole tiny pipeline under FluxControlNetPipeline with one control (mode 2, strength 0.7, window
[0, 0.75]) and under a one-net FluxMultiControlNetModel with two controls (modes 0 and 4, strengths 0.6 / 0.5,
windows [0, 1] / [0.25, 1]): diffusers runs the single union net once per image and sums.

usage: /work/refvenv/bin/python scripts/golden/flux_controlnet_union.py tests/golden/flux   (after
flux_pipeline.py and flux_controlnet.py, whose control.png it reuses). Needs torch and diffusers (not in CI).

Writes controlnet_union/model (config.json + bf16 safetensors; the reference ran in f32 on the rounded values),
controlnet_union/control2.png and controlnet_union/union_io.safetensors: the direct run's inputs and sample
stacks, `final_latents` (one control) and `final_latents_multi` (two)."""
import os
import sys
import tempfile

import numpy as np
import torch
import diffusers.pipelines.flux.pipeline_flux_controlnet as cn_module
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel
from PIL import Image
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flux_models  # noqa: E402
import flux_pipeline  # noqa: E402


def main(golden):
    out = os.path.join(golden, "controlnet_union")
    os.makedirs(out, exist_ok=True)
    ptrans, vae = flux_pipeline.build(golden)
    cfg = {k: v for k, v in dict(ptrans.config).items() if not k.startswith("_") and k != "out_channels"}
    cfg.update(num_layers=1, num_single_layers=1, num_mode=7)
    cn = FluxControlNetModel(**cfg).eval()
    flux_models.randomize(cn, 80)

    # Direct run: batch 2, 4x4 image tokens, 5 text tokens.
    g = torch.Generator().manual_seed(81)
    b, img, txt = 2, 16, 5
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    io = {
        "hidden_states": torch.randn(b, img, 64, generator=g),
        "controlnet_cond": torch.randn(b, img, 64, generator=g),
        "encoder_hidden_states": torch.randn(b, txt, 8, generator=g),
        "pooled_projections": torch.randn(b, 8, generator=g),
        "timestep": torch.tensor([0.7, 0.3]),
        "guidance": torch.tensor([3.5, 3.5]),
        "img_ids": torch.stack([torch.zeros(16), ys.flatten().float(), xs.flatten().float()], 1),
        "txt_ids": torch.randint(0, 4, (txt, 3), generator=g).float(),
    }
    mode = torch.tensor([3, 5])
    with torch.no_grad():
        blocks, singles = cn(**io, controlnet_mode=mode[:, None], conditioning_scale=0.8, return_dict=False)
    res = dict(io)
    res["controlnet_mode"] = mode.float()
    res["controlnet_block_samples"] = torch.stack(blocks)
    res["controlnet_single_block_samples"] = torch.stack(singles)

    rng = np.random.default_rng(9)
    control2 = Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))
    control2.save(os.path.join(out, "control2.png"))
    control = Image.open(os.path.join(golden, "controlnet", "control.png")).convert("RGB")
    ref = load_file(os.path.join(golden, "pipeline_io.safetensors"))
    args = dict(prompt=flux_pipeline.PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                max_sequence_length=512, output_type="latent")
    # The control images' latent distribution's mean (diffusers samples it; trt-diff uses the mean).
    orig = cn_module.retrieve_latents
    cn_module.retrieve_latents = lambda e, generator=None, sample_mode="sample": orig(e, generator, "argmax")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        base = flux_pipeline.pipeline(ptrans, vae, tmp, golden)
        pipe = FluxControlNetPipeline(controlnet=cn, **base.components)
        res["final_latents"] = pipe(**args, control_image=control, control_mode=2, controlnet_conditioning_scale=0.7,
                                    control_guidance_start=0.0, control_guidance_end=0.75,
                                    latents=ref["initial_latents"].clone()).images.float()
        multi = FluxControlNetPipeline(controlnet=FluxMultiControlNetModel([cn]), **base.components)
        res["final_latents_multi"] = multi(**args, control_image=[control, control2], control_mode=[0, 4],
                                           controlnet_conditioning_scale=[0.6, 0.5],
                                           control_guidance_start=[0.0, 0.25], control_guidance_end=[1.0, 1.0],
                                           latents=ref["initial_latents"].clone()).images.float()
    cn_module.retrieve_latents = orig
    for k in ("final_latents", "final_latents_multi"):
        print(k, ": the ControlNet moves the final latents by", float((res[k] - ref["final_latents"]).abs().max()))
    cn.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    st = os.path.join(out, "model", "diffusion_pytorch_model.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(st).items()}, st)
    save_file({k: v.contiguous() for k, v in res.items()}, os.path.join(out, "union_io.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/flux")
