"""Golden files for the whole Stable Diffusion pipelines: diffusers' StableDiffusionPipeline (and its Img2Img
pipeline) and StableDiffusionXLPipeline on the tiny random components of sd_models.py (UNets, 4-channel VAE), the
tiny CLIP-L of flux_text.py (full 49408-token vocabulary, hidden 8) and a tiny OpenCLIP-bigG-shaped
CLIPTextModelWithProjection made here (full vocabulary, hidden 8, projection 8), with the real CLIP BPE tokenizer,
EulerDiscreteScheduler over the scaled-linear betas with `timestep_spacing="linspace"` (its timesteps are then
integers for 4 steps: 999, 666, 333, 0, exactly ComfyUI's "normal" schedule) and fixed initial latents.

usage: /work/refvenv/bin/python scripts/golden/sd_pipeline.py tests/golden/sd   (after sd_models.py and flux_text.py)
With --bench N it only times N end-to-end StableDiffusionXLPipeline calls on the CPU (benches/sd_generate.rs's
peer) and prints the median seconds. Needs torch, diffusers, transformers (not in CI). Writes sdxl/pipeline_text_encoder_2/ (the bigG above; its unused
vocabulary rows are zero, so git stores it compressed) and pipeline_io.safetensors with, at 32x32 (latents 16x16: the tiny VAE scales by 2) and 4 steps:
- sd15_*: initial latents; final latents with CFG 7.5 and NEGATIVE; the same as v-prediction (an SD2.x-style
  scheduler); a long prompt (LONG, 2 chunks of 75 tokens, and a 2-chunk negative) through prompt_embeds that are
  the per-chunk encoder outputs concatenated (A1111/ComfyUI); img2img (strength 0.5 from init.png, the noise
  saved, the VAE's mode as latent); inpainting with the 4-channel UNet (mask.png: repaint the left half, strength
  0.75, the same noise) and with a tiny 9-channel inpainting UNet (sd15_inpaint/unet);
- sdxl_*: initial latents; final latents with CFG 5 and NEGATIVE (penultimate hidden states of both encoders,
  bigG's pooled projection, time ids [32, 32, 0, 0, 32, 32]); the base's latents at denoising_end 0.5 and the
  final latents after StableDiffusionXLImg2ImgPipeline continues from them at denoising_start 0.5."""
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flux_pipeline import clip_tokenizer  # noqa: E402

PROMPT = "a watercolor painting of a fox in the snow, 4k"
NEGATIVE = "blurry, low quality"
LONG = ", ".join(["a red fox", "deep snow", "pine forest", "golden hour light", "watercolor on paper",
                  "soft edges", "muted palette", "winter morning", "gentle fog", "distant mountains"] * 3)
LONG_NEGATIVE = ", ".join(["blurry", "low quality", "jpeg artifacts", "oversaturated", "deformed"] * 6)


def scheduler(prediction="epsilon"):
    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", timestep_spacing="linspace",
                                  prediction_type=prediction)


def big_g(used_ids):
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=8,
                         bos_token_id=0, pad_token_id=1, eos_token_id=2)
    model = CLIPTextModelWithProjection(cfg).eval()
    g = torch.Generator().manual_seed(60)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1.0 + noise if (p.ndim == 1 and "norm" in name and name.endswith("weight")) else noise)
            p.copy_(p.to(torch.bfloat16).float())
        emb = model.text_model.embeddings.token_embedding.weight
        keep = torch.zeros(emb.shape[0], dtype=torch.bool)
        keep[used_ids] = True
        emb[~keep] = 0.0
    return model


def ids_of(tok, *texts):
    ids = set([0, 49406, 49407])
    for t in texts:
        ids.update(tok(t, truncation=False)["input_ids"])
    return sorted(ids)


def chunked_embeds(tok, encoder, text, chunks):
    """A1111/ComfyUI long-prompt conditioning: 75-token chunks, each BOS + chunk + EOS + padding through the
    encoder, hidden states concatenated (`chunks` of them, empty ones padding a shorter prompt)."""
    ids = tok(text, truncation=False, add_special_tokens=False)["input_ids"]
    rows = []
    for c in range(chunks):
        part = ids[c * 75:(c + 1) * 75]
        row = [49406] + part + [49407]
        row += [tok.pad_token_id] * (77 - len(row))
        rows.append(row)
    with torch.no_grad():
        out = [encoder(torch.tensor([r])).last_hidden_state for r in rows]
    return torch.cat(out, 1)


def bench(out, runs):
    """Times StableDiffusionXLPipeline end to end (text encoders, 4 UNet steps with CFG 5, VAE decode, PIL image) on
    the committed tiny components, as benches/sd_generate.rs runs trt-diff; prints one JSON line."""
    flux = os.path.join(os.path.dirname(os.path.abspath(out.rstrip("/"))), "flux")
    load = lambda cls, path: cls.from_pretrained(path, torch_dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tok = clip_tokenizer(tmp)
        tok2 = clip_tokenizer(tmp)
        tok2.pad_token = "!"
        xl = StableDiffusionXLPipeline(vae=load(AutoencoderKL, os.path.join(out, "sd15", "vae")),
                                       text_encoder=load(CLIPTextModel, os.path.join(flux, "text_encoder")),
                                       text_encoder_2=load(CLIPTextModelWithProjection,
                                                           os.path.join(out, "sdxl", "pipeline_text_encoder_2")),
                                       tokenizer=tok, tokenizer_2=tok2,
                                       unet=load(UNet2DConditionModel, os.path.join(out, "sdxl", "unet")),
                                       scheduler=scheduler(), force_zeros_for_empty_prompt=False)
        xl.set_progress_bar_config(disable=True)
        args = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, height=32, width=32,
                    num_inference_steps=4, output_type="pil")
        with torch.no_grad():
            xl(**args)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                xl(**args)
                times.append(time.perf_counter() - t)
    times.sort()
    print(json.dumps({"diffusers_seconds_median": times[len(times) // 2], "runs": runs,
                      "torch_threads": torch.get_num_threads()}))


def main(out):
    golden = os.path.dirname(os.path.abspath(out.rstrip("/")))
    flux = os.path.join(golden, "flux")
    vae = AutoencoderKL.from_pretrained(os.path.join(out, "sd15", "vae"), torch_dtype=torch.float32).eval()
    clip_l = CLIPTextModel.from_pretrained(os.path.join(flux, "text_encoder"), torch_dtype=torch.float32).eval()
    unet15 = UNet2DConditionModel.from_pretrained(os.path.join(out, "sd15", "unet"), torch_dtype=torch.float32).eval()
    unetxl = UNet2DConditionModel.from_pretrained(os.path.join(out, "sdxl", "unet"), torch_dtype=torch.float32).eval()
    io = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok = clip_tokenizer(tmp)
        tok2 = clip_tokenizer(tmp)
        tok2.pad_token = "!"
        sd = StableDiffusionPipeline(vae=vae, text_encoder=clip_l, tokenizer=tok, unet=unet15, scheduler=scheduler(),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        g = torch.Generator().manual_seed(7)
        lat = torch.randn(1, 4, 16, 16, generator=g)
        args = dict(height=32, width=32, num_inference_steps=4, output_type="latent")
        with torch.no_grad():
            io["sd15_initial_latents"] = lat
            io["sd15_final_latents"] = sd(PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, latents=lat.clone(),
                                          **args).images
            sd_v = StableDiffusionPipeline(**{**sd.components, "scheduler": scheduler("v_prediction")},
                                           requires_safety_checker=False)
            io["sd15_final_latents_v"] = sd_v(PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5,
                                              latents=lat.clone(), **args).images
            pe = chunked_embeds(tok, clip_l, LONG, 2)
            ne = chunked_embeds(tok, clip_l, LONG_NEGATIVE, 2)
            io["sd15_final_latents_long"] = sd(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=7.5,
                                               latents=lat.clone(), **args).images
            image = sd(PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, latents=lat.clone(), height=32, width=32,
                       num_inference_steps=4, output_type="pt").images
            init = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            orig = img2img_module.retrieve_latents
            img2img_module.retrieve_latents = lambda e, generator=None, sample_mode="sample": orig(e, generator,
                                                                                                  "argmax")
            i2i = StableDiffusionImg2ImgPipeline(**sd.components, requires_safety_checker=False)
            noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
            io["sd15_img2img_noise"] = noise
            io["sd15_final_latents_img2img"] = i2i(PROMPT, image=init, strength=0.5, negative_prompt=NEGATIVE,
                                                   guidance_scale=7.5, num_inference_steps=4, output_type="latent",
                                                   generator=torch.Generator().manual_seed(9)).images
            img2img_module.retrieve_latents = orig
            init.save(os.path.join(out, "init.png"))
            # Inpainting with the regular 4-channel UNet (latent blend after every step): repaint the left half.
            mask = np.zeros((32, 32), dtype=np.uint8)
            mask[:, :16] = 255
            mask = Image.fromarray(mask)
            mask.save(os.path.join(out, "mask.png"))
            orig = inpaint_module.retrieve_latents
            inpaint_module.retrieve_latents = lambda e, generator=None, sample_mode="sample": orig(e, generator,
                                                                                                  "argmax")
            inp = StableDiffusionInpaintPipeline(**sd.components, requires_safety_checker=False)
            io["sd15_final_latents_inpaint"] = inp(PROMPT, image=init, mask_image=mask, strength=0.75, height=32,
                                                   width=32, negative_prompt=NEGATIVE, guidance_scale=7.5,
                                                   num_inference_steps=4, output_type="latent",
                                                   generator=torch.Generator().manual_seed(9)).images
            # A 9-channel inpainting UNet (latent + mask + masked-image latent; no blending).
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from sd_models import SD15, randomize
            unet9 = UNet2DConditionModel(**{**SD15, "in_channels": 9}).eval()
            randomize(unet9, 70)
            inp9 = StableDiffusionInpaintPipeline(**{**sd.components, "unet": unet9}, requires_safety_checker=False)
            io["sd15_final_latents_inpaint9"] = inp9(PROMPT, image=init, mask_image=mask, strength=0.75, height=32,
                                                     width=32, negative_prompt=NEGATIVE, guidance_scale=7.5,
                                                     num_inference_steps=4, output_type="latent",
                                                     generator=torch.Generator().manual_seed(9)).images
            unet9.to(torch.bfloat16).save_pretrained(os.path.join(out, "sd15_inpaint", "unet"),
                                                     safe_serialization=True)
            inpaint_module.retrieve_latents = orig

        g2 = big_g(ids_of(tok2, PROMPT, NEGATIVE))
        xl = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=g2, tokenizer=tok, tokenizer_2=tok2,
                                       unet=unetxl, scheduler=scheduler(), force_zeros_for_empty_prompt=False)
        lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            io["sdxl_initial_latents"] = lat
            io["sdxl_final_latents"] = xl(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, latents=lat.clone(),
                                          **args).images
            # Base + refiner handoff (diffusers' denoising_end / denoising_start at 0.5): the same tiny SDXL as
            # both (a refiner-style img2img pipeline without aesthetic scores: 6 time ids).
            half = xl(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, latents=lat.clone(), denoising_end=0.5,
                      **args).images
            ref = StableDiffusionXLImg2ImgPipeline(**xl.components, requires_aesthetics_score=False,
                                                   force_zeros_for_empty_prompt=False)
            io["sdxl_handoff_latents"] = half
            io["sdxl_final_latents_refined"] = ref(PROMPT, image=half, negative_prompt=NEGATIVE, guidance_scale=5.0,
                                                   num_inference_steps=4, denoising_start=0.5,
                                                   output_type="latent").images
        g2.to(torch.bfloat16).save_pretrained(os.path.join(out, "sdxl", "pipeline_text_encoder_2"),
                                              safe_serialization=True)
    save_file({k: v.float().contiguous() for k, v in io.items()}, os.path.join(out, "pipeline_io.safetensors"))
    for k, v in io.items():
        print(k, tuple(v.shape), float(v.abs().max()))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(sys.argv[sys.argv.index("--bench") + 1]) if "--bench" in sys.argv else 0
    if n:
        args = [a for a in args if a != str(n)]
    out = args[0] if args else "tests/golden/sd"
    bench(out, n) if n else main(out)
