#!/usr/bin/env python3
"""Golden file of whole RES4LYF sampler runs, step by step, as RES4LYF computes them: its hybrid samplers
(pec423_2h2s, pec433_2h3s, abnorsett*_h*s, lawson4x-gen-mod_*h4s, anchor 1) and some explicit linear tableaux
with noise_anchor 1 (RES4LYF's node default) and 0.

    /path/to/venv/bin/python scripts/golden/samplers_res4lyf_runs.py /path/to/RES4LYF \
        tests/golden/samplers/res4lyf_runs.json

(a venv with torch, mpmath, einops; RES4LYF checked at 022c873). Nothing of RES4LYF is committed here.

What is RES4LYF's own code and what is not: the per-step coefficients (a, b, u, v, c, the warm-up switch to
res_Ns, hybrid_stages) come from RES4LYF's `get_rk_methods_beta`, and the stage/step updates from its
`RK_Method_Beta.update_substep` / `zum` (u_k/v_k einsums), both run unmodified (the methods are taken from the
source by `ast` and bound to a small object, because the module imports ComfyUI), as are the model-call wrappers
`RK_Method_Exponential.__call__` / `RK_Method_Linear.__call__` (which apply noise_anchor: a linear method's
stage derivative is `(x_0 - D) / sigma` at anchor 1, `(x - D) / sub_sigma` at 0). RES4LYF's sampler loop
(`beta/rk_sampler_beta.py`, `sample_rk_beta`) needs ComfyUI's model plumbing, so its default path (eta = 0, no
guides; implicit steps and substeps with the default implicit types, which at eta 0 all take the same branch)
is transcribed below line for line: the history recycling
`eps_[ms] = data_prev_[ms] - x_0; eps_prev_ = eps_.clone()`, the tableau loop (model call at x_[row],
s_[row]; update_substep), `x_next = x_[rows - multistep_stages - row_offset + 1]`, and the end-of-step shift
`data_prev_[0] = data_[0]; data_prev_[k] = data_prev_[k-1]` (which leaves the newest denoised in slots 0 and 1).
The implicit steps re-run the tableau loop with row 0 evaluated at the previous result x at sigma_next; the
substeps re-evaluate a row at `x_[row + row_offset]`; with the implicit type "rebound" (its `implicit_type` /
`implicit_type_substeps`) those branches of the loop are transcribed too (and `sigma_from_to` runs from its
source); "retro-eta" and "bongmath" take their own branch only with substep noise, so at eta 0 they are the
default "predictor-corrector". Left out: `rebound_overshoot_substep/step`, the identity
at eta 0 (up to rounding), and everything behind guides and noise. For implicit tableaux (noise_anchor 1) the
loop's implicit branch is transcribed too: `init_implicit_sampling` and `newton_iter` run from RES4LYF's source,
the model call of row 0 is skipped when c_1 = 0, and the b row only updates.

Bongmath (RES4LYF's default BONGMATH = True): the runs above are with it off; the file also holds runs with
it on (`"bongmath": true`, first schedule only, to keep the file small), where its `bong_iter` (from the source,
unmodified) runs after each row as the loop does (last substep, s_[row] > sigma_min, h < sigma_max / 2,
sigma > 0.03, SD's sigma range). At eta 0 it re-derives x_0 from the stage it just wrote by 100 fixed-point
iterations, which changes nothing (<= 1e-12) except (i) linear tableaux at noise_anchor < 1 with implicit
steps/substeps, where it recomputes an eps at the row's own point although the model was called at
(x_next, sigma_next) or (X_{r+1}, sigma_{r+1}), and (ii) hybrids whose iteration diverges (h * sum_j a_ij > 1:
abnorsett3_2h2s, lawson43-gen-mod_2h4s at the last step of 12 Karras steps), where it amplifies rounding
(6e-7 and 4e-5 relative). `--bongmath` turns it on for every run instead (exploration, not committed).

The model is the analytic Gaussian-data denoiser of trt_diff::samplers::model::GaussianData (VE, float64).
"""
import ast
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from samplers_res4lyf import load_res4lyf  # noqa: E402

HYBRID = ["abnorsett2_1h2s", "abnorsett3_2h2s", "abnorsett4_3h2s", "pec423_2h2s", "pec433_2h3s",
          "lawson42-gen-mod_1h4s", "lawson43-gen-mod_2h4s", "lawson44-gen-mod_3h4s", "lawson45-gen-mod_4h4s"]


SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642
BONGMATH = "--bongmath" in sys.argv  # bongmath on for every run (exploration), see the module docs
IMPLICIT = ["gauss-legendre_2s", "radau_iia_2s", "lobatto_iiia_2s", "lobatto_iiic_2s", "crouzeix_2s"]
REFINE_EXP = ["res_2s", "res_3s", "dpmpp_2s"]
REFINE_LIN = ["heun_2s", "rk4_4s"]
LINEAR = ["heun_2s", "ralston_3s", "rk4_4s", "rk38_4s", "bogacki-shampine_4s", "dormand-prince_6s"]


def load_rk_method(root, torch):
    """RK_Method_Beta's zum / einsum / update_substep and the Exponential / Linear subclasses' __call__, from
    the source, bound to minimal holders: returns (exponential class, linear class)."""
    src = open(os.path.join(root, "beta", "rk_method_beta.py")).read()
    tree = ast.parse(src)
    typing = __import__("typing")
    ns = {"torch": torch, "Tensor": torch.Tensor, "Optional": typing.Optional, "Tuple": typing.Tuple}

    def methods(cls_name, names):
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
        fns = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in names]
        d = dict(ns)
        exec(compile(ast.Module(body=fns, type_ignores=[]), "rk_method_beta.py", "exec"), d)
        return {k: d[k] for k in names}

    base = methods("RK_Method_Beta", ("zum", "a_k_einsum", "b_k_einsum", "u_k_einsum", "v_k_einsum",
                                      "update_substep", "newton_iter", "bong_iter"))

    class RK:
        SYNC_SUBSTEP_MEAN_CW = False
        model_device = "cpu"
        extra_args = {}

        def EO(self, key, default=False, *a, **k):
            return default

    for k, f in base.items():
        setattr(RK, k, f)
    out = []
    for cls_name in ("RK_Method_Exponential", "RK_Method_Linear"):
        sub = type(cls_name, (RK,), methods(cls_name, ("__call__", "get_epsilon", "get_epsilon_anchored")))
        out.append(sub)
    return out


def load_init_implicit(root, torch):
    """rk_sampler_beta.py's init_implicit_sampling, from its source (the module imports ComfyUI)."""
    src = open(os.path.join(root, "beta", "rk_sampler_beta.py")).read()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "init_implicit_sampling")
    fn.decorator_list = []
    typing = __import__("typing")
    ns = {"torch": torch, "Tensor": torch.Tensor, "Optional": typing.Optional, "RK_Method_Beta": object,
          "ExtraOptions": object}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "rk_sampler_beta.py", "exec"), ns)
    return ns["init_implicit_sampling"]


def load_sigma_from_to(root, torch):
    """RK_NoiseSampler.sigma_from_to from rk_noise_sampler_beta.py's source (the module imports ComfyUI)."""
    src = open(os.path.join(root, "beta", "rk_noise_sampler_beta.py")).read()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "RK_NoiseSampler")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sigma_from_to")
    ns = {"torch": torch, "Tensor": torch.Tensor}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "rk_noise_sampler_beta.py", "exec"), ns)
    return lambda *a: ns["sigma_from_to"](None, *a)


def gaussian(n):
    """GaussianData::standard(n, false)."""
    mu = [0.8 * math.sin(i * 1.7) for i in range(n)]
    s = [0.3 + 0.5 * (0.5 + 0.5 * math.cos(i * 0.9)) for i in range(n)]
    return mu, s


def run(rk, RK, torch, name, sigmas, x, exponential, anchor, full=0, diag=0, init_implicit=None, bong=False,
        itype="predictor-corrector", itype_sub="predictor-corrector", sigma_from_to=None):
    n = x.shape[0]
    mu, s = gaussian(n)
    mu, s2 = torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64) ** 2

    def model(x, sigma, **kw):
        return mu + s2 / (s2 + sigma ** 2) * (x - mu)

    sig = torch.tensor(sigmas, dtype=torch.float64)
    data_prev_ = torch.zeros(4, n, dtype=torch.float64)
    x_ = data_ = eps_ = eps_prev_ = None
    out = []
    for step in range(len(sigmas) - 1):
        sigma, sigma_next = sig[step], sig[step + 1]
        # h_fn(sigma_down = sigma_next, sigma) of RK_Method_Exponential / RK_Method_Linear
        h = -torch.log(sigma_next / sigma) if exponential else sigma_next - sigma
        a, b, u, v, ci, ms, hs, _ = rk.get_rk_methods_beta(name, h, 0.0, 0.5, 1.0, [], step, sig, sigma,
                                                           sigma_next, sigma_next, "")
        R = RK()
        R.LINEAR_ANCHOR_X_0 = anchor
        R.model_denoised = model
        R.A, R.B, R.C = (torch.tensor(m, dtype=torch.float64) for m in (a, b, ci))
        R.U = torch.tensor(u, dtype=torch.float64) if u is not None else None
        R.V = torch.tensor(v, dtype=torch.float64) if v is not None else None
        R.rows, R.cols = R.A.shape
        R.multistep_stages, R.hybrid_stages = ms, hs
        R.IMPLICIT = name in rk.get_implicit_sampler_name_list(nameOnly=True)
        R.EXPONENTIAL, R.unsample_bongmath = exponential, False
        row_offset = 1 if not R.IMPLICIT and R.A[0].sum() == 0 else 0
        # NS.get_substep_list: sigma_fn(t_fn(sigma) + h C)
        s_ = torch.exp(-(-torch.log(sigma) + h * R.C)) if exponential else sigma + h * R.C
        recycled_stages = max(ms, hs, len(data_prev_) - 1)
        if x_ is None:
            x_, data_, eps_, eps_prev_ = (torch.zeros(R.rows + 2, n, dtype=torch.float64) for _ in range(4))
        if R.rows + 2 > x_.shape[0]:
            gap = R.rows + 2 - x_.shape[0]
            x_, data_, eps_, eps_prev_ = (torch.cat((t, torch.zeros(gap, n, dtype=torch.float64)))
                                          for t in (x_, data_, eps_, eps_prev_))
        x_[0] = x.clone()
        x_0 = x_[0].clone()
        if ms > 0 or hs > 0:
            for m in range(min(len(data_prev_), len(eps_))):
                eps_[m] = data_prev_[m] - x_0  # get_epsilon_anchored
            eps_prev_ = eps_.clone()
        if R.IMPLICIT:
            x_, eps_, data_ = init_implicit(R, x_0, x_, eps_, eps_prev_, data_, None, None, None, step, sig, h, s_,
                                            lambda *a, **k: False, False)
        full_iter = 0
        while full_iter < full + 1:  # implicit_steps_full (implicit_type predictor-corrector, eta 0)
            if R.IMPLICIT:  # the loop's "init" newton at the start of every pass
                x_, eps_ = R.newton_iter(x_0, x_, eps_, eps_prev_, data_, s_, 0, h, sig, step, "init", False)
            for row in range(R.rows - ms - row_offset + 1):
                diag_iter = 0
                while diag_iter < diag + 1:  # implicit_steps_diag
                    if row >= R.rows:  # the b row of an implicit tableau: update only
                        x_ = R.update_substep(x_0, x_, eps_, eps_prev_, row, row_offset, h, h)
                        diag_iter += 1
                        continue
                    if full_iter > 0 and row_offset == 1 and row == 0:
                        if itype == "rebound":  # sample_rk_beta's implicit_type == "rebound" branch
                            eps_tmp, denoised_tmp = R(x, sigma_next, x_0, sigma)
                            eps_tmp = (x - denoised_tmp) / sigma_next
                            x = denoised_tmp + sigma * eps_tmp
                            x_tmp, s_tmp = x, sigma
                        else:
                            x_tmp, s_tmp = x, sigma_next
                    elif diag_iter > 0:
                        if itype_sub == "rebound":  # its implicit_type_substeps == "rebound" branch
                            eps_[row], data_[row] = R(x_[row + row_offset], s_[row + row_offset + ms], x_0, sigma)
                            x_ = R.update_substep(x_0, x_, eps_, eps_prev_, row, row_offset, h, h)
                            x_[row + row_offset] = sigma_from_to(x_0, x_[row + row_offset], sigma,
                                                                 s_[row + row_offset + ms], s_[row])
                            x_tmp, s_tmp = x_[row + row_offset], s_[row]
                        else:
                            x_tmp, s_tmp = x_[row + row_offset], s_[row + row_offset + ms]
                    else:
                        x_tmp, s_tmp = x_[row], s_[row]
                    if R.IMPLICIT and row == 0 and R.C[0] == 0.0:
                        pass
                    else:
                        # x_tmp may be a view of x_, which newton_iter refreshes in place (as in RES4LYF).
                        x_, eps_ = R.newton_iter(x_0, x_, eps_, eps_prev_, data_, s_, row, h, sig, step, "pre", False)
                        eps_[row], data_[row] = R(x_tmp, s_tmp, x_0, sigma)
                        if full_iter == 0 and diag_iter == 0:
                            x_, eps_ = R.newton_iter(x_0, x_, eps_, eps_prev_, data_, s_, row, h, sig, step, "post",
                                                     False)
                    x_ = R.update_substep(x_0, x_, eps_, eps_prev_, row, row_offset, h, h)
                    # bongmath (RES4LYF's default BONGMATH = True), with the SD model's sigma_min/max.
                    if (bong or BONGMATH) and s_[row] > SIGMA_MIN and h < SIGMA_MAX / 2 and diag_iter == diag and sigma > 0.03:
                        x_0, x_, eps_ = R.bong_iter(x_0, x_, eps_, eps_prev_, data_, sigma, s_, row, row_offset, h,
                                                    step, step)
                    diag_iter += 1
            x = x_[R.rows - ms - row_offset + 1].clone()  # eta 0: x = x_next
            full_iter += 1
        data_prev_[0] = data_[0]
        for m in range(recycled_stages):
            data_prev_[recycled_stages - m] = data_prev_[recycled_stages - m - 1]
        out.append([float(v) for v in x])
    return out


def main():
    root, path = sys.argv[1], sys.argv[2]
    import torch

    rk = load_res4lyf(root)
    EXP, LIN = load_rk_method(root, torch)
    init_implicit = load_init_implicit(root, torch)
    sigma_from_to = load_sigma_from_to(root, torch)
    n = 6
    mu, s = gaussian(n)
    schedules = [
        # Karras (rho 7) from 14.6 to 0.03, 12 and 24 steps, and an exponential schedule, 10 steps.
        [((14.6 ** (1 / 7)) + i / 12 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7 for i in range(13)],
        [((14.6 ** (1 / 7)) + i / 24 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7 for i in range(25)],
        [math.exp(math.log(10.0) + i / 10 * (math.log(0.05) - math.log(10.0))) for i in range(11)],
    ]
    runs, raises = [], []
    jobs = [(name, True, 1.0, 0, 0) for name in HYBRID] + [(name, False, a, 0, 0) for name in LINEAR for a in (1.0, 0.0)]
    # RES4LYF's implicit steps (full) / substeps (diag) on explicit methods.
    jobs += [(name, True, 1.0, f, d) for name in REFINE_EXP for f, d in ((1, 0), (0, 1), (2, 1))]
    jobs += [(name, False, a, f, d) for name in REFINE_LIN for a in (1.0, 0.0) for f, d in ((1, 0), (1, 1))]
    # Implicit tableaux at noise_anchor 1: init, newton iterations, Gauss-Seidel rows (row 0 skipped at c = 0).
    jobs += [(name, False, 1.0, f, d) for name in IMPLICIT for f, d in ((0, 0), (1, 0), (0, 1))]
    jobs = [(*j, False, False) for j in jobs]
    # Implicit tableaux at noise_anchor 0 and 0.5: its model-free newton iterations then move the stages
    # (first schedule only, to keep the file small).
    jobs += [(name, False, a, f, d, False, True) for name in IMPLICIT for a in (0.0, 0.5)
             for f, d in ((0, 0), (1, 0), (0, 1))]
    # Bongmath on: the cases it changes (linear tableaux with implicit steps/substeps at anchor 0) and ones
    # where it must be the identity (anchor 1, exponential, implicit tableaux, hybrids), first schedule only.
    bong_jobs = [(name, False, a, f, d) for name in REFINE_LIN for a in (1.0, 0.0) for f, d in ((0, 0), (1, 0), (0, 1), (1, 1))]
    bong_jobs += [(name, False, a, 0, 0) for name in ("ralston_3s", "dormand-prince_6s") for a in (1.0, 0.0)]
    bong_jobs += [(name, True, 1.0, f, d) for name in REFINE_EXP for f, d in ((0, 0), (1, 0), (0, 1))]
    bong_jobs += [(name, False, a, f, 0) for name in IMPLICIT[:2] for a in (1.0, 0.0, 0.5) for f in (0, 1)]
    bong_jobs += [(name, True, 1.0, 0, 0) for name in HYBRID if name not in ("abnorsett4_3h2s", "lawson45-gen-mod_4h4s")]
    jobs = [(*j, "predictor-corrector", "predictor-corrector") for j in jobs]
    jobs += [(*j, True, True, "predictor-corrector", "predictor-corrector") for j in bong_jobs]
    # The implicit type "rebound" (implicit_type for the steps, implicit_type_substeps for the substeps).
    jobs += [(name, exp, a, f, d, False, True, ft, dt) for name, exp, a in
             (("res_2s", True, 1.0), ("res_3s", True, 1.0), ("heun_2s", False, 0.0), ("rk4_4s", False, 1.0))
             for f, d, ft, dt in ((1, 0, "rebound", "predictor-corrector"), (0, 1, "predictor-corrector", "rebound"),
                                  (1, 1, "rebound", "rebound"))]
    jobs += [(name, False, a, f, d, False, True, "rebound", "rebound") for name in IMPLICIT[:2] + ["lobatto_iiia_2s"]
             for a in (1.0, 0.0) for f, d in ((0, 1), (1, 1))]
    for name, exponential, anchor, full, diag, bong, first_only, itype, itype_sub in jobs:
        scheds = schedules[:1] if first_only else schedules if full == diag == 0 else schedules[::2]
        for sig in scheds:
            x0 = [m + sig[0] * math.cos(1.3 * i + 0.4) for i, m in enumerate(mu)]
            try:
                xs = run(rk, EXP if exponential else LIN, torch, name, sig,
                         torch.tensor(x0, dtype=torch.float64), exponential, anchor, full, diag, init_implicit,
                         bong, itype, itype_sub, sigma_from_to)
            except Exception as e:  # RES4LYF's own failure: recorded, the name is not registered
                raises.append({"name": name, "error": f"{type(e).__name__}: {e}"})
                print(f"{name}: raises {type(e).__name__}: {e}")
                break
            runs.append({"name": name, "anchor": anchor, "implicit_steps": full, "implicit_substeps": diag,
                         "bongmath": bong or BONGMATH, "implicit_type": itype, "implicit_type_substeps": itype_sub,
                         "sigmas": sig, "x0": x0, "xs": xs})
    with open(path, "w") as f:
        json.dump({"runs": runs, "raises": raises}, f, separators=(",", ":"))
    print(f"wrote {path}: {len(runs)} runs")


if __name__ == "__main__":
    main()
