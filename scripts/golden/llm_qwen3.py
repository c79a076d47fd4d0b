"""Golden files for a tiny random Qwen3 from transformers' Qwen3ForCausalLM.

usage: python scripts/golden/llm_qwen3.py tests/golden/llm/tiny_qwen3
Needs torch, transformers and gguf (the reference venv, or PYTHONPATH=llama.cpp/gguf-py; not CI). Writes:
- config.json + model.safetensors (bf16 weights: the float32 model is built from bf16-rounded weights, so both
  hold the same values), a Hugging Face checkpoint without q/k/v biases, with per-head q/k RMSNorms, head_dim 12
  (not hidden_size / num_attention_heads = 8, and not a multiple of 16, so the CPU graph pads heads), rope_theta
  1e6 and tied embeddings;
- tiny_qwen3.gguf: the same weights under llama.cpp's qwen3 names and keys (matrices F16, exact for these bf16
  values; norms F32), as convert_hf_to_gguf.py writes (no output.weight: tied);
- logits.json: the token ids and transformers' float32 logits for them (one forward pass over all ids)."""
import json
import os
import sys

import gguf
import numpy as np
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

IDS = [3, 17, 42, 99, 5, 64, 127, 8, 33, 71]


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger than the default init so the logits are not all near zero; bf16-representable. Norm weights
            # around 1 (q/k norms scale every head's values).
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_((base + torch.randn_like(p) * 0.3).to(torch.bfloat16).to(torch.float32))
        logits = model(torch.tensor([IDS])).logits[0].numpy()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    json.dump({"ids": IDS, "logits": logits.astype(float).round(7).tolist()}, open(os.path.join(out, "logits.json"), "w"))
    model.to(torch.float32)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(os.path.join(out, "tiny_qwen3.gguf"), arch="qwen3")
    w.add_name("tiny-qwen3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
                 "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
                 "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(cfg.num_hidden_layers):
        for k, v in per_layer.items():
            names[f"model.layers.{i}.{k}"] = f"blk.{i}.{v}"
    for hf, gg in names.items():
        t = sd[hf]
        w.add_tensor(gg, np.ascontiguousarray(t, dtype=np.float16 if t.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1])
