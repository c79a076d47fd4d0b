"""Golden files for Z-Image-Turbo: a tiny random ZImagePipeline (diffusers ZImageTransformer2DModel, a tiny Qwen3
text encoder, a tiny byte-level BPE tokenizer with Qwen2's pre-tokenizer and Qwen3's chat template, the tiny
16-channel AutoencoderKL of flux_pipeline.py and Z-Image-Turbo's scheduler config).

usage: /work/refvenv/bin/python scripts/golden/z_image.py tests/golden/z_image   (after flux_pipeline.py)
Needs torch, diffusers, transformers, tokenizers (not in CI). Writes a diffusers model folder (model_index.json,
transformer/, text_encoder/ (a Qwen3Model: tensor names without `model.`), tokenizer/, scheduler/; the VAE is
tests/golden/flux/pipeline/vae, linked by the tests) with bf16 weights (the reference runs in float32 on the same
rounded values), and io.safetensors:
- transformer_*: a batch of 2 latents [2, 16, 6, 4] (6 image tokens, padded to 32), timesteps, 5 caption features
  each (padded to 32) and diffusers' output;
- ids / hidden: the chat-formatted PROMPT's token ids and the text encoder's hidden_states[-2] for them;
- vae_latent / vae_image: one VAE decode;
- pipeline: the initial latents [1, 16, 16, 16] of a 32x32 image, the final latents and image ([0, 1], CHW) of
  4 steps without CFG; the final latents with CFG (guidance_scale 1, NEGATIVE); img2img at strength 0.6 from the
  generated image (init.png, encoder mode, the noise saved)."""
import json
import os
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageImg2ImgPipeline, ZImagePipeline
from diffusers import ZImageTransformer2DModel
import diffusers.pipelines.z_image.pipeline_z_image_img2img as img2img_module
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

PROMPT = "a watercolor painting of a fox in the snow, 4k"
NEGATIVE = "blurry, low quality"
HERE = os.path.dirname(os.path.abspath(__file__))
FLUX_VAE = os.path.join(HERE, "..", "..", "tests", "golden", "flux", "pipeline", "vae")
# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2/Qwen3 model).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
# Qwen3's chat template, as Qwen3 checkpoints' tokenizer_config.json carry it (Z-Image-Turbo's tokenizer is Qwen3's).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
CORPUS = [
    PROMPT, NEGATIVE, "a photo of a cat sitting on a windowsill, soft morning light",
    "the quick brown fox jumps over the lazy dog", "user assistant system", "snowy mountains at sunrise 1024",
    "a red fox, a white rabbit and the winter forest", "painting, drawing, sketch, watercolour, colors",
]


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


def tokenizer(out):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    t.chat_template = CHAT_TEMPLATE
    t.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja; Qwen3 repos keep it in tokenizer_config.json.
    cfg_path = os.path.join(out, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = CHAT_TEMPLATE
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    jinja = os.path.join(out, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    return t


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    tok = tokenizer(os.path.join(out, "tokenizer"))
    vocab = len(tok)
    te_cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
    )
    te = Qwen3Model(te_cfg).eval()
    bf16_round(te, 1, 0.3)
    tr = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 64, 64],
    ).eval()
    bf16_round(tr, 2, 0.2)
    with torch.no_grad():
        # Pad tokens that differ from zero, so that a graph ignoring them fails.
        tr.x_pad_token.copy_((torch.randn(1, 32, generator=torch.Generator().manual_seed(3))).bfloat16().float())
        tr.cap_pad_token.copy_((torch.randn(1, 32, generator=torch.Generator().manual_seed(4))).bfloat16().float())
    vae = AutoencoderKL.from_pretrained(FLUX_VAE).float().eval()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    io = {}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        # The transformer alone: two images of one size, captions of one length, two timesteps.
        lat = torch.randn(2, 16, 6, 4, generator=g)
        cap = torch.randn(2, 5, 16, generator=g)
        t = torch.tensor([0.25, 0.8])
        outs = tr([lat[i].unsqueeze(1) for i in range(2)], t, [cap[i] for i in range(2)], return_dict=False)[0]
        io["transformer_latents"] = lat
        io["transformer_timestep"] = t
        io["transformer_cap_feats"] = cap
        io["transformer_sample"] = torch.stack([o.squeeze(1) for o in outs])
        # The text encoder as the pipeline calls it.
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=True)
        ids = tok(text, return_tensors="pt").input_ids
        io["ids"] = ids[0].to(torch.float32)  # exact for any vocabulary below 2^24
        io["hidden"] = te(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
        # The VAE decoder.
        z = torch.randn(1, 16, 4, 4, generator=g)
        io["vae_latent"] = z
        io["vae_image"] = vae.decode(z).sample
    pipe = ZImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    init = torch.randn(1, 16, 16, 16, generator=g)
    io["initial_latents"] = init
    common = dict(height=32, width=32, num_inference_steps=4, latents=init.clone())
    final = pipe(PROMPT, guidance_scale=0.0, output_type="latent", **common).images
    io["final_latents"] = final
    image = pipe(PROMPT, guidance_scale=0.0, output_type="np", **common).images[0]
    io["image"] = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    io["final_latents_cfg"] = pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=1.0, output_type="latent",
                                   **common).images
    # img2img from the generated image, the VAE's mean (diffusers samples; trt-diff encodes the mode).
    png = os.path.join(out, "init.png")
    Image.fromarray((image * 255).round().astype(np.uint8)).save(png)
    img2img_module.retrieve_latents = lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode()
    i2i = ZImageImg2ImgPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=tr)
    i2i.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 16, 16, 16, generator=g)
    io["img2img_noise"] = noise
    img2img_module.randn_tensor = lambda shape, **kw: noise.clone()
    io["final_latents_img2img"] = i2i(PROMPT, image=Image.open(png), strength=0.6, height=32, width=32,
                                      num_inference_steps=4, guidance_scale=0.0, output_type="latent").images
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, "io.safetensors"))
    tr.to(torch.bfloat16).save_pretrained(os.path.join(out, "transformer"))
    te.to(torch.bfloat16).save_pretrained(os.path.join(out, "text_encoder"))
    sched.save_pretrained(os.path.join(out, "scheduler"))
    json.dump({"_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1",
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3Model"],
               "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "ZImageTransformer2DModel"],
               "vae": ["diffusers", "AutoencoderKL"]}, open(os.path.join(out, "model_index.json"), "w"), indent=2)
    print("prompt ids", io["ids"].long().tolist())
    print("timesteps", pipe.scheduler.timesteps.tolist())


if __name__ == "__main__":
    main(sys.argv[1])
