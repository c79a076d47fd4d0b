"""Golden logits for a tiny random Llama with Llama-3 RoPE scaling and tied embeddings (transformers' LlamaForCausalLM).

usage: python scripts/golden/llm_llama_rope.py tests/golden/llm/tiny_llama3
Needs torch and transformers (the reference venv). rope_theta 500000, rope_type llama3 (factor 8, low/high frequency
factors 1/4, original context 16) so that 40 positions exercise all three frequency bands; bf16 safetensors of
bf16-exact float32 weights, as in llm_qwen2.py."""
import json
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

IDS = [(7 * i + 3) % 96 for i in range(40)]


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn_like(p) * 0.3).to(torch.bfloat16).to(torch.float32))
        logits = model(torch.tensor([IDS])).logits[0].numpy()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    json.dump({"ids": IDS, "logits": logits.astype(float).round(7).tolist()},
              open(os.path.join(out, "logits.json"), "w"))


if __name__ == "__main__":
    main(sys.argv[1])
