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
use super::stepper::Ctx;
use anyhow::Result;

/// How a stage's model output becomes its `eps`.
#[derive(Clone, Copy, Debug)]
pub enum StageEps {
    Exponential,
    Linear { anchor: f64 },
}

/// The refinement counts (both 0: no refinement).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refine {
    pub full: usize,
    pub diag: usize,
}
impl Refine {
    pub fn is_none(&self) -> bool {
        self.full == 0 && self.diag == 0
    }
    /// Model calls per step of an explicit method with `stages` stages.
    pub fn calls(&self, stages: usize) -> usize {
        stages * (self.full + 1) * (self.diag + 1)
    }
}

/// One refined step of an explicit tableau `(a, b)` from `x` (sigma = `sig[0]` of the first stage's row) with
/// `sig[r]` the stage sigmas and `sig[stages]` = sigma_next. `bufs` needs `stages + 3` buffers.
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
    let (xs, den) = rest.split_at_mut(1);
    let (x0, xs, den) = (&mut x0[0], &mut xs[0], &mut den[0]);
    x0.copy_from(x)?;
    // Row r's update writes X_{r+1} (the b row after the last stage).
    let weights = |r: usize| -> &[f64] { if r + 1 < n { &a[r + 1] } else { b } };
    for k in 0..=refine.full {
        for r in 0..n {
            for d in 0..=refine.diag {
                // `xs` holds X_r before row r's first evaluation and X_{r+1} after each of its updates.
                let (pt, sg): (&B, f64) = if k > 0 && r == 0 {
                    (&*x, sig[n])
                } else if d > 0 {
                    (&*xs, sig[r + 1])
                } else if r == 0 {
                    (&*x0, sig[0])
                } else {
                    (&*xs, sig[r])
                };
                cx.model.denoise(pt, sg, den)?;
                match kind {
                    StageEps::Exponential => {
                        eps[r].lincomb(0.0, &[(1.0, &*den), (-1.0, &*x0)])?;
                    }
                    StageEps::Linear { anchor } => {
                        let (wp, w0) = ((1.0 - anchor) / sg, anchor / sigma);
                        eps[r].lincomb(0.0, &[(wp, pt), (w0, &*x0), (-(wp + w0), &*den)])?;
                    }
                }
                let w = weights(r);
                let mut terms: Vec<(f64, &B)> = vec![(1.0, &*x0)];
                for (j, &wj) in w.iter().enumerate().take(r + 1) {
                    if wj != 0.0 {
                        terms.push((h * wj, &eps[j]));
                    }
                }
                xs.lincomb(0.0, &terms)?;
            }
        }
        // eta = 0: the iteration's result is the new x (RES4LYF's `x = x_next`).
        x.copy_from(xs)?;
    }
    Ok(())
}
