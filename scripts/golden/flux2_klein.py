"""Golden files for FLUX.2 [klein]: a tiny random Flux2KleinPipeline (diffusers Flux2Transformer2DModel, a tiny
Qwen3ForCausalLM text encoder of 28 layers so that the pipeline's layers 9, 18 and 27 exist, the tiny Qwen2 BPE
tokenizer and Qwen3 chat template of tests/golden/z_image/tokenizer, a tiny 32-channel AutoencoderKLFlux2 with random
batch-norm statistics, and FLUX.2 [klein]'s scheduler config).

usage: /work/refvenv/bin/python scripts/golden/flux2_klein.py tests/golden/flux2   (after z_image.py)
Needs torch, diffusers, transformers (not in CI). Writes a diffusers model folder (model_index.json, transformer/,
text_encoder/, vae/, scheduler/; tokenizer/ is linked by the tests) with bf16 weights (the reference runs in float32
on the same rounded values), and io.safetensors:
- transformer_*: a batch of 2 latents [2, 128, 3, 2] (6 image tokens; the graph takes them packed, [B, 6, 128]),
  timesteps, 5 caption features each, and diffusers' output (packed);
- text_ids / text_hidden: the chat-formatted PROMPT (enable_thinking=False) padded to TEXT_LEN tokens and the
  encoder's hidden states 9, 18 and 27 stacked as the pipeline does ([TEXT_LEN, 3 * 16]);
- vae_*: one decode of a raw 32-channel latent, one encode (the posterior's mean) of an image;
- the pipeline at 32x32 px (max_sequence_length PIPE_TEXT_LEN): initial latents [1, 128, 8, 8] (patchified,
  normalized), the final latents (diffusers' output_type="latent": de-normalized, unpatchified [1, 32, 16, 16]) and
  image ([0, 1], CHW) of 4 distilled steps; the final latents of the base model (is_distilled False, CFG 4 against
  ""); img2img: the generated image (init.png) encoded (mode), noised to the 3rd of 4 sigmas with saved noise and
  the last 3 steps run (diffusers' own encode, scale_noise and schedule, the schedule cut after set_timesteps);
  editing: the final latents with reference.png (64x64) as the reference image."""
import json
import os
import sys

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
import diffusers.pipelines.flux2.pipeline_flux2_klein as klein
from PIL import Image
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

PROMPT = "a watercolor painting of a fox in the snow, 4k"
HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "..", "tests", "golden", "z_image", "tokenizer")
TEXT_LEN = 56
PIPE_TEXT_LEN = 64
# FLUX.2 [klein]'s scheduler/scheduler_config.json.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def bf16_round(model, seed, std):
    """Random weights (norm weights around 1), rounded to bf16 and kept as float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
            p.copy_(p.to(torch.bfloat16).float())


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast.from_pretrained(TOKENIZER)
    te_cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
    )
    te = Qwen3ForCausalLM(te_cfg).eval()
    bf16_round(te, 1, 0.3)
    tr = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False,
    ).eval()
    bf16_round(tr, 2, 0.2)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=32, norm_num_groups=4,
        sample_size=32,
    ).eval()
    bf16_round(vae, 3, 0.2)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        vae.bn.running_mean.copy_((torch.randn(128, generator=g) * 0.5).bfloat16().float())
        vae.bn.running_var.copy_((torch.rand(128, generator=g) * 2 + 0.25).bfloat16().float())
    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    io = {}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        # The transformer alone: two images of 3x2 patched latents, captions of 5 tokens, two timesteps.
        lat = torch.randn(2, 128, 3, 2, generator=g)
        cap = torch.randn(2, 5, 48, generator=g)
        t = torch.tensor([0.25, 0.8])
        packed = Flux2KleinPipeline._pack_latents(lat)
        img_ids = Flux2KleinPipeline._prepare_latent_ids(lat)
        txt_ids = Flux2KleinPipeline._prepare_text_ids(cap)
        io["transformer_hidden_states"] = packed
        io["transformer_timestep"] = t
        io["transformer_encoder_hidden_states"] = cap
        io["transformer_img_ids"] = img_ids[0].float()
        io["transformer_txt_ids"] = txt_ids[0].float()
        io["transformer_sample"] = tr(hidden_states=packed, encoder_hidden_states=cap, timestep=t,
                                      img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        # The text encoder as the pipeline calls it (padded to TEXT_LEN, layers 9, 18, 27 stacked).
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
        enc = tok(text, return_tensors="pt", padding="max_length", truncation=True, max_length=TEXT_LEN)
        io["text_ids"] = enc.input_ids[0].float()  # exact for any vocabulary below 2^24
        io["text_mask"] = enc.attention_mask[0].float()
        io["text_hidden"] = Flux2KleinPipeline._get_qwen3_prompt_embeds(te, tok, PROMPT, max_sequence_length=TEXT_LEN)[0]
        # The VAE alone (raw 32-channel latent space).
        z = torch.randn(1, 32, 4, 4, generator=g)
        io["vae_latent"] = z
        io["vae_image"] = vae.decode(z).sample
        x = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
        io["vae_input"] = x
        io["vae_mean"] = vae.encode(x).latent_dist.mode()
        io["bn_mean"] = vae.bn.running_mean.clone()
        io["bn_var"] = vae.bn.running_var.clone()
    pipe = Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=tr,
                              is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    init = torch.randn(1, 128, 8, 8, generator=g)
    io["initial_latents"] = init
    common = dict(height=32, width=32, num_inference_steps=4, max_sequence_length=PIPE_TEXT_LEN)
    io["final_latents"] = pipe(prompt=PROMPT, output_type="latent", latents=init.clone(), **common).images
    image = pipe(prompt=PROMPT, output_type="np", latents=init.clone(), **common).images[0]
    io["image"] = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    base = Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=tr,
                              is_distilled=False)
    base.set_progress_bar_config(disable=True)
    io["final_latents_cfg"] = base(prompt=PROMPT, guidance_scale=4.0, output_type="latent", latents=init.clone(),
                                   **common).images
    # img2img: the generated image, encoded as the pipeline encodes reference images (mode), noised to the
    # schedule's 2nd sigma (strength 0.75 of 4 steps), the remaining 3 steps.
    png = os.path.join(out, "init.png")
    Image.fromarray((image * 255).round().astype(np.uint8)).save(png)
    with torch.no_grad():
        x = pipe.image_processor.preprocess(Image.open(png), height=32, width=32)
        x0 = pipe._encode_vae_image(x, generator=None)
    noise = torch.randn(1, 128, 8, 8, generator=g)
    io["img2img_noise"] = noise
    orig = klein.retrieve_timesteps
    t_start = 1

    def cut(scheduler, n, device, sigmas=None, mu=None):
        orig(scheduler, n, device, sigmas=sigmas, mu=mu)
        scheduler.timesteps = scheduler.timesteps[t_start:]
        scheduler.sigmas = scheduler.sigmas[t_start:]
        return scheduler.timesteps, len(scheduler.timesteps)

    klein.retrieve_timesteps = cut
    sigmas = np.linspace(1.0, 1 / 4, 4)
    sched.set_timesteps(sigmas=sigmas, mu=klein.compute_empirical_mu(64, 4))
    noised = sched.scale_noise(x0, sched.timesteps[t_start:t_start + 1], noise)
    io["final_latents_img2img"] = pipe(prompt=PROMPT, output_type="latent", latents=noised, **common).images
    klein.retrieve_timesteps = orig
    # A reference image (Klein's editing input, `image=`): 64x64 (the pipeline's smallest side), a smooth pattern.
    yy, xx = np.mgrid[0:64, 0:64]
    ref = np.stack([128 + 100 * np.sin(xx / 7.0), 128 + 100 * np.cos(yy / 5.0), (xx + yy) * 2], -1)
    ref_png = os.path.join(out, "reference.png")
    Image.fromarray(ref.clip(0, 255).astype(np.uint8)).save(ref_png)
    io["final_latents_reference"] = pipe(prompt=PROMPT, image=[Image.open(ref_png)], output_type="latent",
                                         latents=init.clone(), **common).images
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, "io.safetensors"))
    tr.to(torch.bfloat16).save_pretrained(os.path.join(out, "transformer"))
    te.to(torch.bfloat16).save_pretrained(os.path.join(out, "text_encoder"))
    vae.to(torch.bfloat16).save_pretrained(os.path.join(out, "vae"))
    sched.save_pretrained(os.path.join(out, "scheduler"))
    json.dump({"_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.1", "is_distilled": True,
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
               "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]},
              open(os.path.join(out, "model_index.json"), "w"), indent=2)
    print("prompt ids", enc.input_ids[0].tolist())
    print("timesteps", pipe.scheduler.timesteps.tolist())


if __name__ == "__main__":
    main(sys.argv[1])
