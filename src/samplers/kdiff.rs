//! k-diffusion's samplers (Crowson), step for step, on the generic buffer primitive. Coefficients are
//! computed in f64; buffers see only [`Buffer::lincomb`].
use super::buffer::Buffer;
use super::stepper::{Ctx, Sampler, Scratch, ancestral_step, euler_to};
use anyhow::Result;

fn t_of(sigma: f64) -> f64 {
    -sigma.ln()
}
fn sigma_of(t: f64) -> f64 {
    (-t).exp()
}

/// Euler (Karras et al. 2022, Algorithm 2 without churn).
pub struct Euler<B> {
    s: Scratch<B>,
}
impl<B> Default for Euler<B> {
    fn default() -> Self {
        Self { s: Scratch::new() }
    }
}
impl<B: Buffer> Sampler<B> for Euler<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den] = self.s.get(1, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        euler_to(x, den, s, sn)
    }
}

/// Euler ancestral.
pub struct EulerAncestral<B> {
    pub eta: f64,
    pub s_noise: f64,
    s: Scratch<B>,
}
impl<B: Buffer> EulerAncestral<B> {
    pub fn new(eta: f64, s_noise: f64) -> Self {
        Self {
            eta,
            s_noise,
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for EulerAncestral<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, n] = self.s.get(2, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        let (down, up) = ancestral_step(s, sn, self.eta);
        if sn > 0.0 {
            // The Euler step to `down` and the noise in one pass over x.
            cx.noise(n, s, sn)?;
            let r = (down - s) / s;
            x.lincomb(1.0 + r, &[(-r, &*den), (self.s_noise * up, &*n)])?;
        } else {
            euler_to(x, den, s, down)?;
        }
        Ok(())
    }
}

/// Heun (Karras et al. 2022, Algorithm 2); the last step to sigma = 0 is Euler.
pub struct Heun<B> {
    s: Scratch<B>,
}
impl<B> Default for Heun<B> {
    fn default() -> Self {
        Self { s: Scratch::new() }
    }
}
impl<B: Buffer> Sampler<B> for Heun<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, x2, den2] = self.s.get(3, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        if sn == 0.0 {
            return euler_to(x, den, s, sn);
        }
        let dt = sn - s;
        x2.copy_from(x)?;
        euler_to(x2, den, s, sn)?;
        cx.denoise(x2, sn, den2)?;
        // x += dt/2 (d + d2), d = (x - den)/s, d2 = (x2 - den2)/sn
        let (a, b) = (0.5 * dt / s, 0.5 * dt / sn);
        x.lincomb(1.0 + a, &[(-a, &*den), (b, &*x2), (-b, &*den2)])
    }
}

/// DPM-Solver-2 style midpoint in log sigma (k-diffusion `sample_dpm_2`).
pub struct Dpm2<B> {
    s: Scratch<B>,
}
impl<B> Default for Dpm2<B> {
    fn default() -> Self {
        Self { s: Scratch::new() }
    }
}
fn dpm2_substep<B: Buffer>(
    cx: &mut Ctx<'_, B>,
    x: &mut B,
    den: &B,
    x2: &mut B,
    den2: &mut B,
    s: f64,
    to: f64,
) -> Result<()> {
    let mid = ((s.ln() + to.ln()) * 0.5).exp();
    x2.copy_from(x)?;
    euler_to(x2, den, s, mid)?;
    cx.denoise(x2, mid, den2)?;
    let r = (to - s) / mid;
    x.lincomb(1.0, &[(r, &*x2), (-r, &*den2)])
}
impl<B: Buffer> Sampler<B> for Dpm2<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, x2, den2] = self.s.get(3, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        if sn == 0.0 {
            return euler_to(x, den, s, sn);
        }
        dpm2_substep(cx, x, den, x2, den2, s, sn)
    }
}

/// DPM-2 ancestral.
pub struct Dpm2Ancestral<B> {
    pub eta: f64,
    pub s_noise: f64,
    s: Scratch<B>,
}
impl<B: Buffer> Dpm2Ancestral<B> {
    pub fn new(eta: f64, s_noise: f64) -> Self {
        Self {
            eta,
            s_noise,
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for Dpm2Ancestral<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, x2, den2, n] = self.s.get(4, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        let (down, up) = ancestral_step(s, sn, self.eta);
        if down == 0.0 {
            return euler_to(x, den, s, down);
        }
        dpm2_substep(cx, x, den, x2, den2, s, down)?;
        cx.noise(n, s, sn)?;
        x.lincomb(1.0, &[(self.s_noise * up, n)])
    }
}

/// Integral over `[t[i], t[i+1]]` of the Lagrange basis polynomial of node `t[i-j]` among `t[i-k]`,
/// k < order (k-diffusion's `linear_multistep_coeff`, integrated exactly by Gauss-Legendre).
pub fn lms_coeff(order: usize, t: &[f64], i: usize, j: usize) -> f64 {
    // 4-point Gauss-Legendre is exact for the degree <= 3 polynomials of order <= 4 (and fine beyond).
    const X: [f64; 4] = [
        -0.861_136_311_594_052_6,
        -0.339_981_043_584_856_3,
        0.339_981_043_584_856_3,
        0.861_136_311_594_052_6,
    ];
    const W: [f64; 4] = [
        0.347_854_845_137_453_9,
        0.652_145_154_862_546_1,
        0.652_145_154_862_546_1,
        0.347_854_845_137_453_9,
    ];
    let (a, b) = (t[i], t[i + 1]);
    let f = |tau: f64| {
        let mut p = 1.0;
        for k in 0..order {
            if k != j {
                p *= (tau - t[i - k]) / (t[i - j] - t[i - k]);
            }
        }
        p
    };
    let (m, r) = (0.5 * (a + b), 0.5 * (b - a));
    X.iter().zip(W).map(|(&x, w)| w * f(m + r * x)).sum::<f64>() * r
}

/// Linear multistep (LMS) on the derivative history, order 4 by default.
pub struct Lms<B> {
    pub order: usize,
    ds: Vec<B>,
    den: Scratch<B>,
}
impl<B: Buffer> Lms<B> {
    pub fn new(order: usize) -> Self {
        Self {
            order: order.clamp(1, 8),
            ds: Vec::new(),
            den: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for Lms<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let s = cx.sigmas[i];
        if i == 0 {
            self.ds.clear();
        }
        let [den] = self.den.get(1, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        // Reuse the oldest derivative buffer once the history is full.
        let mut d = if self.ds.len() >= self.order {
            self.ds.remove(0)
        } else {
            x.alloc_like()?
        };
        d.lincomb(0.0, &[(1.0 / s, &*x), (-1.0 / s, &*den)])?;
        self.ds.push(d);
        let cur = (i + 1).min(self.order);
        let terms: Vec<(f64, &B)> = (0..cur)
            .map(|j| {
                (
                    lms_coeff(cur, cx.sigmas, i, j),
                    &self.ds[self.ds.len() - 1 - j],
                )
            })
            .collect();
        x.lincomb(1.0, &terms)
    }
}

/// DPM-Solver++(2S) ancestral.
pub struct Dpmpp2sAncestral<B> {
    pub eta: f64,
    pub s_noise: f64,
    s: Scratch<B>,
}
impl<B: Buffer> Dpmpp2sAncestral<B> {
    pub fn new(eta: f64, s_noise: f64) -> Self {
        Self {
            eta,
            s_noise,
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for Dpmpp2sAncestral<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, x2, den2, n] = self.s.get(4, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        let (down, up) = ancestral_step(s, sn, self.eta);
        if down == 0.0 {
            euler_to(x, den, s, down)?;
        } else {
            let (t, tn) = (t_of(s), t_of(down));
            let h = tn - t;
            let sm = t + 0.5 * h;
            x2.lincomb(
                0.0,
                &[
                    (sigma_of(sm) / sigma_of(t), &*x),
                    (-(-h * 0.5).exp_m1(), &*den),
                ],
            )?;
            cx.denoise(x2, sigma_of(sm), den2)?;
            x.lincomb(sigma_of(tn) / sigma_of(t), &[(-(-h).exp_m1(), &*den2)])?;
        }
        if sn > 0.0 {
            cx.noise(n, s, sn)?;
            x.lincomb(1.0, &[(self.s_noise * up, n)])?;
        }
        Ok(())
    }
}

/// DPM-Solver++ SDE (k-diffusion `sample_dpmpp_sde`), two model calls and two noise draws per step.
pub struct DpmppSde<B> {
    pub eta: f64,
    pub s_noise: f64,
    pub r: f64,
    s: Scratch<B>,
}
impl<B: Buffer> DpmppSde<B> {
    pub fn new(eta: f64, s_noise: f64, r: f64) -> Self {
        Self {
            eta,
            s_noise,
            r,
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for DpmppSde<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, x2, den2, n] = self.s.get(4, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        if sn == 0.0 {
            return euler_to(x, den, s, sn);
        }
        let (t, tn) = (t_of(s), t_of(sn));
        let h = tn - t;
        let tm = t + h * self.r;
        let fac = 1.0 / (2.0 * self.r);
        let (sd, su) = ancestral_step(sigma_of(t), sigma_of(tm), self.eta);
        let s_ = t_of(sd);
        x2.lincomb(
            0.0,
            &[
                (sigma_of(s_) / sigma_of(t), &*x),
                (-(t - s_).exp_m1(), &*den),
            ],
        )?;
        cx.noise(n, sigma_of(t), sigma_of(tm))?;
        x2.lincomb(1.0, &[(self.s_noise * su, &*n)])?;
        cx.denoise(x2, sigma_of(tm), den2)?;
        let (sd, su) = ancestral_step(sigma_of(t), sigma_of(tn), self.eta);
        let tn_ = t_of(sd);
        let c = -(t - tn_).exp_m1();
        x.lincomb(
            sigma_of(tn_) / sigma_of(t),
            &[(c * (1.0 - fac), &*den), (c * fac, &*den2)],
        )?;
        cx.noise(n, sigma_of(t), sigma_of(tn))?;
        x.lincomb(1.0, &[(self.s_noise * su, &*n)])
    }
}

/// DPM-Solver++(2M).
pub struct Dpmpp2m<B> {
    s: Scratch<B>,
    have_old: bool,
}
impl<B> Default for Dpmpp2m<B> {
    fn default() -> Self {
        Self {
            s: Scratch::new(),
            have_old: false,
        }
    }
}
impl<B: Buffer> Sampler<B> for Dpmpp2m<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        if i == 0 {
            self.have_old = false;
        }
        let [den, old] = self.s.get(2, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        let (t, tn) = (t_of(s), t_of(sn));
        let h = tn - t;
        let c = -(-h).exp_m1();
        let ratio = sigma_of(tn) / sigma_of(t);
        if !self.have_old || sn == 0.0 {
            x.lincomb(ratio, &[(c, &*den)])?;
        } else {
            let h_last = t - t_of(cx.sigmas[i - 1]);
            let r = h_last / h;
            let k = 1.0 / (2.0 * r);
            x.lincomb(ratio, &[(c * (1.0 + k), &*den), (-c * k, &*old)])?;
        }
        old.copy_from(den)?;
        self.have_old = true;
        Ok(())
    }
}

/// Second-order correction of DPM-Solver++(2M) SDE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// DPM-Solver++(2M) SDE (eta = 0 gives a deterministic variant).
pub struct Dpmpp2mSde<B> {
    pub eta: f64,
    pub s_noise: f64,
    pub solver: SolverType,
    s: Scratch<B>,
    h_last: Option<f64>,
}
impl<B: Buffer> Dpmpp2mSde<B> {
    pub fn new(eta: f64, s_noise: f64, solver: SolverType) -> Self {
        Self {
            eta,
            s_noise,
            solver,
            s: Scratch::new(),
            h_last: None,
        }
    }
}
impl<B: Buffer> Sampler<B> for Dpmpp2mSde<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        if i == 0 {
            self.h_last = None;
        }
        let [den, old, n] = self.s.get(3, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        let mut h = self.h_last.unwrap_or(0.0);
        if sn == 0.0 {
            x.copy_from(den)?;
        } else {
            h = t_of(sn) - t_of(s);
            let eta_h = self.eta * h;
            let e = -(-h - eta_h).exp_m1();
            let mut c_den = e;
            let mut c_old = 0.0;
            if let Some(hl) = self.h_last {
                let r = hl / h;
                let k = match self.solver {
                    SolverType::Heun => (e / (-h - eta_h) + 1.0) / r,
                    SolverType::Midpoint => 0.5 * e / r,
                };
                c_den += k;
                c_old -= k;
            }
            let a = sn / s * (-eta_h).exp();
            // One pass over x: the update and the noise together.
            let mut terms = vec![(c_den, &*den)];
            if self.h_last.is_some() {
                terms.push((c_old, &*old));
            }
            if self.eta != 0.0 {
                cx.noise(n, s, sn)?;
                let c = sn * (-(-2.0 * eta_h).exp_m1()).sqrt() * self.s_noise;
                terms.push((c, &*n));
            }
            x.lincomb(a, &terms)?;
        }
        // The fresh denoised becomes the history (a swap, not a copy: den is rewritten next step).
        std::mem::swap(old, den);
        self.h_last = Some(h);
        Ok(())
    }
}

/// DPM-Solver++(3M) SDE.
pub struct Dpmpp3mSde<B> {
    pub eta: f64,
    pub s_noise: f64,
    s: Scratch<B>,
    h1: Option<f64>,
    h2: Option<f64>,
}
impl<B: Buffer> Dpmpp3mSde<B> {
    pub fn new(eta: f64, s_noise: f64) -> Self {
        Self {
            eta,
            s_noise,
            s: Scratch::new(),
            h1: None,
            h2: None,
        }
    }
}
impl<B: Buffer> Sampler<B> for Dpmpp3mSde<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        if i == 0 {
            self.h1 = None;
            self.h2 = None;
        }
        let bufs = self.s.get(4, x)?;
        // Rotate history: bufs[1] = denoised_1, bufs[2] = denoised_2; the fresh denoised lands in bufs[0].
        let [den, d1, d2, n] = bufs else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        let mut h = 0.0;
        if sn == 0.0 {
            x.copy_from(den)?;
        } else {
            h = t_of(sn) - t_of(s);
            let h_eta = h * (self.eta + 1.0);
            let lin = (-h_eta).exp();
            let c0 = -(-h_eta).exp_m1();
            let phi2 = (-h_eta).exp_m1() / h_eta + 1.0;
            let mut terms = match (self.h1, self.h2) {
                (Some(h1), Some(h2)) => {
                    let (r0, r1) = (h1 / h, h2 / h);
                    // d1_0 = (den - d1)/r0, d1_1 = (d1 - d2)/r1
                    // x += phi2 (d1_0 + (d1_0 - d1_1) r0/(r0+r1)) - phi3 (d1_0 - d1_1)/(r0+r1)
                    let phi3 = phi2 / h_eta - 0.5;
                    let q = r0 / (r0 + r1);
                    let a = phi2 * (1.0 + q) - phi3 / (r0 + r1); // coefficient of d1_0
                    let b = -phi2 * q + phi3 / (r0 + r1); // coefficient of d1_1
                    vec![
                        (c0 + a / r0, &*den),
                        (-a / r0 + b / r1, &*d1),
                        (-b / r1, &*d2),
                    ]
                }
                (Some(h1), None) => {
                    let r = h1 / h;
                    vec![(c0 + phi2 / r, &*den), (-phi2 / r, &*d1)]
                }
                _ => vec![(c0, &*den)],
            };
            // One pass over x: the update and the noise together.
            if self.eta != 0.0 {
                cx.noise(n, s, sn)?;
                let c = sn * (-(-2.0 * h * self.eta).exp_m1()).sqrt() * self.s_noise;
                terms.push((c, &*n));
            }
            x.lincomb(lin, &terms)?;
        }
        // Rotate the history by swaps (den is rewritten next step): d2 <- d1, d1 <- den.
        std::mem::swap(d2, d1);
        std::mem::swap(d1, den);
        self.h2 = self.h1;
        self.h1 = Some(h);
        Ok(())
    }
}
