#!/usr/bin/env python3
"""CPU throughput of the reference quantizers on bf16 weights (GB/s of input), to print beside
benches/quant_throughput.rs:  /work/refvenv/bin/python scripts/bench/quant_peers.py [ROWS COLS]
(or QUANT_PEERS_PYTHON=/work/refvenv/bin/python cargo bench --bench quant_throughput)."""
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def gbps(nbytes, f, reps=3):
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def main():
    rows, cols = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (4096, 4096)
    w = (torch.randn(rows, cols) * 0.05).to(torch.bfloat16)
    n = w.numel() * 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 [{rows}, {cols}]")
    print(f"{'peer':<40} {'GB/s':>10}")
    try:
        from modelopt.torch.export.model_config import QUANTIZATION_FP8
        from modelopt.torch.export.quant_utils import to_quantized_weight
        from modelopt.torch.quantization.qtensor import NVFP4QTensor

        print(f"{'ModelOpt NVFP4QTensor.quantize':<40} {gbps(n, lambda: NVFP4QTensor.quantize(w, 16)):>10.2f}")
        fp8 = lambda: to_quantized_weight(w, w.abs().amax().float() / 448.0, QUANTIZATION_FP8)
        print(f"{'ModelOpt fp8 export (to_quantized_weight)':<40} {gbps(n, fp8):>10.2f}")
    except ImportError as e:
        print(f"ModelOpt not importable: {e}")
    try:
        import bitsandbytes.functional as F

        nf4 = lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        print(f"{'bitsandbytes quantize_4bit nf4 64':<40} {gbps(n, nf4):>10.2f}")
        nf4dq = lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        print(f"{'bitsandbytes nf4 64 + double quant':<40} {gbps(n, nf4dq):>10.2f}")
    except ImportError as e:
        print(f"bitsandbytes not importable: {e}")


if __name__ == "__main__":
    main()
