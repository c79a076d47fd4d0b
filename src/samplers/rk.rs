//! Runge-Kutta on the probability-flow ODE in sigma, `dx/dsigma = (x - D(x, sigma)) / sigma`, for any static
//! [`Tableau`]: explicit ones stage by stage, implicit ones (diagonally or fully) by fixed-point sweeps that
//! cost one model call per stage per sweep. A step to sigma = 0 is the plain denoise (the derivative is
//! singular there), as k-diffusion's Heun does.
use super::buffer::Buffer;
use super::refine::{Refine, StageEps, refined_step};
use super::stepper::{Ctx, Sampler, Scratch};
use super::tableau::{Kind, Tableau};
use anyhow::Result;

pub struct Rk<B> {
    pub tab: &'static Tableau,
    /// Fixed-point sweeps for implicit tableaux (each sweep gains about one order; default: the order).
    pub sweeps: usize,
    /// RES4LYF's `noise_anchor`: stage derivatives `(1 - a) (X_k - D_k) / sigma_k + a (x - D_k) / sigma`
    /// (0: plain RK on the ODE, the order the tableau claims; RES4LYF's nodes default to 1, which caps every
    /// linear method at order 2). Implicit tableaux: see `res4lyf`.
    pub anchor: f64,
    /// RES4LYF's implicit steps/substeps for explicit tableaux, see [`super::refine`] (and for implicit ones
    /// stepped as RES4LYF does).
    pub refine: Refine,
    /// Implicit tableaux: step them as RES4LYF does at `anchor` ([`super::implicit`]) instead of our
    /// fixed-point sweeps.
    pub res4lyf: bool,
    s: Scratch<B>,
}
impl<B> Rk<B> {
    pub fn new(tab: &'static Tableau, sweeps: Option<usize>) -> Self {
        Self {
            tab,
            sweeps: sweeps.unwrap_or(tab.order),
            anchor: 0.0,
            refine: Refine::default(),
            res4lyf: false,
            s: Scratch::new(),
        }
    }
    /// The derivative at the start of the last step, `(x - D(x, sigma)) / sigma` (stage 0 of an explicit
    /// tableau with c_1 = 0), for multistep methods that warm up with this one.
    pub fn first_derivative(&self) -> Option<&B> {
        self.s.bufs.first()
    }
    /// Model calls per step.
    pub fn calls(tab: &Tableau, sweeps: usize) -> usize {
        match tab.kind() {
            Kind::Explicit => tab.stages(),
            _ => 1 + sweeps * tab.stages(),
        }
    }
}

/// `f = (X - D(X, sig)) / sig` into `f`, using `den` as scratch.
fn deriv<B: Buffer>(cx: &mut Ctx<'_, B>, xs: &B, sig: f64, den: &mut B, f: &mut B) -> Result<()> {
    cx.model.denoise(xs, sig, den)?;
    f.lincomb(0.0, &[(1.0 / sig, xs), (-1.0 / sig, &*den)])
}

impl<B: Buffer> Sampler<B> for Rk<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        let tab = self.tab;
        let n = tab.stages();
        if self.refine.active() && sn > 0.0 && tab.kind() == Kind::Explicit {
            let h = sn - s;
            let mut sig: Vec<f64> = tab.c.iter().map(|c| s + c * h).collect();
            sig.push(sn);
            let a: Vec<Vec<f64>> = tab.a.iter().map(|r| r.to_vec()).collect();
            let bufs = self.s.get(self.refine.buffers(n), x)?;
            let e = StageEps::Linear {
                anchor: self.anchor,
            };
            return refined_step(cx, x, bufs, &a, tab.b, &sig, s, h, e, self.refine);
        }
        if self.res4lyf && sn > 0.0 && tab.kind() != Kind::Explicit {
            let bufs = self.s.get(super::implicit::buffers(n), x)?;
            return super::implicit::step(cx, x, bufs, tab, s, sn, self.anchor, self.refine);
        }
        let bufs = self.s.get(n + 2, x)?;
        let (f, rest) = bufs.split_at_mut(n);
        let (xs, den) = rest.split_at_mut(1);
        let (xs, den) = (&mut xs[0], &mut den[0]);
        if sn == 0.0 {
            cx.model.denoise(x, s, den)?;
            return x.copy_from(den);
        }
        let h = sn - s;
        let stage = |k: usize, f: &[B], xs: &mut B, upto: usize| -> Result<()> {
            let terms: Vec<(f64, &B)> = (0..upto)
                .filter(|&j| tab.a[k][j] != 0.0)
                .map(|j| (h * tab.a[k][j], &f[j]))
                .collect();
            xs.lincomb(0.0, &[(1.0, &*x)])?;
            xs.lincomb(1.0, &terms)
        };
        match tab.kind() {
            Kind::Explicit => {
                let a = self.anchor;
                for k in 0..n {
                    stage(k, f, xs, k)?;
                    let (_, cur) = f.split_at_mut(k);
                    let sig = s + tab.c[k] * h;
                    if a == 0.0 {
                        deriv(cx, xs, sig, den, &mut cur[0])?;
                    } else {
                        cx.model.denoise(xs, sig, den)?;
                        let (wx, w0) = ((1.0 - a) / sig, a / s);
                        cur[0].lincomb(0.0, &[(wx, &*xs), (w0, &*x), (-(wx + w0), &*den)])?;
                    }
                }
            }
            _ => {
                // Predictor: every stage derivative = f(x, sigma); then Gauss-Seidel sweeps.
                deriv(cx, x, s, den, &mut f[0])?;
                for k in 1..n {
                    let (a, b) = f.split_at_mut(k);
                    b[0].copy_from(&a[0])?;
                }
                for _ in 0..self.sweeps {
                    for k in 0..n {
                        stage(k, f, xs, n)?;
                        let sig = s + tab.c[k] * h;
                        cx.model.denoise(xs, sig, den)?;
                        f[k].lincomb(0.0, &[(1.0 / sig, &*xs), (-1.0 / sig, &*den)])?;
                    }
                }
            }
        }
        let terms: Vec<(f64, &B)> = (0..n)
            .filter(|&j| tab.b[j] != 0.0)
            .map(|j| (h * tab.b[j], &f[j]))
            .collect();
        x.lincomb(1.0, &terms)
    }
}

/// RES4LYF's deis_2m/3m/4m: Adams-Bashforth in sigma on the derivative history, with the "rhoab" DEIS
/// coefficients (exact integrals of the Lagrange basis over the step, which are k-diffusion's LMS
/// coefficients), after `order + 1` warm-up steps of ralston_{order}s as RES4LYF does. A step to sigma = 0 is
/// the plain denoise.
pub struct DeisMultistep<B> {
    pub order: usize,
    warm: Rk<B>,
    hist: Vec<B>,
    s: Scratch<B>,
}
impl<B: Buffer> DeisMultistep<B> {
    pub fn new(order: usize, warm: &'static Tableau) -> Self {
        Self {
            order,
            warm: Rk::new(warm, None),
            hist: Vec::new(),
            s: Scratch::new(),
        }
    }
    /// The buffer the next history entry goes into: the oldest one once the history is full.
    fn slot(&mut self, like: &B) -> Result<B> {
        if self.hist.len() >= self.order {
            Ok(self.hist.remove(0))
        } else {
            like.alloc_like()
        }
    }
}
impl<B: Buffer> Sampler<B> for DeisMultistep<B> {
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()> {
        let (s, sn) = (cx.sigmas[i], cx.sigmas[i + 1]);
        if i == 0 {
            self.hist.clear();
        }
        if sn == 0.0 {
            let [den] = self.s.get(1, x)? else {
                unreachable!()
            };
            cx.model.denoise(x, s, den)?;
            return x.copy_from(den);
        }
        if i < self.order + 1 || self.hist.len() + 1 < self.order {
            self.warm.step(cx, x, i)?;
            let mut b = self.slot(x)?;
            b.copy_from(self.warm.first_derivative().expect("set by the step"))?;
            self.hist.push(b);
            return Ok(());
        }
        let [den, d] = self.s.get(2, x)? else {
            unreachable!()
        };
        deriv(cx, x, s, den, d)?;
        let mut terms: Vec<(f64, &B)> =
            vec![(super::kdiff::lms_coeff(self.order, cx.sigmas, i, 0), &*d)];
        for j in 1..self.order {
            let c = super::kdiff::lms_coeff(self.order, cx.sigmas, i, j);
            terms.push((c, &self.hist[self.hist.len() - j]));
        }
        x.lincomb(1.0, &terms)?;
        // The new derivative joins the history by swapping buffers, not copying.
        let mut b = self.slot(x)?;
        std::mem::swap(&mut b, &mut self.s.bufs[1]);
        self.hist.push(b);
        Ok(())
    }
}
