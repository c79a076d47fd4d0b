//! Exponential Runge-Kutta methods (RES4LYF's "res", "etdrk", "dpmpp" families) on the probability-flow ODE
//! in `t = -log sigma`, where it reads `dx/dt = D(x) - x`: the linear part is solved exactly and the
//! coefficients are phi functions of the step `h = log(sigma / sigma_next)`.
//!
//! Stage k sits at `sigma_k = sigma e^{-c_k h}` with `X_k = x + h sum_j a_kj (D_j - x)`, and the step is
//! `x' = x + h sum_j b_j (D_j - x)` (RES4LYF's form, `epsilon = denoised - x_0`). Each method is a short
//! function from `(h, c2, c3)` to `(a, b, c)` with the coefficients as RES4LYF publishes them.
use super::buffer::Buffer;
use super::noise_mode::{NoiseMode, sde_step};
use super::phi::PhiAt;
use super::refine::{Refine, StageEps, refined_step};
use super::stepper::{Ctx, Sampler, Scratch};
use anyhow::Result;

/// `(a, b, c)` of one step.
pub struct ExpCoeffs {
    pub a: Vec<Vec<f64>>,
    pub b: Vec<f64>,
    pub c: Vec<f64>,
}

fn zeros(s: usize) -> Vec<Vec<f64>> {
    vec![vec![0.0; s]; s]
}
/// RES4LYF's `gen_first_col_exp`: make each row consistent (`sum_j a_ij = c_i phi_1(-h c_i)`,
/// `sum_j b_j = phi_1(-h)`) by setting the first column.
fn first_col(a: &mut [Vec<f64>], b: &mut [f64], c: &[f64], p: &PhiAt) {
    for i in 0..c.len() {
        let rest: f64 = a[i][1..].iter().sum();
        a[i][0] = c[i] * p.s(1, i + 1) - rest;
    }
    let rest: f64 = b[1..].iter().sum();
    b[0] = p.f(1) - rest;
}

/// An exponential method: name, stages, the order it claims (non-stiff), default (c2, c3).
pub struct ExpMethod {
    pub name: &'static str,
    pub stages: usize,
    pub order: usize,
    pub coeffs: fn(h: f64, c2: f64, c3: f64) -> ExpCoeffs,
    pub c2: f64,
    pub c3: f64,
}

fn gamma(c2: f64, c3: f64) -> f64 {
    (3.0 * c3.powi(3) - 2.0 * c3) / (c2 * (2.0 - 3.0 * c2))
}

fn ddim(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0];
    let p = PhiAt { h, c: &c };
    ExpCoeffs {
        a: zeros(1),
        b: vec![p.f(1)],
        c,
    }
}
fn res_2s(h: f64, c2: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, c2];
    let p = PhiAt { h, c: &c };
    let b2 = p.f(2) / c2;
    let mut a = zeros(2);
    a[1][0] = c2 * p.s(1, 2);
    ExpCoeffs {
        a,
        b: vec![p.f(1) - b2, b2],
        c,
    }
}
fn res_2s_rkmk2e(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 1.0];
    let p = PhiAt { h, c: &c };
    let (mut a, mut b) = (zeros(2), vec![0.0, p.f(2)]);
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_3s(h: f64, c2: f64, c3: f64) -> ExpCoeffs {
    let c = vec![0.0, c2, c3];
    let p = PhiAt { h, c: &c };
    let g = gamma(c2, c3);
    let mut a = zeros(3);
    a[2][1] = g * c2 * p.s(2, 2) + (c3 * c3 / c2) * p.s(2, 3);
    let b3 = p.f(2) / (g * c2 + c3);
    let mut b = vec![0.0, g * b3, b3];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_3s_alt(h: f64, c2: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, c2, 2.0 / 3.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(3);
    a[2][1] = (4.0 / (9.0 * c2)) * p.s(2, 3);
    let mut b = vec![0.0, 0.0, (1.0 / c[2]) * p.f(2)];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_3s_strehmel_weiner(h: f64, c2: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, c2, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(3);
    a[2][1] = (1.0 / c2) * p.s(2, 3);
    let mut b = vec![0.0, 0.0, p.f(2)];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_3s_cox_matthews(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(3);
    a[2][1] = 2.0 * p.s(1, 3);
    let mut b = vec![0.0, -8.0 * p.f(3) + 4.0 * p.f(2), 4.0 * p.f(3) - p.f(2)];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_3s_lie(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 1.0 / 3.0, 2.0 / 3.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(3);
    a[2][1] = (4.0 / 3.0) * p.s(2, 3);
    let mut b = vec![
        0.0,
        6.0 * p.f(2) - 18.0 * p.f(3),
        -1.5 * p.f(2) + 9.0 * p.f(3),
    ];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_3s_sunstar(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 1.0 / 3.0, 2.0 / 3.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(3);
    a[2][1] = (8.0 / 9.0) * p.s(2, 3);
    let mut b = vec![0.0, 0.0, 1.5 * p.f(2)];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_4s_krogstad(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[2][1] = p.s(2, 3);
    a[3][2] = 2.0 * p.s(2, 4);
    let w = 2.0 * p.f(2) - 4.0 * p.f(3);
    let mut b = vec![0.0, w, w, -p.f(2) + 4.0 * p.f(3)];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_4s_strehmel_weiner(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[2][1] = c[2] * p.s(2, 3);
    a[3][1] = -2.0 * p.s(2, 4);
    a[3][2] = 4.0 * p.s(2, 4);
    let mut b = vec![
        0.0,
        0.0,
        4.0 * p.f(2) - 8.0 * p.f(3),
        -p.f(2) + 4.0 * p.f(3),
    ];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_4s_cox_matthews(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[1][0] = c[1] * p.s(1, 2);
    a[2][1] = c[2] * p.s(1, 3);
    a[3][0] = 0.5 * p.s(1, 3) * (p.s(0, 3) - 1.0);
    a[3][2] = p.s(1, 3);
    let w = 2.0 * p.f(2) - 4.0 * p.f(3);
    let b = vec![
        p.f(1) - 3.0 * p.f(2) + 4.0 * p.f(3),
        w,
        w,
        4.0 * p.f(3) - p.f(2),
    ];
    ExpCoeffs { a, b, c }
}
fn etdrk2_2s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(2);
    a[1][0] = p.f(1);
    ExpCoeffs {
        a,
        b: vec![p.f(1) - p.f(2), p.f(2)],
        c,
    }
}
fn etdrk3_a_3s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 1.0, 2.0 / 3.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(3);
    a[1][0] = c[1] * p.f(1);
    a[2][1] = (4.0 / 9.0) * p.s(2, 3);
    a[2][0] = c[2] * p.s(1, 3) - a[2][1];
    let b2 = p.f(2) - 0.5 * p.f(1);
    let b3 = 0.75 * p.f(1);
    ExpCoeffs {
        a,
        b: vec![p.f(1) - b2 - b3, b2, b3],
        c,
    }
}
fn etdrk3_b_3s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 4.0 / 9.0, 2.0 / 3.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(3);
    a[1][0] = c[1] * p.s(1, 2);
    a[2][1] = p.s(2, 3);
    a[2][0] = c[2] * p.s(1, 3) - a[2][1];
    let b3 = 1.5 * p.f(2);
    ExpCoeffs {
        a,
        b: vec![p.f(1) - b3, 0.0, b3],
        c,
    }
}
fn etdrk4_4s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[2][1] = p.s(1, 2);
    a[3][2] = 2.0 * p.s(1, 2);
    let w = 2.0 * p.f(2) - 4.0 * p.f(3);
    let mut b = vec![0.0, w, w, -p.f(2) + 4.0 * p.f(3)];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
/// etdrk4_4s_alt corrected: Cox and Matthews' ETDRK4 (J. Comput. Phys. 176, 2002, eqs. 26-29; the
/// first column from the row sums, as RES4LYF's (4.9) reference does). RES4LYF's formulas are these with two faults: its `phi(1, 2)` is `phi_1(-c_2 h)` where
/// the formulas mean `c_2 phi_1(-c_2 h)` (a21, a32, a43 twice too large, a41 off by a32's excess), and its
/// b row drops b1 = phi_1 - 3 phi_2 + 4 phi_3 (so sum b != phi_1: not consistent).
fn etdrk4_4s_alt(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let half = 0.5 * p.s(1, 2);
    let mut a = zeros(4);
    a[1][0] = half;
    a[2][1] = half;
    a[3][0] = p.f(1) - 2.0 * half;
    a[3][2] = 2.0 * half;
    let w = 2.0 * p.f(2) - 4.0 * p.f(3);
    let b = vec![
        p.f(1) - 3.0 * p.f(2) + 4.0 * p.f(3),
        w,
        w,
        -p.f(2) + 4.0 * p.f(3),
    ];
    ExpCoeffs { a, b, c }
}
/// irk_exp_diag_2s corrected: RES4LYF's diagonally implicit exponential method keeps its nodes (1/3, 2/3)
/// and its diagonal `lambda = (1 - e^{-c_1 h}) / h = c_1 phi_1(-c_1 h)`, but its a21 (= lambda) and b (which
/// sums to 1 - O(h^2), not phi_1(-h)) are no exponential method: as published it is inconsistent and first
/// order. Here a21 makes row 2 consistent (`a21 + lambda = c_2 phi_1(-c_2 h)`) and b meets the stiff order
/// conditions `b1 + b2 = phi_1`, `b1 c1 + b2 c2 = phi_2` (Hochbruck-Ostermann 2005): order 2.
fn irk_exp_diag_2s(h: f64, c1: f64, c2: f64) -> ExpCoeffs {
    let c = vec![c1, c2];
    let p = PhiAt { h, c: &c };
    let lam = c1 * p.s(1, 1);
    let a = vec![vec![lam, 0.0], vec![c2 * p.s(1, 2) - lam, lam]];
    let b = vec![
        (p.f(2) - c2 * p.f(1)) / (c1 - c2),
        (p.f(2) - c1 * p.f(1)) / (c2 - c1),
    ];
    ExpCoeffs { a, b, c }
}
fn dpmpp_2s(h: f64, c2: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, c2];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(2);
    let mut b = vec![0.0, (1.0 / (2.0 * c2)) * p.f(1)];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn dpmpp_3s(h: f64, c2: f64, c3: f64) -> ExpCoeffs {
    let c = vec![0.0, c2, c3];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(3);
    a[2][1] = (c3 * c3 / c2) * p.s(2, 3);
    let mut b = vec![0.0, 0.0, (1.0 / c3) * p.f(2)];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}

fn res_4s_krogstad_alt(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[2][1] = 4.0 * p.s(2, 2);
    a[3][2] = 2.0 * p.f(2);
    let w = 2.0 * p.f(2) - 4.0 * p.f(3);
    let mut b = vec![0.0, w, w, -p.f(2) + 4.0 * p.f(3)];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_4s_strehmel_weiner_alt(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[2][1] = 2.0 * p.s(2, 2);
    a[3][1] = -2.0 * p.f(2);
    a[3][2] = 4.0 * p.f(2);
    let mut b = vec![
        0.0,
        0.0,
        4.0 * p.f(2) - 8.0 * p.f(3),
        -p.f(2) + 4.0 * p.f(3),
    ];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_4s_cfree4(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[1][0] = c[1] * p.s(1, 2);
    a[2][1] = c[2] * p.s(1, 2);
    a[3][0] = 0.5 * p.s(1, 2) * (p.s(0, 2) - 1.0);
    a[3][2] = p.s(1, 2);
    let b = vec![
        0.5 * p.f(1) - (1.0 / 3.0) * p.s(1, 2),
        (1.0 / 3.0) * p.f(1),
        (1.0 / 3.0) * p.f(1),
        -(1.0 / 6.0) * p.f(1) + (1.0 / 3.0) * p.s(1, 2),
    ];
    ExpCoeffs { a, b, c }
}
fn res_4s_friedli(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[2][1] = 2.0 * p.s(2, 2);
    a[3][1] = -(26.0 / 25.0) * p.f(1) + (2.0 / 25.0) * p.f(2);
    a[3][2] = (26.0 / 25.0) * p.f(1) + (48.0 / 25.0) * p.f(2);
    let mut b = vec![
        0.0,
        0.0,
        4.0 * p.f(2) - 8.0 * p.f(3),
        -p.f(2) + 4.0 * p.f(3),
    ];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_4s_munthe_kaas(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[1][0] = c[1] * p.s(1, 2);
    a[2][0] = (h / 8.0) * p.s(1, 2);
    a[2][1] = 0.5 * (1.0 - h / 4.0) * p.s(1, 2);
    a[3][2] = p.f(1);
    let b = vec![
        (1.0 / 6.0) * p.f(1) * (1.0 + h / 2.0),
        (1.0 / 3.0) * p.f(1),
        (1.0 / 3.0) * p.f(1),
        (1.0 / 6.0) * p.f(1) * (1.0 - h / 2.0),
    ];
    ExpCoeffs { a, b, c }
}
fn res_4s_minchev(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[2][1] = (4.0 / 25.0) * p.s(1, 2) + (24.0 / 25.0) * p.s(2, 2);
    // RES4LYF computes a4_2 = 21/5 phi_2 - 108/5 phi_3 but leaves it out of the matrix; so do we.
    a[3][2] = (1.0 / 20.0) * p.f(1) - (33.0 / 10.0) * p.f(2) + (123.0 / 5.0) * p.f(3);
    let mut b = vec![
        0.0,
        -(1.0 / 10.0) * p.f(1) + (1.0 / 5.0) * p.f(2) - 4.0 * p.f(3) + 12.0 * p.f(4),
        (1.0 / 30.0) * p.f(1) + (23.0 / 5.0) * p.f(2) - 8.0 * p.f(3) - 4.0 * p.f(4),
        (1.0 / 30.0) * p.f(1) - (7.0 / 5.0) * p.f(2) + 6.0 * p.f(3) - 4.0 * p.f(4),
    ];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_5s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0, 0.5];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(5);
    a[2][1] = p.s(2, 3);
    a[3][1] = p.s(2, 4);
    a[4][1] = 0.5 * p.s(2, 5) - p.s(3, 4) + 0.25 * p.s(2, 4) - 0.5 * p.s(3, 5);
    a[3][2] = a[3][1];
    a[4][2] = a[4][1];
    a[4][3] = 0.25 * p.s(2, 5) - a[4][1];
    let mut b = vec![
        0.0,
        0.0,
        0.0,
        -p.f(2) + 4.0 * p.f(3),
        4.0 * p.f(2) - 8.0 * p.f(3),
    ];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_5s_hochbruck_ostermann(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0, 0.5];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(5);
    a[2][1] = 4.0 * p.s(2, 2);
    a[3][1] = p.f(2);
    a[4][1] = 0.25 * p.f(2) - p.f(3) + 2.0 * p.s(2, 2) - 4.0 * p.s(3, 2);
    a[3][2] = p.f(2);
    a[4][2] = a[4][1];
    a[4][3] = p.s(2, 2) - a[4][1];
    let mut b = vec![
        0.0,
        0.0,
        0.0,
        -p.f(2) + 4.0 * p.f(3),
        4.0 * p.f(2) - 8.0 * p.f(3),
    ];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_6s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0 / 3.0, 1.0 / 3.0, 5.0 / 6.0];
    let p = PhiAt { h, c: &c };
    let (c2, c3, c4, c5, c6) = (c[1], c[2], c[3], c[4], c[5]);
    let mut a = zeros(6);
    a[1][0] = c2 * p.s(1, 2);
    a[2][1] = (c3 * c3 / c2) * p.s(2, 3);
    a[3][1] = (c4 * c4 / c2) * p.s(2, 4);
    a[3][2] = (c4 * c4 * p.s(2, 4) - a[3][1] * c2) / c3;
    a[4][2] = (-c4 * c5 * c5 * p.s(2, 5) + 2.0 * c5.powi(3) * p.s(3, 5)) / (c3 * (c3 - c4));
    a[4][3] = (-c3 * c5 * c5 * p.s(2, 5) + 2.0 * c5.powi(3) * p.s(3, 5)) / (c4 * (c4 - c3));
    a[5][2] = (-c4 * c6 * c6 * p.s(2, 6) + 2.0 * c6.powi(3) * p.s(3, 6)) / (c3 * (c3 - c4));
    a[5][3] = (-c3 * c6 * c6 * p.s(2, 6) + 2.0 * c6.powi(3) * p.s(3, 6)) / (c4 * (c4 - c3));
    a[5][4] = (c6 * c6 * p.s(2, 6) - a[5][2] * c3 - a[5][3] * c4) / c5;
    let mut b = vec![
        0.0,
        0.0,
        0.0,
        0.0,
        (-c6 * p.f(2) + 2.0 * p.f(3)) / (c5 * (c5 - c6)),
        (-c5 * p.f(2) + 2.0 * p.f(3)) / (c6 * (c6 - c5)),
    ];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
/// res_8s (RES4LYF notes it is not EXPRK5S8; its res_8s_alt, which would be, raises in RES4LYF itself because
/// its node list is commented out, so it is not registered).
fn res_8s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 0.25, 0.5, 0.2, 2.0 / 3.0, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(8);
    let phi = |j, i| p.s(j, i);
    a[2][1] = 0.5 * phi(2, 3);
    a[3][2] = (1.0 / 8.0) * phi(2, 4);
    a[4][2] = -0.5 * phi(2, 5) + 2.0 * phi(3, 5);
    a[4][3] = 2.0 * phi(2, 5) - 4.0 * phi(3, 5);
    a[5][3] = (8.0 / 25.0) * phi(2, 6) - (32.0 / 125.0) * phi(3, 6);
    a[5][4] = (2.0 / 25.0) * phi(2, 6) - 0.5 * a[5][3];
    let a64 = a[5][3];
    a[6][3] = (-125.0 / 162.0) * a64;
    a[6][4] = (125.0 / 1944.0) * a64 - (16.0 / 27.0) * phi(2, 7) + (320.0 / 81.0) * phi(3, 7);
    a[6][5] = (3125.0 / 3888.0) * a64 + (100.0 / 27.0) * phi(2, 7) - (800.0 / 81.0) * phi(3, 7);
    let big = (5.0 / 32.0) * a64 - (1.0 / 28.0) * phi(2, 6) + (36.0 / 175.0) * phi(2, 7)
        - (48.0 / 25.0) * phi(3, 7)
        + (6.0 / 175.0) * phi(4, 6)
        + (192.0 / 35.0) * phi(4, 7)
        + 6.0 * phi(4, 8);
    let (f2, f3) = (phi(2, 8), phi(3, 8));
    a[7][4] = (208.0 / 3.0) * f3 - (16.0 / 3.0) * f2 - 40.0 * big;
    a[7][5] = (-250.0 / 3.0) * f3 + (250.0 / 21.0) * f2 + (250.0 / 7.0) * big;
    a[7][6] = -27.0 * f3 + (27.0 / 14.0) * f2 + (135.0 / 7.0) * big;
    let mut b = vec![0.0; 8];
    b[5] = (125.0 / 14.0) * p.f(2) - (625.0 / 14.0) * p.f(3) + (1125.0 / 14.0) * p.f(4);
    b[6] = (-27.0 / 14.0) * p.f(2) + (162.0 / 7.0) * p.f(3) - (405.0 / 7.0) * p.f(4);
    b[7] = 0.5 * p.f(2) - 6.5 * p.f(3) + 22.5 * p.f(4);
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_10s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![
        0.0,
        0.5,
        0.5,
        1.0 / 3.0,
        0.5,
        1.0 / 3.0,
        0.25,
        0.3,
        0.75,
        1.0,
    ];
    let p = PhiAt { h, c: &c };
    let ci = |i: usize| c[i - 1];
    let mut a = zeros(10);
    a[2][1] = (ci(3) * ci(3) / ci(2)) * p.s(2, 3);
    a[3][1] = (ci(4) * ci(4) / ci(2)) * p.s(2, 4);
    for i in 5..8 {
        for (j, k) in [(3, 4), (4, 3)] {
            a[i - 1][j - 1] = (-ci(i).powi(2) * ci(k) * p.s(2, i)
                + 2.0 * ci(i).powi(3) * p.s(3, i))
                / (ci(j) * (ci(j) - ci(k)));
        }
    }
    for i in 8..11 {
        for (j, k, l) in [(5, 6, 7), (6, 5, 7), (7, 5, 6)] {
            a[i - 1][j - 1] = (ci(i).powi(2) * ci(k) * ci(l) * p.s(2, i)
                - 2.0 * ci(i).powi(3) * (ci(k) + ci(l)) * p.s(3, i)
                + 6.0 * ci(i).powi(4) * p.s(4, i))
                / (ci(j) * (ci(j) - ci(k)) * (ci(j) - ci(l)));
        }
    }
    let bj = |j: usize, k: usize, l: usize| {
        (ci(k) * ci(l) * p.f(2) - 2.0 * (ci(k) + ci(l)) * p.f(3) + 6.0 * p.f(4))
            / (ci(j) * (ci(j) - ci(k)) * (ci(j) - ci(l)))
    };
    let mut b = vec![0.0; 10];
    b[7] = bj(8, 9, 10);
    b[8] = bj(9, 8, 10);
    b[9] = bj(10, 8, 9);
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
/// The shared stage rows of res_15s / res_16s (RES4LYF builds them from permutations of the earlier
/// stages; each entry's formula is symmetric in the other indices, so every permutation writes the same value).
fn res_many_rows(a: &mut [Vec<f64>], c: &[f64], p: &PhiAt, last: usize) {
    let ci = |i: usize| c[i - 1];
    for i in 3..5 {
        a[i - 1][1] = (ci(i) * ci(i) / ci(2)) * p.s(2, i);
    }
    for i in 5..8 {
        for (j, k) in [(3, 4), (4, 3)] {
            a[i - 1][j - 1] = (-ci(i).powi(2) * ci(k) * p.s(2, i)
                + 2.0 * ci(i).powi(3) * p.s(3, i))
                / (ci(j) * (ci(j) - ci(k)));
        }
    }
    for i in 8..12 {
        for (j, k, l) in [(5, 6, 7), (6, 5, 7), (7, 5, 6)] {
            a[i - 1][j - 1] = (ci(i).powi(2) * ci(k) * ci(l) * p.s(2, i)
                - 2.0 * ci(i).powi(3) * (ci(k) + ci(l)) * p.s(3, i)
                + 6.0 * ci(i).powi(4) * p.s(4, i))
                / (ci(j) * (ci(j) - ci(k)) * (ci(j) - ci(l)));
        }
    }
    for i in 12..=last {
        for j in 8..12 {
            let o: Vec<usize> = (8..12).filter(|&m| m != j).collect();
            let (k, l, d) = (o[0], o[1], o[2]);
            let num = -ci(i).powi(2) * ci(d) * ci(k) * ci(l) * p.s(2, i)
                + 2.0 * ci(i).powi(3) * (ci(d) * ci(k) + ci(d) * ci(l) + ci(k) * ci(l)) * p.s(3, i)
                - 6.0 * ci(i).powi(4) * (ci(d) + ci(k) + ci(l)) * p.s(4, i)
                + 24.0 * ci(i).powi(5) * p.s(5, i);
            a[i - 1][j - 1] = num / (ci(j) * (ci(j) - ci(k)) * (ci(j) - ci(l)) * (ci(j) - ci(d)));
        }
    }
}
fn res_15s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![
        0.0,
        0.5,
        0.5,
        1.0 / 3.0,
        0.5,
        0.2,
        0.25,
        18.0 / 25.0,
        1.0 / 3.0,
        0.3,
        1.0 / 6.0,
        90.0 / 103.0,
        1.0 / 3.0,
        0.3,
        0.2,
    ];
    let p = PhiAt { h, c: &c };
    let ci = |i: usize| c[i - 1];
    let mut a = zeros(15);
    res_many_rows(&mut a, &c, &p, 15);
    // b_i over the other three of stages 12..15 (RES4LYF's sign-selection pass never matches and is a no-op).
    let mut b = vec![0.0; 15];
    for i in 12..16 {
        let o: Vec<usize> = (12..16).filter(|&m| m != i).collect();
        let (j, k, l) = (ci(o[0]), ci(o[1]), ci(o[2]));
        let num = -j * k * l * p.f(2) + 2.0 * (j * k + j * l + k * l) * p.f(3)
            - 6.0 * (j + k + l) * p.f(4)
            + 24.0 * p.f(5);
        b[i - 1] = num / (ci(i) * (ci(i) - j) * (ci(i) - k) * (ci(i) - l));
    }
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn res_16s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![
        0.0,
        0.5,
        0.5,
        1.0 / 3.0,
        0.5,
        0.2,
        0.25,
        0.5,
        0.2,
        0.25,
        1.0 / 3.0,
        0.5,
        0.2,
        0.25,
        1.0 / 3.0,
        1.0,
    ];
    let p = PhiAt { h, c: &c };
    let ci = |i: usize| c[i - 1];
    let mut a = zeros(16);
    res_many_rows(&mut a, &c, &p, 16);
    let mut b = vec![0.0; 16];
    for i in 12..17 {
        // RES4LYF loops over permutations (i, j, d, k, l) and keeps the last, i.e. the other four in
        // descending index order; its denominator has a misplaced bracket,
        // c_i (c_i - c_k) (c_i - c_j (c_i - c_d) (c_i - c_l)), ported as published.
        let mut o: Vec<usize> = (12..17).filter(|&m| m != i).collect();
        o.reverse();
        let (j, d, k, l) = (ci(o[0]), ci(o[1]), ci(o[2]), ci(o[3]));
        let num = -j * d * k * l * p.f(2)
            + 2.0 * (j * k * d + j * k * l + k * d * l + d * l * j) * p.f(3)
            - 6.0 * (j * k + j * d + j * l + k * d + k * l + d * l) * p.f(4)
            + 24.0 * (j + k + l + d) * p.f(5)
            - 120.0 * p.f(6);
        let x = ci(i);
        b[i - 1] = num / (x * (x - k) * (x - j * (x - d) * (x - l)));
    }
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn lawson2a_2s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(2);
    a[1][0] = c[1] * p.s(0, 2);
    ExpCoeffs {
        a,
        b: vec![0.0, p.s(0, 2)],
        c,
    }
}
fn lawson2b_2s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(2);
    a[1][0] = p.f(0);
    ExpCoeffs {
        a,
        b: vec![0.5 * p.f(0), 0.5],
        c,
    }
}
fn lawson4_4s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[1][0] = c[1] * p.s(0, 2);
    a[2][1] = 0.5;
    a[3][2] = p.s(0, 2);
    let b = vec![
        (1.0 / 6.0) * p.f(0),
        (1.0 / 3.0) * p.s(0, 2),
        (1.0 / 3.0) * p.s(0, 2),
        1.0 / 6.0,
    ];
    ExpCoeffs { a, b, c }
}
fn lawson41_gen(h: f64, modified: bool) -> ExpCoeffs {
    let c = vec![0.0, 0.5, 0.5, 1.0];
    let p = PhiAt { h, c: &c };
    let mut a = zeros(4);
    a[2][1] = 0.5;
    a[3][2] = p.s(0, 2);
    let b4 = if modified {
        p.f(2) - (1.0 / 3.0) * p.s(0, 2)
    } else {
        1.0 / 6.0
    };
    let mut b = vec![0.0, (1.0 / 3.0) * p.s(0, 2), (1.0 / 3.0) * p.s(0, 2), b4];
    first_col(&mut a, &mut b, &c, &p);
    ExpCoeffs { a, b, c }
}
fn lawson41_gen_4s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    lawson41_gen(h, false)
}
fn lawson41_gen_mod_4s(h: f64, _: f64, _: f64) -> ExpCoeffs {
    lawson41_gen(h, true)
}

/// The exponential single-step methods. `order` is the order RES4LYF's coefficients actually reach on the
/// analytic problem (checked by the convergence tests); several are lower than their names suggest, e.g.
/// res_3s's gamma rule gives order 3 only for c3 = 1, and etdrk4_4s has a32 = phi_1(-h/2) where Cox-Matthews
/// has c3 phi_1(-c3 h). RES4LYF's defaults for c2/c3 (0.5/1.0) unless the method fixes them.
/// etdrk4_4s_alt is registered corrected (Cox-Matthews' ETDRK4, see its function): as published it is not
/// consistent and does not converge.
pub static EXP_METHODS: &[ExpMethod] = &[
    ExpMethod {
        name: "ddim",
        stages: 1,
        order: 1,
        coeffs: ddim,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_2s",
        stages: 2,
        order: 2,
        coeffs: res_2s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_2s_stable",
        stages: 2,
        order: 2,
        coeffs: res_2s,
        c2: 1.0,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_2s_rkmk2e",
        stages: 2,
        order: 2,
        coeffs: res_2s_rkmk2e,
        c2: 1.0,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_3s",
        stages: 3,
        order: 3,
        coeffs: res_3s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_3s_non-monotonic",
        stages: 3,
        order: 2,
        coeffs: res_3s,
        c2: 1.0,
        c3: 0.5,
    },
    ExpMethod {
        name: "res_3s_alt",
        stages: 3,
        order: 3,
        coeffs: res_3s_alt,
        c2: 1.0 / 3.0,
        c3: 2.0 / 3.0,
    },
    ExpMethod {
        name: "res_3s_strehmel_weiner",
        stages: 3,
        order: 2,
        coeffs: res_3s_strehmel_weiner,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_3s_cox_matthews",
        stages: 3,
        order: 3,
        coeffs: res_3s_cox_matthews,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_3s_lie",
        stages: 3,
        order: 3,
        coeffs: res_3s_lie,
        c2: 1.0 / 3.0,
        c3: 2.0 / 3.0,
    },
    ExpMethod {
        name: "res_3s_sunstar",
        stages: 3,
        order: 2,
        coeffs: res_3s_sunstar,
        c2: 1.0 / 3.0,
        c3: 2.0 / 3.0,
    },
    ExpMethod {
        name: "res_4s_krogstad",
        stages: 4,
        order: 4,
        coeffs: res_4s_krogstad,
        c2: 0.5,
        c3: 0.5,
    },
    ExpMethod {
        name: "res_4s_strehmel_weiner",
        stages: 4,
        order: 4,
        coeffs: res_4s_strehmel_weiner,
        c2: 0.5,
        c3: 0.5,
    },
    ExpMethod {
        name: "res_4s_cox_matthews",
        stages: 4,
        order: 4,
        coeffs: res_4s_cox_matthews,
        c2: 0.5,
        c3: 0.5,
    },
    ExpMethod {
        name: "etdrk2_2s",
        stages: 2,
        order: 2,
        coeffs: etdrk2_2s,
        c2: 1.0,
        c3: 1.0,
    },
    ExpMethod {
        name: "etdrk3_a_3s",
        stages: 3,
        order: 3,
        coeffs: etdrk3_a_3s,
        c2: 1.0,
        c3: 2.0 / 3.0,
    },
    ExpMethod {
        name: "etdrk3_b_3s",
        stages: 3,
        order: 3,
        coeffs: etdrk3_b_3s,
        c2: 4.0 / 9.0,
        c3: 2.0 / 3.0,
    },
    ExpMethod {
        name: "etdrk4_4s",
        stages: 4,
        order: 2,
        coeffs: etdrk4_4s,
        c2: 0.5,
        c3: 0.5,
    },
    ExpMethod {
        name: "etdrk4_4s_alt",
        stages: 4,
        order: 4,
        coeffs: etdrk4_4s_alt,
        c2: 0.5,
        c3: 0.5,
    },
    ExpMethod {
        name: "irk_exp_diag_2s",
        stages: 2,
        order: 2,
        coeffs: irk_exp_diag_2s,
        c2: 1.0 / 3.0,
        c3: 2.0 / 3.0,
    },
    ExpMethod {
        name: "dpmpp_2s",
        stages: 2,
        order: 2,
        coeffs: dpmpp_2s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "dpmpp_sde_2s",
        stages: 2,
        order: 2,
        coeffs: dpmpp_2s,
        c2: 1.0,
        c3: 1.0,
    },
    ExpMethod {
        name: "dpmpp_3s",
        stages: 3,
        order: 2,
        coeffs: dpmpp_3s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_4s_krogstad_alt",
        stages: 4,
        order: 2,
        coeffs: res_4s_krogstad_alt,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_4s_strehmel_weiner_alt",
        stages: 4,
        order: 2,
        coeffs: res_4s_strehmel_weiner_alt,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_4s_cfree4",
        stages: 4,
        order: 4,
        coeffs: res_4s_cfree4,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_4s_friedli",
        stages: 4,
        order: 2,
        coeffs: res_4s_friedli,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_4s_minchev",
        stages: 4,
        order: 2,
        coeffs: res_4s_minchev,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_4s_munthe-kaas",
        stages: 4,
        order: 2,
        coeffs: res_4s_munthe_kaas,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_5s",
        stages: 5,
        order: 4,
        coeffs: res_5s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_5s_hochbruck-ostermann",
        stages: 5,
        order: 2,
        coeffs: res_5s_hochbruck_ostermann,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_6s",
        stages: 6,
        order: 4,
        coeffs: res_6s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_8s",
        stages: 8,
        order: 4,
        coeffs: res_8s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_10s",
        stages: 10,
        order: 5,
        coeffs: res_10s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "lawson2a_2s",
        stages: 2,
        order: 2,
        coeffs: lawson2a_2s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "lawson2b_2s",
        stages: 2,
        order: 2,
        coeffs: lawson2b_2s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "lawson4_4s",
        stages: 4,
        order: 4,
        coeffs: lawson4_4s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "lawson41-gen_4s",
        stages: 4,
        order: 4,
        coeffs: lawson41_gen_4s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "lawson41-gen-mod_4s",
        stages: 4,
        order: 4,
        coeffs: lawson41_gen_mod_4s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_15s",
        stages: 15,
        order: 6,
        coeffs: res_15s,
        c2: 0.5,
        c3: 1.0,
    },
    ExpMethod {
        name: "res_16s",
        stages: 16,
        order: 1,
        coeffs: res_16s,
        c2: 0.5,
        c3: 1.0,
    },
];

impl ExpMethod {
    pub fn by_name(name: &str) -> Option<&'static ExpMethod> {
        EXP_METHODS.iter().find(|m| m.name == name)
    }
    pub fn at(&self, h: f64) -> ExpCoeffs {
        (self.coeffs)(h, self.c2, self.c3)
    }
    /// Whether a stage depends on itself or a later one (irk_exp_diag_2s), so it is solved by sweeps.
    pub fn implicit(&self) -> bool {
        self.at(0.5).implicit()
    }
    /// Model calls per step: the stages, or for implicit methods one call at (x, sigma) and
    /// [`IMPLICIT_SWEEPS`] sweeps over the stages.
    pub fn calls(&self) -> usize {
        if self.implicit() {
            1 + IMPLICIT_SWEEPS * self.stages
        } else {
            self.stages
        }
    }
}

/// Gauss-Seidel sweeps over the stages of an implicit exponential method (each gains about one order; the
/// only one, irk_exp_diag_2s, is order 2).
pub const IMPLICIT_SWEEPS: usize = 2;

impl ExpCoeffs {
    pub fn implicit(&self) -> bool {
        self.a
            .iter()
            .enumerate()
            .any(|(i, r)| r[i..].iter().any(|&v| v != 0.0))
    }
}

/// SDE settings of a single-step exponential sampler (RES4LYF's noise modes, see [`super::noise_mode`]).
#[derive(Clone, Copy, Debug)]
pub struct ExpSde {
    pub mode: NoiseMode,
    pub eta: f64,
    pub s_noise: f64,
    pub vp: bool,
    pub sigma_max: f64,
}

/// Single-step exponential RK sampler. A step to sigma = 0 is the plain denoise (h is infinite there). With
/// `sde`, each step lands on the noise mode's sigma_down and then `x = alpha_ratio x + s_noise sigma_up z`
/// (RES4LYF's add_noise, without its per-channel z-score renormalization of z).
pub struct ExpRk<B> {
    pub method: &'static ExpMethod,
    pub sde: Option<ExpSde>,
    /// RES4LYF's implicit steps/substeps (deterministic steps only), see [`super::refine`].
    pub refine: Refine,
    s: Scratch<B>,
}
impl<B> ExpRk<B> {
    pub fn new(method: &'static ExpMethod) -> Self {
        Self {
            method,
            sde: None,
            refine: Refine::default(),
            s: Scratch::new(),
        }
    }
}

/// One exponential RK step given `(a, b, c)`: `den[0]` must already hold D(x, sigma) when `have_first`.
pub(crate) fn exp_step<B: Buffer>(
    cx: &mut Ctx<'_, B>,
    x: &mut B,
    bufs: &mut [B],
    k: &ExpCoeffs,
    sigma: f64,
    h: f64,
) -> Result<()> {
    let s = k.b.len();
    let (den, rest) = bufs.split_at_mut(s);
    let xs = &mut rest[0];
    let implicit = k.implicit();
    let sweeps = if implicit { IMPLICIT_SWEEPS } else { 1 };
    if implicit {
        // Every stage starts from D(x, sigma), then Gauss-Seidel sweeps (each row reads the newest values).
        cx.model.denoise(x, sigma, &mut den[0])?;
        let (first, others) = den.split_at_mut(1);
        for d in others {
            d.copy_from(&first[0])?;
        }
    }
    for st in (0..s).cycle().take(s * sweeps) {
        if !implicit && st == 0 && k.c[0] == 0.0 && k.a[0].iter().all(|&v| v == 0.0) {
            cx.model.denoise(x, sigma, &mut den[0])?;
            continue;
        }
        let row = &k.a[st];
        let sum: f64 = row.iter().sum();
        let mut terms: Vec<(f64, &B)> = vec![(1.0 - h * sum, &*x)];
        for (j, &a) in row.iter().enumerate() {
            if a != 0.0 {
                terms.push((h * a, &den[j]));
            }
        }
        xs.lincomb(0.0, &terms)?;
        let sig = sigma * (-k.c[st] * h).exp();
        cx.model.denoise(xs, sig, &mut den[st])?;
    }
    let sum: f64 = k.b.iter().sum();
    let terms: Vec<(f64, &B)> =
        k.b.iter()
            .enumerate()
            .filter(|(_, b)| **b != 0.0)
            .map(|(j, &b)| (h * b, &den[j]))
            .collect();
    x.lincomb(1.0 - h * sum, &terms)
}

impl<B: Buffer> Sampler<B> for ExpRk<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let bufs = self.s.get(self.method.stages + 1, x)?;
        if sn == 0.0 {
            let (d, _) = bufs.split_at_mut(1);
            cx.model.denoise(x, s, &mut d[0])?;
            return x.copy_from(&d[0]);
        }
        let Some(sde) = self.sde else {
            let h = (s / sn).ln();
            let k = self.method.at(h);
            if self.refine.active() {
                let mut sig: Vec<f64> = k.c.iter().map(|c| s * (-c * h).exp()).collect();
                sig.push(sn);
                let bufs = self.s.get(self.refine.buffers(self.method.stages), x)?;
                let e = StageEps::Exponential;
                return refined_step(cx, x, bufs, &k.a, &k.b, &sig, s, h, e, self.refine);
            }
            return exp_step(cx, x, bufs, &k, s, h);
        };
        let st = sde_step(sde.mode, s, sn, sde.eta, sde.vp, sde.sigma_max, false);
        if st.sigma_down > 0.0 && st.sigma_down < s {
            let h = (s / st.sigma_down).ln();
            let k = self.method.at(h);
            exp_step(cx, x, bufs, &k, s, h)?;
        } else if st.sigma_down <= 0.0 {
            cx.model.denoise(x, s, &mut bufs[0])?;
            x.copy_from(&bufs[0])?;
        }
        if st.sigma_up > 0.0 && sde.s_noise > 0.0 {
            let n = &mut bufs[1];
            cx.noise(n, s, sn)?;
            x.lincomb(st.alpha_ratio, &[(sde.s_noise * st.sigma_up, &*n)])?;
        }
        Ok(())
    }
}

/// Exponential multistep (RES4LYF res_2m/res_3m, abnorsett_2m..4m): the history of denoised values stands in
/// for the stages, at nodes `c_j = -(t_i - t_{i-j}) / h` behind the current point. The first steps (until the
/// history is full) use the single-step method of the same order.
pub struct ExpMultistep<B> {
    pub name: &'static str,
    /// Points used: the current denoised plus `order - 1` earlier ones.
    pub order: usize,
    warmup: &'static ExpMethod,
    hist: Vec<B>,
    s: Scratch<B>,
}
impl<B> ExpMultistep<B> {
    pub fn new(name: &'static str, order: usize, warmup: &'static ExpMethod) -> Self {
        Self {
            name,
            order,
            warmup,
            hist: Vec::new(),
            s: Scratch::new(),
        }
    }
}

/// b of the multistep methods for step h with history nodes `c` (c[0] = 0 the current point, c[j] < 0).
fn multistep_b(name: &str, h: f64, c: &[f64]) -> Vec<f64> {
    let p = PhiAt { h, c };
    match name {
        // res_2s with c2 = -h_prev/h.
        "res_2m" => {
            let b2 = p.f(2) / c[1];
            vec![p.f(1) - b2, b2]
        }
        // res_3s's b with c2, c3 behind: gamma from RES4LYF's formula.
        "res_3m" => {
            let (c2, c3) = (c[1], c[2]);
            let g = gamma(c2, c3);
            let b3 = p.f(2) / (g * c2 + c3);
            let b2 = g * b3;
            vec![p.f(1) - b2 - b3, b2, b3]
        }
        // dpmpp_3s's b with c2, c3 behind.
        "dpmpp_3m" => {
            let b3 = p.f(2) / c[2];
            vec![p.f(1) - b3, 0.0, b3]
        }
        // Adams-Bashforth-Norsett for equal steps (RES4LYF's coefficients ignore the node positions).
        "abnorsett_2m" => vec![p.f(1) + p.f(2), -p.f(2)],
        "abnorsett_3m" => {
            let b2 = -2.0 * p.f(2) - 2.0 * p.f(3);
            let b3 = 0.5 * p.f(2) + p.f(3);
            vec![p.f(1) - b2 - b3, b2, b3]
        }
        "abnorsett_4m" => {
            let b2 = -3.0 * p.f(2) - 5.0 * p.f(3) - 3.0 * p.f(4);
            let b3 = 1.5 * p.f(2) + 4.0 * p.f(3) + 3.0 * p.f(4);
            let b4 = (-1.0 / 3.0) * p.f(2) - p.f(3) - p.f(4);
            vec![p.f(1) - b2 - b3 - b4, b2, b3, b4]
        }
        _ => unreachable!("multistep_b called with a name not in the registry: {name}"),
    }
}

impl<B: Buffer> Sampler<B> for ExpMultistep<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        if i == 0 {
            self.hist.clear();
        }
        let need = self.order - 1;
        let bufs = self.s.get(self.warmup.stages + 1, x)?;
        if sn == 0.0 || self.hist.len() < need {
            // Single-step warm-up (or the final denoise), then remember D(x, sigma) from its first stage.
            if sn == 0.0 {
                cx.model.denoise(x, s, &mut bufs[0])?;
                x.copy_from(&bufs[0])?;
            } else {
                let h = (s / sn).ln();
                let k = self.warmup.at(h);
                exp_step(cx, x, bufs, &k, s, h)?;
            }
            let mut d = if self.hist.len() >= need && need > 0 {
                self.hist.pop().expect("non-empty")
            } else {
                bufs[0].alloc_like()?
            };
            d.copy_from(&bufs[0])?;
            self.hist.insert(0, d);
            self.hist.truncate(need.max(1));
            return Ok(());
        }
        let den = &mut bufs[0];
        cx.model.denoise(x, s, den)?;
        let h = (s / sn).ln();
        let t = -s.ln();
        let mut c = vec![0.0];
        for j in 1..self.order {
            let tj = -cx.sigmas[i - j].ln();
            c.push(-(t - tj) / h);
        }
        let b = multistep_b(self.name, h, &c);
        let sum: f64 = b.iter().sum();
        let mut terms: Vec<(f64, &B)> = vec![(h * b[0], &*den)];
        for (bj, hj) in b[1..].iter().zip(&self.hist) {
            terms.push((h * bj, hj));
        }
        x.lincomb(1.0 - h * sum, &terms)?;
        // Newest first.
        let mut d = self.hist.pop().expect("history is full here");
        d.copy_from(den)?;
        self.hist.insert(0, d);
        Ok(())
    }
}
