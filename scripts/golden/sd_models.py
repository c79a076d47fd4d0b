"""Golden files for the Stable Diffusion models: tiny random UNet2DConditionModel in an SD1.5-like configuration
(cross-attention down blocks first, 1x1-conv proj_in/out, 2 heads per level) and an SDXL-like one (plain first
level, linear proj_in/out, two transformer blocks in the last level, added time/text embeddings; cross-attention
width 16 = the two tiny pipeline text encoders of sd_pipeline.py, pooled width 8), a tiny
4-channel AutoencoderKL with quant convs, and tiny text encoders in CLIP-L's layout (quick_gelu) and OpenCLIP
bigG's (gelu, CLIPTextModelWithProjection), each with inputs and float32 reference outputs.

usage: /work/refvenv/bin/python scripts/golden/sd_models.py tests/golden/sd
Needs torch, diffusers and transformers (not in CI). Writes, per UNet, a diffusers folder `<name>/unet/`
(config.json + diffusion_pytorch_model.safetensors), the same weights in the original CompVis/SGM single-file
layout `<name>_single.safetensors` (keys under `model.diffusion_model.`, made by inverting diffusers'
`convert_ldm_unet_checkpoint` and checked by running that converter back), and `<name>_unet_io.safetensors`; the VAE
as `sd15/vae/` + `vae_io.safetensors`; the text encoders as `sd15/text_encoder/` and `sdxl/text_encoder_2/` +
`text_io.safetensors` (hidden states of every layer's output used by SD: last (after the final LayerNorm), the
penultimate layer's output, the projected pooled output), and a tiny random 4-channel TAESD-style decoder `tae_decoder.safetensors`.

Weights are stored as bfloat16 (the references run in float32 on those rounded values), re-drawn from a seeded
normal distribution so that no layer is left at diffusers' zero/one initialisation."""
import json
import os
import sys

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


def randomize(model, seed, std=0.15):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise * (2.0 if p.ndim == 1 else 1.0))
            p.copy_(p.to(torch.bfloat16).float())


RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
          ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]


def resnet(rest):
    for d, o in RESNET:
        if rest.startswith(d):
            return o + rest[len(d):]
    raise KeyError(rest)


def unet_to_original(sd, cfg, check=True):
    """diffusers UNet2DConditionModel names -> CompVis/SGM single-file names (under model.diffusion_model.)."""
    l = cfg["layers_per_block"]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        rest = lambda i: ".".join(p[i:])
        if p[0] in ("time_embedding", "add_embedding"):
            base = "time_embed" if p[0] == "time_embedding" else "label_emb.0"
            o = f"{base}.{0 if p[1] == 'linear_1' else 2}.{rest(2)}"
        elif p[0] == "conv_in":
            o = f"input_blocks.0.0.{rest(1)}"
        elif p[0] == "conv_norm_out":
            o = f"out.0.{rest(1)}"
        elif p[0] == "conv_out":
            o = f"out.2.{rest(1)}"
        elif p[0] == "down_blocks":
            i = int(p[1])
            if p[2] == "resnets":
                o = f"input_blocks.{1 + i * (l + 1) + int(p[3])}.0.{resnet(rest(4))}"
            elif p[2] == "attentions":
                o = f"input_blocks.{1 + i * (l + 1) + int(p[3])}.1.{rest(4)}"
            else:
                o = f"input_blocks.{(i + 1) * (l + 1)}.0.op.{rest(5)}"
        elif p[0] == "mid_block":
            if p[1] == "attentions":
                o = f"middle_block.1.{rest(3)}"
            else:
                o = f"middle_block.{0 if p[2] == '0' else 2}.{resnet(rest(3))}"
        elif p[0] == "up_blocks":
            i = int(p[1])
            if p[2] == "resnets":
                o = f"output_blocks.{i * (l + 1) + int(p[3])}.0.{resnet(rest(4))}"
            elif p[2] == "attentions":
                o = f"output_blocks.{i * (l + 1) + int(p[3])}.1.{rest(4)}"
            else:
                o = f"output_blocks.{i * (l + 1) + l}.{2 if up_attn[i] else 1}.conv.{rest(5)}"
        else:
            raise KeyError(k)
        out["model.diffusion_model." + o] = v
    if not check:
        return out
    # diffusers' own converter must give the diffusers state dict back.
    back = convert_ldm_unet_checkpoint(dict(out), cfg)
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))[:10]
    for k in sd:
        assert torch.equal(back[k].reshape(sd[k].shape), sd[k]), k
    return out


SD15 = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(4, 8, 8),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=2,
            cross_attention_dim=8, attention_head_dim=2)
SDXL = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(4, 8, 8),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=2,
            cross_attention_dim=16, attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 8)


def unet(out_dir, name, cfg, seed):
    model = UNet2DConditionModel(**cfg).eval()
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ios = {}
    # Two shapes through one graph: batch 2 at 8x8 with 77 text tokens, batch 1 at 6x10 (not a multiple of the
    # UNet's stride: the upsamplers follow the skip sizes) with 154 tokens (a two-chunk long prompt).
    for tag, (b, h, w, s) in [("", (2, 8, 8, 77)), ("small_", (1, 6, 10, 154))]:
        x = torch.randn(b, 4, h, w, generator=g)
        t = torch.tensor([999.0, 321.5][:b])
        ctx = torch.randn(b, s, cfg["cross_attention_dim"], generator=g)
        kw = {}
        if cfg.get("addition_embed_type"):
            text = torch.randn(b, 8, generator=g)
            ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 8.0, 0.0, 640.0, 384.0]][:b])
            kw["added_cond_kwargs"] = {"text_embeds": text, "time_ids": ids}
            ios[f"{tag}text_embeds"], ios[f"{tag}time_ids"] = text, ids
        with torch.no_grad():
            y = model(x, t, encoder_hidden_states=ctx, **kw).sample
        ios.update({f"{tag}sample": x, f"{tag}timestep": t, f"{tag}encoder_hidden_states": ctx,
                    f"{tag}model_output": y})
        print(name, tag, tuple(y.shape), float(y.abs().max()))
    save_file({k: v.contiguous() for k, v in ios.items()}, os.path.join(out_dir, f"{name}_unet_io.safetensors"))
    d = os.path.join(out_dir, name, "unet")
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(unet_to_original(sd, dict(model.config)), os.path.join(out_dir, f"{name}_single.safetensors"))


def vae(out_dir, seed):
    model = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          latent_channels=4, norm_num_groups=2, sample_size=16).eval()
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    image = torch.rand(1, 3, 16, 24, generator=g) * 2 - 1
    latent = torch.randn(2, 4, 4, 6, generator=g)
    with torch.no_grad():
        dist = model.encode(image).latent_dist
        decoded = model.decode(latent).sample
    save_file({"image": image, "mean": dist.mean.contiguous(), "logvar": dist.logvar.contiguous(), "latent": latent,
               "decoded": decoded.contiguous()}, os.path.join(out_dir, "vae_io.safetensors"))
    model.to(torch.bfloat16).save_pretrained(os.path.join(out_dir, "sd15", "vae"), safe_serialization=True)
    print("vae", tuple(dist.mean.shape), tuple(decoded.shape))


def text(out_dir, seed):
    common = dict(vocab_size=1000, max_position_embeddings=77, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                  num_hidden_layers=3, num_attention_heads=2)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, hidden_act="quick_gelu",
                                          **common)).eval()
    big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=12, intermediate_size=24, hidden_act="gelu",
                                                       projection_dim=12, **common)).eval()
    randomize(clip_l, seed, std=0.3)
    randomize(big_g, seed + 1, std=0.3)
    g = torch.Generator().manual_seed(seed + 2)
    # BOS, random ids, EOS (the largest id: legacy eos_token_id=2 pools at argmax), padded with EOS / with 0.
    ids = torch.full((2, 77), 999, dtype=torch.long)
    for row, n in enumerate([5, 40]):
        ids[row, 0] = 998
        ids[row, 1:1 + n] = torch.randint(3, 998, (n,), generator=g)
    ids_g = ids.clone()
    ids_g[0, 7:] = 0
    io = {"input_ids": ids, "input_ids_g": ids_g}
    with torch.no_grad():
        a = clip_l(ids, output_hidden_states=True)
        b = big_g(ids_g, output_hidden_states=True)
    io["l_last_hidden_state"] = a.last_hidden_state
    io["l_penultimate"] = a.hidden_states[-2]
    io["l_pooled"] = a.pooler_output
    io["g_last_hidden_state"] = b.last_hidden_state
    io["g_penultimate"] = b.hidden_states[-2]
    io["g_text_embeds"] = b.text_embeds
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out_dir, "text_io.safetensors"))
    clip_l.to(torch.bfloat16).save_pretrained(os.path.join(out_dir, "sd15", "text_encoder"), safe_serialization=True)
    big_g.to(torch.bfloat16).save_pretrained(os.path.join(out_dir, "sdxl", "text_encoder_2"),
                                             safe_serialization=True)
    # The same bigG weights as in an SGM single file, beside CLIP-L in transformers' layout under its prefix.
    sd = {k: v.contiguous() for k, v in big_g.state_dict().items()}
    single = to_open_clip(sd, 3, "conditioner.embedders.1.model.")
    check_open_clip(big_g, sd, single, "conditioner.embedders.1.model.")
    for k, v in clip_l.state_dict().items():
        single["conditioner.embedders.0.transformer." + k] = v.contiguous()
    save_file(single, os.path.join(out_dir, "sdxl_text_single.safetensors"))
    print("text", tuple(a.last_hidden_state.shape), tuple(b.text_embeds.shape))


def to_open_clip(sd, layers, prefix):
    """transformers CLIPTextModelWithProjection names -> OpenCLIP's (SDXL's conditioner.embedders.1.model.*),
    checked by running diffusers' convert_open_clip_checkpoint back."""
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           prefix + "text_projection": sd["text_projection.weight"].T.contiguous()}
    for i in range(layers):
        h, o = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for suffix in ("weight", "bias"):
            out[f"{o}attn.in_proj_{suffix}"] = torch.cat([sd[f"{h}self_attn.{p}_proj.{suffix}"] for p in "qkv"], 0)
            for hf, oc in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                           ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                out[f"{o}{oc}.{suffix}"] = sd[f"{h}{hf}.{suffix}"]
    return out


def check_open_clip(model, sd, single, prefix):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    back = convert_open_clip_checkpoint(model, single, prefix=prefix)
    want = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    assert set(back) == set(want), sorted(set(back) ^ set(want))
    for k in want:
        assert torch.equal(back[k], want[k]), k


def tae(out_dir):
    """A tiny random TAESD-style decoder for 4-channel latents (flux_tae_tiny.py's layout), for `--preview`."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from flux_tae_tiny import decoder
    torch.manual_seed(61)
    d = decoder(latent_channels=4)
    save_file({k: v.half().contiguous() for k, v in d.state_dict().items()}, os.path.join(out_dir, "tae_decoder.safetensors"))


def main(out_dir):
    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)
    unet(out_dir, "sd15", SD15, 10)
    unet(out_dir, "sdxl", SDXL, 20)
    vae(out_dir, 30)
    text(out_dir, 40)
    tae(out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
