"""A random-weight GGUF with Qwen2.5-0.5B's shapes (F16 matrices, F32 norms and biases) for benchmarks.

usage: python scripts/bench/make_qwen05b_gguf.py OUT.gguf ../shared/data/tokenizers/ggml-vocab-qwen2.gguf
Needs numpy and gguf. Hyper-parameters are Qwen2.5-0.5B's (hidden 896, 24 layers, 14 heads / 2 KV heads, FFN 4864,
vocabulary 151936 with tied embeddings, rope_theta 1e6); the tokenizer metadata (and chat template) is copied from the qwen2 vocab file
and padded to 151936 tokens as llama.cpp's converter pads it. Weights are N(0, 0.02)."""
import sys

import numpy as np
import gguf

H, FF, L, NH, NKV, V, CTX = 896, 4864, 24, 14, 2, 151936, 32768
HD = H // NH


def main(out, vocab_file):
    r = gguf.GGUFReader(vocab_file)
    w = gguf.GGUFWriter(out, arch="qwen2")
    w.add_name("qwen2.5-0.5b-shaped-random")
    w.add_context_length(CTX)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = list(r.fields["tokenizer.ggml.tokens"].contents())
    types = list(r.fields["tokenizer.ggml.token_type"].contents())
    for i in range(len(tokens), V):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
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
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", vec(H, 0.0, 1.0))
        w.add_tensor(p + "ffn_norm.weight", vec(H, 0.0, 1.0))
        w.add_tensor(p + "attn_q.weight", mat(H, H))
        w.add_tensor(p + "attn_q.bias", vec(H))
        w.add_tensor(p + "attn_k.weight", mat(NKV * HD, H))
        w.add_tensor(p + "attn_k.bias", vec(NKV * HD))
        w.add_tensor(p + "attn_v.weight", mat(NKV * HD, H))
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
    main(sys.argv[1], sys.argv[2])
