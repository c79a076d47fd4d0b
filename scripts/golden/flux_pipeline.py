"""Golden files for the whole Flux pipeline: a tiny random FLUX.1-dev-shaped pipeline (diffusers FluxPipeline with
FluxTransformer2DModel, AutoencoderKL, the tiny CLIPTextModel / T5EncoderModel of flux_text.py and the real CLIP
BPE and T5 tokenizers from ../shared/data/tokenizers), run for 4 flow-match Euler steps from fixed initial latents.

usage: /work/refvenv/bin/python scripts/golden/flux_pipeline.py tests/golden/flux   (after flux_text.py)
Needs torch, diffusers, transformers (not in CI). Writes pipeline/transformer and pipeline/vae (save_pretrained:
the diffusers folder layout and file names, bfloat16 / float16 weights; the reference runs in float32 on the
same rounded values) and pipeline_io.safetensors: the packed initial latents, the final packed latents and the
decoded image (float32, [0, 1]), the final latents with true CFG 2.0 and NEGATIVE, and img2img (init.png = that image, strength 0.6, the noise saved) for PROMPT at 32x32, guidance 3.5, 512 T5 tokens, dev's scheduler config.
With --bench N it also times N end-to-end calls on the CPU and prints the median seconds."""
import gzip
import json
import os
import sys
import tempfile
import time

import torch
import diffusers.pipelines.flux.pipeline_flux_img2img as img2img_module
import numpy as np
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline,
                       FluxTransformer2DModel)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

PROMPT = "a watercolor painting of a fox in the snow, 4k"
NEGATIVE = "blurry, low quality"
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("TRT_DIFF_SHARED_DATA", os.path.join(HERE, "..", "..", "..", "shared", "data"))


def randomize(model, seed, std, store):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if p.ndim == 1 and "norm" in name and "linear" not in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise * (3.0 if p.ndim == 1 else 1.0))
            p.copy_(p.to(store).float())


def clip_tokenizer(tmp):
    """CLIPTokenizer files from openai's bpe_simple_vocab_16e6.txt.gz (the same construction as SimpleTokenizer)."""
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
    return CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=77)


def build(out):
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=8,
                                         pooled_projection_dim=8, guidance_embeds=True,
                                         axes_dims_rope=[4, 6, 6]).eval()
    randomize(transformer, 40, 0.08, torch.bfloat16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159).eval()
    randomize(vae, 50, 0.05, torch.float16)
    return transformer, vae


def pipeline(transformer, vae, tmp, text_dir):
    clip = CLIPTextModel.from_pretrained(os.path.join(text_dir, "text_encoder"), torch_dtype=torch.float32).eval()
    t5 = T5EncoderModel.from_pretrained(os.path.join(text_dir, "text_encoder_2"), torch_dtype=torch.float32).eval()
    t5_tok = T5TokenizerFast(tokenizer_file=os.path.join(DATA, "tokenizers", "t5_tokenizer.json"),
                             model_max_length=512)
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                            max_shift=1.15, num_train_timesteps=1000, shift=3.0,
                                            use_dynamic_shifting=True)
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(tmp),
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def main(out, bench):
    transformer, vae = build(out)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = pipeline(transformer, vae, tmp, out)
        g = torch.Generator().manual_seed(7)
        latents = torch.randn(1, 64, 64, generator=g)  # 32x32 image: 16x16 latent (VAE 2x), 8x8 tokens of 4x16
        args = dict(prompt=PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                    max_sequence_length=512)
        with torch.no_grad():
            final = pipe(**args, latents=latents.clone(), output_type="latent").images
            image = pipe(**args, latents=latents.clone(), output_type="pt").images
            true_cfg = pipe(**args, latents=latents.clone(), output_type="latent", negative_prompt=NEGATIVE,
                            true_cfg_scale=2.0).images
            # img2img from that image (saved as init.png), strength 0.6: the VAE encoder's mode (diffusers samples
            # it; the latent distribution's mean is what trt-diff uses) and the noise drawn here, packed.
            init = Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            orig = img2img_module.retrieve_latents
            img2img_module.retrieve_latents = lambda e, generator=None, sample_mode="sample": orig(e, generator,
                                                                                                  "argmax")
            i2i = FluxImg2ImgPipeline(**pipe.components)
            noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(9))
            packed_noise = FluxPipeline._pack_latents(noise, 1, 16, 16, 16)
            img2img = i2i(**args, image=init, strength=0.6, generator=torch.Generator().manual_seed(9),
                          output_type="latent").images
            img2img_module.retrieve_latents = orig
        if bench:
            times = []
            for _ in range(bench):
                t = time.perf_counter()
                with torch.no_grad():
                    pipe(**args, latents=latents.clone(), output_type="pil")
                times.append(time.perf_counter() - t)
            times.sort()
            print(json.dumps({"diffusers_seconds_median": times[len(times) // 2], "runs": bench,
                              "torch_threads": torch.get_num_threads()}))
            return
    pdir = os.path.join(out, "pipeline")
    transformer.to(torch.bfloat16).save_pretrained(os.path.join(pdir, "transformer"))
    vae.to(torch.float16).save_pretrained(os.path.join(pdir, "vae"))
    save_file({"initial_latents": latents.contiguous(), "final_latents": final.float().contiguous(),
               "image": image.float().contiguous(), "final_latents_true_cfg": true_cfg.float().contiguous(),
               "img2img_noise": packed_noise.contiguous(), "final_latents_img2img": img2img.float().contiguous()}, os.path.join(out, "pipeline_io.safetensors"))
    init.save(os.path.join(out, "init.png"))
    print("final latents", tuple(final.shape), float(final.abs().max()), "image", tuple(image.shape))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(sys.argv[sys.argv.index("--bench") + 1]) if "--bench" in sys.argv else 0
    if n:
        args = [a for a in args if a != str(n)]
    main(args[0] if args else "tests/golden/flux", n)
