#!/usr/bin/env python3
"""Fits the polynomials of the f32 Box-Muller transform (src/samplers/gauss.rs, src/cuda/kernels.cu) and prints
their f32 bit patterns. Relative-error minimax fits by Lawson's iteratively reweighted least squares on a dense
grid, targets from mpmath at 40 digits. Needs numpy and mpmath:  python3 scripts/noise_minimax.py
"""
import mpmath as mp
import numpy as np

mp.mp.dps = 40


def lawson(xs, target, powers, var, weight, iters=100):
    a = np.stack([var**k for k in powers], 1)
    w = np.ones_like(xs)
    for _ in range(iters):
        sw = np.sqrt(w) * weight
        c, *_ = np.linalg.lstsq(a * sw[:, None], target * sw, rcond=None)
        e = np.abs(a @ c - target) * weight
        w = w * e
        w /= w.sum()
    return c, (np.abs(a @ c - target) * weight).max()


def bits(v):
    f = np.float32(v)
    return f"0x{int(f.view(np.uint32)):08x}", float(f)


def show(name, cs, err):
    print(f"{name}: max relative error of the fit {err:.3g}")
    for c in cs:
        h, f = bits(c)
        print(f"    f32::from_bits({h}), // {f!r}")


# sin(2 pi x) = x (2 pi + x^2 P(x^2)), cos(2 pi x) = 1 + x^2 Q(x^2), x in [-1/8, 1/8] turns.
x = np.linspace(1e-6, 0.125, 20001)
x2 = x * x
sin_t = np.array([float(mp.sin(2 * mp.pi * mp.mpf(v)) / mp.mpf(v) - 2 * mp.pi) for v in x])
c, err = lawson(x, sin_t, [1, 2, 3], x2, x / np.sin(2 * np.pi * x))
show("SIN_P (x^2, x^4, x^6 terms of sin(2 pi x)/x - 2 pi)", c, err)
cos_t = np.array([float(mp.cos(2 * mp.pi * mp.mpf(v)) - 1) for v in x])
c, err = lawson(x, cos_t, [1, 2, 3, 4], x2, 1 / np.cos(2 * np.pi * x))
show("COS_P (x^2 .. x^8 terms of cos(2 pi x) - 1)", c, err)
hi = np.float32(float(2 * mp.pi))
print("S1_HI", bits(hi), "S1_LO", bits(float(2 * mp.pi - mp.mpf(float(hi)))))
print("LN2_HI", bits(0.693359375), "LN2_LO", bits(float(mp.log(2) - mp.mpf(0.693359375))))

# ln(1 + f) = f - f^2/2 + f^3 P(f), f in [sqrt(1/2) - 1, sqrt(2) - 1], error relative to ln(1 + f).
f = np.linspace(np.sqrt(0.5) - 1, np.sqrt(2) - 1, 20001)
f = f[np.abs(f) > 1e-6]
log_t = np.array([float((mp.log1p(mp.mpf(v)) - mp.mpf(v) + mp.mpf(v) ** 2 / 2) / mp.mpf(v) ** 3) for v in f])
c, err = lawson(f, log_t, list(range(8)), f, np.abs(f**3 / np.log1p(f)))
show("LOG_P (constant first)", c, err)
