#!/usr/bin/env python3
"""Golden file for the schedulers, produced by ComfyUI's and RES4LYF's own scheduler code.

    COMFYUI_DIR=/path/to/ComfyUI RES4LYF_DIR=/path/to/RES4LYF python scripts/golden/samplers_schedules.py \
        tests/golden/samplers

The functions are taken by name from the sources (ast; the modules themselves import all of ComfyUI):
comfy/samplers.py (simple, ddim_uniform, normal/sgm_uniform, beta, linear_quadratic, kl_optimal),
comfy/model_sampling.py ModelSamplingDiscrete with comfy/ldm/modules/diffusionmodules/util.py
make_beta_schedule (the SD 1.x/SDXL table, float32 as ComfyUI keeps it), comfy/k_diffusion/sampling.py
get_sigmas_laplace, and RES4LYF sigmas.py bong_tangent_scheduler (beta57 is RES4LYF's name for ComfyUI's
beta scheduler with alpha 0.5, beta 0.7), and diffusers' Flux calculate_shift. Needs torch, numpy, scipy, diffusers. Writes schedules.json.
"""
import ast
import json
import math
import os
import sys

import numpy
import scipy.stats
import torch


def take(path, names, ns):
    """Execute the top-level functions/classes called `names` from the Python file at `path` in `ns`."""
    tree = ast.parse(open(path).read())
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = set(names) - {n.name for n in nodes}
    if missing:
        sys.exit(f"{path}: {sorted(missing)} not found")
    exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), ns)


def main(out):
    comfy, r4 = os.environ.get("COMFYUI_DIR"), os.environ.get("RES4LYF_DIR")
    if not comfy or not r4:
        sys.exit("set COMFYUI_DIR (a ComfyUI checkout) and RES4LYF_DIR (a RES4LYF checkout)")
    ns = {"torch": torch, "math": math, "numpy": numpy, "scipy": scipy, "np": numpy}
    take(os.path.join(comfy, "comfy/ldm/modules/diffusionmodules/util.py"), ["make_beta_schedule"], ns)
    take(os.path.join(comfy, "comfy/model_sampling.py"), ["ModelSamplingDiscrete"], ns)
    take(os.path.join(comfy, "comfy/samplers.py"),
         ["simple_scheduler", "ddim_scheduler", "normal_scheduler", "beta_scheduler", "linear_quadratic_schedule",
          "kl_optimal_scheduler"], ns)
    take(os.path.join(comfy, "comfy/k_diffusion/sampling.py"), ["get_sigmas_laplace"], ns)
    from math import atan, pi
    ns.update(atan=atan, pi=pi)
    take(os.path.join(r4, "sigmas.py"), ["get_bong_tangent_sigmas", "bong_tangent_scheduler"], ns)

    ms = ns["ModelSamplingDiscrete"]()
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    cases = []

    def add(name, steps, sig, **kw):
        cases.append({"name": name, "steps": steps, "sigmas": [float(v) for v in sig], **kw})

    for steps in [1, 2, 5, 10, 20, 37]:
        add("simple", steps, ns["simple_scheduler"](ms, steps))
        add("ddim_uniform", steps, ns["ddim_scheduler"](ms, steps))
        add("normal", steps, ns["normal_scheduler"](ms, steps))
        add("sgm_uniform", steps, ns["normal_scheduler"](ms, steps, sgm=True))
        add("beta", steps, ns["beta_scheduler"](ms, steps))
        add("beta57", steps, ns["beta_scheduler"](ms, steps, alpha=0.5, beta=0.7))
        add("linear_quadratic", steps, ns["linear_quadratic_schedule"](ms, steps))
        if steps > 1:
            add("kl_optimal", steps, ns["kl_optimal_scheduler"](steps, lo, hi), sigma_min=lo, sigma_max=hi)
            add("laplace", steps, ns["get_sigmas_laplace"](steps, lo, hi), sigma_min=lo, sigma_max=hi)
        if steps >= 5:  # RES4LYF's own bong_tangent divides by zero below 5 steps
            add("bong_tangent", steps, ns["bong_tangent_scheduler"](ms, steps))
    # Partial schedules (img2img): ComfyUI KSampler.set_steps keeps the last steps+1 of int(steps/denoise).
    for steps, denoise in [(10, 0.5), (20, 0.75), (7, 0.3)]:
        new_steps = int(steps / denoise)
        full = ns["normal_scheduler"](ms, new_steps)
        add("normal_partial", steps, full[-(steps + 1):], denoise=denoise)
    # Flux's resolution-dependent shift mu: diffusers' calculate_shift with FluxPipeline's defaults.
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    flux_mu = [{"image_seq_len": n, "mu": float(calculate_shift(n))} for n in [256, 1024, 4096, 6144, 16384]]
    with open(os.path.join(out, "schedules.json"), "w") as f:
        json.dump({"sd_sigma_min": lo, "sd_sigma_max": hi, "cases": cases, "flux_mu": flux_mu}, f,
                  separators=(",", ":"))
    print("wrote", len(cases), "schedules to", out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/samplers")
