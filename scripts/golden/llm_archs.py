"""Golden files for tiny random Mistral and Phi-3 decoders from transformers' MistralForCausalLM and
Phi3ForCausalLM, both with a sliding attention window shorter than the prompt (so it changes the logits).

usage: python scripts/golden/llm_archs.py tests/golden/llm
Needs torch, transformers and gguf (the reference venv; not CI). Writes tiny_mistral/ and tiny_phi3/, each with
- config.json + model.safetensors: bf16 weights (the float32 model is built from bf16-rounded weights, so both hold
  the same values); Phi-3 keeps its fused qkv_proj and gate_up_proj matrices, as its checkpoints do;
- tiny_<arch>.gguf: the same weights under llama.cpp's names and keys (matrices F16, exact for these bf16 values;
  norms F32) as convert_hf_to_gguf.py writes them: Mistral as arch `llama` with q/k permuted to the interleaved
  RoPE layout, Phi-3 as arch `phi3` with `attn_qkv` and the fused `ffn_up` (gate rows first); both with
  `<arch>.attention.sliding_window`;
- logits.json: the token ids and transformers' float32 logits for them (one forward pass over all ids, eager
  attention)."""
import json
import os
import sys

import gguf
import numpy as np
import torch
from transformers import MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM

IDS = [3, 17, 42, 99, 5, 64, 127, 8, 33, 71, 12, 90]
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=False)


def permute(t, n):
    """HF halves layout -> llama.cpp's interleaved rows for the llama arch (convert_hf_to_gguf's permute)."""
    d1, d2 = t.shape
    return t.reshape(n, 2, d1 // n // 2, d2).swapaxes(1, 2).reshape(d1, d2)


def make(cls, cfg, out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_((base + torch.randn_like(p) * 0.3).to(torch.bfloat16).to(torch.float32))
        logits = model(torch.tensor([IDS])).logits[0].numpy()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    json.dump({"ids": IDS, "logits": logits.astype(float).round(7).tolist()},
              open(os.path.join(out, "logits.json"), "w"))
    model.to(torch.float32)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def write_gguf(path, arch, cfg, tensors, window):
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(window)
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float16 if t.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def common_names(sd, layers):
    names = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
             "output.weight": sd["lm_head.weight"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        names[f"blk.{i}.attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        names[f"blk.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        names[f"blk.{i}.attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        names[f"blk.{i}.ffn_down.weight"] = sd[p + "mlp.down_proj.weight"]
    return names


def main(root):
    cfg = MistralConfig(**COMMON, sliding_window=4, head_dim=8, attn_implementation="eager")
    out = os.path.join(root, "tiny_mistral")
    sd = make(MistralForCausalLM, cfg, out)
    names = common_names(sd, cfg.num_hidden_layers)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names[f"blk.{i}.attn_q.weight"] = permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        names[f"blk.{i}.attn_k.weight"] = permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        names[f"blk.{i}.attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
        names[f"blk.{i}.ffn_gate.weight"] = sd[p + "mlp.gate_proj.weight"]
        names[f"blk.{i}.ffn_up.weight"] = sd[p + "mlp.up_proj.weight"]
    write_gguf(os.path.join(out, "tiny_mistral.gguf"), "llama", cfg, names, cfg.sliding_window)

    cfg = Phi3Config(**COMMON, sliding_window=5, original_max_position_embeddings=64, rope_scaling=None,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    out = os.path.join(root, "tiny_phi3")
    sd = make(Phi3ForCausalLM, cfg, out)
    names = common_names(sd, cfg.num_hidden_layers)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names[f"blk.{i}.attn_qkv.weight"] = sd[p + "self_attn.qkv_proj.weight"]
        names[f"blk.{i}.ffn_up.weight"] = sd[p + "mlp.gate_up_proj.weight"]
    write_gguf(os.path.join(out, "tiny_phi3.gguf"), "phi3", cfg, names, cfg.sliding_window)


if __name__ == "__main__":
    main(sys.argv[1])
