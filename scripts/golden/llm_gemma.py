"""Golden files for tiny random Gemma 2 and Gemma 3 decoders from transformers' Gemma2ForCausalLM and
Gemma3ForCausalLM: sliding-window layers (window 4, shorter than the 12-token prompt) interleaved with global ones,
GeGLU MLPs, sandwich norms, scaled embeddings; Gemma 2 with attention and final-logit soft-capping set low enough
to bite, Gemma 3 with q/k norms, a local RoPE base and linear RoPE scaling on its global layer.

usage: python scripts/golden/llm_gemma.py tests/golden/llm
Needs torch, transformers and gguf (the reference venv; not CI). Then run scripts/golden/llm_gemma_llamacpp.py (a
venv with llama-cpp-python) for llama.cpp's logits on the GGUF files. Writes tiny_gemma2/ and tiny_gemma3/, each with
- config.json + model.safetensors: bf16 weights (the float32 model is built from bf16-rounded weights, so both hold
  the same values);
- tiny_<arch>.gguf: the same weights under llama.cpp's names and keys as convert_hf_to_gguf.py writes them (norm
  weights stored plus one, matrices F16, exact for these bf16 values; norms F32), with a small SPM vocabulary so
  that llama.cpp loads it;
- logits.json: the token ids and transformers' float32 logits for them (one forward pass, eager attention)."""
import json
import os
import sys

import gguf
import numpy as np
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

IDS = [2, 17, 42, 99, 5, 64, 127, 8, 33, 71, 12, 90]
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=64, rms_norm_eps=1e-6, sliding_window=4,
              hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2,
              attn_implementation="eager")


def make(cls, cfg, out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            # Gemma's norms multiply by (1 + weight): small random offsets.
            p.copy_((torch.randn_like(p) * 0.3).to(torch.bfloat16).to(torch.float32))
        logits = model(torch.tensor([IDS])).logits[0].numpy()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    json.dump({"ids": IDS, "logits": logits.astype(float).round(7).tolist()},
              open(os.path.join(out, "logits.json"), "w"))
    model.to(torch.float32)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def vocab(w, n):
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<0x0A>"] + [f"\u2581t{i}" for i in range(n - 5)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 5 + [-float(i) for i in range(n - 5)])
    w.add_token_types([3, 3, 3, 2, 6] + [1] * (n - 5))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.add_add_space_prefix(False)


def write_gguf(path, arch, cfg, sd, extra):
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    extra(w)
    vocab(w, cfg.vocab_size)
    names = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            key = f"model.layers.{i}.{hf}.weight"
            if key in sd:
                names[f"blk.{i}.{gg}.weight"] = sd[key]
    for name, t in names.items():
        if name.endswith("norm.weight"):
            t = t + 1.0  # convert_hf_to_gguf stores Gemma's norms as 1 + weight
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float16 if t.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(root):
    cfg = Gemma2Config(**COMMON, num_hidden_layers=3, rope_theta=10000.0, attn_logit_softcapping=1.5,
                       final_logit_softcapping=3.0)
    out = os.path.join(root, "tiny_gemma2")
    sd = make(Gemma2ForCausalLM, cfg, out)

    def gemma2(w):
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    write_gguf(os.path.join(out, "tiny_gemma2.gguf"), "gemma2", cfg, sd, gemma2)

    cfg3 = Gemma3TextConfig(**COMMON, num_hidden_layers=6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                            rope_scaling={"rope_type": "linear", "factor": 8.0})
    out = os.path.join(root, "tiny_gemma3")
    sd = make(Gemma3ForCausalLM, cfg3, out)

    def gemma3(w):
        w.add_rope_freq_base(1000000.0)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(8.0)
    write_gguf(os.path.join(out, "tiny_gemma3.gguf"), "gemma3", cfg3, sd, gemma3)


if __name__ == "__main__":
    main(sys.argv[1])
