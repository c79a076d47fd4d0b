//! RES4LYF's implicit refinement of explicit methods (its `implicit_steps` / `implicit_substeps`, at eta = 0
//! with the default implicit types): extra model calls that re-solve the step.
//!
//! - `implicit_steps` (RES4LYF's full iterations): after a normal step, the step is redone `full` more times;
//!   in each redo the first stage is evaluated at the previous iteration's result `x_next` at `sigma_next`
//!   (predictor-corrector), the later stages as usual.
//! - `implicit_substeps` (its diagonal iterations): each stage row r is evaluated `diag` more times, at the
//!   point its own update produced (`X_{r+1}` at `sigma_{r+1}`, `x_next` at `sigma_next` for the last row).
//!
//! All in RES4LYF's form `X_{r+1} = x_0 + h sum_j w_{r+1,j} eps_j` with `eps_j = D_j - x_0` for exponential
//! methods and `eps_j = a (x_0 - D_j) / sigma + (1 - a) (X_j - D_j) / sigma_j` for linear ones (a =
//! noise_anchor). Proven step by step against RES4LYF's own update code (scripts/golden/samplers_res4lyf_runs.py).
use super::buffer::Buffer;
use super::noise_mode::{NoiseMode, SdeStep, sde_step};
use super::stepper::Ctx;
use anyhow::Result;

/// How a stage's model output becomes its `eps`.
#[derive(Clone, Copy, Debug)]
pub enum StageEps {
    Exponential,
    Linear { anchor: f64 },
}

/// RES4LYF's bongmath (its default `BONGMATH = True`, `RK_Method_Beta.bong_iter`): after each stage row's
/// update (the last substep), 100 fixed-point iterations re-derive the step's start `x_0` from the point the
/// row just wrote, `x_0 = X_{r+1} - h sum_j w_{r+1,j} eps_j`, re-place the earlier stage points
/// `X_k = x_0 + h sum_j a_kj eps_j` (k <= r) and recompute their eps from the stored model outputs at
/// `(X_k, sigma_k)`. Where the eps already came from those points this changes nothing (the fixed point); it
/// changes the step where an eps was taken elsewhere: RES4LYF's implicit steps/substeps of linear tableaux
/// at noise_anchor < 1 (an eps evaluated at `(x_next, sigma_next)` or `(X_{r+1}, sigma_{r+1})` is recomputed at
/// the row's own point). Applied as RES4LYF's sampler loop does: only while `sigma_r > sigma_min`,
/// `h < sigma_max / 2`, `sigma > 0.03`, and not after the last row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bong {
    /// The model's sigma range (RES4LYF's `RK.sigma_min`, `RK.sigma_max`).
    pub sigma_min: f64,
    pub sigma_max: f64,
}
/// RES4LYF's `implicit_type` / `implicit_type_substeps`. Its "retro-eta" and "bongmath" types take a branch
/// of their own only where the substep adds noise (`sub_sigma_up > 0`, see [`SubNoise`]); elsewhere they
/// are exactly "predictor-corrector" (the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImplicitType {
    #[default]
    PredictorCorrector,
    Rebound,
    /// With substep noise: the redo's first stage at `x_0` (its `sigma_from_to(x_0, x, sigma, sigma_next,
    /// sigma)`), a substep's call at `X_{r+1}` carried back to `sigma_r` along the line from `x_0`.
    RetroEta,
    /// With substep noise: as retro-eta without bongmath; with it, the call at the row's own point `X_r`.
    Bongmath,
}
impl ImplicitType {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "predictor-corrector" => Self::PredictorCorrector,
            "retro-eta" => Self::RetroEta,
            "bongmath" => Self::Bongmath,
            "rebound" => Self::Rebound,
            _ => anyhow::bail!(
                "unknown implicit type '{s}'; valid: predictor-corrector, rebound, retro-eta, bongmath"
            ),
        })
    }
}

/// RES4LYF's per-substep SDE noise (`eta_substep`, `noise_mode_sde_substep`, `s_noise_substep`, its
/// `set_sde_substep` / `swap_noise_substep`): after row r's update wrote `X_{r+1}` at `sigma_{r+1}` (every
/// row but the one writing x_next, which it also noises on all but the last substep), the noise mode's split
/// of `(sigma_r, sigma_{r+1})` moves `X_{r+1}` back along the line from `(sigma, x_0)` to `sigma_down` and adds
/// noise: `X_{r+1} = alpha_ratio (x_0 + (sigma_down - sigma) e) + s_noise sigma_up z`, `e = (x_0 - X_{r+1}) /
/// (sigma - sigma_{r+1})`. `z` comes from the context's noise source (RES4LYF z-scores it per channel: wrap the
/// source in [`super::noise::ZScorePlanes`]), asked for `(sigma_r, sigma_{r+1})` ordered high to low (the
/// lower one times 0.999 when they are equal, as RES4LYF asks its Brownian sampler).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SubNoise {
    pub mode: NoiseMode,
    pub eta: f64,
    pub s_noise: f64,
    /// Variance-preserving / flow model and its largest sigma (the noise modes' normalization).
    pub vp: bool,
    pub sigma_max: f64,
}
impl SubNoise {
    /// The split of the substep `(s_r, s_next)`, or None where it adds no noise.
    pub(crate) fn split(&self, s_r: f64, s_next: f64) -> Option<SdeStep> {
        if s_next <= 0.0 {
            return None;
        }
        let st = sde_step(
            self.mode,
            s_r,
            s_next,
            self.eta,
            self.vp,
            self.sigma_max,
            false,
        );
        (st.sigma_up != 0.0).then_some(st)
    }
}

/// Swap `xs` (at `s_next`, on the line from `(sigma, x0)`) to the split's sigma_down and add its noise `z`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn swap_noise<B: Buffer>(
    cx: &mut Ctx<'_, B>,
    xs: &mut B,
    x0: &B,
    z: &mut B,
    st: SdeStep,
    s_noise: f64,
    sigma: f64,
    s_r: f64,
    s_next: f64,
) -> Result<()> {
    let (mut hi, mut lo) = (s_r, s_next);
    // Equal nodes (RES4LYF compares its own sigma + h c, which may differ from ours by rounding).
    if (hi - lo).abs() <= 1e-14 * hi {
        lo *= 0.999;
    }
    if lo > hi {
        std::mem::swap(&mut hi, &mut lo);
    }
    cx.noise(z, hi, lo)?;
    // alpha (x0 - (sigma - sd) (x0 - xs) / (sigma - s_next)) + s_noise su z
    let q = (sigma - st.sigma_down) / (sigma - s_next);
    let ar = st.alpha_ratio;
    xs.lincomb(
        ar * q,
        &[(ar * (1.0 - q), x0), (s_noise * st.sigma_up, &*z)],
    )
}

/// RES4LYF's bong_iter runs exactly this many iterations.
pub const BONG_ITERS: usize = 100;

/// The refinement counts (both 0: no refinement), and bongmath.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Refine {
    pub full: usize,
    pub diag: usize,
    pub bong: Option<Bong>,
    /// RES4LYF's implicit type "rebound" (default "predictor-corrector") for the implicit steps: each redo's
    /// first stage is evaluated at x_next moved back to sigma along D(x_next, sigma_next) (one call more).
    pub rebound_full: bool,
    /// Its `implicit_type_substeps` "rebound": each substep makes an extra call at X_{r+1}, updates, and
    /// evaluates the row at that result carried back to sigma_r (two calls per substep).
    pub rebound_diag: bool,
    /// RES4LYF's per-substep noise, see [`SubNoise`] (implicit tableaux: [`super::implicit`]).
    pub sub: Option<SubNoise>,
    /// RES4LYF's default step noise (its overshoot 0, `swap_noise_step`): each iteration's x_next at
    /// sigma_next is swapped to the mode's sigma_down along the line from `(sigma, x_0)` and noised, as a
    /// substep is (the split of `(sigma, sigma_next)`, the step's eta and s_noise).
    pub step: Option<SubNoise>,
    /// The implicit types retro-eta / bongmath of the steps and the substeps (they differ from
    /// predictor-corrector only where a substep adds noise).
    pub retro_full: Option<ImplicitType>,
    pub retro_diag: Option<ImplicitType>,
}
impl Refine {
    pub fn is_none(&self) -> bool {
        self.full == 0 && self.diag == 0
    }
    /// Whether a step must be taken in RES4LYF's form ([`refined_step`]): refinement or bongmath.
    pub fn active(&self) -> bool {
        !self.is_none() || self.bong.is_some() || self.sub.is_some() || self.step.is_some()
    }
    fn noisy(&self) -> bool {
        self.sub.is_some() || self.step.is_some()
    }
    /// Buffers [`refined_step`] needs for `stages` stages.
    pub fn buffers(&self, stages: usize) -> usize {
        let base = if self.bong.is_some() {
            3 * stages + 3
        } else {
            stages + 3
        };
        // The noise draw and the row's own point X_r (substep type bongmath).
        base + if self.noisy() { 2 } else { 0 }
    }
    /// Model calls per step of an explicit method with `stages` stages.
    pub fn calls(&self, stages: usize) -> usize {
        let row = 1 + self.diag * if self.rebound_diag { 2 } else { 1 };
        // Redo passes: row 0 is evaluated from x_next on every substep (plus the rebound call).
        let redo_row0 = (self.diag + 1) * if self.rebound_full { 2 } else { 1 };
        stages * row + self.full * (redo_row0 + (stages - 1) * row)
    }
}

/// One refined step of an explicit tableau `(a, b)` from `x` (sigma = `sig[0]` of the first stage's row) with
/// `sig[r]` the stage sigmas and `sig[stages]` = sigma_next. `bufs` needs `refine.buffers(stages)` buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn refined_step<B: Buffer>(
    cx: &mut Ctx<'_, B>,
    x: &mut B,
    bufs: &mut [B],
    a: &[Vec<f64>],
    b: &[f64],
    sig: &[f64],
    sigma: f64,
    h: f64,
    kind: StageEps,
    refine: Refine,
) -> Result<()> {
    let n = b.len();
    let (eps, rest) = bufs.split_at_mut(n);
    let (x0, rest) = rest.split_at_mut(1);
    let (xs, rest) = rest.split_at_mut(1);
    let (den, rest) = rest.split_at_mut(1);
    let (x0, xs, den) = (&mut x0[0], &mut xs[0], &mut den[0]);
    // With bongmath: every row's model output (`data`) and scratch for the re-placed stage points.
    // With substep noise, the last two: the noise draw and the row's own point X_r.
    let extra = if refine.noisy() { 2 } else { 0 };
    let (rest, noise_bufs) = rest.split_at_mut(rest.len() - extra);
    let (data, pts) = rest.split_at_mut(if refine.bong.is_some() { n } else { 0 });
    x0.copy_from(x)?;
    // Row r's update writes X_{r+1} (the b row after the last stage).
    let weights = |r: usize| -> &[f64] { if r + 1 < n { &a[r + 1] } else { b } };
    for k in 0..=refine.full {
        for r in 0..n {
            for d in 0..=refine.diag {
                let w = weights(r);
                // X_{r+1} = x_0 + h sum_{j <= r} w_j eps_j into `xs`.
                let update = |xs: &mut B, eps: &[B], x0: &B| -> Result<()> {
                    let mut terms: Vec<(f64, &B)> = vec![(1.0, x0)];
                    for (j, &wj) in w.iter().enumerate().take(r + 1) {
                        if wj != 0.0 {
                            terms.push((h * wj, &eps[j]));
                        }
                    }
                    xs.lincomb(0.0, &terms)
                };
                let rebound_full = k > 0 && r == 0 && refine.rebound_full;
                let rebound_diag = !(k > 0 && r == 0) && d > 0 && refine.rebound_diag;
                // Substep noise after this substep's update: every row but the one writing x_next, which
                // is noised on all its substeps but the last (RES4LYF's set_sde_substep).
                let noisy = refine
                    .sub
                    .filter(|_| r + 1 < n || d < refine.diag)
                    .and_then(|sn| sn.split(sig[r], sig[r + 1]));
                let retro_full = (k > 0 && r == 0 && noisy.is_some())
                    .then_some(refine.retro_full)
                    .flatten();
                let retro_diag = (!(k > 0 && r == 0) && d > 0 && noisy.is_some())
                    .then_some(refine.retro_diag)
                    .flatten();
                if let [_, xr] = noise_bufs
                    && d == 0
                    && r > 0
                {
                    xr.copy_from(xs)?;
                }
                let own_point = retro_diag == Some(ImplicitType::Bongmath) && refine.bong.is_some();
                if retro_diag.is_some() && !own_point {
                    // retro-eta: X_{r+1} carried back from sigma_{r+1} to sigma_r along the line from
                    // (sigma, x_0) (RES4LYF's sigma_from_to).
                    let q = (sig[r] - sigma) / (sigma - sig[r + 1]);
                    xs.lincomb(-q, &[(1.0 + q, &*x0)])?;
                }
                if rebound_full {
                    // RES4LYF's "rebound": D at (x_next, sigma_next), x moved back to sigma along its eps.
                    cx.model.denoise(x, sig[n], den)?;
                    let q = sigma / sig[n];
                    x.lincomb(q, &[(1.0 - q, &*den)])?;
                } else if rebound_diag {
                    // An extra call at X_{r+1}, its update, and the result carried back from sigma_{r+1} to
                    // sigma_r along the line through (sigma, x_0) (RES4LYF's sigma_from_to).
                    cx.model.denoise(xs, sig[r + 1], den)?;
                    stage_eps(&mut eps[r], kind, xs, sig[r + 1], x0, sigma, den)?;
                    update(xs, eps, x0)?;
                    let q = (sig[r] - sigma) / (sigma - sig[r + 1]);
                    xs.lincomb(-q, &[(1.0 + q, &*x0)])?;
                }
                // `xs` holds X_r before row r's first evaluation and X_{r+1} after each of its updates.
                let (pt, sg): (&B, f64) = if rebound_full {
                    (&*x, sigma)
                } else if retro_full.is_some() {
                    // Both types: the redo's first stage at x_0 (sigma_from_to(x_0, x, sigma, sigma_next,
                    // sigma) = x_0; with bongmath x_[0] = x_0).
                    (&*x0, sigma)
                } else if own_point {
                    // bongmath with bongmath on: the row's own point (x_[row]; x_[0] = x_0).
                    if r == 0 {
                        (&*x0, sig[0])
                    } else {
                        (&noise_bufs[1], sig[r])
                    }
                } else if retro_diag.is_some() || rebound_diag {
                    (&*xs, sig[r])
                } else if k > 0 && r == 0 {
                    (&*x, sig[n])
                } else if d > 0 {
                    (&*xs, sig[r + 1])
                } else if r == 0 {
                    (&*x0, sig[0])
                } else {
                    (&*xs, sig[r])
                };
                cx.model.denoise(pt, sg, den)?;
                stage_eps(&mut eps[r], kind, pt, sg, x0, sigma, den)?;
                if !data.is_empty() {
                    data[r].copy_from(den)?;
                }
                update(xs, eps, x0)?;
                if let (Some(st), Some(sn), [z, _]) = (noisy, refine.sub, &mut *noise_bufs) {
                    swap_noise(cx, xs, x0, z, st, sn.s_noise, sigma, sig[r], sig[r + 1])?;
                }
                if let Some(bg) = refine.bong
                    && d == refine.diag
                    && r + 1 < n
                    && sig[r] > bg.sigma_min
                    && h < bg.sigma_max / 2.0
                    && sigma > 0.03
                {
                    let pts = &mut pts[..r + 1];
                    bong_iter(x0, xs, eps, data, pts, a, w, r + 1, sig, sigma, h, kind)?;
                }
            }
        }
        // The iteration's result is the new x (RES4LYF's `x = x_next` at eta 0, else `swap_noise_step`).
        x.copy_from(xs)?;
        if let (Some(sn), [z, _]) = (refine.step, &mut *noise_bufs)
            && let Some(st) = sn.split(sigma, sig[n])
        {
            swap_noise(cx, x, x0, z, st, sn.s_noise, sigma, sigma, sig[n])?;
        }
    }
    Ok(())
}

/// A stage's eps from its model output `den` at `(pt, sg)`, in RES4LYF's form (its `get_epsilon`).
pub(crate) fn stage_eps<B: Buffer>(
    out: &mut B,
    kind: StageEps,
    pt: &B,
    sg: f64,
    x0: &B,
    sigma: f64,
    den: &B,
) -> Result<()> {
    match kind {
        StageEps::Exponential => out.lincomb(0.0, &[(1.0, den), (-1.0, x0)]),
        StageEps::Linear { anchor } => {
            let (wp, w0) = ((1.0 - anchor) / sg, anchor / sigma);
            out.lincomb(0.0, &[(wp, pt), (w0, x0), (-(wp + w0), den)])
        }
    }
}

/// RES4LYF's `bong_iter`: `xs` = the point the current row wrote with weights `w` (over the first `cols`
/// eps), unchanged; `x0` and the first `pts.len()` stages (points into `pts`, eps into `eps`, from their
/// model outputs `data` at `sig`) updated in place, as RES4LYF's 100 iterations do (all points from the old
/// eps first, then all eps). Explicit tableaux after row r: r + 1 stages and columns; implicit ones (row
/// offset 0): the r stages before it, all columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bong_iter<B: Buffer, R: AsRef<[f64]>>(
    x0: &mut B,
    xs: &B,
    eps: &mut [B],
    data: &[B],
    pts: &mut [B],
    a: &[R],
    w: &[f64],
    cols: usize,
    sig: &[f64],
    sigma: f64,
    h: f64,
    kind: StageEps,
) -> Result<()> {
    let comb = |base: &B, s: f64, row: &[f64], eps: &[B], out: &mut B| -> Result<()> {
        let mut terms: Vec<(f64, &B)> = vec![(1.0, base)];
        for (j, &wj) in row.iter().enumerate().take(cols) {
            if wj != 0.0 {
                terms.push((s * h * wj, &eps[j]));
            }
        }
        out.lincomb(0.0, &terms)
    };
    for _ in 0..BONG_ITERS {
        comb(xs, -1.0, w, eps, x0)?;
        for (k, p) in pts.iter_mut().enumerate() {
            comb(x0, 1.0, a[k].as_ref(), eps, p)?;
        }
        for (k, p) in pts.iter().enumerate() {
            stage_eps(&mut eps[k], kind, p, sig[k], x0, sigma, &data[k])?;
        }
    }
    Ok(())
}
