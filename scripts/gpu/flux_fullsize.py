"""FLUX.1-dev at its real shapes with random weights, for the GPU benchmark of issue 15 (scripts/gpu/flux_fullsize.sh).

    python flux_fullsize.py make DIR [--tiny]     # a diffusers folder: transformer (bf16), CLIP-L, a 1-layer
                                                  # T5 with T5-XXL's width, the 16-channel VAE
    python flux_fullsize.py bench DIR [--tiny] [--size 1024] [--steps 28] [--rounds 2]
                                                  # diffusers' FluxPipeline on that folder: seconds per step

The transformer has FLUX.1-dev's configuration (19 double + 38 single blocks, 24 heads of 128, guidance embedding:
11.9 B parameters, 23.8 GB in bf16); weights are N(0, 0.02) drawn on the GPU. Text encoders only shape the
conditioning (encoded once per prompt), so CLIP has one layer and T5 one layer of T5-XXL's width (4096).
`--tiny` makes every part tiny (CPU check of the folder format). Needs torch, transformers and diffusers.
"""
import argparse
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("mode", choices=["make", "bench"])
p.add_argument("dir")
p.add_argument("--tiny", action="store_true")
p.add_argument("--size", type=int, default=1024)
p.add_argument("--steps", type=int, default=28)
p.add_argument("--rounds", type=int, default=2)
a = p.parse_args()
dev = "cuda" if torch.cuda.is_available() else "cpu"

if a.tiny:
    TR = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
    T5 = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1)
    VAE_CH = [8, 16]
else:
    TR = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
              joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12,
                projection_dim=768)
    T5 = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=1)
    VAE_CH = [128, 256, 512, 512]


def randomize(m):
    with torch.no_grad():
        for t in m.parameters():
            t.normal_(0.0, 0.02)
    return m


def make(d):
    import transformers
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("meta"):
        tr = FluxTransformer2DModel(in_channels=64, patch_size=1, **TR)
    tr = randomize(tr.to_empty(device=dev).to(torch.bfloat16))
    n = sum(t.numel() for t in tr.parameters())
    tr.save_pretrained(f"{d}/transformer", max_shard_size="5GB")
    print(f"transformer: {n / 1e9:.2f} B parameters")
    del tr
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **CLIP))
    randomize(clip).to(torch.bfloat16).save_pretrained(f"{d}/text_encoder")
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, **T5))
    randomize(t5).to(torch.bfloat16).save_pretrained(f"{d}/text_encoder_2")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=VAE_CH,
                        down_block_types=["DownEncoderBlock2D"] * len(VAE_CH),
                        up_block_types=["UpDecoderBlock2D"] * len(VAE_CH), layers_per_block=2 if not a.tiny else 1,
                        norm_num_groups=32 if not a.tiny else 4, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159)
    randomize(vae).save_pretrained(f"{d}/vae")
    print(f"wrote {d}")


def bench(d):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    tr = FluxTransformer2DModel.from_pretrained(f"{d}/transformer", torch_dtype=dt).to(dev)
    vae = AutoencoderKL.from_pretrained(f"{d}/vae", torch_dtype=dt).to(dev)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, transformer=tr, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    g = torch.Generator(dev).manual_seed(0)
    emb = torch.randn(1, 512, TR["joint_attention_dim"], generator=g, device=dev, dtype=dt)
    pooled = torch.randn(1, TR["pooled_projection_dim"], generator=g, device=dev, dtype=dt)
    for r in range(a.rounds):
        marks = []

        def on_step(p, i, t, kw):
            if dev == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            return kw

        t0 = time.perf_counter()
        pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=a.size, width=a.size,
             num_inference_steps=a.steps, guidance_scale=3.5, generator=torch.Generator(dev).manual_seed(r),
             callback_on_step_end=on_step, output_type="np")
        total = time.perf_counter() - t0
        steps = [b - c for b, c in zip(marks[1:], marks[:-1])]
        mean = sum(steps) / max(len(steps), 1)
        print(f"diffusers FluxPipeline {a.size}x{a.size} {a.steps} steps round {r}: {mean:.4f} s/step "
              f"(min {min(steps, default=0):.4f}, max {max(steps, default=0):.4f}), {total:.2f} s total")


make(a.dir) if a.mode == "make" else bench(a.dir)
