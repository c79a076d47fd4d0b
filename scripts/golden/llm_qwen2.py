"""Golden files for a tiny random Qwen2 from transformers' Qwen2ForCausalLM.

usage: python scripts/golden/llm_qwen2.py tests/golden/llm/tiny_qwen2
Needs torch, transformers and gguf (the reference venv, not CI). Writes into the folder:
- config.json + model.safetensors (bf16 weights: the float32 model is built from bf16-rounded weights, so both
  hold the same values), a Hugging Face checkpoint with q/k/v biases, rope_theta 1e6 and a separate lm_head;
- tiny_qwen2.gguf: the same weights under llama.cpp's qwen2 names and keys (F32), as convert_hf_to_gguf.py writes;
- logits.json: the token ids and transformers' float32 logits for them (one forward pass over all ids)."""
import json
import os
import sys

import gguf
import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

IDS = [3, 17, 42, 99, 5, 64, 127, 8, 33, 71]


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            # Larger than the default init so the logits are not all near zero; bf16-representable.
            p.copy_((torch.randn_like(p) * 0.3).to(torch.bfloat16).to(torch.float32))
        logits = model(torch.tensor([IDS])).logits[0].numpy()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    json.dump({"ids": IDS, "logits": logits.astype(float).round(7).tolist()}, open(os.path.join(out, "logits.json"), "w"))
    model.to(torch.float32)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(os.path.join(out, "tiny_qwen2.gguf"), arch="qwen2")
    w.add_name("tiny-qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
                 "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
                 "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(cfg.num_hidden_layers):
        for k, v in per_layer.items():
            names[f"model.layers.{i}.{k}"] = f"blk.{i}.{v}"
    for hf, gg in names.items():
        w.add_tensor(gg, np.ascontiguousarray(sd[hf], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1])
