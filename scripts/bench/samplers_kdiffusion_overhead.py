#!/usr/bin/env python3
"""k-diffusion's per-step overhead (everything but the model) in torch on the CPU, for a Flux 1024x1024
latent (1x16x128x128 float32). The model is the identity, so the time is the sampler's own tensor work.

    /work/sampvenv/bin/python scripts/bench/samplers_kdiffusion_overhead.py [--json]

(a venv with torch, scipy, torchsde, tqdm and `pip install --no-deps k-diffusion`)

benches/sampler_step.rs runs this (TRT_DIFF_PEER_PYTHON=/path/to/that/python) and prints the numbers
beside its own.
"""
import inspect
import json
import sys
import time

import torch


def load_kdiffusion_sampling():
    """k_diffusion.sampling; when the package's __init__ cannot import (it pulls in training-only dependencies:
    scikit-image, clean-fid, CLIP, ...), load sampling.py itself with the one helper it needs from utils."""
    try:
        import k_diffusion.sampling as K

        return K
    except ImportError:
        import importlib.machinery
        import importlib.util
        import types

        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            raise
        root = list(spec.submodule_search_locations)[0]
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = [root]
        utils = types.ModuleType("k_diffusion.utils")

        def append_dims(x, target_dims):
            return x[(...,) + (None,) * (target_dims - x.ndim)]

        utils.append_dims = append_dims
        pkg.utils = utils
        sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
        import k_diffusion.sampling as K

        return K


K = load_kdiffusion_sampling()

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
        # inspect.signature sees through torch.no_grad's wrapper (fn.__code__ would be the wrapper's), so the
        # SDE samplers get the same i.i.d. noise as ours instead of k-diffusion's default Brownian tree.
        kw = {"noise_sampler": noise} if "noise_sampler" in inspect.signature(fn).parameters else {}
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
