//! SmoothQuant (Xiao et al. 2023) as ModelOpt's INT8 `smoothquant` calibration computes it: per input channel j,
//! the pre-quantization scale `p_j = max|W_:j|^(1-alpha) / max|X_j|^alpha` (= 1/s_j of the paper) multiplies the
//! activation and divides the weight's column, moving activation outliers into the weights, where per-channel
//! INT8 scales absorb them. The layer's per-tensor activation range becomes `max_j max|X_j| p_j`. Arithmetic in
//! f32 as ModelOpt does (`model_calib.smoothquant`, `apply_pre_quant_scale_and_smooth`), including its guards:
//! channels never seen (amax 0) get p = 1 when some scale underflowed, and p is clamped to [1e-4, 1e4].
use anyhow::{Result, bail};

/// A layer's smoothing: what multiplies its input, and the input's range after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Smoothing {
    /// `p_j`, one per input channel.
    pub pre_quant_scale: Vec<f32>,
    /// The smoothed activation's absolute maximum (the per-tensor INT8 scale's amax).
    pub input_amax: f32,
}

fn pow(v: f32, e: f32) -> f32 {
    // torch lowers x ** 0.5 to sqrt; powf(0.5) can differ from it in the last place.
    if e == 0.5 { v.sqrt() } else { v.powf(e) }
}

/// The smoothing of a linear layer with weight `w` [n, k] (row-major, PyTorch layout) whose input channels reached
/// `act_amax` [k] in calibration, at migration strength `alpha` in [0, 1].
pub fn smoothing(act_amax: &[f32], w: &[f32], n: usize, k: usize, alpha: f32) -> Result<Smoothing> {
    if !(0.0..=1.0).contains(&alpha) {
        bail!("SmoothQuant alpha {alpha} is outside [0, 1]");
    }
    if act_amax.len() != k || w.len() != n * k {
        bail!(
            "SmoothQuant: {} activation maxima and {} weights for a [{n}, {k}] layer",
            act_amax.len(),
            w.len()
        );
    }
    let mut wmax = vec![0f32; k];
    for row in w.chunks_exact(k.max(1)) {
        for (m, v) in wmax.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    let mut p: Vec<f32> = wmax
        .iter()
        .zip(act_amax)
        .map(|(wm, a)| pow(*wm, 1.0 - alpha) / pow(*a, alpha))
        .collect();
    const EPS: f32 = 1.0 / (1u64 << 31) as f32;
    if p.iter().any(|v| *v <= EPS) {
        for (v, a) in p.iter_mut().zip(act_amax) {
            if *a <= EPS {
                *v = 1.0;
            }
        }
    }
    for v in p.iter_mut() {
        // NaN (0/0: a channel zero in both) is kept at 1, as no migration.
        *v = if v.is_nan() { 1.0 } else { v.clamp(1e-4, 1e4) };
    }
    let input_amax = act_amax.iter().zip(&p).fold(0f32, |m, (a, s)| m.max(a * s));
    Ok(Smoothing {
        pre_quant_scale: p,
        input_amax,
    })
}

impl Smoothing {
    /// `w` [n, k] with each column j multiplied by `1 / p_j` (ModelOpt's inverse scale, then the product).
    pub fn smooth_weight(&self, w: &[f32]) -> Vec<f32> {
        let inv: Vec<f32> = self.pre_quant_scale.iter().map(|p| 1.0 / p).collect();
        let k = inv.len().max(1);
        w.chunks_exact(k)
            .flat_map(|row| row.iter().zip(&inv).map(|(v, s)| v * s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_outliers_and_keeps_the_product() {
        // Channel 0 of the activation is an outlier: its scale shrinks it, the weight column grows.
        let w = [0.5f32, 0.5, 0.5, 0.5];
        let s = smoothing(&[100.0, 1.0], &w, 2, 2, 0.5).unwrap();
        assert!(s.pre_quant_scale[0] < s.pre_quant_scale[1]);
        let ws = s.smooth_weight(&w);
        // (x p) (w / p) = x w per channel.
        for j in 0..2 {
            let x = 3.0f32;
            assert!(((x * s.pre_quant_scale[j]) * ws[j] - x * w[j]).abs() < 1e-5);
        }
        assert!(s.input_amax < 100.0);
        assert!(smoothing(&[1.0], &w, 2, 2, 0.5).is_err());
        assert!(smoothing(&[1.0, 1.0], &w, 2, 2, 1.5).is_err());
        // alpha 0: only the weight's range matters; no channel is NaN.
        let z = smoothing(&[0.0, 0.0], &[0.0; 4], 2, 2, 0.5).unwrap();
        assert!(z.pre_quant_scale.iter().all(|v| v.is_finite()));
    }
}
