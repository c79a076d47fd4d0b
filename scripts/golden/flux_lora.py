"""Golden files for LoRA on Flux: LoRA files in the formats people have (diffusers/PEFT, kohya sd-scripts with BFL
names and `.alpha`, ComfyUI `diffusion_model.*`, kohya with diffusers names `lora_transformer_*`, LyCORIS LoHa and
LoKr) for the tiny FLUX.1-dev transformer of flux_models.py (tests/golden/flux/flux_dev*.safetensors), loaded by
diffusers (`load_lora_weights`, `set_adapters`) and run on that file's inputs; and a tiny whole pipeline
(flux_pipeline.py's) with a transformer + CLIP text-encoder LoRA, whose final latents are the reference for merged
builds and run-time LoRA.

usage: /work/refvenv/bin/python scripts/golden/flux_lora.py tests/golden/flux   (after flux_models.py, flux_text.py
and flux_pipeline.py). Needs torch, diffusers, peft (not in CI).

Writes lora/<format>.safetensors, lora/pipeline_peft.safetensors and lora/lora_io.safetensors (float32 outputs:
`sample.<case>` for the transformer cases, `final_latents.<case>` for the pipeline cases).

diffusers does not load LoHa/LoKr for Flux: their reference merges the LyCORIS delta by the LyCORIS formulas
(LoHa: (w1a @ w1b) * (w2a @ w2b) * alpha / rank; LoKr: kron(w1, w2), scaled by alpha / rank when a factor is
low-rank) into the diffusers weights, then runs the model."""
import json
import os
import sys

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flux_pipeline  # noqa: E402

STRENGTH = 0.7
KOHYA_SKIP = ("linear1", "_in", "final_layer")


def tiny_transformer(golden):
    cfg = json.load(open(os.path.join(golden, "flux_dev_config.json")))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    model = FluxTransformer2DModel(**cfg).eval()
    sd = {k: v.float() for k, v in load_file(os.path.join(golden, "flux_dev.safetensors")).items()}
    model.load_state_dict(sd)
    return model


def run(model, io):
    keys = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
            "guidance"]
    with torch.no_grad():
        return model(**{k: io[k] for k in keys}, return_dict=False)[0].float().contiguous()


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def factors(g, out_f, in_f, rank, std=0.15):
    return torch.randn(rank, in_f, generator=g) * std, torch.randn(out_f, rank, generator=g) * std


# BFL module (as kohya / ComfyUI name it) -> the diffusers linears it fuses, in row order (out features).
def bfl_modules(model):
    n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    m = {
        "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
        "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
        "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
        "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
        "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
        "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
        "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
        "final_layer.linear": ["proj_out"],
        # BFL keeps (shift, scale), diffusers (scale, shift): the halves swap.
        "final_layer.adaLN_modulation.1": ["norm_out.linear"],
    }
    for i in range(n_double):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        m[f"{d}.img_mod.lin"] = [f"{s}.norm1.linear"]
        m[f"{d}.txt_mod.lin"] = [f"{s}.norm1_context.linear"]
        m[f"{d}.img_attn.qkv"] = [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"]
        m[f"{d}.txt_attn.qkv"] = [f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"]
        m[f"{d}.img_attn.proj"] = [f"{s}.attn.to_out.0"]
        m[f"{d}.txt_attn.proj"] = [f"{s}.attn.to_add_out"]
        m[f"{d}.img_mlp.0"] = [f"{s}.ff.net.0.proj"]
        m[f"{d}.img_mlp.2"] = [f"{s}.ff.net.2"]
        m[f"{d}.txt_mlp.0"] = [f"{s}.ff_context.net.0.proj"]
        m[f"{d}.txt_mlp.2"] = [f"{s}.ff_context.net.2"]
    for i in range(n_single):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        m[f"{d}.linear1"] = [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"]
        m[f"{d}.linear2"] = [f"{s}.proj_out"]
        m[f"{d}.modulation.lin"] = [f"{s}.norm.linear"]
    return m


def bfl_shape(model, parts):
    lin = linears(model)
    return sum(lin[p].out_features for p in parts), lin[parts[0]].in_features


def peft_lora(model, g):
    """diffusers/PEFT: transformer.<diffusers name>.lora_A/B (no alpha: scale 1), bf16, every linear."""
    sd = {}
    for name, lin in linears(model).items():
        a, b = factors(g, lin.out_features, lin.in_features, 4)
        sd[f"transformer.{name}.lora_A.weight"] = a.to(torch.bfloat16)
        sd[f"transformer.{name}.lora_B.weight"] = b.to(torch.bfloat16)
    return sd


def kohya_lora(model, g, prefix, sep_dots, skip=()):
    """kohya sd-scripts (`lora_unet_` + BFL name with '_') or ComfyUI (`diffusion_model.` + dotted BFL name):
    lora_down/lora_up with .alpha (rank 4, alpha 2: scale 0.5), f16."""
    sd = {}
    for bfl, parts in bfl_modules(model).items():
        if any(s in bfl for s in skip):
            continue
        out_f, in_f = bfl_shape(model, parts)
        down, up = factors(g, out_f, in_f, 4)
        key = prefix + (bfl if sep_dots else bfl.replace(".", "_"))
        sd[f"{key}.lora_down.weight"] = down.half()
        sd[f"{key}.lora_up.weight"] = up.half()
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    return sd


def mixture_lora(model, g):
    """kohya-style keys with diffusers names: lora_transformer_<diffusers name with '_'>, alpha 8 on rank 4."""
    sd = {}
    for name, lin in linears(model).items():
        if not name.startswith(("transformer_blocks", "single_transformer_blocks")):
            continue
        down, up = factors(g, lin.out_features, lin.in_features, 4)
        key = "lora_transformer_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(8.0)
    return sd


def lycoris(model, g, kind):
    """LyCORIS LoHa / LoKr in kohya naming (lora_unet_ + BFL names), and the dense delta per diffusers linear."""
    sd, deltas = {}, {}
    for bfl, parts in bfl_modules(model).items():
        out_f, in_f = bfl_shape(model, parts)
        key = "lora_unet_" + bfl.replace(".", "_")
        if kind == "loha":
            rank, alpha = 2, 1.0
            w1a, w1b = torch.randn(out_f, rank, generator=g) * 0.3, torch.randn(rank, in_f, generator=g) * 0.3
            w2a, w2b = torch.randn(out_f, rank, generator=g) * 0.3, torch.randn(rank, in_f, generator=g) * 0.3
            sd.update({f"{key}.hada_w1_a": w1a, f"{key}.hada_w1_b": w1b, f"{key}.hada_w2_a": w2a,
                       f"{key}.hada_w2_b": w2b, f"{key}.alpha": torch.tensor(alpha)})
            delta = (w1a @ w1b) * (w2a @ w2b) * (alpha / rank)
        else:
            # w1 full [4, 4] (factor of the out and in features), w2 low-rank (w2_a @ w2_b), scale alpha / rank.
            rank, alpha = 2, 3.0
            w1 = torch.randn(4, 4, generator=g) * 0.3
            w2a = torch.randn(out_f // 4, rank, generator=g) * 0.2
            w2b = torch.randn(rank, in_f // 4, generator=g) * 0.2
            sd.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b,
                       f"{key}.alpha": torch.tensor(alpha)})
            delta = torch.kron(w1, w2a @ w2b) * (alpha / rank)
        if bfl == "final_layer.adaLN_modulation.1":
            delta = torch.cat(delta.chunk(2, 0)[::-1], 0)
        row = 0
        for p in parts:
            n = linears(model)[p].out_features
            deltas[p] = delta[row:row + n]
            row += n
    return sd, deltas


def with_lora(model, path, names_weights):
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    for name, (file, _) in names_weights.items():
        pipe.load_lora_weights(os.path.join(path, file), adapter_name=name)
    pipe.set_adapters(list(names_weights), adapter_weights=[w for _, w in names_weights.values()])
    return pipe


def main(golden):
    out = os.path.join(golden, "lora")
    os.makedirs(out, exist_ok=True)
    io = {k: v.float() for k, v in load_file(os.path.join(golden, "flux_dev_io.safetensors")).items()}
    g = torch.Generator().manual_seed(100)
    base = tiny_transformer(golden)
    files = {
        "peft": peft_lora(base, g),
        # diffusers splits linear1 with FLUX.1's full-size widths, and names the embedders and the final layer
        # without the `transformer.` prefix (they are then not loaded): LoHa/LoKr cover those mappings.
        "kohya": kohya_lora(base, g, "lora_unet_", False, skip=KOHYA_SKIP),
        "comfyui": kohya_lora(base, g, "diffusion_model.", True, skip=KOHYA_SKIP),
    }
    # diffusers mis-parses `lora_transformer_single_transformer_blocks_*` (a module named after the block): this
    # format's reference merges alpha / rank * up @ down into the named diffusers linears by hand.
    mixture = mixture_lora(base, g)
    for name, sd in files.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, f"{name}.safetensors"))
    results = {"sample.base": run(base, io)}
    for name in files:
        model = tiny_transformer(golden)
        pipe = with_lora(model, out, {name: (f"{name}.safetensors", STRENGTH)})
        results[f"sample.{name}"] = run(pipe.transformer, io)
    save_file(mixture, os.path.join(out, "kohya_diffusers_names.safetensors"))
    model = tiny_transformer(golden)
    lin = linears(model)
    with torch.no_grad():
        for name, l in lin.items():
            key = "lora_transformer_" + name.replace(".", "_")
            if f"{key}.alpha" in mixture:
                down, up = mixture[f"{key}.lora_down.weight"], mixture[f"{key}.lora_up.weight"]
                l.weight += STRENGTH * float(mixture[f"{key}.alpha"]) / down.shape[0] * (up @ down)
    results["sample.kohya_diffusers_names"] = run(model, io)
    model = tiny_transformer(golden)
    pipe = with_lora(model, out, {"peft": ("peft.safetensors", 0.7), "kohya": ("kohya.safetensors", 0.5)})
    results["sample.stacked_peft0.7_kohya0.5"] = run(pipe.transformer, io)
    for kind in ["loha", "lokr"]:
        sd, deltas = lycoris(base, g, kind)
        save_file(sd, os.path.join(out, f"{kind}.safetensors"))
        model = tiny_transformer(golden)
        lin = linears(model)
        with torch.no_grad():
            for p, d in deltas.items():
                lin[p].weight += STRENGTH * d
        results[f"sample.{kind}"] = run(model, io)
    for k, v in results.items():
        if k != "sample.base":
            print(k, "differs from base by", float((v - results["sample.base"]).abs().max()))

    # The whole tiny pipeline with a transformer + CLIP LoRA (PEFT format, as diffusers saves it).
    transformer, vae = flux_pipeline.build(golden)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        pipe = flux_pipeline.pipeline(transformer, vae, tmp, golden)
        sd = peft_lora(pipe.transformer, g)
        for name, lin in linears(pipe.text_encoder).items():
            if "encoder.layers" in name:
                a, b = factors(g, lin.out_features, lin.in_features, 4, std=0.3)
                sd[f"text_encoder.{name}.lora_A.weight"] = a
                sd[f"text_encoder.{name}.lora_B.weight"] = b
        save_file(sd, os.path.join(out, "pipeline_peft.safetensors"))
        ref = load_file(os.path.join(golden, "pipeline_io.safetensors"))
        args = dict(prompt=flux_pipeline.PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                    max_sequence_length=512, output_type="latent")
        pipe.load_lora_weights(os.path.join(out, "pipeline_peft.safetensors"), adapter_name="peft")
        pipe.set_adapters(["peft"], adapter_weights=[STRENGTH])
        with torch.no_grad():
            lat = pipe(**args, latents=ref["initial_latents"].clone()).images
        results["final_latents.pipeline_peft0.7"] = lat.float().contiguous()
        print("pipeline: final latents differ from base by",
              float((lat - ref["final_latents"]).abs().max()))
    # diffusers' own save_lora_weights with PEFT metadata: lora_alpha 8 on rank 4 (scale 2), an alpha_pattern
    # entry (proj_mlp: alpha 2, scale 0.5), stored in the file's `lora_adapter_metadata`.
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model = tiny_transformer(golden)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, alpha_pattern={"proj_mlp": 2},
                                 target_modules=["to_q", "to_k", "to_v", "proj_mlp", "ff.net.2"]))
    g2 = torch.Generator().manual_seed(200)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g2) * 0.1)
    meta = model.peft_config["default"].to_dict()
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=meta, weight_name="peft_metadata.safetensors")
    fresh = tiny_transformer(golden)
    pipe = with_lora(fresh, out, {"peft_metadata": ("peft_metadata.safetensors", STRENGTH)})
    results["sample.peft_metadata"] = run(pipe.transformer, io)
    print("sample.peft_metadata differs from base by",
          float((results["sample.peft_metadata"] - results["sample.base"]).abs().max()))
    save_file(results, os.path.join(out, "lora_io.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/flux")
