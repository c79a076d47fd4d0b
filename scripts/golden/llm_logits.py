"""Golden logits for stories260K from Hugging Face transformers' LlamaForCausalLM.

usage: python scripts/golden/llm_logits.py ../shared/data/llm/stories260K.bin tests/golden/llm/stories260K_logits.json
Needs torch and transformers (not in CI). The llama2.c checkpoint is converted the way llama2.c's export.py does:
q/k projection rows are permuted from interleaved-pair RoPE to Hugging Face's rotate-half layout. The token ids are
fixed here (BOS + "Once upon a time" under tok512); the test checks that our tokenizer produces the same ids."""
import json
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

IDS = [1, 403, 407, 261, 378]


def main(src, out):
    raw = open(src, "rb").read()
    dim, hidden, layers, heads, kv_heads, vocab, seq = np.frombuffer(raw[:28], dtype=np.int32)
    shared = vocab > 0
    vocab = abs(int(vocab))
    w = np.frombuffer(raw[28:], dtype=np.float32)
    head = dim // heads
    kvd = head * kv_heads
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        a = w[off:off + n].reshape(shape)
        off += n
        return torch.tensor(a.copy())

    emb = take(vocab, dim)
    rms_att = take(layers, dim)
    wq, wk, wv = take(layers, dim, dim), take(layers, kvd, dim), take(layers, kvd, dim)
    wo = take(layers, dim, dim)
    rms_ffn = take(layers, dim)
    w1, w2, w3 = take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
    rms_final = take(dim)

    def permute(t, n):
        d1, d2 = t.shape
        return t.view(n, d1 // n // 2, 2, d2).transpose(1, 2).reshape(d1, d2)

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=int(dim), intermediate_size=int(hidden), num_hidden_layers=int(layers),
                      num_attention_heads=int(heads), num_key_value_heads=int(kv_heads), max_position_embeddings=int(seq),
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=bool(shared))
    model = LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final, "lm_head.weight": emb}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rms_att[i]
        sd[p + "self_attn.q_proj.weight"] = permute(wq[i], heads)
        sd[p + "self_attn.k_proj.weight"] = permute(wk[i], kv_heads)
        sd[p + "self_attn.v_proj.weight"] = wv[i]
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        sd[p + "mlp.gate_proj.weight"] = w1[i]
        sd[p + "mlp.down_proj.weight"] = w2[i]
        sd[p + "mlp.up_proj.weight"] = w3[i]
    model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].numpy()
    json.dump({"ids": IDS, "logits": logits.astype(float).round(7).tolist(),
               "source": "transformers LlamaForCausalLM, llama2.c export permutation"}, open(out, "w"))
    print(f"wrote {out}: {logits.shape}")


if __name__ == "__main__":
    main(*sys.argv[1:])
