"""Golden files for SD3.5 single-file checkpoints (Stability AI's sd3.5_*.safetensors layout).

usage: /work/refvenv/bin/python scripts/golden/sd35_single_file.py tests/golden/sd35   (after sd35.py)
Needs torch, diffusers, transformers (not in CI). Writes
- single_file.safetensors: the tiny medium transformer of sd35.py in the original MMDiT layout under
  `model.diffusion_model.` (fused qkv, `x_block`/`context_block`, shift|scale AdaLN order) and its VAE in the LDM
  layout under `first_stage_model.`, made by inverting diffusers' converters; both are checked here to convert back
  exactly through diffusers' own `convert_sd3_transformer_checkpoint_to_diffusers` and `convert_ldm_vae_checkpoint`.
  The text encoders are not in it: the tests put the committed tiny ones beside it as Stability AI's repositories
  do (text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors).
- single_file_io.safetensors: `final_latents` of StableDiffusion3Pipeline on the components diffusers'
  from_single_file makes of that file (the transformer and VAE through its converters, CLIP-L with the identity
  text projection it gives SAI's CLIP-L), with sd35.py's initial latents, prompt, NEGATIVE, CFG 4, 4 steps, 32x32.
"""
import copy
import os
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                 convert_sd3_transformer_checkpoint_to_diffusers)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel, T5TokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from flux_models import vae_to_original  # noqa: E402
from sd35 import DATA, GOLDEN, MAX_SEQ, NEGATIVE, PROMPT, clip_tokenizer  # noqa: E402

PREFIX = "model.diffusion_model."


def swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_original(sd, num_layers, dual):
    """diffusers SD3Transformer2DModel names -> the original MMDiT names (inverse of diffusers' converter)."""
    o = {"pos_embed": sd["pos_embed.pos_embed"], "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
         "x_embedder.proj.bias": sd["pos_embed.proj.bias"], "context_embedder.weight": sd["context_embedder.weight"],
         "context_embedder.bias": sd["context_embedder.bias"], "final_layer.linear.weight": sd["proj_out.weight"],
         "final_layer.linear.bias": sd["proj_out.bias"]}
    for p in ("weight", "bias"):
        for src, dst in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
            o[f"{dst}.mlp.0.{p}"] = sd[f"time_text_embed.{src}.linear_1.{p}"]
            o[f"{dst}.mlp.2.{p}"] = sd[f"time_text_embed.{src}.linear_2.{p}"]
        o[f"final_layer.adaLN_modulation.1.{p}"] = swap_halves(sd[f"norm_out.linear.{p}"])
    for i in range(num_layers):
        d, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == num_layers - 1
        for p in ("weight", "bias"):
            o[f"{j}.x_block.attn.qkv.{p}"] = torch.cat([sd[f"{d}.attn.to_{x}.{p}"] for x in "qkv"])
            o[f"{j}.context_block.attn.qkv.{p}"] = torch.cat(
                [sd[f"{d}.attn.add_{x}_proj.{p}"] for x in "qkv"])
            o[f"{j}.x_block.attn.proj.{p}"] = sd[f"{d}.attn.to_out.0.{p}"]
            o[f"{j}.x_block.adaLN_modulation.1.{p}"] = sd[f"{d}.norm1.linear.{p}"]
            o[f"{j}.x_block.mlp.fc1.{p}"] = sd[f"{d}.ff.net.0.proj.{p}"]
            o[f"{j}.x_block.mlp.fc2.{p}"] = sd[f"{d}.ff.net.2.{p}"]
            ctx_ada = sd[f"{d}.norm1_context.linear.{p}"]
            o[f"{j}.context_block.adaLN_modulation.1.{p}"] = swap_halves(ctx_ada) if last else ctx_ada
            if not last:
                o[f"{j}.context_block.attn.proj.{p}"] = sd[f"{d}.attn.to_add_out.{p}"]
                o[f"{j}.context_block.mlp.fc1.{p}"] = sd[f"{d}.ff_context.net.0.proj.{p}"]
                o[f"{j}.context_block.mlp.fc2.{p}"] = sd[f"{d}.ff_context.net.2.{p}"]
            if i in dual:
                o[f"{j}.x_block.attn2.qkv.{p}"] = torch.cat([sd[f"{d}.attn2.to_{x}.{p}"] for x in "qkv"])
                o[f"{j}.x_block.attn2.proj.{p}"] = sd[f"{d}.attn2.to_out.0.{p}"]
        for src, dst in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                         ("attn.norm_added_q", "context_block.attn.ln_q"),
                         ("attn.norm_added_k", "context_block.attn.ln_k")):
            o[f"{j}.{dst}.weight"] = sd[f"{d}.{src}.weight"]
        if i in dual:
            o[f"{j}.x_block.attn2.ln_q.weight"] = sd[f"{d}.attn2.norm_q.weight"]
            o[f"{j}.x_block.attn2.ln_k.weight"] = sd[f"{d}.attn2.norm_k.weight"]
    return {PREFIX + k: v.contiguous() for k, v in o.items()}


def same(a, b, what):
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b))[:8])
    for k in a:
        assert torch.equal(a[k], b[k]), (what, k)


def main(out):
    tdir = os.path.join(GOLDEN, "sd35", "transformer")
    transformer = SD3Transformer2DModel.from_pretrained(tdir, torch_dtype=torch.float32).eval()
    cfg = transformer.config
    sd = load_file(os.path.join(tdir, "diffusion_pytorch_model.safetensors"))
    original = to_original(sd, cfg.num_layers, set(cfg.dual_attention_layers))
    back = convert_sd3_transformer_checkpoint_to_diffusers(copy.copy(original))
    same(back, sd, "transformer")

    vdir = os.path.join(GOLDEN, "flux", "pipeline", "vae")
    vsd = load_file(os.path.join(vdir, "diffusion_pytorch_model.safetensors"))
    vae_cfg = dict(AutoencoderKL.load_config(os.path.join(GOLDEN, "sd35", "vae")))
    vae_orig = {"first_stage_model." + k: v for k, v in vae_to_original(vsd, len(vae_cfg["block_out_channels"])).items()}
    same(convert_ldm_vae_checkpoint(dict(vae_orig), vae_cfg), vsd, "vae")
    save_file({**original, **vae_orig}, os.path.join(out, "single_file.safetensors"))

    # The pipeline diffusers' from_single_file makes of the file (with the tiny folder's configs).
    single = SD3Transformer2DModel.from_config(cfg).eval()
    single.load_state_dict({k: v.float() for k, v in back.items()}, strict=True)
    vae = AutoencoderKL.from_config(vae_cfg).eval()
    vae.load_state_dict({k: v.float() for k, v in vsd.items()}, strict=True)
    clip_cfg = CLIPTextConfig.from_pretrained(os.path.join(GOLDEN, "sd35", "text_encoder"))
    te = CLIPTextModelWithProjection.from_pretrained(os.path.join(GOLDEN, "flux", "text_encoder"), config=clip_cfg,
                                                     torch_dtype=torch.float32).eval()
    with torch.no_grad():
        te.text_projection.weight.copy_(torch.eye(clip_cfg.hidden_size))
    te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(GOLDEN, "sd", "sdxl", "pipeline_text_encoder_2"),
                                                      torch_dtype=torch.float32).eval()
    te3 = T5EncoderModel.from_pretrained(os.path.join(GOLDEN, "flux", "text_encoder_2"),
                                         torch_dtype=torch.float32).eval()
    t5_tok = T5TokenizerFast(tokenizer_file=os.path.join(DATA, "tokenizers", "t5_tokenizer.json"),
                             model_max_length=512)
    tmp = tempfile.mkdtemp()
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae, text_encoder=te,
        tokenizer=clip_tokenizer(tmp, "<|endoftext|>"), text_encoder_2=te2, tokenizer_2=clip_tokenizer(tmp, "!"),
        text_encoder_3=te3, tokenizer_3=t5_tok, transformer=single)
    pipe.set_progress_bar_config(disable=True)
    init = load_file(os.path.join(out, "io.safetensors"))["initial_latents"]
    with torch.no_grad():
        latents = pipe(PROMPT, latents=init.clone(), negative_prompt=NEGATIVE, guidance_scale=4.0, height=32,
                       width=32, num_inference_steps=4, max_sequence_length=MAX_SEQ, output_type="latent").images
    save_file({"final_latents": latents.contiguous()}, os.path.join(out, "single_file_io.safetensors"))
    print("written; final latents", latents.flatten()[:4].tolist())


if __name__ == "__main__":
    main(sys.argv[1])
