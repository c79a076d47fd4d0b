"""Golden files for Stable Diffusion 3.5: tiny random SD3Transformer2DModels (a medium-like one with MMDiT-X dual
attention in block 0 and a large-like one without; both with qk RMSNorm and the context_pre_only last block), the
SD3 text conditioning (CLIP-L and CLIP-G with projection, T5), the 16-channel VAE with SD3's latent factors, and
the whole StableDiffusion3Pipeline.

usage: /work/refvenv/bin/python scripts/golden/sd35.py tests/golden/sd35   (after flux_text.py, sd_pipeline.py)
Needs torch, diffusers, transformers (not in CI). The text encoders are committed goldens of other families (the
tests link them, nothing is copied): CLIP-L is tests/golden/flux/text_encoder (a CLIPTextModel) plus the
`text_projection` written here (text_encoder/text_projection.safetensors) and an SD3 CLIPTextModelWithProjection
config; CLIP-G is tests/golden/sd/sdxl/pipeline_text_encoder_2; T5 is tests/golden/flux/text_encoder_2; the VAE
weights are tests/golden/flux/pipeline/vae with SD3's config (scaling 1.5305, shift 0.0609). Tokenizers are the
real CLIP BPE and T5 tokenizer.json of ../shared/data/tokenizers (CLIP-G pads with "!", as SD3's tokenizer_2).
Writes transformer/ (medium-like, joint_attention_dim 8 = T5's width, so CLIP-L|CLIP-G (16) is cut to 8 as
diffusers' F.pad does), transformer_large/ (joint_attention_dim 24: without T5 the CLIP features are zero-padded),
text_encoder/, vae/, scheduler/, model_index.json (bf16 weights; references in float32 on the rounded values) and
io.safetensors:
- transformer_{latents,timestep,pooled}: a batch of 2 latents [2, 16, 6, 4] (3x2 patches, cropped out of a 10x10
  position grid), timesteps and pooled projections; {medium,large}_context (7 rows) and _sample (diffusers'
  output); medium_skip_sample with skip_layers=[1];
- text_t5_*: encode_prompt of PROMPT with T5 (max_sequence_length 16): prompt_embeds [1, 93, 8], pooled [1, 16];
  text_clip_*: the same without T5 (the large transformer's width 24): [1, 93, 24];
- vae_latent / vae_image: one VAE decode of raw latents;
- pipeline (medium transformer, all three encoders, max_sequence_length 16, 32x32 image): initial latents
  [1, 16, 16, 16]; final latents and image of 4 steps with CFG 4 and NEGATIVE; the final latents without CFG
  (guidance_scale 1, turbo-like); with skip-layer guidance (layers [1], scale 2.8, start 0.2, stop 0.6: steps 1
  and 2); img2img at strength 0.6 from the generated image (init.png, the encoder's mode, the noise saved)."""
import gzip
import json
import os
import sys
import tempfile

import numpy as np
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline)
import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img as img2img_module
from PIL import Image
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                          T5TokenizerFast)

PROMPT = "a watercolor painting of a fox in the snow, 4k"
NEGATIVE = "blurry, low quality"
HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "..", "tests", "golden")
DATA = os.environ.get("TRT_DIFF_SHARED_DATA", os.path.join(HERE, "..", "..", "..", "shared", "data"))
MAX_SEQ = 16


def bf16_round(model, seed, std):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if p.ndim == 1 and "norm" in name and "linear" not in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise * (3.0 if p.ndim == 1 else 1.0))
            p.copy_(p.to(torch.bfloat16).float())
        for b in model.buffers():
            b.copy_(b.to(torch.bfloat16).float())


def clip_tokenizer(tmp, pad):
    """CLIPTokenizer files from openai's bpe_simple_vocab_16e6.txt.gz (the construction of SimpleTokenizer)."""
    merges = gzip.open(os.path.join(DATA, "tokenizers", "bpe_simple_vocab_16e6.txt.gz")).read().decode()
    merges = merges.split("\n")[1:49152 - 256 - 2 + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    json.dump({v: i for i, v in enumerate(vocab)}, open(os.path.join(tmp, "vocab.json"), "w"))
    open(os.path.join(tmp, "merges.txt"), "w").write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=77,
                         pad_token=pad)


def transformer(dual, joint, seed):
    t = SD3Transformer2DModel(sample_size=20, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=joint, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=16, pos_embed_max_size=10,
                              dual_attention_layers=dual, qk_norm="rms_norm").eval()
    bf16_round(t, seed, 0.15)
    return t


def clip_l(out):
    """Flux's tiny CLIPTextModel as the CLIPTextModelWithProjection SD3 loads, with a projection made here."""
    src = os.path.join(GOLDEN, "flux", "text_encoder")
    cfg = CLIPTextConfig.from_pretrained(src)
    cfg.architectures = ["CLIPTextModelWithProjection"]
    cfg.projection_dim = 8
    m = CLIPTextModelWithProjection.from_pretrained(src, config=cfg, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        m.text_projection.weight.copy_((torch.randn(8, 8, generator=g) * 0.3).bfloat16().float())
    d = os.path.join(out, "text_encoder")
    os.makedirs(d, exist_ok=True)
    cfg.save_pretrained(d)
    save_file({"text_projection.weight": m.text_projection.weight.detach().bfloat16().contiguous()},
              os.path.join(d, "text_projection.safetensors"))
    return m


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    medium = transformer((0,), 8, 1)
    large = transformer((), 24, 2)
    te = clip_l(out)
    te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(GOLDEN, "sd", "sdxl", "pipeline_text_encoder_2"),
                                                      torch_dtype=torch.float32).eval()
    te3 = T5EncoderModel.from_pretrained(os.path.join(GOLDEN, "flux", "text_encoder_2"),
                                         torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(GOLDEN, "flux", "pipeline", "vae"), torch_dtype=torch.float32,
                                        scaling_factor=1.5305, shift_factor=0.0609).eval()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    t5_tok = T5TokenizerFast(tokenizer_file=os.path.join(DATA, "tokenizers", "t5_tokenizer.json"),
                             model_max_length=512)
    io = {}
    g = torch.Generator().manual_seed(5)
    tmp = tempfile.mkdtemp()
    tok = clip_tokenizer(tmp, "<|endoftext|>")
    tok2 = clip_tokenizer(tmp, "!")
    with torch.no_grad():
        lat = torch.randn(2, 16, 6, 4, generator=g)
        t = torch.tensor([250.0, 800.0])
        pooled = torch.randn(2, 16, generator=g)
        io["transformer_latents"], io["transformer_timestep"], io["transformer_pooled"] = lat, t, pooled
        for name, tr, joint in [("medium", medium, 8), ("large", large, 24)]:
            ctx = torch.randn(2, 7, joint, generator=g)
            io[f"{name}_context"] = ctx
            io[f"{name}_sample"] = tr(lat, ctx, pooled, t, return_dict=False)[0]
            if name == "medium":
                io["medium_skip_sample"] = tr(lat, ctx, pooled, t, return_dict=False, skip_layers=[1])[0]
        full = StableDiffusion3Pipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                                        tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=t5_tok, transformer=medium)
        full.set_progress_bar_config(disable=True)
        pe, _, pooled_pe, _ = full.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False,
                                                 max_sequence_length=MAX_SEQ)
        io["text_t5_prompt_embeds"] = pe
        io["text_t5_pooled"] = pooled_pe
        no_t5 = StableDiffusion3Pipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                                         text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None,
                                         transformer=large)
        pe, _, pooled_pe, _ = no_t5.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False,
                                                  max_sequence_length=MAX_SEQ)
        io["text_clip_prompt_embeds"] = pe
        io["text_clip_pooled"] = pooled_pe
        z = torch.randn(1, 16, 4, 4, generator=g)
        io["vae_latent"] = z
        io["vae_image"] = vae.decode(z).sample
    init = torch.randn(1, 16, 16, 16, generator=g)
    io["initial_latents"] = init
    common = dict(height=32, width=32, num_inference_steps=4, max_sequence_length=MAX_SEQ)
    run = lambda **kw: full(PROMPT, latents=init.clone(), **common, **kw).images
    io["final_latents"] = run(negative_prompt=NEGATIVE, guidance_scale=4.0, output_type="latent")
    image = run(negative_prompt=NEGATIVE, guidance_scale=4.0, output_type="np")[0]
    io["image"] = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    io["final_latents_nocfg"] = run(guidance_scale=1.0, output_type="latent")
    io["final_latents_slg"] = run(negative_prompt=NEGATIVE, guidance_scale=4.0, output_type="latent",
                                  skip_guidance_layers=[1], skip_layer_guidance_scale=2.8,
                                  skip_layer_guidance_start=0.2, skip_layer_guidance_stop=0.6)
    png = os.path.join(out, "init.png")
    Image.fromarray((image * 255).round().astype(np.uint8)).save(png)
    img2img_module.retrieve_latents = lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode()
    noise = torch.randn(1, 16, 16, 16, generator=g)
    io["img2img_noise"] = noise
    img2img_module.randn_tensor = lambda shape, **kw: noise.clone()
    i2i = StableDiffusion3Img2ImgPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                                          text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3,
                                          tokenizer_3=t5_tok, transformer=medium)
    i2i.set_progress_bar_config(disable=True)
    io["final_latents_img2img"] = i2i(PROMPT, image=Image.open(png), strength=0.6, negative_prompt=NEGATIVE,
                                      guidance_scale=4.0, output_type="latent", **common).images
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, "io.safetensors"))
    medium.to(torch.bfloat16).save_pretrained(os.path.join(out, "transformer"))
    large.to(torch.bfloat16).save_pretrained(os.path.join(out, "transformer_large"))
    sched.save_pretrained(os.path.join(out, "scheduler"))
    os.makedirs(os.path.join(out, "vae"), exist_ok=True)
    vae.save_config(os.path.join(out, "vae"))
    json.dump({"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "text_encoder_3": ["transformers", "T5EncoderModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
               "tokenizer_3": ["transformers", "T5TokenizerFast"],
               "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
              open(os.path.join(out, "model_index.json"), "w"), indent=2)
    print("timesteps", full.scheduler.timesteps.tolist())


if __name__ == "__main__":
    main(sys.argv[1])
