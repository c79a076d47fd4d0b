//! ComfyUI's own KSampler samplers (beyond k-diffusion's), step for step in the VE convention of the rest of
//! this module (`x = x0 + sigma eps`, `lambda = -log sigma`, alpha = 1): CFG++ variants, Heun++, DPM-Solver
//! fast/adaptive, DDPM, LCM, iPNDM, DEIS, res_multistep, gradient estimation, ER-SDE, SEEDS, SA-Solver and
//! UniPC. Coefficients are computed in f64 on the host; buffers see only [`Buffer::lincomb`] (plus a host read
//! for dpm_adaptive's error norm).
use super::buffer::Buffer;
use super::schedule::linspace;
use super::stepper::{Ctx, Sampler, Scratch, ancestral_step, euler_to};
use anyhow::{Result, bail};

/// Newest-last history of buffers, at most `cap` long, reusing the oldest buffer's memory.
struct History<B> {
    v: Vec<B>,
}
impl<B: Buffer> History<B> {
    fn new() -> Self {
        Self { v: Vec::new() }
    }
    fn push(&mut self, src: &B, cap: usize) -> Result<()> {
        let mut b = if self.v.len() >= cap.max(1) {
            self.v.remove(0)
        } else {
            src.alloc_like()?
        };
        b.copy_from(src)?;
        self.v.push(b);
        Ok(())
    }
    /// `k` = 0 is the newest.
    fn back(&self, k: usize) -> &B {
        &self.v[self.v.len() - 1 - k]
    }
    fn len(&self) -> usize {
        self.v.len()
    }
}

/// Solve `a y = b` (small dense systems) by Gaussian elimination with partial pivoting.
pub fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f64>> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .expect("non-empty");
        if a[p][c] == 0.0 || !a[p][c].is_finite() {
            bail!(
                "singular {n}x{n} system in sampler coefficients (repeated sigmas in the schedule?)"
            );
        }
        a.swap(c, p);
        b.swap(c, p);
        for r in c + 1..n {
            let f = a[r][c] / a[c][c];
            let pivot = a[c].clone();
            for (ark, pk) in a[r].iter_mut().zip(&pivot).skip(c) {
                *ark -= f * pk;
            }
            b[r] -= f * b[c];
        }
    }
    let mut y = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| a[r][k] * y[k]).sum();
        y[r] = (b[r] - s) / a[r][r];
    }
    Ok(y)
}

fn lam(sigma: f64) -> f64 {
    -sigma.ln()
}

// ---------------------------------------------------------------------------------------------------------
// CFG++ Euler (ancestral): the step direction uses the unconditional prediction, the landing point the guided
// one (Chung et al. 2024).

pub struct EulerCfgPp<B> {
    pub eta: f64,
    pub s_noise: f64,
    s: Scratch<B>,
}
impl<B> EulerCfgPp<B> {
    pub fn new(eta: f64, s_noise: f64) -> Self {
        Self {
            eta,
            s_noise,
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for EulerCfgPp<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, unc, n] = self.s.get(3, x)? else {
            unreachable!()
        };
        cx.denoise_uncond(x, s, den, unc)?;
        if sn == 0.0 {
            return x.copy_from(den);
        }
        let (down, up) = ancestral_step(s, sn, self.eta);
        // x = den + down (x - unc) / s
        x.lincomb(down / s, &[(1.0, &*den), (-down / s, &*unc)])?;
        if self.eta > 0.0 && self.s_noise > 0.0 {
            cx.noise(n, s, sn)?;
            x.lincomb(1.0, &[(self.s_noise * up, &*n)])?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
/// Heun++ (ComfyUI heunpp2): a three-point derivative average whose weights depend on sigma_0.
pub struct Heunpp2<B> {
    s: Scratch<B>,
}
impl<B> Default for Heunpp2<B> {
    fn default() -> Self {
        Self { s: Scratch::new() }
    }
}
impl<B: Buffer> Sampler<B> for Heunpp2<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let sig = cx.sigmas;
        let (s, sn, s_end) = (sig[i], sig[i + 1], *sig.last().expect("non-empty"));
        let [den, x2, den2, x3, den3] = self.s.get(5, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        let dt = sn - s;
        if sn == s_end {
            return euler_to(x, den, s, sn);
        }
        x2.copy_from(x)?;
        euler_to(x2, den, s, sn)?;
        cx.denoise(x2, sn, den2)?;
        if sig[i + 2] == s_end {
            let w2 = sn / (2.0 * sig[0]);
            let w1 = 1.0 - w2;
            let (a, b) = (dt * w1 / s, dt * w2 / sn);
            return x.lincomb(1.0 + a, &[(-a, &*den), (b, &*x2), (-b, &*den2)]);
        }
        let s2 = sig[i + 2];
        x3.copy_from(x2)?;
        euler_to(x3, den2, sn, s2)?;
        cx.denoise(x3, s2, den3)?;
        let w = 3.0 * sig[0];
        let (w2, w3) = (sn / w, s2 / w);
        let w1 = 1.0 - w2 - w3;
        let (a, b, c) = (dt * w1 / s, dt * w2 / sn, dt * w3 / s2);
        x.lincomb(
            1.0 + a,
            &[
                (-a, &*den),
                (b, &*x2),
                (-b, &*den2),
                (c, &*x3),
                (-c, &*den3),
            ],
        )
    }
}

// ---------------------------------------------------------------------------------------------------------
// DPM-Solver (Lu et al. 2022) in t = -log sigma with eps = (x - D) / sigma, as k-diffusion's DPMSolver class.

struct DpmBufs<'a, B> {
    eps: &'a mut B,
    eps1: &'a mut B,
    eps2: &'a mut B,
    u: &'a mut B,
    den: &'a mut B,
}
fn sigma_t(t: f64) -> f64 {
    (-t).exp()
}
fn dpm_eps<B: Buffer>(cx: &mut Ctx<'_, B>, x: &B, t: f64, den: &mut B, eps: &mut B) -> Result<()> {
    let s = sigma_t(t);
    cx.denoise(x, s, den)?;
    eps.lincomb(0.0, &[(1.0 / s, x), (-1.0 / s, &*den)])
}
/// DPM-Solver-k step from (x, t) to t_next into `out`, reusing `b.eps` (already at (x, t)) and, when
/// `have_r1`, `b.eps1` (at r1 = 1/3). Returns whether eps1 was (re)computed at r1.
#[allow(clippy::too_many_arguments)]
fn dpm_step<B: Buffer>(
    cx: &mut Ctx<'_, B>,
    x: &B,
    t: f64,
    tn: f64,
    k: usize,
    r1: f64,
    b: &mut DpmBufs<'_, B>,
    out: &mut B,
    have_r1: bool,
) -> Result<()> {
    let h = tn - t;
    let st = sigma_t(tn);
    match k {
        1 => out.lincomb(0.0, &[(1.0, x), (-st * h.exp_m1(), &*b.eps)]),
        2 => {
            if !have_r1 {
                let s1 = t + r1 * h;
                b.u.lincomb(
                    0.0,
                    &[(1.0, x), (-sigma_t(s1) * (r1 * h).exp_m1(), &*b.eps)],
                )?;
                dpm_eps(cx, b.u, s1, b.den, b.eps1)?;
            }
            let e = h.exp_m1();
            let c = st / (2.0 * r1) * e;
            out.lincomb(0.0, &[(1.0, x), (-st * e + c, &*b.eps), (-c, &*b.eps1)])
        }
        _ => {
            let (r1, r2) = (1.0 / 3.0, 2.0 / 3.0);
            let (s1, s2) = (t + r1 * h, t + r2 * h);
            if !have_r1 {
                b.u.lincomb(
                    0.0,
                    &[(1.0, x), (-sigma_t(s1) * (r1 * h).exp_m1(), &*b.eps)],
                )?;
                dpm_eps(cx, b.u, s1, b.den, b.eps1)?;
            }
            let e2 = (r2 * h).exp_m1();
            let c = sigma_t(s2) * (r2 / r1) * (e2 / (r2 * h) - 1.0);
            b.u.lincomb(
                0.0,
                &[(1.0, x), (-sigma_t(s2) * e2 + c, &*b.eps), (-c, &*b.eps1)],
            )?;
            dpm_eps(cx, b.u, s2, b.den, b.eps2)?;
            let e = h.exp_m1();
            let c = st / r2 * (e / h - 1.0);
            out.lincomb(0.0, &[(1.0, x), (-st * e + c, &*b.eps), (-c, &*b.eps2)])
        }
    }
}

/// The range ComfyUI gives DPM-Solver-fast/adaptive: from sigmas[0] to the last nonzero sigma.
fn dpm_range(sigmas: &[f64]) -> (f64, f64) {
    let n = sigmas.len();
    let lo = if sigmas[n - 1] == 0.0 {
        sigmas[n - 2]
    } else {
        sigmas[n - 1]
    };
    (sigmas[0], lo)
}

/// DPM-Solver-fast: `len(sigmas) - 1` model calls on its own steps (uniform in log sigma, orders 3..3,2,1)
/// from sigmas[0] to the last nonzero sigma, as ComfyUI runs it (no final denoise to 0). The whole solve
/// happens in the first `step`; later steps leave x as it is.
pub struct DpmFast<B> {
    s: Scratch<B>,
}
impl<B> Default for DpmFast<B> {
    fn default() -> Self {
        Self { s: Scratch::new() }
    }
}
impl<B: Buffer> Sampler<B> for DpmFast<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        if i != 0 {
            return Ok(());
        }
        let nfe = cx.sigmas.len() - 1;
        let (hi, lo) = dpm_range(cx.sigmas);
        let (t0, t1) = (lam(hi), lam(lo));
        let m = nfe / 3 + 1;
        let ts = linspace(t0, t1, m + 1);
        let orders: Vec<usize> = if nfe.is_multiple_of(3) {
            let mut o = vec![3; m - 2];
            o.extend([2, 1]);
            o
        } else {
            let mut o = vec![3; m - 1];
            o.push(nfe % 3);
            o
        };
        let [eps, eps1, eps2, u, den, out] = self.s.get(6, x)? else {
            unreachable!()
        };
        let mut b = DpmBufs {
            eps,
            eps1,
            eps2,
            u,
            den,
        };
        for (k, &ord) in orders.iter().enumerate() {
            dpm_eps(cx, x, ts[k], b.den, b.eps)?;
            dpm_step(cx, x, ts[k], ts[k + 1], ord, 0.5, &mut b, out, false)?;
            x.copy_from(out)?;
        }
        Ok(())
    }
}

/// DPM-Solver-23 with PID step-size control (k-diffusion's defaults: rtol 0.05, atol 0.0078, h_init 0.05,
/// I-controller, accept_safety 0.81), from sigmas[0] to the last nonzero sigma; the whole solve happens in
/// the first `step`. The error norm reads the buffers on the host.
pub struct DpmAdaptive<B> {
    s: Scratch<B>,
    /// Model calls of the last solve.
    pub nfe: usize,
}
impl<B> Default for DpmAdaptive<B> {
    fn default() -> Self {
        Self {
            s: Scratch::new(),
            nfe: 0,
        }
    }
}
impl<B: Buffer> Sampler<B> for DpmAdaptive<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        if i != 0 {
            return Ok(());
        }
        let (hi, lo) = dpm_range(cx.sigmas);
        let (t_start, t_end) = (lam(hi), lam(lo));
        // k-diffusion makes atol and rtol float32 tensors; use the same rounded values.
        let (atol, rtol) = (0.0078f32 as f64, 0.05f32 as f64);
        let order = 3.0;
        let (b1, b2, b3) = (1.0 / order, 0.0, 0.0); // pcoeff 0, icoeff 1, dcoeff 0
        let (safety, eps_pid) = (0.81, 1e-8);
        let mut h = 0.05;
        let mut errs: Vec<f64> = vec![];
        let [eps, eps1, eps2, u, den, xl, xh, xp] = self.s.get(8, x)? else {
            unreachable!()
        };
        xp.copy_from(x)?;
        let mut b = DpmBufs {
            eps,
            eps1,
            eps2,
            u,
            den,
        };
        let mut s = t_start;
        self.nfe = 0;
        let mut guard = 0usize;
        while s < t_end - 1e-5 {
            guard += 1;
            if guard > 100_000 {
                bail!("dpm_adaptive: no convergence after 100000 attempted steps");
            }
            let t = t_end.min(s + h);
            dpm_eps(cx, x, s, b.den, b.eps)?;
            dpm_step(cx, x, s, t, 2, 1.0 / 3.0, &mut b, xl, false)?;
            dpm_step(cx, x, s, t, 3, 1.0 / 3.0, &mut b, xh, true)?;
            self.nfe += 3;
            let (lv, hv, pv) = (xl.to_host_f64()?, xh.to_host_f64()?, xp.to_host_f64()?);
            let ss: f64 = lv
                .iter()
                .zip(&hv)
                .zip(&pv)
                .map(|((l, h), p)| {
                    let delta = atol.max(rtol * l.abs().max(p.abs()));
                    ((l - h) / delta).powi(2)
                })
                .sum();
            let error = ss.sqrt() / (lv.len() as f64).sqrt();
            let inv = 1.0 / (error + eps_pid);
            if errs.is_empty() {
                errs = vec![inv; 3];
            }
            errs[0] = inv;
            let f = errs[0].powf(b1) * errs[1].powf(b2) * errs[2].powf(b3);
            let factor = 1.0 + (f - 1.0).atan();
            let accept = factor >= safety;
            if accept {
                errs[2] = errs[1];
                errs[1] = errs[0];
            }
            h *= factor;
            if accept {
                xp.copy_from(xl)?;
                x.copy_from(xh)?;
                s = t;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
/// CFG++ DPM-Solver++(2S) ancestral (VE branch of ComfyUI's sampler; its second call's guided output is unused).
pub struct Dpmpp2sAncestralCfgPp<B> {
    pub eta: f64,
    pub s_noise: f64,
    s: Scratch<B>,
}
impl<B> Dpmpp2sAncestralCfgPp<B> {
    pub fn new(eta: f64, s_noise: f64) -> Self {
        Self {
            eta,
            s_noise,
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for Dpmpp2sAncestralCfgPp<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, unc, x2, den2, unc2, n] = self.s.get(6, x)? else {
            unreachable!()
        };
        cx.denoise_uncond(x, s, den, unc)?;
        let (down, up) = ancestral_step(s, sn, self.eta);
        // The guidance vector den - unc is added at the end of the step.
        if down == 0.0 {
            euler_to(x, unc, s, down)?;
        } else {
            let (t, tn) = (lam(s), lam(down));
            let h = tn - t;
            let sm = t + 0.5 * h;
            x2.lincomb(
                0.0,
                &[(sigma_t(sm) / s, &*x), (-(-h * 0.5).exp_m1(), &*unc)],
            )?;
            cx.denoise_uncond(x2, sigma_t(sm), den2, unc2)?;
            x.lincomb(sigma_t(tn) / s, &[(-(-h).exp_m1(), &*unc2)])?;
        }
        if sn > 0.0 {
            cx.noise(n, s, sn)?;
            x.lincomb(1.0, &[(self.s_noise * up, &*n)])?;
        }
        x.lincomb(1.0, &[(1.0, &*den), (-1.0, &*unc)])
    }
}

/// CFG++ DPM-Solver++(2M).
pub struct Dpmpp2mCfgPp<B> {
    s: Scratch<B>,
    have_old: bool,
}
impl<B> Default for Dpmpp2mCfgPp<B> {
    fn default() -> Self {
        Self {
            s: Scratch::new(),
            have_old: false,
        }
    }
}
impl<B: Buffer> Sampler<B> for Dpmpp2mCfgPp<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        if i == 0 {
            self.have_old = false;
        }
        let [den, unc, old] = self.s.get(3, x)? else {
            unreachable!()
        };
        cx.denoise_uncond(x, s, den, unc)?;
        if sn == 0.0 {
            x.copy_from(den)?;
        } else {
            let h = lam(sn) - lam(s);
            let e = (-h).exp();
            // x = den - e unc [- expm1(-h)/(2r) (den - old_unc)] + e x
            if !self.have_old {
                x.lincomb(e, &[(1.0, &*den), (-e, &*unc)])?;
            } else {
                let h_last = lam(s) - lam(cx.sigmas[i - 1]);
                let k = -(-h).exp_m1() / (2.0 * h_last / h);
                x.lincomb(e, &[(1.0 + k, &*den), (-e, &*unc), (-k, &*old)])?;
            }
        }
        old.copy_from(unc)?;
        self.have_old = true;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
/// DDPM ancestral step (ComfyUI's `sample_ddpm`, VP arithmetic on the VE sample).
pub struct Ddpm<B> {
    s: Scratch<B>,
}
impl<B> Default for Ddpm<B> {
    fn default() -> Self {
        Self { s: Scratch::new() }
    }
}
impl<B: Buffer> Sampler<B> for Ddpm<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, n] = self.s.get(2, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        let ac = 1.0 / (s * s + 1.0);
        let acp = 1.0 / (sn * sn + 1.0);
        let alpha = ac / acp;
        // mu = sqrt(1/alpha) (x_vp - (1 - alpha) eps / sqrt(1 - ac)), x_vp = x / sqrt(1 + s^2), eps = (x - den)/s
        let k = (1.0 / alpha).sqrt();
        let ce = (1.0 - alpha) / (1.0 - ac).sqrt() / s;
        let cx_ = k * (1.0 / (1.0 + s * s).sqrt() - ce);
        let cd = k * ce;
        let out_scale = if sn != 0.0 {
            (1.0 + sn * sn).sqrt()
        } else {
            1.0
        };
        x.lincomb(cx_ * out_scale, &[(cd * out_scale, &*den)])?;
        if sn > 0.0 {
            let c = ((1.0 - alpha) * (1.0 - acp) / (1.0 - ac)).sqrt();
            cx.noise(n, s, sn)?;
            x.lincomb(1.0, &[(c * out_scale, &*n)])?;
        }
        Ok(())
    }
}

/// LCM: jump to the denoised sample, then renoise to the next sigma (VE: `x = den + sigma_next s_noise z`).
pub struct Lcm<B> {
    pub s_noise: f64,
    s: Scratch<B>,
}
impl<B> Lcm<B> {
    pub fn new(s_noise: f64) -> Self {
        Self {
            s_noise,
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for Lcm<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, n] = self.s.get(2, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        x.copy_from(den)?;
        if sn > 0.0 {
            cx.noise(n, s, sn)?;
            x.lincomb(1.0, &[(sn * self.s_noise, &*n)])?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
/// iPNDM (fixed Adams-Bashforth weights) and iPNDM-v (variable-step weights) on d = (x - D)/sigma, max order 4
/// (Zhang & Chen, zju-pi/diff-sampler, as ComfyUI ships them).
pub struct Ipndm<B> {
    pub variable: bool,
    pub max_order: usize,
    hist: History<B>,
    s: Scratch<B>,
}
impl<B: Buffer> Ipndm<B> {
    pub fn new(variable: bool) -> Self {
        Self {
            variable,
            max_order: 4,
            hist: History::new(),
            s: Scratch::new(),
        }
    }
}
/// iPNDM-v's coefficients of (d_cur, d_-1, d_-2, d_-3) for step i on `t` (= sigmas).
fn ipndm_v_coeffs(t: &[f64], i: usize, order: usize) -> Vec<f64> {
    let h_n = t[i + 1] - t[i];
    match order {
        1 => vec![1.0],
        2 => {
            let h1 = t[i] - t[i - 1];
            vec![(2.0 + h_n / h1) / 2.0, -(h_n / h1) / 2.0]
        }
        3 => {
            let h1 = t[i] - t[i - 1];
            let h2 = t[i - 1] - t[i - 2];
            let temp =
                (1.0 - h_n / (3.0 * (h_n + h1)) * (h_n * (h_n + h1)) / (h1 * (h1 + h2))) / 2.0;
            vec![
                (2.0 + h_n / h1) / 2.0 + temp,
                -(h_n / h1) / 2.0 - (1.0 + h1 / h2) * temp,
                temp * h1 / h2,
            ]
        }
        _ => {
            let h1 = t[i] - t[i - 1];
            let h2 = t[i - 1] - t[i - 2];
            let h3 = t[i - 2] - t[i - 3];
            let temp1 =
                (1.0 - h_n / (3.0 * (h_n + h1)) * (h_n * (h_n + h1)) / (h1 * (h1 + h2))) / 2.0;
            let temp2 = ((1.0 - h_n / (3.0 * (h_n + h1))) / 2.0
                + (1.0 - h_n / (2.0 * (h_n + h1))) * h_n / (6.0 * (h_n + h1 + h2)))
                * (h_n * (h_n + h1) * (h_n + h1 + h2))
                / (h1 * (h1 + h2) * (h1 + h2 + h3));
            let q = h1 * (h1 + h2) / (h2 * (h2 + h3));
            vec![
                (2.0 + h_n / h1) / 2.0 + temp1 + temp2,
                -(h_n / h1) / 2.0 - (1.0 + h1 / h2) * temp1 - (1.0 + h1 / h2 + q) * temp2,
                temp1 * h1 / h2 + (h1 / h2 + q * (1.0 + h2 / h3)) * temp2,
                -temp2 * q * h1 / h2,
            ]
        }
    }
}
impl<B: Buffer> Sampler<B> for Ipndm<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        if i == 0 {
            self.hist.v.clear();
        }
        let [den, d] = self.s.get(2, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        d.lincomb(0.0, &[(1.0 / s, &*x), (-1.0 / s, &*den)])?;
        let order = self.max_order.min(i + 1).min(self.hist.len() + 1);
        if sn == 0.0 {
            x.copy_from(den)?;
        } else {
            let c: Vec<f64> = if self.variable {
                ipndm_v_coeffs(cx.sigmas, i, order)
            } else {
                match order {
                    1 => vec![1.0],
                    2 => vec![1.5, -0.5],
                    3 => vec![23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0],
                    _ => vec![55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0],
                }
            };
            let dt = sn - s;
            let mut terms: Vec<(f64, &B)> = vec![(dt * c[0], &*d)];
            for (k, ck) in c.iter().enumerate().skip(1) {
                terms.push((dt * ck, self.hist.back(k - 1)));
            }
            x.lincomb(1.0, &terms)?;
        }
        self.hist.push(d, self.max_order - 1)
    }
}

// ---------------------------------------------------------------------------------------------------------
/// DEIS ('tab' mode, max order 3) as ComfyUI ships it (zju-pi/diff-sampler): the sigmas are mapped to VP time
/// with the EDM range (0.002, 80), and each coefficient is a 10000-point Riemann sum of the exponential
/// integrand times a Lagrange basis polynomial.
pub struct Deis<B> {
    pub max_order: usize,
    coeffs: Vec<Vec<f64>>,
    hist: History<B>,
    s: Scratch<B>,
}
impl<B: Buffer> Deis<B> {
    pub fn new(max_order: usize) -> Self {
        Self {
            max_order: max_order.clamp(1, 4),
            coeffs: vec![],
            hist: History::new(),
            s: Scratch::new(),
        }
    }
}
/// The DEIS 'tab' coefficient list for a schedule.
pub fn deis_coeffs(sigmas: &[f64], max_order: usize) -> Vec<Vec<f64>> {
    let (eps_s, smin, smax): (f64, f64, f64) = (1e-3, 0.002, 80.0);
    let beta_d =
        2.0 * ((smin * smin + 1.0).ln() / eps_s - (smax * smax + 1.0).ln()) / (eps_s - 1.0);
    let beta_min = (smax * smax + 1.0).ln() - 0.5 * beta_d;
    let (b0, b1) = (beta_min, beta_d + beta_min);
    let t: Vec<f64> = sigmas
        .iter()
        .map(|&s| {
            ((beta_min * beta_min + 2.0 * beta_d * (s * s + 1.0).ln()).sqrt() - beta_min) / beta_d
        })
        .collect();
    const N: usize = 10000;
    let mut out = vec![];
    for i in 0..t.len() - 1 {
        let order = (i + 1).min(max_order);
        if order == 1 {
            out.push(vec![]);
            continue;
        }
        let taus = linspace(t[i], t[i + 1], N);
        let dtau = (t[i + 1] - t[i]) / N as f64;
        let prev: Vec<f64> = (0..order).map(|k| t[i - k]).collect();
        let integrand: Vec<f64> = taus
            .iter()
            .map(|&tau| {
                let alpha = (-0.5 * tau * tau * (b1 - b0) - tau * b0).exp();
                let dlog = -tau * (b1 - b0) - b0;
                -0.5 * dlog / (alpha * (1.0 - alpha)).sqrt()
            })
            .collect();
        let c = (0..order)
            .map(|j| {
                let s: f64 = taus
                    .iter()
                    .zip(&integrand)
                    .map(|(&tau, &g)| {
                        let mut p = 1.0;
                        for (k, &pk) in prev.iter().enumerate() {
                            if k != j {
                                p *= (tau - pk) / (prev[j] - pk);
                            }
                        }
                        g * p
                    })
                    .sum();
                s * dtau
            })
            .collect();
        out.push(c);
    }
    out
}
impl<B: Buffer> Sampler<B> for Deis<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        if i == 0 || self.coeffs.len() != cx.sigmas.len() - 1 {
            self.coeffs = deis_coeffs(cx.sigmas, self.max_order);
            self.hist.v.clear();
        }
        let [den, d] = self.s.get(2, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        d.lincomb(0.0, &[(1.0 / s, &*x), (-1.0 / s, &*den)])?;
        let mut order = self.max_order.min(i + 1).min(self.hist.len() + 1);
        if sn <= 0.0 {
            order = 1;
        }
        if order == 1 {
            x.lincomb(1.0, &[(sn - s, &*d)])?;
        } else {
            let c = &self.coeffs[i];
            let mut terms: Vec<(f64, &B)> = vec![(c[0], &*d)];
            for (k, ck) in c.iter().enumerate().skip(1).take(order - 1) {
                terms.push((*ck, self.hist.back(k - 1)));
            }
            x.lincomb(1.0, &terms)?;
        }
        self.hist.push(d, self.max_order - 1)
    }
}

// ---------------------------------------------------------------------------------------------------------
/// ComfyUI's res_multistep (second-order exponential multistep, arXiv 2308.02157), with ancestral noise
/// (eta) and CFG++ options.
pub struct ResMultistep<B> {
    pub eta: f64,
    pub s_noise: f64,
    pub cfg_pp: bool,
    old_down: Option<f64>,
    s: Scratch<B>,
}
impl<B> ResMultistep<B> {
    pub fn new(eta: f64, s_noise: f64, cfg_pp: bool) -> Self {
        Self {
            eta,
            s_noise,
            cfg_pp,
            old_down: None,
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for ResMultistep<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        if i == 0 {
            self.old_down = None;
        }
        let [den, unc, old, n] = self.s.get(4, x)? else {
            unreachable!()
        };
        if self.cfg_pp {
            cx.denoise_uncond(x, s, den, unc)?;
        } else {
            cx.denoise(x, s, den)?;
        }
        let (down, up) = ancestral_step(s, sn, self.eta);
        match self.old_down {
            Some(od) if down != 0.0 => {
                let (t, t_old, t_next, t_prev) =
                    (lam(s), lam(od), lam(down), lam(cx.sigmas[i - 1]));
                let h = t_next - t;
                let c2 = (t_prev - t_old) / h;
                let phi1 = (-h).exp_m1() / (-h);
                let phi2 = (phi1 - 1.0) / (-h);
                let nan0 = |v: f64| if v.is_nan() { 0.0 } else { v };
                let (b1, b2) = (nan0(phi1 - phi2 / c2), nan0(phi2 / c2));
                let e = (-h).exp();
                if self.cfg_pp {
                    // x = e (x + den - unc) + h (b1 unc + b2 old)
                    x.lincomb(e, &[(e, &*den), (h * b1 - e, &*unc), (h * b2, &*old)])?;
                } else {
                    x.lincomb(e, &[(h * b1, &*den), (h * b2, &*old)])?;
                }
            }
            _ => {
                if self.cfg_pp {
                    // x = den + down (x - unc)/s
                    x.lincomb(down / s, &[(1.0, &*den), (-down / s, &*unc)])?;
                } else {
                    euler_to(x, den, s, down)?;
                }
            }
        }
        if sn > 0.0 && up != 0.0 {
            cx.noise(n, s, sn)?;
            x.lincomb(1.0, &[(self.s_noise * up, &*n)])?;
        }
        old.copy_from(if self.cfg_pp { &*unc } else { &*den })?;
        self.old_down = Some(down);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
/// Gradient estimation (Permenter & Yuan): Euler plus `(gamma - 1)(d - d_prev) dt`, gamma = 2 by default.
pub struct GradientEstimation<B> {
    pub gamma: f64,
    pub cfg_pp: bool,
    have_old: bool,
    s: Scratch<B>,
}
impl<B> GradientEstimation<B> {
    pub fn new(gamma: f64, cfg_pp: bool) -> Self {
        Self {
            gamma,
            cfg_pp,
            have_old: false,
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for GradientEstimation<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        if i == 0 {
            self.have_old = false;
        }
        let [den, unc, d, old_d] = self.s.get(4, x)? else {
            unreachable!()
        };
        if self.cfg_pp {
            cx.denoise_uncond(x, s, den, unc)?;
            d.lincomb(0.0, &[(1.0 / s, &*x), (-1.0 / s, &*unc)])?;
        } else {
            cx.denoise(x, s, den)?;
            d.lincomb(0.0, &[(1.0 / s, &*x), (-1.0 / s, &*den)])?;
        }
        let dt = sn - s;
        if sn == 0.0 {
            x.copy_from(den)?;
        } else {
            if self.cfg_pp {
                x.lincomb(0.0, &[(1.0, &*den), (sn, &*d)])?;
            } else {
                x.lincomb(1.0, &[(dt, &*d)])?;
            }
            if self.have_old {
                let g = (self.gamma - 1.0) * dt;
                x.lincomb(1.0, &[(g, &*d), (-g, &*old_d)])?;
            }
        }
        old_d.copy_from(d)?;
        self.have_old = true;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
/// ER-SDE-Solver-3 (Cui et al. 2023) with ComfyUI's default noise scaler `x (e^{x^0.3} + 10)` and 200-point
/// quadrature; VE: lambda_er = sigma.
pub struct ErSde<B> {
    pub s_noise: f64,
    pub max_stage: usize,
    have: usize,
    s: Scratch<B>,
}
impl<B> ErSde<B> {
    pub fn new(s_noise: f64) -> Self {
        Self {
            s_noise,
            max_stage: 3,
            have: 0,
            s: Scratch::new(),
        }
    }
}
fn er_scaler(x: f64) -> f64 {
    x * (x.powf(0.3).exp() + 10.0)
}
impl<B: Buffer> Sampler<B> for ErSde<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let sig = cx.sigmas;
        let (s, sn) = (sig[i], sig[i + 1]);
        if i == 0 {
            self.have = 0;
        }
        let [den, old, dd, old_dd, n] = self.s.get(5, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        let stage = self.max_stage.min(i + 1).min(self.have + 1);
        if sn == 0.0 {
            x.copy_from(den)?;
        } else {
            // One fused update `x = r x + (1 - r) den + a dd + k (dd - old_dd) + noise` (ComfyUI applies the terms
            // one by one; the same sum, a few roundings apart), so a step makes 3 passes over the latent.
            let (ls, lt) = (s, sn);
            let r = er_scaler(lt) / er_scaler(ls);
            let c_den = 1.0 - r;
            let (mut c_dd, mut c_old_dd) = (0.0, 0.0);
            if stage >= 2 {
                let dt = lt - ls;
                let step = -dt / 200.0;
                let pos: Vec<f64> = (0..200).map(|k| lt + k as f64 * step).collect();
                let sum_inv: f64 = pos.iter().map(|&p| 1.0 / er_scaler(p)).sum::<f64>() * step;
                let c = 1.0 / (ls - sig[i - 1]);
                // dd = (den - old) / (ls - sigma_{i-1})
                dd.lincomb(0.0, &[(c, &*den), (-c, &*old)])?;
                c_dd = dt + sum_inv * er_scaler(lt);
                if stage >= 3 {
                    let s_u: f64 = pos.iter().map(|&p| (p - ls) / er_scaler(p)).sum::<f64>() * step;
                    let cu = 1.0 / ((ls - sig[i - 2]) / 2.0);
                    let k = dt * dt / 2.0 + s_u * er_scaler(lt);
                    c_dd += k * cu;
                    c_old_dd = -k * cu;
                }
            }
            let mut c_noise = 0.0;
            if self.s_noise > 0.0 {
                let v = lt * lt - ls * ls * r * r;
                let c = if v.is_nan() { 0.0 } else { v.sqrt() };
                let c = if c.is_nan() { 0.0 } else { c };
                cx.noise(n, s, sn)?;
                c_noise = self.s_noise * c;
            }
            let mut terms: Vec<(f64, &B)> = vec![(c_den, &*den)];
            if stage >= 2 {
                terms.push((c_dd, &*dd));
            }
            if stage >= 3 {
                terms.push((c_old_dd, &*old_dd));
            }
            if self.s_noise > 0.0 {
                terms.push((c_noise, &*n));
            }
            x.lincomb(r, &terms)?;
            if stage >= 2 {
                std::mem::swap(dd, old_dd);
            }
        }
        std::mem::swap(old, den);
        self.have += 1;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
/// SEEDS-2 / SEEDS-3 (Gonzalez et al. 2023), data prediction, VE: stage noise is carried between stages.
pub struct Seeds<B> {
    pub stages: usize,
    pub eta: f64,
    pub s_noise: f64,
    s: Scratch<B>,
}
impl<B> Seeds<B> {
    pub fn new(stages: usize, eta: f64, s_noise: f64) -> Self {
        Self {
            stages,
            eta,
            s_noise,
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for Seeds<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let [den, x2, den2, sde, n] = self.s.get(5, x)? else {
            unreachable!()
        };
        cx.denoise(x, s, den)?;
        if sn == 0.0 {
            return x.copy_from(den);
        }
        let inject = self.eta > 0.0 && self.s_noise > 0.0;
        let (ls, lt) = (lam(s), lam(sn));
        let h = lt - ls;
        let eta = self.eta;
        let h_eta = h * (eta + 1.0);
        let phi1 = |v: f64| v.exp_m1();
        let phi2 = |v: f64| (v.exp_m1() - v) / v;
        let r1 = if self.stages == 2 { 0.5 } else { 1.0 / 3.0 };
        let l1 = ls + r1 * (lt - ls);
        let s1 = (-l1).exp();
        let a1 = s1 * l1.exp();
        // Stage 1: x2 = s1/s e^{-r1 h eta} x - a1 phi1(-r1 h_eta) den
        x2.lincomb(
            0.0,
            &[
                (s1 / s * (-r1 * h * eta).exp(), &*x),
                (-a1 * phi1(-r1 * h_eta), &*den),
            ],
        )?;
        if inject {
            cx.noise(n, s, s1)?;
            sde.lincomb(0.0, &[((-(-2.0 * r1 * h * eta).exp_m1()).sqrt(), &*n)])?;
            x2.lincomb(1.0, &[(s1 * self.s_noise, &*sde)])?;
        }
        cx.denoise(x2, s1, den2)?;
        let at = sn * lt.exp();
        let lin = sn / s * (-h * eta).exp();
        if self.stages == 2 {
            let fac = 1.0 / (2.0 * r1);
            let c = -at * phi1(-h_eta);
            // den_d = den + fac (den2 - den)
            x.lincomb(lin, &[(c * (1.0 - fac), &*den), (c * fac, &*den2)])?;
            if inject {
                let seg = (r1 - 1.0) * h * eta;
                cx.noise(n, s1, sn)?;
                sde.lincomb(seg.exp(), &[((-(2.0 * seg).exp_m1()).sqrt(), &*n)])?;
                x.lincomb(1.0, &[(sn * self.s_noise, &*sde)])?;
            }
            return Ok(());
        }
        // SEEDS-3: stage at r2 = 2/3 (x2 and den2 buffers reused for x3 and den3 after the stage-2 values
        // are folded in).
        let r2 = 2.0 / 3.0;
        let l2 = ls + r2 * (lt - ls);
        let s2 = (-l2).exp();
        let a2 = s2 * l2.exp();
        let a3_2 = r2 / r1 * phi2(-r2 * h_eta);
        let a3_1 = phi1(-r2 * h_eta) - a3_2;
        let b3 = phi2(-h_eta) / r2;
        let b1 = phi1(-h_eta) - b3;
        // x3 into x2: s2/s e^{-r2 h eta} x - a2 (a3_1 den + a3_2 den2)
        x2.lincomb(
            0.0,
            &[
                (s2 / s * (-r2 * h * eta).exp(), &*x),
                (-a2 * a3_1, &*den),
                (-a2 * a3_2, &*den2),
            ],
        )?;
        if inject {
            let seg = (r1 - r2) * h * eta;
            cx.noise(n, s1, s2)?;
            sde.lincomb(seg.exp(), &[((-(2.0 * seg).exp_m1()).sqrt(), &*n)])?;
            x2.lincomb(1.0, &[(s2 * self.s_noise, &*sde)])?;
        }
        cx.denoise(x2, s2, den2)?;
        x.lincomb(lin, &[(-at * b1, &*den), (-at * b3, &*den2)])?;
        if inject {
            let seg = (r2 - 1.0) * h * eta;
            cx.noise(n, s2, sn)?;
            sde.lincomb(seg.exp(), &[((-(2.0 * seg).exp_m1()).sqrt(), &*n)])?;
            x.lincomb(1.0, &[(sn * self.s_noise, &*sde)])?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
/// SA-Solver (Xue et al. 2023): stochastic Adams predictor (order 3) and corrector (order 4) in lambda, noise
/// strength tau = 1 for sigma in `[tau_lo, tau_hi]` and 0 elsewhere; PECE re-evaluates after the corrector.
/// The caller's `x` holds the predicted state between steps (what ComfyUI returns); the corrected state is
/// kept here.
pub struct SaSolver<B> {
    pub tau_hi: f64,
    pub tau_lo: f64,
    pub s_noise: f64,
    pub pece: bool,
    pub predictor_order: usize,
    pub corrector_order: usize,
    preds: History<B>,
    xc: Option<B>,
    noise: Option<B>,
    tau: f64,
    h: f64,
    s: Scratch<B>,
}
impl<B: Buffer> SaSolver<B> {
    pub fn new(tau_hi: f64, tau_lo: f64, s_noise: f64, pece: bool) -> Self {
        Self {
            tau_hi,
            tau_lo,
            s_noise,
            pece,
            predictor_order: 3,
            corrector_order: 4,
            preds: History::new(),
            xc: None,
            noise: None,
            tau: 0.0,
            h: 0.0,
            s: Scratch::new(),
        }
    }
}
/// SA-Solver's b coefficients (data prediction, alpha = 1): Lagrange integrals of `e^{(1+tau^2) x}` over
/// `[lambda_s, lambda_t]` on the nodes `lambdas`.
pub fn sa_b_coeffs(lambdas: &[f64], ls: f64, lt: f64, tau: f64) -> Result<Vec<f64>> {
    let k = lambdas.len();
    let tau_mul = 1.0 + tau * tau;
    let h = lt - ls;
    let prod: Vec<f64> = (0..k)
        .map(|p| lt.powi(p as i32) - ls.powi(p as i32) * (-tau_mul * h).exp())
        .collect();
    let lf = |p: usize| (1..=p).map(|v| (v as f64).ln()).sum::<f64>();
    let e: Vec<f64> = (0..k)
        .map(|p| {
            (0..=p)
                .map(|q| {
                    let mut c = lf(p) - lf(q);
                    if tau > 0.0 {
                        c -= (p - q) as f64 * tau_mul.ln();
                    }
                    let sign = if (p - q) % 2 == 0 { 1.0 } else { -1.0 };
                    c.exp() * sign * prod[q]
                })
                .sum()
        })
        .collect();
    let vt: Vec<Vec<f64>> = (0..k)
        .map(|p| lambdas.iter().map(|l| l.powi(p as i32)).collect())
        .collect();
    solve(vt, e)
}
impl<B: Buffer> Sampler<B> for SaSolver<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let sig = cx.sigmas;
        let (s, sn) = (sig[i], sig[i + 1]);
        if i == 0 {
            self.preds.v.clear();
            self.tau = 0.0;
            self.h = 0.0;
        }
        if self.xc.is_none() {
            self.xc = Some(x.alloc_like()?);
            self.noise = Some(x.alloc_like()?);
        }
        let xc = self.xc.as_mut().expect("set above");
        let noise = self.noise.as_mut().expect("set above");
        let [den, n] = self.s.get(2, x)? else {
            unreachable!()
        };
        // x holds x_pred here.
        cx.denoise(x, s, den)?;
        let max_used = self.predictor_order.max(self.corrector_order);
        self.preds.push(den, max_used)?;
        let len = self.preds.len();
        let mut p_ord = self.predictor_order.min(len);
        let mut c_ord = if i == 0 || (sn == 0.0 && !self.pece) {
            0
        } else {
            self.corrector_order.min(len)
        };
        if *sig.last().expect("non-empty") == 0.0 {
            p_ord = p_ord.min(sig.len() - 2 - i);
            c_ord = c_ord.min(sig.len() - 1 - i);
        }
        let lambdas = |a: usize, b: usize| -> Vec<f64> { (a..=b).map(|j| lam(sig[j])).collect() };
        if c_ord == 0 {
            xc.copy_from(x)?;
        } else {
            let b = sa_b_coeffs(
                &lambdas(i + 1 - c_ord, i),
                lam(sig[i - 1]),
                lam(s),
                self.tau,
            )?;
            let lin = s / sig[i - 1] * (-(self.tau * self.tau) * self.h).exp();
            let mut terms: Vec<(f64, &B)> = (0..c_ord)
                .map(|k| (b[k], self.preds.back(c_ord - 1 - k)))
                .collect();
            if self.tau > 0.0 && self.s_noise > 0.0 {
                terms.push((1.0, &*noise));
            }
            xc.lincomb(lin, &terms)?;
            if self.pece {
                cx.denoise(xc, s, den)?;
                let last = self.preds.v.len() - 1;
                self.preds.v[last].copy_from(den)?;
            }
        }
        if sn == 0.0 {
            return x.copy_from(self.preds.back(0));
        }
        self.tau = if self.tau_hi >= sn && sn >= self.tau_lo {
            1.0
        } else {
            0.0
        };
        let b = sa_b_coeffs(&lambdas(i + 1 - p_ord, i), lam(s), lam(sn), self.tau)?;
        self.h = lam(sn) - lam(s);
        let lin = sn / s * (-(self.tau * self.tau) * self.h).exp();
        let mut terms: Vec<(f64, &B)> = vec![(lin, &*xc)];
        for (k, bk) in b.iter().enumerate() {
            terms.push((*bk, self.preds.back(p_ord - 1 - k)));
        }
        x.lincomb(0.0, &terms)?;
        if self.tau > 0.0 && self.s_noise > 0.0 {
            cx.noise(n, s, sn)?;
            let c = sn * (-(-2.0 * self.tau * self.tau * self.h).exp_m1()).sqrt() * self.s_noise;
            noise.lincomb(0.0, &[(c, &*n)])?;
            x.lincomb(1.0, &[(1.0, &*noise)])?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
/// UniPC (Zhao et al. 2023), multistep predictor-corrector, data prediction, B(h) = h (bh1) or e^h - 1 (bh2),
/// order min(3, steps) with lower orders at the start and the end, as ComfyUI's `UniPC.sample`. The corrector
/// reuses the model call at the predicted point, so a step costs one call. A final step to sigma = 0 is a
/// plain denoise (ComfyUI instead maps the schedule onto the model's discrete timesteps).
pub struct UniPc<B> {
    pub bh2: bool,
    hist: Vec<(f64, B)>,
    s: Scratch<B>,
}
impl<B> UniPc<B> {
    pub fn new(bh2: bool) -> Self {
        Self {
            bh2,
            hist: vec![],
            s: Scratch::new(),
        }
    }
}
impl<B: Buffer> Sampler<B> for UniPc<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let sig = cx.sigmas;
        let (s, sn) = (sig[i], sig[i + 1]);
        let steps = sig.len() - 1;
        let order = 3.min(steps);
        if i == 0 || self.hist.is_empty() {
            self.hist.clear();
            let mut m0 = x.alloc_like()?;
            cx.denoise(x, s, &mut m0)?;
            self.hist.push((s, m0));
        }
        if sn == 0.0 {
            let [tmp] = self.s.get(1, x)? else {
                unreachable!()
            };
            cx.denoise(x, s, tmp)?;
            return x.copy_from(tmp);
        }
        let k = i + 1;
        let step_order = if k < order {
            k
        } else {
            order.min(steps + 1 - k)
        }
        .min(self.hist.len());
        let corrector = k != steps;
        let (s0, m0) = {
            let (a, b) = self.hist.last().expect("non-empty");
            (*a, b)
        };
        let l0 = lam(s0);
        let h = lam(sn) - l0;
        let mut rks = vec![];
        for j in 1..step_order {
            let (sj, _) = &self.hist[self.hist.len() - 1 - j];
            rks.push((lam(*sj) - l0) / h);
        }
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut fact = 1.0;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut r = vec![];
        let mut bv = vec![];
        for p in 1..=step_order {
            r.push(
                rks.iter()
                    .map(|v| v.powi(p as i32 - 1))
                    .collect::<Vec<f64>>(),
            );
            bv.push(h_phi_k * fact / b_h);
            fact *= (p + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / fact;
        }
        let nd = step_order - 1; // number of D1 terms
        // D1_j = (m_j - m0) / rk_j
        let d1 = |j: usize| -> (f64, &B) { (1.0 / rks[j], &self.hist[self.hist.len() - 2 - j].1) };
        // x_t_ = sigma_t/sigma_0 x - h_phi_1 m0; predictor x_t = x_t_ - B(h) sum rho_p D1 and corrector
        // x_t_ - B(h) (sum rho_c D1 + rho_last (m_t - m0)), each one fused pass over memory.
        let mut pred: Vec<(f64, &B)> = vec![(-h_phi_1, m0)];
        if nd > 0 {
            let rhos_p = if step_order == 2 {
                vec![0.5]
            } else {
                let a: Vec<Vec<f64>> = r[..nd].iter().map(|row| row[..nd].to_vec()).collect();
                solve(a, bv[..nd].to_vec())?
            };
            for (j, rho) in rhos_p.iter().enumerate() {
                let (inv, mj) = d1(j);
                pred.push((-b_h * rho * inv, mj));
                pred[0].0 += b_h * rho * inv;
            }
        }
        if !corrector {
            return x.lincomb(sn / s0, &pred);
        }
        let [xt, mt] = self.s.get(2, x)? else {
            unreachable!()
        };
        pred.push((sn / s0, &*x));
        xt.lincomb(0.0, &pred)?;
        let rhos_c = if step_order == 1 {
            vec![0.5]
        } else {
            solve(r.clone(), bv.clone())?
        };
        cx.denoise(xt, sn, mt)?;
        let mut terms: Vec<(f64, &B)> = vec![(-h_phi_1, m0)];
        for (j, rho) in rhos_c[..nd].iter().enumerate() {
            let (inv, mj) = d1(j);
            terms.push((-b_h * rho * inv, mj));
            terms[0].0 += b_h * rho * inv;
        }
        let rl = rhos_c[nd];
        terms.push((-b_h * rl, &*mt));
        terms[0].0 += b_h * rl;
        x.lincomb(sn / s0, &terms)?;
        // History: append during warm-up, else drop the oldest; the newest model value is the one at the
        // predicted point (swapped in, not copied).
        let mut b = if self.hist.len() >= order {
            self.hist.remove(0).1
        } else {
            x.alloc_like()?
        };
        std::mem::swap(&mut b, mt);
        self.hist.push((sn, b));
        Ok(())
    }
}
