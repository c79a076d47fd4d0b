"""Golden files for LoRA on Stable Diffusion 1.5 and SDXL: LoRA files in the formats people have, on the tiny
pipelines of sd_pipeline.py (same components, prompts, initial latents, Euler over 4 steps at 32x32), loaded by
diffusers (`load_lora_weights`, `set_adapters`) and run to the final latents.

- sd15 kohya sd-scripts: `lora_unet_<diffusers module with '_'>` on every linear and convolution of the UNet
  (LoCon: 3x3 ResNet convs, resamplers, conv_in/out, 1x1 proj_in/out), `.alpha` 4 on rank 2 (scale 2), and
  `lora_te_<CLIP module>`;
- sd15 diffusers/PEFT: `unet.<module>.lora_A/lora_B` (linears and convs) and `text_encoder.<module>.*`;
- sd15 LyCORIS LoHa and LoKr (kohya naming) on the linears and 3x3 convs: diffusers does not load them for SD, so
  their reference merges the LyCORIS formulas into the weights in torch (checked on the kohya file against
  diffusers' own load first);
- sdxl kohya with the SGM/LDM names kohya trains SDXL under (`lora_unet_input_blocks_4_1_...`,
  `lora_unet_middle_block_0_in_layers_2`, `lora_unet_label_emb_0_0`, ...), `lora_te1_*` and `lora_te2_*`;
- sdxl diffusers/PEFT (`unet.*`, `text_encoder.*`, `text_encoder_2.*`);
- stacked: PEFT at 0.7 with kohya at 0.5 (both families).
Everything else at strength 0.7.

usage: /work/refvenv/bin/python scripts/golden/sd_lora.py tests/golden/sd   (after sd_pipeline.py)
Needs torch, diffusers, transformers, peft (not in CI). Writes lora/*.safetensors and lora/lora_io.safetensors."""
import copy
import os
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flux_pipeline import clip_tokenizer  # noqa: E402
from sd_models import unet_to_original  # noqa: E402
from sd_pipeline import NEGATIVE, PROMPT, scheduler  # noqa: E402

RANK = 2
STRENGTH = 0.7


def modules(model, convs=True):
    """Every linear (and convolution) of `model`, by name."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if convs else (torch.nn.Linear,)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def factors(g, m, std=0.08):
    """Random LoRA down [r, in, kh, kw] / up [out, r, 1, 1] for a conv, [r, in] / [out, r] for a linear."""
    if isinstance(m, torch.nn.Conv2d):
        down = torch.randn(RANK, m.in_channels, *m.kernel_size, generator=g) * std
        up = torch.randn(m.out_channels, RANK, 1, 1, generator=g) * std
    else:
        down = torch.randn(RANK, m.in_features, generator=g) * std
        up = torch.randn(m.out_features, RANK, generator=g) * std
    return down.to(torch.bfloat16).float(), up.to(torch.bfloat16).float()


def kohya(named, g, prefix, rename=lambda n: n, alpha=4.0):
    sd = {}
    for name, m in named.items():
        down, up = factors(g, m)
        key = prefix + rename(name).replace(".", "_")
        sd[key + ".lora_down.weight"] = down
        sd[key + ".lora_up.weight"] = up
        sd[key + ".alpha"] = torch.tensor(alpha)
    return sd


def peft(named, g, prefix):
    sd = {}
    for name, m in named.items():
        down, up = factors(g, m)
        sd[f"{prefix}{name}.lora_A.weight"] = down
        sd[f"{prefix}{name}.lora_B.weight"] = up
    return sd


def lycoris(named, g, kind):
    """LoHa / LoKr factors in kohya naming on the linears and 3x3 convs, and each module's dense delta (alpha 2)."""
    sd, deltas = {}, {}
    for name, m in named.items():
        shape = m.weight.shape
        out_f, in_f = shape[0], shape[1:].numel()
        key = "lora_unet_" + name.replace(".", "_")
        r = lambda *s: (torch.randn(*s, generator=g) * 0.15).to(torch.bfloat16).float()
        if kind == "loha":
            w1a, w1b, w2a, w2b = r(out_f, RANK), r(RANK, in_f), r(out_f, RANK), r(RANK, in_f)
            sd.update({key + ".hada_w1_a": w1a, key + ".hada_w1_b": w1b, key + ".hada_w2_a": w2a,
                       key + ".hada_w2_b": w2b})
            delta = (2.0 / RANK) * (w1a @ w1b) * (w2a @ w2b)
        else:
            # w1 full [2, 2] (out and in features are even here), w2 low rank [out/2, r] @ [r, in/2 (* k * k)].
            w1 = r(2, 2)
            if len(shape) == 4:
                w2a, w2b = r(out_f // 2, RANK), r(RANK, shape[1] // 2 * shape[2] * shape[3])
            else:
                w2a, w2b = r(out_f // 2, RANK), r(RANK, in_f // 2)
            sd.update({key + ".lokr_w1": w1, key + ".lokr_w2_a": w2a, key + ".lokr_w2_b": w2b})
            w2 = w2a @ w2b
            if len(shape) == 4:
                # LyCORIS: kron(w1[:, :, None, None], w2 as [o2, i2, k, k]).
                w2 = w2.reshape(out_f // 2, shape[1] // 2, *shape[2:])
                delta = (2.0 / RANK) * torch.kron(w1[:, :, None, None], w2)
            else:
                delta = (2.0 / RANK) * torch.kron(w1, w2)
        sd[key + ".alpha"] = torch.tensor(2.0)
        deltas[name] = delta.reshape(shape)
    return sd, deltas


def merged(unet, deltas, strength):
    u = copy.deepcopy(unet)
    mods = dict(u.named_modules())
    with torch.no_grad():
        for name, d in deltas.items():
            mods[name].weight += strength * d
    return u


def kohya_dense(sd, named, prefix, rename=lambda n: n):
    """The kohya file's dense deltas by module (alpha / rank * up @ down), to check diffusers' load against."""
    out = {}
    for name, m in named.items():
        key = prefix + rename(name).replace(".", "_")
        down, up = sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"]
        scale = float(sd[key + ".alpha"]) / down.shape[0]
        out[name] = (scale * (up.flatten(1) @ down.flatten(1))).reshape(m.weight.shape)
    return out


def ldm_module(cfg):
    """A diffusers UNet module name -> its SGM/LDM name (as kohya writes SDXL LoRAs)."""
    def f(name):
        (k,) = unet_to_original({name + ".weight": torch.zeros(1)}, cfg, check=False)
        return k[len("model.diffusion_model."):-len(".weight")]
    return f


def main(out_root):
    golden = os.path.dirname(os.path.abspath(out_root.rstrip("/")))
    out = os.path.join(out_root, "lora")
    os.makedirs(out, exist_ok=True)
    f32 = dict(torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(os.path.join(out_root, "sd15", "vae"), **f32).eval()
    clip_l = CLIPTextModel.from_pretrained(os.path.join(golden, "flux", "text_encoder"), **f32).eval()
    big_g = CLIPTextModelWithProjection.from_pretrained(os.path.join(out_root, "sdxl", "pipeline_text_encoder_2"),
                                                        **f32).eval()
    unet15 = UNet2DConditionModel.from_pretrained(os.path.join(out_root, "sd15", "unet"), **f32).eval()
    unetxl = UNet2DConditionModel.from_pretrained(os.path.join(out_root, "sdxl", "unet"), **f32).eval()
    io = {}
    args = dict(height=32, width=32, num_inference_steps=4, output_type="latent")
    with tempfile.TemporaryDirectory() as tmp:
        tok = clip_tokenizer(tmp)
        tok2 = clip_tokenizer(tmp)
        tok2.pad_token = "!"

        def sd15(unet=unet15, text_encoder=clip_l):
            return StableDiffusionPipeline(vae=vae, text_encoder=copy.deepcopy(text_encoder), tokenizer=tok,
                                           unet=copy.deepcopy(unet), scheduler=scheduler(), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)

        def sdxl():
            return StableDiffusionXLPipeline(vae=vae, text_encoder=copy.deepcopy(clip_l),
                                             text_encoder_2=copy.deepcopy(big_g), tokenizer=tok, tokenizer_2=tok2,
                                             unet=copy.deepcopy(unetxl), scheduler=scheduler(),
                                             force_zeros_for_empty_prompt=False)

        lat15 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
        latxl = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))

        def run15(pipe):
            with torch.no_grad():
                return pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, latents=lat15.clone(), **args).images

        def runxl(pipe):
            with torch.no_grad():
                return pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, latents=latxl.clone(), **args).images

        def with_loras(make, files):
            pipe = make()
            for name, (file, _) in files.items():
                pipe.load_lora_weights(os.path.join(out, file), adapter_name=name)
            pipe.set_adapters(list(files), adapter_weights=[w for _, w in files.values()])
            return pipe

        g = torch.Generator().manual_seed(1)
        te = modules(clip_l, convs=False)
        u15 = modules(unet15)
        files = {
            "sd15_kohya": {**kohya(u15, g, "lora_unet_"), **kohya(te, g, "lora_te_")},
            "sd15_peft": {**peft(u15, g, "unet."), **peft(te, g, "text_encoder.")},
        }
        xl_cfg = dict(unetxl.config)
        ux = modules(unetxl)
        files["sdxl_kohya"] = {**kohya(ux, g, "lora_unet_", ldm_module(xl_cfg)), **kohya(te, g, "lora_te1_"),
                               **kohya(modules(big_g.text_model, convs=False), g, "lora_te2_text_model_")}
        files["sdxl_peft"] = {**peft(ux, g, "unet."), **peft(te, g, "text_encoder."),
                              **peft(modules(big_g.text_model, convs=False), g, "text_encoder_2.text_model.")}
        for name, sd in files.items():
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, f"{name}.safetensors"))

        io["sd15_base"] = run15(sd15())
        io["sdxl_base"] = runxl(sdxl())
        for name in files:
            run = run15 if name.startswith("sd15") else runxl
            make = sd15 if name.startswith("sd15") else sdxl
            io[name] = run(with_loras(make, {name: (f"{name}.safetensors", STRENGTH)}))
            print(name, "moves the latents by", float((io[name] - io[name[:4] + "_base"]).abs().max()))
        io["sd15_stacked"] = run15(with_loras(sd15, {"p": ("sd15_peft.safetensors", 0.7),
                                                     "k": ("sd15_kohya.safetensors", 0.5)}))
        io["sdxl_stacked"] = runxl(with_loras(sdxl, {"p": ("sdxl_peft.safetensors", 0.7),
                                                     "k": ("sdxl_kohya.safetensors", 0.5)}))

        # diffusers' kohya load == the dense merge (so the LyCORIS references below follow the same convention).
        dense = kohya_dense(files["sd15_kohya"], u15, "lora_unet_")
        te_dense = kohya_dense(files["sd15_kohya"], te, "lora_te_")
        check = run15(sd15(unet=merged(unet15, dense, STRENGTH), text_encoder=merged(clip_l, te_dense, STRENGTH)))
        err = float((check - io["sd15_kohya"]).abs().max() / io["sd15_kohya"].abs().max())
        print("sd15 kohya: diffusers' load vs the dense merge, max rel", err)
        assert err < 1e-5, err

        ly = {n: m for n, m in u15.items()
              if isinstance(m, torch.nn.Linear) or m.kernel_size == (3, 3)}
        for kind in ("loha", "lokr"):
            sd, deltas = lycoris(ly, g, kind)
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, f"sd15_{kind}.safetensors"))
            io[f"sd15_{kind}"] = run15(sd15(unet=merged(unet15, deltas, STRENGTH)))
            print(kind, "moves the latents by", float((io[f"sd15_{kind}"] - io["sd15_base"]).abs().max()))
    save_file({k: v.float().contiguous() for k, v in io.items()}, os.path.join(out, "lora_io.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
