"""A tiny random Llama GGUF quantized by llama.cpp (Q4_K_M) and llama.cpp's logits on it, for tests/llm_gguf.rs.

usage: python scripts/golden/llm_gguf_llamacpp.py   (a venv with llama-cpp-python 0.3.36, gguf and numpy)
Writes tests/golden/llm/tiny_q4km/: model.gguf (the Q4_K_M file: Q4_K, Q6_K and the quantizer's fallbacks, rows of
256) and logits.bin: u32 vocab, u32 n ids, the ids (u32), then llama.cpp's logits of every position (f32
[n, vocab]) on the Q4_K_M file, then the same on the F16 file it was quantized from (the quantization error the
test measures ours against). Vocabulary: a 320-token SPM one (<unk>, <s>, </s>, the 256 byte tokens, pieces)."""
import os
import struct
import tempfile

import gguf
import numpy as np
import llama_cpp

D, FF, L, NH, NKV, V = 256, 256, 1, 4, 2, 320
OUT = os.path.join(os.path.dirname(__file__), "../../tests/golden/llm/tiny_q4km")
IDS = [1, 270, 301, 262, 288, 300, 259, 310, 295, 280, 275, 299]


def write_f16(path):
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz") + \
        ["\u2581the", "\u2581an", "\u2581on", "\u2581in", "\u2581is", "\u2581it", "\u2581to", "\u2581of", "\u2581"]
    tokens += pieces[:V - len(tokens)]
    assert len(tokens) == V, len(tokens)
    types = [2, 3, 3] + [6] * 256 + [1] * (V - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(V - 259)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(7)

    def mat(rows, cols, s=0.08):
        return (rng.standard_normal((rows, cols)) * s).astype(np.float16)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(V, D, 0.5))
    w.add_tensor("output_norm.weight", norm(D))
    hd = D // NH
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(D))
        w.add_tensor(p + "ffn_norm.weight", norm(D))
        w.add_tensor(p + "attn_q.weight", mat(D, D))
        w.add_tensor(p + "attn_k.weight", mat(NKV * hd, D))
        w.add_tensor(p + "attn_v.weight", mat(NKV * hd, D))
        w.add_tensor(p + "attn_output.weight", mat(D, D))
        w.add_tensor(p + "ffn_gate.weight", mat(FF, D))
        w.add_tensor(p + "ffn_up.weight", mat(FF, D))
        w.add_tensor(p + "ffn_down.weight", mat(D, FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def logits(path):
    # One token per evaluation (llama.cpp keeps only a batch's last logits row), read as llm_peer.py reads them.
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, verbose=False)
    rows = []
    for t in IDS:
        llm.eval([t])
        rows.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy())
    return np.array(rows, dtype=np.float32)


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        f16 = os.path.join(tmp, "f16.gguf")
        write_f16(f16)
        q = os.path.join(OUT, "model.gguf")
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert llama_cpp.llama_model_quantize(f16.encode(), q.encode(), p) == 0
        lq, lf = logits(q), logits(f16)
    with open(os.path.join(OUT, "logits.bin"), "wb") as f:
        f.write(struct.pack("<2I", V, len(IDS)) + struct.pack(f"<{len(IDS)}I", *IDS) + lq.tobytes() + lf.tobytes())
    print("max |Q4_K_M - F16| logits:", float(np.abs(lq - lf).max()), "logits up to", float(np.abs(lf).max()))


if __name__ == "__main__":
    main()
