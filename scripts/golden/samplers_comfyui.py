#!/usr/bin/env python3
"""Golden file for ComfyUI's own KSampler samplers, produced by ComfyUI's REAL sampler code.

    COMFYUI_DIR=/path/to/ComfyUI python scripts/golden/samplers_comfyui.py tests/golden/samplers

COMFYUI_DIR is a ComfyUI checkout (only comfy/k_diffusion/{sampling,utils,deis,sa_solver}.py and
comfy/extra_samplers/uni_pc.py are imported; nothing of ComfyUI is committed here). The Python needs torch, scipy,
torchsde and tqdm. ComfyUI's model plumbing (model_patcher, model_sampling, utils.model_trange) is replaced by
the small stubs below, which reproduce exactly what the samplers read from it: the post-CFG hook that hands
CFG++ samplers the unconditional prediction, EPS (VE) `noise_scaling`, and a plain range for the progress bar.

The model is classifier-free guidance (scale 3) over two analytic Gaussian-data denoisers (cond and uncond,
formulas as trt_diff::samplers::model::GaussianData), in float64. Stochastic samplers get their noise from a
recorded list so the Rust side can replay it. Writes comfyui.json: for each run the sampler, its options, the
sigmas, the initial and the final x, and the noise draws.
"""
import importlib.util
import json
import math
import os
import sys
import types

import numpy as np
import torch

torch.set_default_dtype(torch.float64)
N = 8
SCALE = 3.0


def cond_data():
    mu = [0.8 * math.sin(i * 1.7) for i in range(N)]
    s = [0.3 + 0.5 * (0.5 + 0.5 * math.cos(i * 0.9)) for i in range(N)]
    return torch.tensor(mu), torch.tensor(s)


def uncond_data():
    mu = [0.5 * math.cos(i * 1.3) for i in range(N)]
    s = [0.6 + 0.2 * math.sin(i * 0.7) for i in range(N)]
    return torch.tensor(mu), torch.tensor(s)


def gauss(x, sigma, mu, s):
    mu, s = mu.reshape(1, N, 1, 1), s.reshape(1, N, 1, 1)
    return mu + s * s / (s * s + sigma * sigma) * (x - mu)


# --- stubs for ComfyUI's model plumbing -----------------------------------------------------------------------
class CONST:  # flow models; not used here (VE runs only), isinstance checks must see a class
    pass


class EPS:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        if max_denoise:
            noise = noise * torch.sqrt(1.0 + sigma ** 2.0)
        else:
            noise = noise * sigma
        noise += latent_image
        return noise

    def percent_to_sigma(self, percent):
        raise RuntimeError("pass tau_func explicitly")


def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
    model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


def model_trange(*args, **kwargs):
    kwargs.pop("disable", None)
    return range(*args)


def install_stubs(root):
    comfy = types.ModuleType("comfy")
    comfy.__path__ = [os.path.join(root, "comfy")]
    mp = types.ModuleType("comfy.model_patcher")
    mp.set_model_options_post_cfg_function = set_model_options_post_cfg_function
    ms = types.ModuleType("comfy.model_sampling")
    ms.CONST = CONST
    ms.EPS = EPS
    mm = types.ModuleType("comfy.memory_management")
    ut = types.ModuleType("comfy.utils")
    ut.model_trange = model_trange
    comfy.model_patcher, comfy.model_sampling, comfy.memory_management, comfy.utils = mp, ms, mm, ut
    for name, mod in [("comfy", comfy), ("comfy.model_patcher", mp), ("comfy.model_sampling", ms),
                      ("comfy.memory_management", mm), ("comfy.utils", ut)]:
        sys.modules[name] = mod


class Model:
    """What ComfyUI's samplers call: CFG over the two analytic denoisers, with the post-CFG hook."""

    def __init__(self):
        self.model_sampling = EPS()
        patcher = types.SimpleNamespace(get_model_object=lambda name: self.model_sampling)
        self.inner_model = types.SimpleNamespace(model_patcher=patcher,
                                                 inner_model=types.SimpleNamespace(model_sampling=self.model_sampling))

    def __call__(self, x, sigma, model_options=None, seed=None, **kw):
        s = sigma.reshape(-1)[0]
        c = gauss(x, s, *cond_data())
        u = gauss(x, s, *uncond_data())
        d = u + SCALE * (c - u)
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            d = fn({"denoised": d, "cond_denoised": c, "uncond_denoised": u, "sigma": sigma, "input": x,
                    "model": self, "model_options": model_options})
        return d


class ListNoise:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.used = []

    def __call__(self, sigma, sigma_next):
        z = self.rng.standard_normal(N)
        self.used.append({"sigma": float(sigma), "sigma_next": float(sigma_next), "z": z.tolist()})
        return torch.tensor(z).reshape(1, N, 1, 1)


def karras(n, lo, hi, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros([1])])


def main(out):
    root = os.environ.get("COMFYUI_DIR")
    if not root or not os.path.isdir(os.path.join(root, "comfy", "k_diffusion")):
        sys.exit("set COMFYUI_DIR to a ComfyUI checkout (with comfy/k_diffusion/sampling.py)")
    install_stubs(root)
    import comfy.k_diffusion.sampling as K  # noqa: E402
    import comfy.k_diffusion.sa_solver as SA  # noqa: E402
    spec = importlib.util.spec_from_file_location("uni_pc", os.path.join(root, "comfy", "extra_samplers", "uni_pc.py"))
    U = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(U)

    mu, s = cond_data()
    rng = np.random.default_rng(5)
    runs = []

    def run(name, fn, sigmas, noise=False, options=None, **kw):
        x0 = (mu + torch.sqrt(s * s + sigmas[0] ** 2) * torch.tensor(rng.standard_normal(N)))
        x0 = x0.reshape(1, N, 1, 1)
        ns = ListNoise(len(runs) + 100)
        if noise:
            kw["noise_sampler"] = ns
        x = fn(Model(), x0.clone(), sigmas, extra_args={}, disable=True, **kw)
        runs.append({"sampler": name, "options": options or {}, "sigmas": sigmas.tolist(),
                     "x0": x0.reshape(-1).tolist(), "x": x.reshape(-1).tolist(), "noise": ns.used})

    z10 = karras(10, 0.0292, 14.6146)  # ends at 0
    nz = karras(12, 0.0292, 14.6146)[:-1]  # 11 steps ending at sigma_min
    for sig in [z10, nz]:
        run("euler_cfg_pp", K.sample_euler_cfg_pp, sig)
        run("euler_ancestral_cfg_pp", K.sample_euler_ancestral_cfg_pp, sig, noise=True)
        run("heunpp2", K.sample_heunpp2, sig)
        run("dpmpp_2s_ancestral_cfg_pp", K.sample_dpmpp_2s_ancestral_cfg_pp, sig, noise=True)
        run("dpmpp_2m_cfg_pp", K.sample_dpmpp_2m_cfg_pp, sig)
        run("ddpm", K.sample_ddpm, sig, noise=True)
        run("lcm", K.sample_lcm, sig, noise=True)
        run("ipndm", K.sample_ipndm, sig)
        run("ipndm_v", K.sample_ipndm_v, sig)
        run("deis", K.sample_deis, sig)
        run("res_multistep", K.sample_res_multistep, sig)
        run("res_multistep_cfg_pp", K.sample_res_multistep_cfg_pp, sig)
        run("res_multistep_ancestral", K.sample_res_multistep_ancestral, sig, noise=True)
        run("res_multistep_ancestral_cfg_pp", K.sample_res_multistep_ancestral_cfg_pp, sig, noise=True)
        run("gradient_estimation", K.sample_gradient_estimation, sig)
        run("gradient_estimation_cfg_pp", K.sample_gradient_estimation_cfg_pp, sig)
        run("er_sde", K.sample_er_sde, sig, noise=True)
        run("seeds_2", K.sample_seeds_2, sig, noise=True)
        run("seeds_3", K.sample_seeds_3, sig, noise=True)
        for pece in [False, True]:
            name = "sa_solver_pece" if pece else "sa_solver"
            tau = SA.get_tau_interval_func(5.0, 0.5, eta=1.0)
            fn = K.sample_sa_solver_pece if pece else K.sample_sa_solver
            run(name, fn, sig, noise=True, options={"sa_tau_sigmas": [5.0, 0.5]}, tau_func=tau)
        # ComfyUI's wrappers (comfy/samplers.py ksampler): from sigmas[0] to the last nonzero sigma.
        lo = sig[-2] if sig[-1] == 0 else sig[-1]
        run("dpm_fast", lambda m, x, sg, **kw: K.sample_dpm_fast(m, x, lo, sg[0], len(sg) - 1, **kw), sig)
        run("dpm_adaptive", lambda m, x, sg, **kw: K.sample_dpm_adaptive(m, x, lo, sg[0], **kw), sig)
    # Options.
    run("euler_ancestral_cfg_pp", K.sample_euler_ancestral_cfg_pp, z10, noise=True,
        options={"eta": 0.5, "s_noise": 0.8}, eta=0.5, s_noise=0.8)
    run("gradient_estimation", K.sample_gradient_estimation, z10, options={"ge_gamma": 2.5}, ge_gamma=2.5)

    # UniPC: ComfyUI's UniPC class on a VE noise schedule (t = sigma, alpha = 1), data prediction, order
    # min(3, steps), as sample_unipc configures it; schedules without the final 0 (ComfyUI maps that onto the
    # model's discrete timesteps, which is model-specific).
    class VE:
        total_N, T = 1000, 1.0  # read by UniPC.sample only for defaults it does not use here

        def marginal_lambda(self, t):
            return -torch.log(t)

        def marginal_std(self, t):
            return t

        def marginal_log_mean_coeff(self, t):
            return torch.zeros_like(t)

        def marginal_alpha(self, t):
            return torch.ones_like(t)

    def unipc(model, x, sigmas, variant):
        def model_fn(xx, t):
            return (xx - model(xx, t)) / t[0]

        u = U.UniPC(model_fn, VE(), predict_x0=True, thresholding=False, variant=variant)
        return u.sample(x, timesteps=sigmas, skip_type="time_uniform", method="multistep",
                        order=min(3, len(sigmas) - 1), lower_order_final=True)

    for sig in [nz, karras(7, 0.1, 10.0)[:-1]]:
        for variant, name in [("bh1", "uni_pc"), ("bh2", "uni_pc_bh2")]:
            run(name, lambda m, x, sg, disable=None, extra_args=None, v=variant: unipc(m, x, sg, v), sig)

    with open(os.path.join(out, "comfyui.json"), "w") as f:
        json.dump({"cfg_scale": SCALE, "runs": runs}, f, separators=(",", ":"))
    print("wrote", len(runs), "runs to", out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/samplers")
