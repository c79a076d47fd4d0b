#!/usr/bin/env python3
"""Golden file of RES4LYF's Runge-Kutta coefficients, read from a RES4LYF checkout (nothing of it is copied
into this repository; only the numbers its code produces land in the golden file).

    python3 -m venv /work/refvenv-s && /work/refvenv-s/bin/pip install torch mpmath einops numpy
    /work/refvenv-s/bin/python scripts/golden/samplers_res4lyf.py /path/to/RES4LYF \
        tests/golden/samplers/res4lyf.json

For every static tableau (rk_coeff) it stores a, b, c; for the phi-based exponential methods it evaluates
get_rk_methods_beta(name, h) at a few step sizes h (RES4LYF's default mpmath phi) and stores a, b, c.
"""
import json
import os
import shutil
import sys
import tempfile


def load_res4lyf(root):
    """Import RES4LYF's beta/rk_coefficients_beta.py with stand-ins for its ComfyUI-facing helpers."""
    tmp = tempfile.mkdtemp()
    pkg = os.path.join(tmp, "r4")
    os.makedirs(os.path.join(pkg, "beta"))
    open(os.path.join(pkg, "__init__.py"), "w").close()
    open(os.path.join(pkg, "beta", "__init__.py"), "w").close()
    for f in ["rk_coefficients_beta.py", "phi_functions.py", "deis_coefficients.py"]:
        shutil.copy(os.path.join(root, "beta", f), os.path.join(pkg, "beta", f))
    with open(os.path.join(pkg, "helper.py"), "w") as f:
        f.write(
            "class ExtraOptions:\n"
            "    def __init__(self, s): pass\n"
            "    def __call__(self, key, default=False, *a, **k): return default\n"
            "def extra_options_flag(flag, eo): return False\n"
            "def get_extra_options_kv(key, default, eo, ret_type=None): return default\n"
        )
    with open(os.path.join(pkg, "res4lyf.py"), "w") as f:
        f.write("def get_display_sampler_category(): return False\ndef RESplain(*a, **k): pass\n")
    sys.path.insert(0, tmp)
    import r4.beta.rk_coefficients_beta as rk

    return rk


EXPONENTIAL = [
    "ddim", "res_2s", "res_2s_stable", "res_2s_rkmk2e", "res_3s", "res_3s_non-monotonic", "res_3s_alt",
    "res_3s_strehmel_weiner", "res_3s_cox_matthews", "res_3s_lie", "res_3s_sunstar", "res_4s_krogstad",
    "res_4s_strehmel_weiner", "res_4s_cox_matthews", "etdrk2_2s", "etdrk3_a_3s", "etdrk3_b_3s",
    "etdrk4_4s", "etdrk4_4s_alt", "dpmpp_2s", "dpmpp_sde_2s", "dpmpp_3s",
    "res_4s_krogstad_alt", "res_4s_strehmel_weiner_alt", "res_4s_cfree4", "res_4s_friedli", "res_4s_minchev",
    "res_4s_munthe-kaas", "res_5s", "res_5s_hochbruck-ostermann", "res_6s", "res_8s", "res_10s", "res_15s", "res_16s",
    "lawson2a_2s", "lawson2b_2s", "lawson4_4s", "lawson41-gen_4s", "lawson41-gen-mod_4s", "irk_exp_diag_2s",
]


def load_noise_modes(root):
    """RES4LYF's RK_NoiseSampler.get_sde_step / get_sde_coeff / get_vpsde_step_RF, taken from its source by ast
    (the module itself imports ComfyUI) and bound to a minimal object holding the two fields they read."""
    import ast
    import torch

    src = open(os.path.join(root, "beta", "rk_noise_sampler_beta.py")).read()
    tree = ast.parse(src)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RK_NoiseSampler")
    fns = [n for n in cls.body if isinstance(n, ast.FunctionDef)
           and n.name in ("get_sde_step", "get_sde_coeff", "get_vpsde_step_RF")]
    ns = {"torch": torch, "Tensor": torch.Tensor, "Optional": __import__("typing").Optional,
          "Tuple": __import__("typing").Tuple, "RESplain": lambda *a, **k: None}
    exec(compile(ast.Module(body=fns, type_ignores=[]), "rk_noise_sampler_beta.py", "exec"), ns)

    class NS:
        pass

    for f in ("get_sde_step", "get_sde_coeff", "get_vpsde_step_RF"):
        setattr(NS, f, ns[f])
    return NS


NOISE_MODES = ["hard", "lorentzian", "soft", "soft-linear", "softer", "eps", "sinusoidal", "exp", "vpsde", "er4",
               "hard_var"]


def noise_modes(root):
    import torch

    NS = load_noise_modes(root)
    out = []
    for vp, sigma_max, pairs in [(False, 14.6146, [(14.0, 9.0), (3.0, 2.2), (0.5, 0.3)]),
                                 (True, 1.0, [(0.95, 0.8), (0.5, 0.42), (0.1, 0.05)])]:
        ns = NS()
        ns.sigma_max, ns.VARIANCE_PRESERVING = sigma_max, vp
        for mode in NOISE_MODES:
            for s, sn in pairs:
                for eta in [0.25, 0.5, 1.0]:
                    for down in [False, True]:
                        su, _, sd, ar = ns.get_sde_step(torch.tensor(s, dtype=torch.float64),
                                                        torch.tensor(sn, dtype=torch.float64), eta, mode, down)
                        out.append({"mode": mode, "vp": vp, "sigma_max": sigma_max, "sigma": s, "sigma_next": sn,
                                    "eta": eta, "down": down, "sigma_up": float(su), "sigma_down": float(sd),
                                    "alpha_ratio": float(ar)})
    return out


def main():
    root, out = sys.argv[1], sys.argv[2]
    import torch

    rk = load_res4lyf(root)
    g = {"tableaux": {}, "exponential": []}
    for name, (a, b, c) in rk.rk_coeff.items():
        if len(b) != 1:
            continue  # embedded/multi-row variants are not in our table
        a = [list(map(float, row)) + [0.0] * (len(c) - len(row)) for row in a]
        g["tableaux"][name] = {"a": a, "b": [float(v) for v in b[0]], "c": [float(v) for v in c]}
    sig = torch.tensor([14.0, 6.0, 2.5, 1.0, 0.4, 0.1], dtype=torch.float64)
    for name in EXPONENTIAL:
        for hv in [1e-6, 0.05, 0.4, 0.9]:
            h = torch.tensor(hv, dtype=torch.float64)
            sigma, sigma_next = sig[2], sig[2] * torch.exp(-h)
            a, b, u, v, ci, ms, hs, fsal = rk.get_rk_methods_beta(
                name, h, 0.0, 0.5, 1.0, None, 2, sig, sigma, sigma_next, sigma_next, ""
            )
            fl = lambda m: [[float(x) for x in row] for row in m]
            g["exponential"].append({"name": name, "h": hv, "a": fl(a), "b": fl(b)[0], "c": [float(x) for x in ci]})
    g["noise_modes"] = noise_modes(root)
    # deis_2m/3m/4m's multistep coefficients: RES4LYF's get_deis_coeff_list(sigmas, order, "rhoab").
    from r4.beta.deis_coefficients import get_deis_coeff_list

    deis = []
    for sig in [[14.6, 9.1, 5.9, 3.7, 2.2, 1.3, 0.71, 0.38, 0.19, 0.09, 0.04],
                [1.0, 0.93, 0.84, 0.71, 0.55, 0.38, 0.22, 0.1, 0.03]]:
        t = torch.tensor(sig, dtype=torch.float64)
        for order in [2, 3, 4]:
            deis.append({"sigmas": sig, "order": order,
                         "coeffs": [[float(v) for v in row] for row in get_deis_coeff_list(t, order, deis_mode="rhoab")]})
    g["deis_rhoab"] = deis
    with open(out, "w") as f:
        json.dump(g, f, separators=(",", ":"))
    print(f"wrote {out}: {len(g['tableaux'])} tableaux, {len(g['exponential'])} exponential evaluations")


if __name__ == "__main__":
    main()
