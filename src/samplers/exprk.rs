//! Exponential Runge-Kutta methods (RES4LYF's "res", "etdrk", "dpmpp" families) on the probability-flow ODE
//! in `t = -log sigma`, where it reads `dx/dt = D(x) - x`: the linear part is solved exactly and the
//! coefficients are phi functions of the step `h = log(sigma / sigma_next)`.
//!
//! Stage k sits at `sigma_k = sigma e^{-c_k h}` with `X_k = x + h sum_j a_kj (D_j - x)`, and the step is
//! `x' = x + h sum_j b_j (D_j - x)` (RES4LYF's form, `epsilon = denoised - x_0`). Each method is a short
//! function from `(h, c2, c3)` to `(a, b, c)` with the coefficients as RES4LYF publishes them.
use super::buffer::Buffer;
use super::phi::PhiAt;
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

/// The exponential single-step methods. `order` is the order RES4LYF's coefficients actually reach on the
/// analytic problem (checked by the convergence tests); several are lower than their names suggest, e.g.
/// res_3s's gamma rule gives order 3 only for c3 = 1, and etdrk4_4s has a32 = phi_1(-h/2) where Cox-Matthews
/// has c3 phi_1(-c3 h). RES4LYF's defaults for c2/c3 (0.5/1.0) unless the method fixes them.
/// (etdrk4_4s_alt is left out: as published it is not consistent, so it does not converge.)
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
];

impl ExpMethod {
    pub fn by_name(name: &str) -> Option<&'static ExpMethod> {
        EXP_METHODS.iter().find(|m| m.name == name)
    }
    pub fn at(&self, h: f64) -> ExpCoeffs {
        (self.coeffs)(h, self.c2, self.c3)
    }
}

/// Single-step exponential RK sampler. A step to sigma = 0 is the plain denoise (h is infinite there).
pub struct ExpRk<B> {
    pub method: &'static ExpMethod,
    s: Scratch<B>,
}
impl<B> ExpRk<B> {
    pub fn new(method: &'static ExpMethod) -> Self {
        Self {
            method,
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
    for st in 0..s {
        if st == 0 && k.c[0] == 0.0 && k.a[0].iter().all(|&v| v == 0.0) {
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
        let (done, cur) = den.split_at_mut(st);
        let _ = done;
        cx.model.denoise(xs, sig, &mut cur[0])?;
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
        let h = (s / sn).ln();
        let k = self.method.at(h);
        exp_step(cx, x, bufs, &k, s, h)
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
