"""Golden files for the Flux image models: tiny random FluxTransformer2DModel (dev with guidance, schnell without)
and a tiny 16-channel AutoencoderKL from diffusers, with inputs and reference outputs. The VAE is also written in
the original (LDM / BFL `ae.safetensors`) layout as `vae_original.safetensors`.

usage: /work/refvenv/bin/python scripts/golden/flux_models.py tests/golden/flux
Needs torch and diffusers (not in CI). Writes, per model, `<name>.safetensors` (diffusers layout), for the
transformers also `<name>_bfl.safetensors` (the original Black Forest Labs layout, made by inverting diffusers'
`convert_flux_to_diffusers.py` renaming: q/k/v fused back into qkv, single-block q/k/v/mlp into linear1, the final
AdaLN's (scale, shift) halves swapped back to (shift, scale)), `<name>_config.json`, and `<name>_io.safetensors`
with the inputs and outputs (float32). Weights are stored as bfloat16 (transformers) and float16 (VAE), like the
real checkpoints; the references run in float32 on those same rounded values.

Parameters are re-drawn from a seeded normal distribution (diffusers' init leaves several of them at zero or one,
which would hide mistakes); everything runs in float32 on the CPU."""
import json
import os
import re
import sys

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file


def randomize(model, seed, std=0.08, store=torch.bfloat16):
    """Seeded normal parameters, rounded to the storage dtype (the reference then runs in float32 on exactly the
    weights the files hold, and the files stay half the size)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name or (
                    p.ndim == 1 and ("norm" in name and "linear" not in name)):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise * (3.0 if p.ndim == 1 else 1.0))
            p.copy_(p.to(store).float())


def to_bfl(sd, n_double, n_single):
    """diffusers FluxTransformer2DModel state dict -> BFL flux1-*.safetensors names."""
    out = {}

    def mv(dst, src):
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd[f"{src}.{suffix}"]

    def cat(dst, srcs):
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = torch.cat([sd[f"{s}.{suffix}"] for s in srcs], 0)

    mv("img_in", "x_embedder")
    mv("txt_in", "context_embedder")
    mv("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    mv("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    mv("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    mv("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        mv("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        mv("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    for i in range(n_double):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        mv(f"{d}.img_mod.lin", f"{s}.norm1.linear")
        mv(f"{d}.txt_mod.lin", f"{s}.norm1_context.linear")
        cat(f"{d}.img_attn.qkv", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"])
        cat(f"{d}.txt_attn.qkv", [f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"])
        out[f"{d}.img_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        out[f"{d}.img_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
        out[f"{d}.txt_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_added_q.weight"]
        out[f"{d}.txt_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_added_k.weight"]
        mv(f"{d}.img_attn.proj", f"{s}.attn.to_out.0")
        mv(f"{d}.txt_attn.proj", f"{s}.attn.to_add_out")
        mv(f"{d}.img_mlp.0", f"{s}.ff.net.0.proj")
        mv(f"{d}.img_mlp.2", f"{s}.ff.net.2")
        mv(f"{d}.txt_mlp.0", f"{s}.ff_context.net.0.proj")
        mv(f"{d}.txt_mlp.2", f"{s}.ff_context.net.2")
    for i in range(n_single):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        cat(f"{d}.linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"])
        mv(f"{d}.linear2", f"{s}.proj_out")
        out[f"{d}.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        out[f"{d}.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
        mv(f"{d}.modulation.lin", f"{s}.norm.linear")
    mv("final_layer.linear", "proj_out")
    for suffix in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{suffix}"].chunk(2, 0)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale], 0)
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    return out


def transformer(out_dir, name, guidance, seed):
    cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
               axes_dims_rope=[4, 6, 6])
    model = FluxTransformer2DModel(**cfg).eval()
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    io = run_transformer(model, g, guidance, 2, 4, 6, 7)
    save_file(io, os.path.join(out_dir, f"{name}_io.safetensors"))
    # A second shape (other batch, image and text sizes) through the same graph: the dynamic axes.
    io2 = run_transformer(model, g, guidance, 1, 3, 5, 4)
    save_file(io2, os.path.join(out_dir, f"{name}_io_small.safetensors"))
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out_dir, f"{name}.safetensors"))
    save_file(to_bfl(sd, cfg["num_layers"], cfg["num_single_layers"]),
              os.path.join(out_dir, f"{name}_bfl.safetensors"))
    dump_config(model, os.path.join(out_dir, f"{name}_config.json"))
    print(name, "sample", tuple(io["sample"].shape), float(io["sample"].abs().max()))


def run_transformer(model, g, guidance, batch, h, w, txt):
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 0] = 1.0  # a non-zero first axis exercises all three RoPE axes (FLUX.1 Kontext uses it)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(h * w, 3)
    txt_ids = torch.zeros(txt, 3)
    inputs = {
        "hidden_states": torch.randn(batch, h * w, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, txt, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.tensor([0.7, 0.25][:batch]),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }
    if guidance:
        inputs["guidance"] = torch.tensor([3.5, 1.5][:batch])
    with torch.no_grad():
        sample = model(**inputs, return_dict=False)[0]
    io = {k: v.contiguous() for k, v in inputs.items()}
    io["sample"] = sample.contiguous()
    return io


def vae_to_original(sd, levels):
    """diffusers AutoencoderKL names -> the original LDM names of BFL's ae.safetensors (the inverse of diffusers'
    convert_ldm_vae_checkpoint): down/up levels, block_N, mid.block_1/attn_1/block_2, nin_shortcut, norm_out, and
    the mid attention's q/k/v/proj_out as 1x1 convs."""
    out = {}
    for k, v in sd.items():
        side, rest = k.split(".", 1)
        r = rest
        r = re.sub(r"^down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", r)
        r = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", r)
        r = re.sub(r"^up_blocks\.(\d+)", lambda m: f"up.{levels - 1 - int(m.group(1))}", r)
        r = re.sub(r"^up\.(\d+)\.resnets\.(\d+)", r"up.\1.block.\2", r)
        r = re.sub(r"^up\.(\d+)\.upsamplers\.0", r"up.\1.upsample", r)
        r = re.sub(r"^mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m.group(1)) + 1}", r)
        r = r.replace("mid_block.attentions.0.", "mid.attn_1.")
        r = r.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        attn = r.startswith("mid.attn_1.")
        if attn:
            r = (r.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
                 .replace("to_out.0", "proj_out"))
            if v.ndim == 2:
                v = v[:, :, None, None]
        out[f"{side}.{r}"] = v.contiguous()
    return out


def vae(out_dir, seed):
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                          latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                          scaling_factor=0.3611, shift_factor=0.1159).eval()
    randomize(model, seed, std=0.05, store=torch.float16)
    g = torch.Generator().manual_seed(seed + 1)
    image = torch.rand(1, 3, 16, 24, generator=g) * 2 - 1
    latent = torch.randn(1, 16, 6, 10, generator=g)
    with torch.no_grad():
        dist = model.encode(image).latent_dist
        decoded = model.decode(latent).sample
    sd = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out_dir, "vae.safetensors"))
    save_file(vae_to_original(sd, 2), os.path.join(out_dir, "vae_original.safetensors"))
    save_file({"image": image, "mean": dist.mean.contiguous(), "logvar": dist.logvar.contiguous(),
               "latent": latent, "decoded": decoded.contiguous()}, os.path.join(out_dir, "vae_io.safetensors"))
    dump_config(model, os.path.join(out_dir, "vae_config.json"))
    print("vae mean", tuple(dist.mean.shape), "decoded", tuple(decoded.shape))


def dump_config(model, path):
    cfg = dict(model.config)
    cfg.pop("_use_default_values", None)  # a set: its order changes from run to run
    json.dump(cfg, open(path, "w"), indent=1, default=list)


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    transformer(out_dir, "flux_dev", True, 10)
    transformer(out_dir, "flux_schnell", False, 20)
    vae(out_dir, 30)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/flux")
