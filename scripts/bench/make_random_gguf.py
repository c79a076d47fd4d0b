"""A random-weight GGUF with a real model's shapes (F16 matrices, F32 norms and biases) for benchmarks.

usage: python scripts/bench/make_random_gguf.py SHAPE OUT.gguf VOCAB.gguf
SHAPE is one of:
- qwen2.5-0.5b (vocabulary ../shared/data/tokenizers/ggml-vocab-qwen2.gguf): hidden 896, 24 layers, 14 heads / 2 KV
  heads, FFN 4864, vocabulary 151936 with tied embeddings, q/k/v biases, rope_theta 1e6;
- llama-3.2-1b (vocabulary ../shared/data/tokenizers/ggml-vocab-gpt-2.gguf, a stand-in for Llama 3's BPE vocabulary,
  which the ids of the bench do not depend on): hidden 2048, 16 layers, 32 heads / 8 KV heads, FFN 8192, vocabulary
  128256 with tied embeddings, rope_theta 5e5 with Llama 3's RoPE scaling as llama.cpp's converter writes it (the
  `rope_freqs` tensor; factor 32, low/high frequency factors 1 and 4, original context 8192).
Needs numpy and gguf. The tokenizer metadata (and chat template) is copied from the vocab file and padded with unused
tokens to the vocabulary size, as llama.cpp's converter pads it. Weights are N(0, 0.02)."""
import math
import sys

import numpy as np
import gguf

SHAPES = {
    # arch, hidden, FFN, layers, heads, KV heads, vocabulary, context, rope base, q/k/v biases, Llama 3 RoPE scaling
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936, 32768, 1e6, True, False),
    "llama-3.2-1b": ("llama", 2048, 8192, 16, 32, 8, 128256, 131072, 5e5, False, True),
}


def llama3_rope_factors(head_dim, base, factor=32.0, low=1.0, high=4.0, original=8192):
    """The per-dimension divisors of llama.cpp's converter for `rope_scaling.rope_type = llama3`."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def main(shape, out, vocab_file):
    arch, H, FF, L, NH, NKV, V, CTX, theta, biases, llama3 = SHAPES[shape]
    HD = H // NH
    r = gguf.GGUFReader(vocab_file)
    w = gguf.GGUFWriter(out, arch=arch)
    w.add_name(f"{shape}-shaped-random")
    w.add_context_length(CTX)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-6 if arch == "qwen2" else 1e-5)
    if arch == "llama":
        w.add_rope_dimension_count(HD)
        w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = list(r.fields["tokenizer.ggml.tokens"].contents())
    types = list(r.fields["tokenizer.ggml.token_type"].contents())
    for i in range(len(tokens), V):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    if "tokenizer.ggml.pre" in r.fields:
        w.add_tokenizer_pre(r.fields["tokenizer.ggml.pre"].contents())
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(r.fields["tokenizer.ggml.merges"].contents()))
    for key, add in [("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
                     ("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
                     ("tokenizer.ggml.padding_token_id", w.add_pad_token_id)]:
        if key in r.fields:
            add(int(r.fields[key].contents()))
    w.add_add_bos_token(False)
    if "tokenizer.chat_template" in r.fields:
        w.add_chat_template(r.fields["tokenizer.chat_template"].contents())
    rng = np.random.default_rng(0)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def vec(n, scale=0.02, base=0.0):
        return (base + rng.standard_normal(n, dtype=np.float32) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(V, H))
    w.add_tensor("output_norm.weight", vec(H, 0.0, 1.0))
    if llama3:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(HD, theta))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", vec(H, 0.0, 1.0))
        w.add_tensor(p + "ffn_norm.weight", vec(H, 0.0, 1.0))
        w.add_tensor(p + "attn_q.weight", mat(H, H))
        w.add_tensor(p + "attn_k.weight", mat(NKV * HD, H))
        w.add_tensor(p + "attn_v.weight", mat(NKV * HD, H))
        if biases:
            w.add_tensor(p + "attn_q.bias", vec(H))
            w.add_tensor(p + "attn_k.bias", vec(NKV * HD))
            w.add_tensor(p + "attn_v.bias", vec(NKV * HD))
        w.add_tensor(p + "attn_output.weight", mat(H, H))
        w.add_tensor(p + "ffn_gate.weight", mat(FF, H))
        w.add_tensor(p + "ffn_up.weight", mat(FF, H))
        w.add_tensor(p + "ffn_down.weight", mat(H, FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
