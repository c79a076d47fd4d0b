"""llama.cpp (llama-cpp-python) on a GGUF: prompt processing and generation speed, greedy, CPU.

usage: python scripts/bench/llm_peer.py MODEL.gguf PROMPT_IDS(comma separated) GEN_TOKENS THREADS
LLM_PEER_NO_EXTRA_BUFTS=1 turns llama.cpp's weight repacking (extra buffer types) off.
Prints one JSON line: prompt_tokens, prompt_seconds (= time to first token: prefill plus the first sample),
generated, generation_seconds. Called by `cargo bench --bench llm_tokens` with the same ids it feeds trt-diff."""
import json
import sys
import time

import os

import numpy as np
import llama_cpp
from llama_cpp import Llama

if os.environ.get("LLM_PEER_NO_EXTRA_BUFTS"):
    # llama.cpp's extra buffer types (weight repacking for AMX / interleaved AVX kernels) crash on some CPUs (a Q8_0
    # file segfaults in llama_decode on this AMX VM); this runs llama.cpp's plain CPU kernels instead.
    _default = llama_cpp.llama_model_default_params

    def _params():
        p = _default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = _params
    import llama_cpp.llama
    llama_cpp.llama.llama_cpp.llama_model_default_params = _params


def last_logits_argmax(llm):
    # With logits_all off llama.cpp keeps only the batch's last logits row; read it directly.
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))


def main(model, ids, gen, threads):
    ids = [int(x) for x in ids.split(",")]
    gen, threads = int(gen), int(threads)
    llm = Llama(model_path=model, n_ctx=len(ids) + gen + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=len(ids), n_ubatch=len(ids), verbose=False, logits_all=False)
    # Warm-up (first evaluation allocates buffers).
    llm.reset()
    llm.eval(ids[:8])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = last_logits_argmax(llm)
    t1 = time.perf_counter()
    for _ in range(gen - 1):
        llm.eval([tok])
        tok = last_logits_argmax(llm)
    t2 = time.perf_counter()
    print(json.dumps({"prompt_tokens": len(ids), "prompt_seconds": t1 - t0, "generated": gen,
                      "generation_seconds": t2 - t1}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
