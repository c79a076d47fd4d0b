"""Golden files for Flux ControlNet (diffusers FluxControlNetModel, InstantX / Shakker style): a tiny random
ControlNet (1 double block, 1 single block) beside the tiny FLUX.1-dev transformer of flux_models.py (1 double,
2 single blocks: the single sample then serves both single blocks, as diffusers' interval rule has it), run on that
file's inputs with a random packed control latent and conditioning scale 0.8; the transformer then takes the
samples. And the whole tiny pipeline (flux_pipeline.py's) under diffusers' FluxControlNetPipeline with a control
image, strength 0.7, control window [0.0, 0.75].

usage: /work/refvenv/bin/python scripts/golden/flux_controlnet.py tests/golden/flux   (after flux_models.py and
flux_pipeline.py). Needs torch and diffusers (not in CI).

Writes controlnet/model (save_pretrained: config.json + bf16 safetensors; the reference runs in f32 on the same
rounded values), controlnet/pipeline_model (the pipeline's ControlNet), controlnet/control.png and
controlnet/controlnet_io.safetensors: the inputs, `controlnet_cond`, the two sample stacks, the transformer's
`sample` with them, and `final_latents` of the pipeline run."""
import json
import os
import sys
import tempfile

import numpy as np
import torch
import diffusers.pipelines.flux.pipeline_flux_controlnet as cn_module
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flux_models  # noqa: E402
import flux_pipeline  # noqa: E402


def main(golden):
    out = os.path.join(golden, "controlnet")
    os.makedirs(out, exist_ok=True)
    cfg = {k: v for k, v in json.load(open(os.path.join(golden, "flux_dev_config.json"))).items()
           if not k.startswith("_")}
    transformer = FluxTransformer2DModel(**cfg).eval()
    transformer.load_state_dict({k: v.float() for k, v in
                                 load_file(os.path.join(golden, "flux_dev.safetensors")).items()})
    cn_cfg = {k: v for k, v in cfg.items() if k not in ("out_channels",)}
    cn_cfg.update(num_layers=1, num_single_layers=1)
    controlnet = FluxControlNetModel(**cn_cfg).eval()
    flux_models.randomize(controlnet, 60)
    io = {k: v.float() for k, v in load_file(os.path.join(golden, "flux_dev_io.safetensors")).items()}
    g = torch.Generator().manual_seed(61)
    cond = torch.randn(io["hidden_states"].shape, generator=g)
    keys = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
            "guidance"]
    with torch.no_grad():
        blocks, singles = controlnet(**{k: io[k] for k in keys}, controlnet_cond=cond, conditioning_scale=0.8,
                                     return_dict=False)
        sample = transformer(**{k: io[k] for k in keys}, controlnet_block_samples=blocks,
                             controlnet_single_block_samples=singles, return_dict=False)[0]
    controlnet.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    # save_pretrained keeps f32: store bf16 as the real checkpoints are (the reference ran on rounded values).
    st = os.path.join(out, "model", "diffusion_pytorch_model.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(st).items()}, st)
    res = {"controlnet_cond": cond, "controlnet_block_samples": torch.stack(blocks),
           "controlnet_single_block_samples": torch.stack(singles), "sample": sample,
           "sample_without_controlnet": io["sample"]}

    # The whole tiny pipeline with a ControlNet of its own width.
    ptrans, vae = flux_pipeline.build(golden)
    pcfg = {k: v for k, v in dict(ptrans.config).items() if not k.startswith("_") and k != "out_channels"}
    pcfg.update(num_layers=1, num_single_layers=1)
    pcn = FluxControlNetModel(**pcfg).eval()
    flux_models.randomize(pcn, 70)
    with torch.no_grad():
        for p in pcn.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    with tempfile.TemporaryDirectory() as tmp:
        base = flux_pipeline.pipeline(ptrans, vae, tmp, golden)
        pipe = FluxControlNetPipeline(controlnet=pcn, **{k: v for k, v in base.components.items()})
        rng = np.random.default_rng(5)
        control = Image.fromarray((rng.random((32, 32, 3)) > 0.7).astype(np.uint8) * 255)
        control.save(os.path.join(out, "control.png"))
        ref = load_file(os.path.join(golden, "pipeline_io.safetensors"))
        # The control image's latent distribution's mean (diffusers samples it; trt-diff uses the mean).
        orig = cn_module.retrieve_latents
        cn_module.retrieve_latents = lambda e, generator=None, sample_mode="sample": orig(e, generator, "argmax")
        with torch.no_grad():
            lat = pipe(prompt=flux_pipeline.PROMPT, control_image=control, height=32, width=32,
                       num_inference_steps=4, guidance_scale=3.5, max_sequence_length=512,
                       controlnet_conditioning_scale=0.7, control_guidance_start=0.0, control_guidance_end=0.75,
                       latents=ref["initial_latents"].clone(), output_type="latent").images
        cn_module.retrieve_latents = orig
        res["final_latents"] = lat.float()
        print("pipeline: ControlNet moves the final latents by", float((lat - ref["final_latents"]).abs().max()))
    pcn.save_pretrained(os.path.join(out, "pipeline_model"), safe_serialization=True)
    st = os.path.join(out, "pipeline_model", "diffusion_pytorch_model.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(st).items()}, st)
    save_file({k: v.contiguous() for k, v in res.items()}, os.path.join(out, "controlnet_io.safetensors"))
    print("ControlNet moves the transformer output by", float((sample - io["sample"]).abs().max()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/flux")
