#!/usr/bin/env python3
"""k-diffusion's per-step overhead (everything but the model) in torch on the CPU, for a Flux 1024x1024
latent (1x16x128x128 float32). The model is the identity, so the time is the sampler's own tensor work.

    /work/refvenv-s/bin/python scripts/bench/samplers_kdiffusion_overhead.py [--json]

benches/sampler_step.rs runs this (TRT_DIFF_PEER_PYTHON=/work/refvenv-s/bin/python) and prints the numbers
beside its own.
"""
import json
import sys
import time

import torch
import k_diffusion.sampling as K

SAMPLERS = {
    "euler": K.sample_euler,
    "euler_ancestral": K.sample_euler_ancestral,
    "heun": K.sample_heun,
    "dpm_2": K.sample_dpm_2,
    "lms": K.sample_lms,
    "dpmpp_2s_ancestral": K.sample_dpmpp_2s_ancestral,
    "dpmpp_2m": K.sample_dpmpp_2m,
    "dpmpp_2m_sde": K.sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": K.sample_dpmpp_3m_sde,
}


def main():
    steps = 20
    x0 = torch.randn(1, 16, 128, 128)
    sigmas = K.get_sigmas_karras(steps, 0.03, 14.6)
    model = lambda x, s: x  # noqa: E731  (identity: no model cost)
    noise = lambda s, sn: torch.randn_like(x0)  # noqa: E731
    out = {}
    for name, fn in SAMPLERS.items():
        kw = {"noise_sampler": noise} if "noise_sampler" in fn.__code__.co_varnames else {}
        fn(model, x0.clone(), sigmas, disable=True, **kw)  # warm-up
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn(model, x0.clone(), sigmas, disable=True, **kw)
            best = min(best, (time.perf_counter() - t) / steps)
        out[name] = best * 1e3
    if "--json" in sys.argv:
        print(json.dumps({"threads": torch.get_num_threads(), "ms_per_step": out}))
    else:
        print(f"k-diffusion per-step overhead, torch {torch.__version__} CPU, {torch.get_num_threads()} threads")
        for k, v in out.items():
            print(f"{k:<22} {v:8.3f} ms")


if __name__ == "__main__":
    main()
