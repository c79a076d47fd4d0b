//! RES4LYF's stepping of implicit (fully or diagonally) tableaux at any `noise_anchor` a, at eta 0 with its
//! default implicit types (`sample_rk_beta`'s implicit branch, `init_implicit_sampling`, `newton_iter`), in
//! its form: stage points `X_r = x_0 + h sum_j a_rj eps_j` (h = sigma_next - sigma) and
//! `eps_r = (1 - a) (X_r - D_r) / sigma_r + a (x_0 - D_r) / sigma`.
//!
//! - Start: one model call `D_0 = D(x, sigma)`; every row takes `data_r = D_0` and `eps_r = eps_0 sigma /
//!   sigma_r` (RES4LYF scales eps_0 in place first, so the later rows get the factor twice when c_1 != 0).
//! - Its model-free "newton" iteration (100 Jacobi sweeps, frozen data): `eps_0` is held at its value on
//!   entry, all `X_r` (r >= start) from the current eps, then all `eps_r` from `(X_r, data_r)`; run at the
//!   start (all rows, in `init_implicit_sampling`) and again at the start of every pass (its loop's "init"),
//!   before each row's model call (rows from it on), and after the first call of each row in the first pass
//!   (the rows after it). At a = 1 eps does not depend on X: one sweep reaches its fixed
//!   point of eps (undoing the start's scaling), a second places the points from them, as RES4LYF's 100 do.
//! - Then `implicit_steps + 1` passes over the rows, each row `implicit_substeps + 1` times: newton, a model
//!   call at its point X_r (a first row at c = 0 keeps the start's value, no call), then `X_r` re-placed; the
//!   result is `x_0 + h sum_j b_j eps_j`. With bongmath, its `bong_iter` after each row's last substep; with
//!   the substep type "rebound", each substep's extra call and update before it (the step type "rebound"
//!   does not apply to implicit tableaux in RES4LYF, row offset 0).
//!
//! Proven against RES4LYF's own `init_implicit_sampling` / `newton_iter` / `update_substep` in
//! scripts/golden/samplers_res4lyf_runs.py.
use super::buffer::Buffer;
use super::refine::{Refine, StageEps, bong_iter, swap_noise};
use super::stepper::Ctx;
use super::tableau::Tableau;
use anyhow::Result;

/// RES4LYF's `newton_iter` default count.
pub const NEWTON_ITERS: usize = 100;

/// Buffers [`step`] needs for a tableau of `n` stages.
pub fn buffers(n: usize) -> usize {
    3 * n + 4
}

/// One step from `x` at `sigma` to `sigma_next` (> 0), in place; `bufs` holds [`buffers`] buffers.
#[allow(clippy::too_many_arguments)]
pub fn step<B: Buffer>(
    cx: &mut Ctx<'_, B>,
    x: &mut B,
    bufs: &mut [B],
    tab: &Tableau,
    sigma: f64,
    sigma_next: f64,
    anchor: f64,
    refine: Refine,
) -> Result<()> {
    let n = tab.stages();
    let h = sigma_next - sigma;
    let sg: Vec<f64> = tab.c.iter().map(|c| sigma + h * c).collect();
    let (eps, rest) = bufs.split_at_mut(n);
    let (data, rest) = rest.split_at_mut(n);
    let (pts, rest) = rest.split_at_mut(n + 1);
    let [x0, held, z] = rest else {
        unreachable!("buffers(n) buffers")
    };
    x0.copy_from(x)?;
    let eps_of = |out: &mut B, pt: &B, d: &B, s_r: f64, x0: &B| -> Result<()> {
        let (wp, w0) = ((1.0 - anchor) / s_r, anchor / sigma);
        out.lincomb(0.0, &[(wp, pt), (w0, x0), (-(wp + w0), d)])
    };
    // X_r = x_0 + h sum_j w_j eps_j.
    let place = |out: &mut B, w: &[f64], eps: &[B], x0: &B| -> Result<()> {
        let mut terms: Vec<(f64, &B)> = vec![(1.0, x0)];
        for (j, &wj) in w.iter().enumerate() {
            if wj != 0.0 {
                terms.push((h * wj, &eps[j]));
            }
        }
        out.lincomb(0.0, &terms)
    };
    let newton = |start: usize,
                  eps: &mut [B],
                  data: &[B],
                  pts: &mut [B],
                  held: &mut B,
                  x0: &B|
     -> Result<()> {
        if start >= n {
            return Ok(());
        }
        held.copy_from(&eps[0])?;
        // At a = 1 eps_r depends on data_r and x_0 only: the first sweep sets the eps, the second places the
        // points from them, the fixed point (needed when bongmath moved x_0 since the eps were computed).
        for _ in 0..if anchor == 1.0 { 2 } else { NEWTON_ITERS } {
            eps[0].copy_from(held)?;
            for (r, p) in pts.iter_mut().enumerate().take(n).skip(start) {
                place(p, tab.a[r], eps, x0)?;
            }
            for r in start..n {
                eps_of(&mut eps[r], &pts[r], &data[r], sg[r], x0)?;
            }
        }
        Ok(())
    };
    // Start: D(x, sigma) for every row.
    cx.model.denoise(x, sigma, &mut data[0])?;
    eps_of(&mut eps[0], x, &data[0], sigma, x0)?;
    eps[0].scale(sigma / sg[0])?;
    for (r, &s_r) in sg.iter().enumerate().skip(1) {
        let (e0, er) = eps.split_at_mut(r);
        er[0].lincomb(0.0, &[(sigma / s_r, &e0[0])])?;
        let (d0, dr) = data.split_at_mut(r);
        dr[0].copy_from(&d0[0])?;
    }
    newton(0, eps, data, pts, held, x0)?;
    for pass in 0..=refine.full {
        // RES4LYF's loop runs its "init" newton again at the start of every pass (the first one included).
        newton(0, eps, data, pts, held, x0)?;
        for row in 0..=n {
            for d in 0..=refine.diag {
                if row == n {
                    place(&mut pts[n], tab.b, eps, x0)?;
                    continue;
                }
                if d > 0 && refine.rebound_diag {
                    // RES4LYF's substep type "rebound": an extra call at the row's point and its update
                    // first (its carry-back by sigma_from_to from sigma_r to sigma_r is the identity here).
                    cx.model.denoise(&pts[row], sg[row], &mut data[row])?;
                    eps_of(&mut eps[row], &pts[row], &data[row], sg[row], x0)?;
                    place(&mut pts[row], tab.a[row], eps, x0)?;
                }
                // Substep noise (RES4LYF's implicit branch before the call): the row's point re-placed,
                // swapped at (sigma_r, sigma_r) and noised, then with bongmath its pre-call bong_iter
                // (x_0 from the noised point); the newton "pre" sweeps below re-place the point from eps, so
                // without bongmath the draw leaves no trace.
                if let Some(sn) = refine.sub
                    && row > 0
                    && let Some(st) = sn.split(sg[row], sg[row])
                {
                    place(&mut pts[row], tab.a[row], eps, x0)?;
                    swap_noise(
                        cx,
                        &mut pts[row],
                        x0,
                        z,
                        st,
                        sn.s_noise,
                        sigma,
                        sg[row],
                        sg[row],
                    )?;
                    if refine.bong.is_some() && sigma > 0.03 {
                        let (before, at) = pts.split_at_mut(row);
                        let kind = StageEps::Linear { anchor };
                        bong_iter(
                            x0, &at[0], eps, data, before, tab.a, tab.a[row], n, &sg, sigma, h,
                            kind,
                        )?;
                    }
                }
                if !(row == 0 && tab.c[0] == 0.0) {
                    newton(row, eps, data, pts, held, x0)?;
                    cx.model.denoise(&pts[row], sg[row], &mut data[row])?;
                    eps_of(&mut eps[row], &pts[row], &data[row], sg[row], x0)?;
                    if pass == 0 && d == 0 {
                        newton(row + 1, eps, data, pts, held, x0)?;
                    }
                }
                place(&mut pts[row], tab.a[row], eps, x0)?;
                if let Some(bg) = refine.bong
                    && d == refine.diag
                    && sg[row] > bg.sigma_min
                    && h < bg.sigma_max / 2.0
                    && sigma > 0.03
                {
                    let (before, at) = pts.split_at_mut(row);
                    let kind = StageEps::Linear { anchor };
                    bong_iter(
                        x0, &at[0], eps, data, before, tab.a, tab.a[row], n, &sg, sigma, h, kind,
                    )?;
                }
            }
        }
        // The pass's result; RES4LYF swaps step noise into it on every pass (the last one is kept).
        x.copy_from(&pts[n])?;
        if let Some(sn) = refine.step
            && let Some(st) = sn.split(sigma, sigma_next)
        {
            swap_noise(cx, x, x0, z, st, sn.s_noise, sigma, sigma, sigma_next)?;
        }
    }
    Ok(())
}
