"""Quantizes a GGUF with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`).

usage: python scripts/bench/quantize_gguf.py IN.gguf OUT.gguf TYPE THREADS   (TYPE: Q8_0, Q4_K_M, Q4_0, ...)
For 896-wide models llama.cpp falls back from Q4_K to Q5_0 per tensor (rows must be whole 256-blocks), as in the
real Qwen2.5-0.5B Q4_K_M file."""
import sys

import llama_cpp

FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17,
          "Q6_K": 18}


def main(inp, out, kind, threads):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[kind]
    p.nthread = int(threads)
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), p)
    if rc != 0:
        sys.exit(f"llama_model_quantize({inp}, {kind}) failed with {rc}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
