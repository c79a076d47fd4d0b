#!/usr/bin/env python3
"""Golden file of whole RES4LYF sampler runs with its per-substep SDE noise (eta_substep,
noise_mode_sde_substep, s_noise_substep), on explicit exponential methods, explicit linear tableaux and implicit
tableaux (its implicit branch: init_implicit_sampling, newton_iter, the noise swapped into a row's point and
bongmath's pre-call bong_iter before the call), with
implicit steps/substeps, bongmath and the implicit types retro-eta / bongmath, and its default step noise
(`swap_noise_step`), alone and with substep noise (exponential methods at noise_anchor 1, the only anchor ours
have):

    /path/to/venv/bin/python scripts/golden/samplers_res4lyf_substep_noise.py /path/to/RES4LYF \
        tests/golden/samplers/res4lyf_substep_noise.json

(a venv with torch, mpmath, einops; RES4LYF checked at 022c873; nothing of RES4LYF is committed here.)

RES4LYF's own code, taken from its source by `ast` and run unmodified: the coefficients (`get_rk_methods_beta`),
`RK_Method_*.__call__` / `update_substep` / `bong_iter` (as in samplers_res4lyf_runs.py), and from
`RK_NoiseSampler`: `set_sde_step`, `set_substep_list`, `set_sde_substep`, `get_sde_step`, `get_sde_substep`,
`get_sde_coeff`, `swap_noise_substep`, `rebound_overshoot_substep`, `rebound_overshoot_step`,
`swap_noise_step` and `sigma_from_to`, with `latents.normalize_zscore` (the per-channel z-score of every draw). Its sampler loop
(`sample_rk_beta`) is transcribed line for line for this path (no guides, overshoot 0, gaussian noise;
the step noise at eta > 0 by its default `swap_noise_step`): per row and substep `NS.set_sde_substep`, the model-call point of the
implicit types (predictor-corrector, retro-eta, bongmath), the model call, `update_substep` with
`NS.h_new`, `rebound_overshoot_substep`, `swap_noise_substep` (explicit methods), bongmath's conditions.
The step and substep noise generators (`noise_sampler`, `noise_sampler2`) are replaced by one stream of
recorded draws: the file holds
every draw (before the z-score) with the (sigma, sigma_next) RES4LYF asked it for, and the Rust test replays
them through `noise::ZScorePlanes`. Latents are (2, 1, 3) (two channels of three values), the model is the
analytic Gaussian-data denoiser of trt_diff::samplers::model::GaussianData (VE, float64).
"""
import ast
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from samplers_res4lyf import load_res4lyf  # noqa: E402
from samplers_res4lyf_runs import SIGMA_MAX, SIGMA_MIN, gaussian, load_init_implicit, load_rk_method  # noqa: E402

SHAPE = (2, 1, 3)


def load_noise_sampler(root, torch):
    """RK_NoiseSampler's step/substep noise methods from rk_noise_sampler_beta.py (the module imports ComfyUI),
    with latents.normalize_zscore."""
    typing = __import__("typing")
    ns = {"torch": torch, "Tensor": torch.Tensor, "Optional": typing.Optional, "Tuple": typing.Tuple,
          "Union": typing.Union, "RESplain": lambda *a, **k: None}
    lat = ast.parse(open(os.path.join(root, "latents.py")).read())
    fn = next(n for n in lat.body if isinstance(n, ast.FunctionDef) and n.name == "normalize_zscore")
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "latents.py", "exec"), ns)
    src = ast.parse(open(os.path.join(root, "beta", "rk_noise_sampler_beta.py")).read())
    cls = next(n for n in src.body if isinstance(n, ast.ClassDef) and n.name == "RK_NoiseSampler")
    names = ("set_sde_step", "set_substep_list", "set_sde_substep", "get_sde_step", "get_sde_substep",
             "get_sde_coeff", "get_vpsde_step_RF", "swap_noise_substep", "rebound_overshoot_substep",
             "rebound_overshoot_step", "sigma_from_to", "swap_noise_step")
    fns = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in names]
    for f in fns:  # drop type annotations naming RK classes defined elsewhere
        for a in f.args.args:
            a.annotation = None
    exec(compile(ast.Module(body=fns, type_ignores=[]), "rk_noise_sampler_beta.py", "exec"), ns)

    class NS:
        def EO(self, key, default=False, *a, **k):
            return default

    for k in names:
        setattr(NS, k, ns[k])
    return NS


def run(rk, RK, NSC, torch, name, sigmas, x0, exponential, anchor, full, diag, bong, itype, itype_sub, eta_sub,
        mode_sub, s_noise_sub, eta, mode, s_noise, gen, init_implicit):
    f64 = torch.float64
    n = math.prod(SHAPE)
    mu, s = gaussian(n)
    mu = torch.tensor(mu, dtype=f64).reshape(SHAPE)
    s2 = torch.tensor(s, dtype=f64).reshape(SHAPE) ** 2

    def model(x, sigma, **kw):
        return mu + s2 / (s2 + sigma ** 2) * (x - mu)

    draws = []

    def noise_sampler2(sigma, sigma_next):
        z = torch.round(torch.randn(SHAPE, generator=gen, dtype=f64) * 1e6) / 1e6
        draws.append([float(sigma), float(sigma_next), [float(v) for v in z.flatten()]])
        return z.clone()

    NS = NSC()
    NS.sigma_max, NS.sigma_min = torch.tensor(SIGMA_MAX, dtype=f64), torch.tensor(SIGMA_MIN, dtype=f64)
    NS.VARIANCE_PRESERVING = False
    implicit = name in rk.get_implicit_sampler_name_list(nameOnly=True)
    NS.row_offset = 0 if implicit else 1
    NS.noise_mode_sde, NS.noise_mode_sde_substep = mode, mode_sub
    NS.overshoot_mode = NS.overshoot_mode_substep = "hard"
    NS.noise_boost_step = NS.noise_boost_substep = 0.0
    NS.DOWN_STEP = NS.DOWN_SUBSTEP = False
    NS.noise_sampler_type2 = "gaussian"
    NS.noise_sampler = NS.noise_sampler2 = noise_sampler2  # one recorded stream, in call order
    if exponential:
        NS.sigma_fn, NS.t_fn = (lambda t: t.neg().exp()), (lambda s: s.log().neg())
        NS.h_fn = lambda sd, s: -torch.log(sd / s)
    else:
        NS.sigma_fn = NS.t_fn = lambda t: t
        NS.h_fn = lambda sd, s: sd - s

    sig = torch.tensor(sigmas, dtype=f64)
    x = torch.tensor(x0, dtype=f64).reshape(SHAPE)
    x_ = data_ = eps_ = eps_prev_ = None
    out = []
    for step in range(len(sigmas) - 1):
        sigma, sigma_next = sig[step], sig[step + 1]
        NS.set_sde_step(sigma, sigma_next, eta, 0.0, s_noise)  # overshoot 0
        a, b, u, v, ci, ms, hs, _ = rk.get_rk_methods_beta(name, NS.h, 0.0, 0.5, 1.0, [], step, sig, sigma,
                                                           sigma_next, NS.sigma_down, "")
        assert ms == 0 and hs == 0, name
        R = RK()
        R.LINEAR_ANCHOR_X_0 = anchor
        R.model_denoised = model
        R.A, R.B, R.C = (torch.tensor(m, dtype=f64) for m in (a, b, ci))
        R.U = R.V = None
        R.rows, R.cols = R.A.shape
        R.multistep_stages, R.hybrid_stages = ms, hs
        R.IMPLICIT = implicit
        R.EXPONENTIAL, R.unsample_bongmath = exponential, False
        row_offset = 1 if not R.IMPLICIT and R.A[0].sum() == 0 else 0
        NS.set_substep_list(R)
        s_ = NS.s_
        if x_ is None:
            x_, data_, eps_, eps_prev_ = (torch.zeros(R.rows + 2, *SHAPE, dtype=f64) for _ in range(4))
        if R.rows + 2 > x_.shape[0]:
            gap = R.rows + 2 - x_.shape[0]
            x_, data_, eps_, eps_prev_ = (torch.cat((t, torch.zeros(gap, *SHAPE, dtype=f64)))
                                          for t in (x_, data_, eps_, eps_prev_))
        x_[0] = x.clone()
        x_0 = x_[0].clone()
        if R.IMPLICIT:
            x_, eps_, data_ = init_implicit(R, x_0, x_, eps_, eps_prev_, data_, None, None, None, step, sig, NS.h,
                                            s_, lambda *a, **k: False, False)
        full_iter = 0
        while full_iter < full + 1:
            if R.IMPLICIT:  # the loop's "init" newton at the start of every pass
                x_, eps_ = R.newton_iter(x_0, x_, eps_, eps_prev_, data_, s_, 0, NS.h, sig, step, "init", False)
            for row in range(R.rows - ms - row_offset + 1):
                diag_iter = 0
                while diag_iter < diag + 1:
                    NS.set_sde_substep(row, ms, eta_sub, 0.0, s_noise_sub, full_iter, diag_iter, full, diag)
                    noisy = NS.sub_sigma_up > 0 or NS.sub_sigma_up_eta > 0
                    if R.IMPLICIT:
                        if row >= R.rows:  # the b row: update only
                            x_ = R.update_substep(x_0, x_, eps_, eps_prev_, row, row_offset, NS.h_new, NS.h_new_orig)
                            diag_iter += 1
                            continue
                        # Its implicit branch before the call (types' x_tmp are overwritten by it).
                        x_[row] = x_0 + NS.h_new * R.zum(row, eps_, eps_prev_)
                        x_[row] = NS.rebound_overshoot_substep(x_0, x_[row])
                        if row > 0:
                            x_[row] = NS.swap_noise_substep(x_0, x_[row])
                        if bong and sigma > 0.03:  # its pre-call bong_iter
                            x_0, x_, eps_ = R.bong_iter(x_0, x_, eps_, eps_prev_, data_, sigma, s_, row, row_offset,
                                                        NS.h, step, step)
                        x_tmp, s_tmp = x_[row], (NS.sub_sigma if diag_iter == 0 else s_[row + ms])
                        if not (row == 0 and R.C[0] == 0.0):
                            x_, eps_ = R.newton_iter(x_0, x_, eps_, eps_prev_, data_, s_, row, NS.h, sig, step, "pre",
                                                     False)
                            eps_[row], data_[row] = R(x_tmp, s_tmp, x_0, sigma)
                            if full_iter == 0 and diag_iter == 0:
                                x_, eps_ = R.newton_iter(x_0, x_, eps_, eps_prev_, data_, s_, row, NS.h, sig, step,
                                                         "post", False)
                        x_ = R.update_substep(x_0, x_, eps_, eps_prev_, row, row_offset, NS.h_new, NS.h_new_orig)
                        x_[row] = NS.rebound_overshoot_substep(x_0, x_[row])
                        if bong and s_[row] > SIGMA_MIN and NS.h < SIGMA_MAX / 2 and diag_iter == diag and sigma > 0.03:
                            x_0, x_, eps_ = R.bong_iter(x_0, x_, eps_, eps_prev_, data_, sigma, s_, row, row_offset, NS.h,
                                                        step, step)
                        diag_iter += 1
                        continue
                    if full_iter > 0 and row == 0:
                        if itype == "retro-eta" and noisy:
                            x_tmp, s_tmp = NS.sigma_from_to(x_0, x, sigma, sigma_next, sigma), sigma
                        elif itype == "bongmath" and noisy:
                            if bong:
                                x_tmp, s_tmp = x_[row], s_[row]
                            else:
                                x_tmp, s_tmp = NS.sigma_from_to(x_0, x, sigma, sigma_next, sigma), sigma
                        else:
                            x_tmp, s_tmp = x, sigma_next
                    elif diag_iter > 0:
                        if itype_sub == "retro-eta" and noisy:
                            x_tmp = NS.sigma_from_to(x_0, x_[row + row_offset], sigma, s_[row + row_offset + ms],
                                                     s_[row])
                            s_tmp = s_[row]
                        elif itype_sub == "bongmath" and noisy:
                            if bong:
                                x_tmp, s_tmp = x_[row], s_[row]
                            else:
                                x_tmp = NS.sigma_from_to(x_0, x_[row + row_offset], sigma,
                                                         s_[row + row_offset + ms], s_[row])
                                s_tmp = s_[row]
                        else:
                            x_tmp, s_tmp = x_[row + row_offset], s_[row + row_offset + ms]
                    else:
                        x_tmp, s_tmp = x_[row], NS.sub_sigma
                    eps_[row], data_[row] = R(x_tmp, s_tmp, x_0, sigma)
                    x_ = R.update_substep(x_0, x_, eps_, eps_prev_, row, row_offset, NS.h_new, NS.h_new_orig)
                    x_[row + row_offset] = NS.rebound_overshoot_substep(x_0, x_[row + row_offset])
                    if NS.noise_mode_sde_substep != "hard_sq":  # not RK.IMPLICIT
                        x_[row + row_offset] = NS.swap_noise_substep(x_0, x_[row + row_offset])
                    if bong and s_[row] > SIGMA_MIN and NS.h < SIGMA_MAX / 2 and diag_iter == diag and sigma > 0.03:
                        x_0, x_, eps_ = R.bong_iter(x_0, x_, eps_, eps_prev_, data_, sigma, s_, row, row_offset, NS.h,
                                                    step, step)
                    diag_iter += 1
            x_next = x_[R.rows - ms - row_offset + 1].clone()
            x_next = NS.rebound_overshoot_step(x_0, x_next)
            if eta == 0.0:
                x = x_next
            else:
                x = NS.swap_noise_step(x_0, x_next)
            full_iter += 1
        out.append([float(v) for v in x.flatten()])
    return out, draws


def main():
    root, path = sys.argv[1], sys.argv[2]
    import torch

    rk = load_res4lyf(root)
    EXP, LIN = load_rk_method(root, torch)
    NSC = load_noise_sampler(root, torch)
    init_implicit = load_init_implicit(root, torch)
    n = math.prod(SHAPE)
    mu, _ = gaussian(n)
    # Karras (rho 7) from 14.6 to 0.05, 6 steps.
    sig = [((14.6 ** (1 / 7)) + i / 6 * (0.05 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7 for i in range(7)]
    x0 = [m + sig[0] * math.cos(1.3 * i + 0.4) for i, m in enumerate(mu)]
    pc = "predictor-corrector"
    # (name, exponential, anchor, implicit steps, substeps, bongmath, type, substep type, eta_sub, mode, s_noise)
    jobs = [(nm, True, 1.0, 0, 0, False, pc, pc, 0.5, "hard", 1.0) for nm in ("res_2s", "res_3s", "dpmpp_2s")]
    jobs += [(nm, False, a, 0, 0, False, pc, pc, 0.5, "hard", 1.0) for nm in ("heun_2s", "rk4_4s")
             for a in (1.0, 0.0)]
    jobs += [("ralston_3s", False, 1.0, 0, 0, False, pc, pc, 0.7, "hard", 0.8)]
    jobs += [("res_2s", True, 1.0, 0, 0, False, pc, pc, e, m, 1.0)
             for m, e in (("exp", 0.5), ("soft", 0.5), ("softer", 0.9), ("sinusoidal", 0.8), ("eps", 0.5),
                          ("lorentzian", 0.5), ("soft-linear", 0.3), ("er4", 0.5), ("hard_var", 0.5))]
    # Implicit steps / substeps with substep noise.
    jobs += [("res_2s", True, 1.0, f, d, False, pc, pc, 0.5, "hard", 1.0) for f, d in ((1, 0), (0, 1))]
    jobs += [("heun_2s", False, 0.0, 1, 1, False, pc, pc, 0.5, "hard", 1.0)]
    # Bongmath with substep noise.
    jobs += [("res_2s", True, 1.0, 0, 0, True, pc, pc, 0.5, "hard", 1.0),
             ("res_3s", True, 1.0, 0, 1, True, pc, pc, 0.5, "hard", 1.0),
             ("heun_2s", False, 0.0, 0, 0, True, pc, pc, 0.5, "hard", 1.0),
             ("rk4_4s", False, 1.0, 0, 0, True, pc, pc, 0.5, "hard", 1.0),
             ("heun_2s", False, 0.0, 1, 1, True, pc, pc, 0.5, "hard", 1.0)]
    # The implicit types retro-eta and bongmath, with and without bongmath.
    jobs += [(nm, ex, a, 1, 1, bg, t, t, 0.5, "hard", 1.0)
             for nm, ex, a in (("res_3s", True, 1.0), ("heun_2s", False, 0.0))
             for t in ("retro-eta", "bongmath") for bg in (False, True)]
    jobs = [(*j, 0.0, "hard", 1.0) for j in jobs]
    # Step noise in its default (swap) form, alone and with substep noise; RES4LYF's node defaults are eta 0.5,
    # eta_substep 0.5, hard, noise_anchor 1, bongmath on.
    jobs += [(nm, ex, 1.0, 0, 0, True, pc, pc, 0.5, "hard", 1.0, 0.5, "hard", 1.0)
             for nm, ex in (("res_2s", True), ("res_3s", True), ("heun_2s", False), ("rk4_4s", False))]
    jobs += [(nm, ex, a, 0, 0, False, pc, pc, 0.0, "hard", 1.0, 0.5, "hard", 1.0)
             for nm, ex, a in (("res_2s", True, 1.0), ("heun_2s", False, 0.0))]
    jobs += [("res_3s", True, 1.0, 0, 0, False, pc, pc, 0.5, "hard", 1.0, 0.7, "exp", 0.9),
             ("res_2s", True, 1.0, 1, 0, True, pc, pc, 0.5, "hard", 1.0, 0.5, "hard", 1.0),
             ("heun_2s", False, 0.0, 1, 1, True, "retro-eta", "retro-eta", 0.5, "hard", 1.0, 0.5, "hard", 1.0)]
    # Implicit tableaux stepped as RES4LYF does, at noise_anchor 1: substep noise (which its newton "pre"
    # iteration wipes unless bongmath moves x_0), with bongmath, with step noise, with implicit steps.
    imp = [(nm, False, 1.0, 0, 0, bg, pc, pc, 0.5, "hard", 1.0, 0.0, "hard", 1.0)
           for nm in ("gauss-legendre_2s", "radau_iia_2s") for bg in (False, True)]
    imp += [("lobatto_iiia_2s", False, 1.0, 0, 0, True, pc, pc, 0.5, "hard", 1.0, 0.5, "hard", 1.0),
            ("gauss-legendre_2s", False, 1.0, 1, 1, True, pc, pc, 0.5, "hard", 1.0, 0.5, "hard", 1.0)]
    jobs += imp
    runs = []
    for (name, exponential, anchor, full, diag, bong, itype, itype_sub, eta_sub, mode_sub, s_noise_sub, eta, mode,
         s_noise) in jobs:
        gen = torch.Generator().manual_seed(20260)  # the same draws in every run: variants compare
        xs, draws = run(rk, EXP if exponential else LIN, NSC, torch, name, sig, x0, exponential, anchor, full,
                        diag, bong, itype, itype_sub, eta_sub, mode_sub, s_noise_sub, eta, mode, s_noise, gen,
                        init_implicit)
        runs.append({"name": name, "anchor": anchor, "implicit_steps": full, "implicit_substeps": diag,
                     "bongmath": bong, "implicit_type": itype, "implicit_type_substeps": itype_sub,
                     "eta_substep": eta_sub, "noise_mode_substep": mode_sub, "s_noise_substep": s_noise_sub,
                     "eta": eta, "noise_mode": mode, "s_noise": s_noise,
                     "sigmas": sig, "x0": x0, "xs": xs, "draws": draws})
    with open(path, "w") as f:
        json.dump({"shape": list(SHAPE), "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "runs": runs}, f, separators=(",", ":"))
    print(f"wrote {path}: {len(runs)} runs, {sum(len(r['draws']) for r in runs)} draws")


if __name__ == "__main__":
    main()
