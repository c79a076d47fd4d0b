"""Golden file for FLUX.2 [klein] transformers in Black Forest Labs' own layout (flux-2-klein-4b.safetensors).

usage: /work/refvenv/bin/python scripts/golden/flux2_bfl.py tests/golden/flux2   (after flux2_klein.py)
Needs torch and diffusers (not in CI). Writes flux_2_bfl.safetensors: the tiny transformer of flux2_klein.py
(transformer/) in BFL's names (fused double-block qkv, `*.scale` norms, `lin` modulations, the final AdaLN as
shift|scale), made by inverting diffusers' `convert_flux2_transformer_checkpoint_to_diffusers` and checked here to
convert back through it exactly. The tests read it as the transformer of a folder without transformer/.
"""
import copy
import os
import sys

import torch
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
       "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
       "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
       "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
       "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
       "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
       "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
       "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear"}
DOUBLE = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
          "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
          "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
          "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0",
          "ff_context.linear_out": "txt_mlp.2"}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
          "attn.norm_k": "norm.key_norm"}
QKV = {"img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
       "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]}


def to_bfl(sd):
    out = {}
    for k, v in sd.items():
        module, param = k.rsplit(".", 1)
        norm = "norm" in module and module.split(".")[-1].startswith("norm_")
        if module == "norm_out.linear":
            a, b = v.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([b, a])
        elif module.startswith("transformer_blocks."):
            _, i, within = module.split(".", 2)
            fused = [f for f, parts in QKV.items() if within in parts]
            if fused:
                if within == QKV[fused[0]][0]:
                    out[f"double_blocks.{i}.{fused[0]}.{param}"] = torch.cat(
                        [sd[f"transformer_blocks.{i}.{p}.{param}"] for p in QKV[fused[0]]])
                continue
            out[f"double_blocks.{i}.{DOUBLE[within]}.{'scale' if norm else param}"] = v
        elif module.startswith("single_transformer_blocks."):
            _, i, within = module.split(".", 2)
            out[f"single_blocks.{i}.{SINGLE[within]}.{'scale' if norm else param}"] = v
        else:
            out[f"{TOP[module]}.{param}"] = v
    return {k: v.contiguous() for k, v in out.items()}


def main(out):
    sd = load_file(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    bfl = to_bfl(sd)
    back = convert_flux2_transformer_checkpoint_to_diffusers(copy.copy(bfl))
    assert back.keys() == sd.keys(), sorted(set(back) ^ set(sd))[:8]
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    save_file(bfl, os.path.join(out, "flux_2_bfl.safetensors"))
    print(f"wrote {len(bfl)} tensors; diffusers maps them back exactly")


if __name__ == "__main__":
    main(sys.argv[1])
