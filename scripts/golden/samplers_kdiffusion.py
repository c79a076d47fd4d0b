#!/usr/bin/env python3
"""Golden files for the sampler tests, produced by the REAL k-diffusion and diffusers packages.

    python3 -m venv /work/refvenv-s
    /work/refvenv-s/bin/pip install torch k-diffusion 'setuptools<81' 'numpy<2' diffusers
    /work/refvenv-s/bin/python scripts/golden/samplers_kdiffusion.py tests/golden/samplers

Writes kdiffusion.json (schedules and step-by-step sampler trajectories) and diffusers_flow.json
(FlowMatchEuler/HeunDiscreteScheduler sigmas and trajectories). Everything runs in float64 (torch default
dtype) so the Rust side can be compared to ~1e-10. The denoiser is the analytic Gaussian-data one, the same
formula as trt_diff::samplers::model::GaussianData::standard; stochastic samplers get their noise from a
recorded list (noise_sampler) so the Rust side can replay it.
"""
import json
import math
import os
import sys

import numpy as np
import torch

torch.set_default_dtype(torch.float64)
import k_diffusion.sampling as K  # noqa: E402

N = 8


def data(flow):
    mu = np.array([0.8 * math.sin(i * 1.7) for i in range(N)])
    s = np.array([0.3 + 0.5 * (0.5 + 0.5 * math.cos(i * 0.9)) for i in range(N)])
    return mu, s


def denoise(x, sigma, flow):
    mu, s = (torch.tensor(v) for v in data(flow))
    if flow:
        a = 1 - sigma
        v = a * a * s * s + sigma * sigma
        return mu + a * s * s / v * (x - a * mu)
    return mu + s * s / (s * s + sigma * sigma) * (x - mu)


class ListNoise:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.used = []

    def __call__(self, sigma, sigma_next):
        z = self.rng.standard_normal(N)
        self.used.append({"sigma": float(sigma), "sigma_next": float(sigma_next), "z": z.tolist()})
        return torch.tensor(z).reshape(1, N)


def run(name, fn, sigmas, x0, **kw):
    traj = []
    model = lambda x, s: denoise(x, s[0], False)  # noqa: E731
    noise = ListNoise(1234)
    if "noise" in kw:
        kw.pop("noise")
        kw["noise_sampler"] = noise
    cb = lambda d: traj.append(d["x"].reshape(-1).tolist())  # noqa: E731
    x = fn(model, torch.tensor(x0).reshape(1, N), sigmas, callback=cb, disable=True, **kw)
    traj.append(x.reshape(-1).tolist())
    return {"sampler": name, "options": {k: v for k, v in kw.items() if k != "noise_sampler"},
            "sigmas": sigmas.tolist(), "x": traj, "noise": noise.used}


def kdiffusion(out):
    g = {"schedules": [], "runs": []}
    for n in [1, 2, 7, 20]:
        for lo, hi in [(0.0292, 14.6146), (0.002, 80.0)]:
            g["schedules"].append({"name": "karras", "n": n, "sigma_min": lo, "sigma_max": hi, "rho": 7.0,
                                   "sigmas": K.get_sigmas_karras(n, lo, hi).tolist()})
            g["schedules"].append({"name": "exponential", "n": n, "sigma_min": lo, "sigma_max": hi,
                                   "sigmas": K.get_sigmas_exponential(n, lo, hi).tolist()})
            for rho in [1.0, 2.5]:
                g["schedules"].append({"name": "polyexponential", "n": n, "sigma_min": lo, "sigma_max": hi,
                                       "rho": rho, "sigmas": K.get_sigmas_polyexponential(n, lo, hi, rho).tolist()})
        g["schedules"].append({"name": "vp", "n": n, "sigmas": K.get_sigmas_vp(n).tolist()})
    mu, s = data(False)
    rng = np.random.default_rng(7)
    sigmas = K.get_sigmas_karras(8, 0.0292, 14.6146)
    x0 = (mu + np.sqrt(s * s + float(sigmas[0]) ** 2) * rng.standard_normal(N)).tolist()
    R = g["runs"]
    R.append(run("euler", K.sample_euler, sigmas, x0))
    R.append(run("euler_ancestral", K.sample_euler_ancestral, sigmas, x0, noise=1))
    R.append(run("euler_ancestral", K.sample_euler_ancestral, sigmas, x0, noise=1, eta=0.5, s_noise=0.9))
    R.append(run("heun", K.sample_heun, sigmas, x0))
    R.append(run("dpm_2", K.sample_dpm_2, sigmas, x0))
    R.append(run("dpm_2_ancestral", K.sample_dpm_2_ancestral, sigmas, x0, noise=1))
    R.append(run("lms", K.sample_lms, sigmas, x0))
    R.append(run("dpmpp_2s_ancestral", K.sample_dpmpp_2s_ancestral, sigmas, x0, noise=1))
    R.append(run("dpmpp_sde", K.sample_dpmpp_sde, sigmas, x0, noise=1))
    R.append(run("dpmpp_sde", K.sample_dpmpp_sde, sigmas, x0, noise=1, eta=0.0))
    R.append(run("dpmpp_2m", K.sample_dpmpp_2m, sigmas, x0))
    R.append(run("dpmpp_2m_sde", K.sample_dpmpp_2m_sde, sigmas, x0, noise=1))
    R.append(run("dpmpp_2m_sde", K.sample_dpmpp_2m_sde, sigmas, x0, noise=1, eta=0.0))
    R.append(run("dpmpp_2m_sde_heun", K.sample_dpmpp_2m_sde, sigmas, x0, noise=1, solver_type="heun"))
    R.append(run("dpmpp_3m_sde", K.sample_dpmpp_3m_sde, sigmas, x0, noise=1))
    R.append(run("dpmpp_3m_sde", K.sample_dpmpp_3m_sde, sigmas, x0, noise=1, eta=0.0))
    # LMS on an exponential schedule too (its coefficients depend on the spacing).
    R.append(run("lms", K.sample_lms, K.get_sigmas_exponential(8, 0.0292, 14.6146), x0))
    for r in R:
        r["options"].pop("solver_type", None)
    with open(os.path.join(out, "kdiffusion.json"), "w") as f:
        json.dump(g, f, separators=(",", ":"))


def diffusers_flow(out):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    mu, s = data(True)
    rng = np.random.default_rng(11)
    x0 = rng.standard_normal(N)  # the flow prior at t = 1 is N(0, 1)
    g = {"runs": []}
    cases = [
        ("euler", FlowMatchEulerDiscreteScheduler(shift=3.0), {}),
        ("euler", FlowMatchEulerDiscreteScheduler(shift=1.0), {}),
        ("euler", FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), {"mu": 0.8}),
        ("heun", FlowMatchHeunDiscreteScheduler(shift=3.0), {}),
    ]
    for name, sch, kw in cases:
        for steps in [4, 9]:
            sch.set_timesteps(steps, **kw)
            x = torch.tensor(x0)
            traj = [x.tolist()]
            for t in sch.timesteps:
                sigma = float(t) / 1000.0
                v = (x - denoise(x, sigma, True)) / sigma
                x = sch.step(v, t, x).prev_sample
                traj.append(x.tolist())
            sig = sch.sigmas.tolist()
            if name == "heun":
                # diffusers interleaves the Heun corrector's sigmas; the schedule is every other entry.
                sig = sig[0:1] + sig[1:-1:2] + sig[-1:]
                # Each Heun step is two scheduler calls (predictor, corrector); the last step is a lone Euler call.
                traj = traj[0::2] + traj[-1:]
            g["runs"].append({"sampler": name, "steps": steps, "shift": sch.config.shift,
                              "mu": kw.get("mu"), "sigmas": sig, "x": traj})
    with open(os.path.join(out, "diffusers_flow.json"), "w") as f:
        json.dump(g, f, separators=(",", ":"))


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/golden/samplers"
    os.makedirs(out, exist_ok=True)
    kdiffusion(out)
    diffusers_flow(out)
    print("wrote", out)
