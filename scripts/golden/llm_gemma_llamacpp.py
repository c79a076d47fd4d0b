"""llama.cpp's logits on the tiny Gemma 2 / Gemma 3 GGUF files of scripts/golden/llm_gemma.py (run that first), as
F16 and quantized to Q8_0 by llama.cpp's own quantizer.

usage: python scripts/golden/llm_gemma_llamacpp.py tests/golden/llm   (a venv with llama-cpp-python 0.3.36, numpy)
Writes, in tiny_gemma2/ and tiny_gemma3/: tiny_<arch>_q8_0.gguf and llamacpp.json ({"f16": rows, "q8_0": rows}: one
logits row per prompt token, evaluated one token at a time with the KV cache). Prints how far llama.cpp is from
transformers' logits.json, which checks that the GGUF files say what transformers' configs say (the window pattern,
the local RoPE, soft-capping, the norm offsets) as llama.cpp reads them."""
import json
import os
import sys

import llama_cpp
import numpy as np


def logits(path, ids):
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, verbose=False)
    rows = []
    for t in ids:
        llm.eval([t])
        rows.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy())
    return np.array(rows, dtype=np.float32)


def main(root):
    for arch in ["gemma2", "gemma3"]:
        d = os.path.join(root, f"tiny_{arch}")
        golden = json.load(open(os.path.join(d, "logits.json")))
        ids, want = golden["ids"], np.array(golden["logits"])
        f16 = os.path.join(d, f"tiny_{arch}.gguf")
        q8 = os.path.join(d, f"tiny_{arch}_q8_0.gguf")
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = 7  # LLAMA_FTYPE_MOSTLY_Q8_0
        assert llama_cpp.llama_model_quantize(f16.encode(), q8.encode(), p) == 0
        lf, lq = logits(f16, ids), logits(q8, ids)
        scale = np.abs(want).max()
        print(f"{arch}: llama.cpp F16 vs transformers {np.abs(lf - want).max() / scale:.2e}, "
              f"Q8_0 vs transformers {np.abs(lq - want).max() / scale:.2e} of the largest logit {scale:.3f}")
        json.dump({"f16": lf.astype(float).round(7).tolist(), "q8_0": lq.astype(float).round(7).tolist()},
                  open(os.path.join(d, "llamacpp.json"), "w"))


if __name__ == "__main__":
    main(sys.argv[1])
