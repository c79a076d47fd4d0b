//! Noise schedules (sigma sequences, highest first). k-diffusion's continuous schedules, ComfyUI's schedules
//! over a model's discrete sigma table, RES4LYF's extras, and the Flux/SD3 time shift.
use anyhow::{Result, bail};

/// A model's noise parameterization, as ComfyUI's `model_sampling` sees it (for the discrete schedulers).
#[derive(Clone, Debug)]
pub enum ModelSampling {
    /// Discrete VP (SD 1.x, SDXL): 1000 training sigmas from a "scaled linear" beta schedule.
    Discrete { sigmas: Vec<f64> },
    /// Rectified flow with SD3's shift `s`: sigma(t) = s t / (1 + (s - 1) t), t = k/1000, k = 1..1000.
    Flow { shift: f64, sigmas: Vec<f64> },
    /// Rectified flow with Flux's exponential shift mu: sigma(t) = e^mu / (e^mu + 1/t - 1), t = k/10000.
    Flux { mu: f64, sigmas: Vec<f64> },
}

impl ModelSampling {
    /// SD 1.x / SDXL: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, sigma = sqrt((1 - abar)/abar).
    pub fn sd() -> Self {
        let n = 1000;
        let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let mut abar = 1.0;
        let sigmas = (0..n)
            .map(|i| {
                let beta = (a + (b - a) * i as f64 / (n - 1) as f64).powi(2);
                abar *= 1.0 - beta;
                ((1.0 - abar) / abar).sqrt()
            })
            .collect();
        Self::Discrete { sigmas }
    }
    pub fn sd3(shift: f64) -> Self {
        let sigmas = (1..=1000)
            .map(|k| time_snr_shift(shift, k as f64 / 1000.0))
            .collect();
        Self::Flow { shift, sigmas }
    }
    pub fn flux(mu: f64) -> Self {
        let sigmas = (1..=10000)
            .map(|k| flux_time_shift(mu, 1.0, k as f64 / 10000.0))
            .collect();
        Self::Flux { mu, sigmas }
    }
    /// By model name: sd15, sdxl, sd3 (shift 3), flux (mu 1.15, ComfyUI's default).
    pub fn for_model(name: &str) -> Result<Self> {
        Ok(match name {
            "sd15" | "sd1" | "sdxl" | "sd2" => Self::sd(),
            "sd3" | "sd35" => Self::sd3(3.0),
            "flux" => Self::flux(1.15),
            _ => bail!("unknown model '{name}'; valid: sd15, sdxl, sd3, flux"),
        })
    }
    pub fn sigmas(&self) -> &[f64] {
        match self {
            Self::Discrete { sigmas } | Self::Flow { sigmas, .. } | Self::Flux { sigmas, .. } => {
                sigmas
            }
        }
    }
    pub fn sigma_min(&self) -> f64 {
        self.sigmas()[0]
    }
    pub fn sigma_max(&self) -> f64 {
        *self.sigmas().last().expect("non-empty table")
    }
    /// ComfyUI `timestep(sigma)`: nearest training index in log sigma (discrete) or the continuous time.
    pub fn timestep(&self, sigma: f64) -> f64 {
        match self {
            Self::Discrete { sigmas } => {
                let ls = sigma.ln();
                let mut best = 0;
                for (k, s) in sigmas.iter().enumerate() {
                    if (ls - s.ln()).abs() < (ls - sigmas[best].ln()).abs() {
                        best = k;
                    }
                }
                best as f64
            }
            Self::Flow { .. } => sigma * 1000.0,
            Self::Flux { .. } => sigma,
        }
    }
    /// ComfyUI `percent_to_sigma`: the sigma at a fraction of the way through sampling (0 = start).
    pub fn percent_to_sigma(&self, percent: f64) -> f64 {
        if percent <= 0.0 {
            return 999_999_999.9;
        }
        if percent >= 1.0 {
            return 0.0;
        }
        let p = 1.0 - percent;
        match self {
            Self::Discrete { .. } => self.sigma(p * 999.0),
            Self::Flow { .. } => self.sigma(p * 1000.0),
            Self::Flux { .. } => self.sigma(p),
        }
    }
    /// ComfyUI `sigma(timestep)`: log-linear interpolation in the table (discrete) or the shift formula.
    pub fn sigma(&self, t: f64) -> f64 {
        match self {
            Self::Discrete { sigmas } => {
                let t = t.clamp(0.0, (sigmas.len() - 1) as f64);
                let (lo, hi) = (t.floor() as usize, t.ceil() as usize);
                let w = t - t.floor();
                ((1.0 - w) * sigmas[lo].ln() + w * sigmas[hi].ln()).exp()
            }
            Self::Flow { shift, .. } => time_snr_shift(*shift, t / 1000.0),
            Self::Flux { mu, .. } => flux_time_shift(*mu, 1.0, t),
        }
    }
}

/// SD3 shift: `s t / (1 + (s - 1) t)`.
pub fn time_snr_shift(shift: f64, t: f64) -> f64 {
    if shift == 1.0 {
        return t;
    }
    shift * t / (1.0 + (shift - 1.0) * t)
}
/// Flux shift: `e^mu / (e^mu + (1/t - 1)^sigma)`.
pub fn flux_time_shift(mu: f64, sigma: f64, t: f64) -> f64 {
    mu.exp() / (mu.exp() + (1.0 / t - 1.0).powf(sigma))
}
/// Resolution-dependent mu (Flux, diffusers `calculate_shift`): linear in the token count between
/// (256, 0.5) and (4096, 1.15). The token count of a WxH image is (W/16)(H/16).
pub fn flux_mu(image_seq_len: f64) -> f64 {
    let (x1, x2, y1, y2) = (256.0, 4096.0, 0.5, 1.15);
    let m = (y2 - y1) / (x2 - x1);
    image_seq_len * m + (y1 - m * x1)
}

pub(crate) fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    // torch/numpy linspace: the first half from a, the second half from b (so both ends are exact).
    let step = (b - a) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                a + step * i as f64
            } else {
                b - step * (n - 1 - i) as f64
            }
        })
        .collect()
}
fn append_zero(mut v: Vec<f64>) -> Vec<f64> {
    v.push(0.0);
    v
}

/// Karras et al. (2022): `(max^(1/rho) + ramp (min^(1/rho) - max^(1/rho)))^rho`, then 0.
pub fn karras(n: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    append_zero(
        linspace(0.0, 1.0, n)
            .into_iter()
            .map(|r| (hi + r * (lo - hi)).powf(rho))
            .collect(),
    )
}
/// Uniform in log sigma, then 0.
pub fn exponential(n: usize, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    append_zero(
        linspace(sigma_max.ln(), sigma_min.ln(), n)
            .into_iter()
            .map(f64::exp)
            .collect(),
    )
}
/// Polynomial in log sigma, then 0.
pub fn polyexponential(n: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let (a, b) = (sigma_min.ln(), sigma_max.ln());
    append_zero(
        linspace(1.0, 0.0, n)
            .into_iter()
            .map(|r| (r.powf(rho) * (b - a) + a).exp())
            .collect(),
    )
}
/// Continuous VP (Song et al.), then 0.
pub fn vp(n: usize, beta_d: f64, beta_min: f64, eps_s: f64) -> Vec<f64> {
    append_zero(
        linspace(1.0, eps_s, n)
            .into_iter()
            .map(|t| ((beta_d * t * t / 2.0 + beta_min * t).exp() - 1.0).sqrt())
            .collect(),
    )
}
/// Laplace (Tiankai et al. 2024) as ComfyUI has it: n sigmas clamped to [min, max], no final 0.
pub fn laplace(n: usize, sigma_min: f64, sigma_max: f64, mu: f64, beta: f64) -> Vec<f64> {
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|x| {
            let sign = (0.5 - x).signum() * if x == 0.5 { 0.0 } else { 1.0 };
            let lmb = mu - beta * sign * (1.0 - 2.0 * (0.5 - x).abs() + 1e-5).ln();
            lmb.exp().clamp(sigma_min, sigma_max)
        })
        .collect()
}
/// KL-optimal (Sabour et al. 2024): `tan(r atan(min) + (1 - r) atan(max))`, r = i/(n-1), then 0.
pub fn kl_optimal(n: usize, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    append_zero(
        (0..n)
            .map(|i| {
                let r = if n > 1 {
                    i as f64 / (n - 1) as f64
                } else {
                    0.0
                };
                (r * sigma_min.atan() + (1.0 - r) * sigma_max.atan()).tan()
            })
            .collect(),
    )
}

/// ComfyUI "simple": every (len/steps)-th training sigma from the top, then 0.
pub fn simple(ms: &ModelSampling, steps: usize) -> Vec<f64> {
    let s = ms.sigmas();
    let ss = s.len() as f64 / steps as f64;
    append_zero(
        (0..steps)
            .map(|x| s[s.len() - 1 - (x as f64 * ss) as usize])
            .collect(),
    )
}
/// ComfyUI "normal" (and "sgm_uniform" with `sgm`): uniform in the model's timestep.
pub fn normal(ms: &ModelSampling, steps: usize, sgm: bool) -> Vec<f64> {
    let start = ms.timestep(ms.sigma_max());
    let end = ms.timestep(ms.sigma_min());
    let mut append = true;
    let ts = if sgm {
        let mut t = linspace(start, end, steps + 1);
        t.pop();
        t
    } else {
        let mut n = steps;
        if ms.sigma(end).abs() < 1e-5 {
            n += 1;
            append = false;
        }
        linspace(start, end, n)
    };
    let v: Vec<f64> = ts.into_iter().map(|t| ms.sigma(t)).collect();
    if append { append_zero(v) } else { v }
}
/// ComfyUI "ddim_uniform": every (len/steps)-th training sigma from index 1, reversed, after a 0.
pub fn ddim_uniform(ms: &ModelSampling, steps: usize) -> Vec<f64> {
    let s = ms.sigmas();
    let mut steps = steps;
    let mut sigs = Vec::new();
    if s[1].abs() < 1e-5 {
        steps += 1;
    } else {
        sigs.push(0.0);
    }
    let ss = (s.len() / steps).max(1);
    let mut x = 1;
    while x < s.len() {
        sigs.push(s[x]);
        x += ss;
    }
    sigs.reverse();
    sigs
}
/// ComfyUI "beta" (Lee et al. 2024): training sigmas at Beta(alpha, beta) quantiles of 1 - i/steps,
/// duplicates dropped, then 0. ("beta57" is alpha = 0.5, beta = 0.7, RES4LYF's default.)
pub fn beta(ms: &ModelSampling, steps: usize, alpha: f64, beta: f64) -> Vec<f64> {
    let s = ms.sigmas();
    let total = (s.len() - 1) as f64;
    let mut out = Vec::new();
    let mut last = -1.0;
    for i in 0..steps {
        let q = 1.0 - i as f64 / steps as f64;
        let t = (beta_ppf(q, alpha, beta) * total).round_ties_even();
        if t != last {
            out.push(s[t as usize]);
        }
        last = t;
    }
    append_zero(out)
}
/// ComfyUI "linear_quadratic" (Mochi): linear then quadratic in 1 - sigma, scaled by sigma_max.
pub fn linear_quadratic(
    ms: &ModelSampling,
    steps: usize,
    threshold_noise: f64,
    linear_steps: Option<usize>,
) -> Vec<f64> {
    let sched: Vec<f64> = if steps == 1 {
        vec![1.0, 0.0]
    } else {
        let ls = linear_steps.unwrap_or(steps / 2);
        let mut v: Vec<f64> = (0..ls)
            .map(|i| i as f64 * threshold_noise / ls as f64)
            .collect();
        let diff = ls as f64 - threshold_noise * steps as f64;
        let qs = (steps - ls) as f64;
        let qc = diff / (ls as f64 * qs * qs);
        let lc = threshold_noise / ls as f64 - 2.0 * diff / (qs * qs);
        let c = qc * (ls as f64).powi(2);
        v.extend((ls..steps).map(|i| qc * (i as f64).powi(2) + lc * i as f64 + c));
        v.push(1.0);
        v.into_iter().map(|x| 1.0 - x).collect()
    };
    sched.into_iter().map(|x| x * ms.sigma_max()).collect()
}

/// Regularized incomplete beta I_x(a, b) by Lentz's continued fraction.
pub fn beta_inc(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - beta_inc(1.0 - x, b, a);
    }
    let tiny = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut f = d;
    for m in 1..500 {
        let m = m as f64;
        for num in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + num * d;
            if d.abs() < tiny {
                d = tiny;
            }
            c = 1.0 + num / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-16 {
            break;
        }
    }
    ln_front.exp() * f / a
}
/// Lanczos log-gamma (g = 7, 9 terms), ~1e-15 relative.
pub fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}
/// Inverse of [`beta_inc`] by bisection (monotone, so robust; 100 halvings reach f64 resolution).
pub fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let m = 0.5 * (lo + hi);
        if beta_inc(m, a, b) < q {
            lo = m;
        } else {
            hi = m;
        }
        if hi - lo < 1e-17 {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// RES4LYF "bong_tangent": two arctan arcs (1 -> 0.5 -> 0) meeting at a pivot; `steps + 1` values ending
/// in 0. Like RES4LYF it ignores the model's sigma range (it is meant for flow models, sigma in [0, 1]).
pub fn bong_tangent(n: usize) -> Vec<f64> {
    bong_tangent_with(n, 1.0, 0.5, 0.0, [0.6, 0.6], [0.2, 0.2])
}
fn bong_tangent_with(
    n: usize,
    start: f64,
    middle: f64,
    end: f64,
    pivot: [f64; 2],
    slope: [f64; 2],
) -> Vec<f64> {
    let steps = n + 2;
    let sf = steps as f64;
    let midpoint = ((sf * pivot[0] + sf * pivot[1]) / 2.0) as usize;
    let p1 = (sf * pivot[0]) as usize as f64;
    let p2 = (sf * pivot[1]) as usize as f64;
    let s1 = slope[0] / (sf / 40.0);
    let s2 = slope[1] / (sf / 40.0);
    let stage_2_len = steps - midpoint;
    let stage_1_len = steps - stage_2_len;
    let arc = |len: usize, slope: f64, pivot: f64, start: f64, end: f64| -> Vec<f64> {
        let f = |x: f64| ((2.0 / std::f64::consts::PI) * (-slope * (x - pivot)).atan() + 1.0) / 2.0;
        let smax = f(0.0);
        let smin = f(len as f64 - 1.0);
        let srange = smax - smin;
        (0..len)
            .map(|x| (f(x as f64) - smin) * (1.0 / srange) * (start - end) + end)
            .collect()
    };
    let a = arc(stage_1_len, s1, p1, start, middle);
    let b = arc(stage_2_len, s2, p2 - stage_1_len as f64, middle, end);
    let mut v: Vec<f64> = a[..a.len() - 1].to_vec();
    v.extend(b);
    v
}

/// Truncate a schedule for img2img: with strength `denoise` in (0, 1], keep the last `steps` sigmas of a
/// `steps / denoise`-step schedule (ComfyUI's KSampler rule).
pub fn partial(
    full_steps_for: impl Fn(usize) -> Result<Vec<f64>>,
    steps: usize,
    denoise: f64,
) -> Result<Vec<f64>> {
    if !(denoise > 0.0 && denoise <= 1.0) {
        bail!("denoise must be in (0, 1], got {denoise}");
    }
    if denoise >= 1.0 {
        return full_steps_for(steps);
    }
    let total = (steps as f64 / denoise) as usize;
    let s = full_steps_for(total)?;
    if s.len() < steps + 1 {
        bail!(
            "schedule of {} values is too short for {steps} steps",
            s.len()
        );
    }
    Ok(s[s.len() - (steps + 1)..].to_vec())
}

/// diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps sigmas (float32 like diffusers, then 0).
/// `mu = Some(m)` is dynamic shifting (Flux: `e^m / (e^m + 1/t - 1)`), else the fixed shift (SD3).
pub fn flow_match(n: usize, shift: f64, mu: Option<f64>) -> Vec<f64> {
    let train = 1000.0;
    let shift_fn = |s: f64| shift * s / (1.0 + (shift - 1.0) * s);
    // Training sigmas are k/1000 (float32), shifted unless dynamic; sigma_max/min are their ends.
    let (smax, smin) = if mu.is_some() {
        (1.0f64, (1.0f32 / 1000.0f32) as f64)
    } else {
        (
            shift_fn(1.0) as f32 as f64,
            shift_fn((1.0f32 / 1000.0f32) as f64) as f32 as f64,
        )
    };
    let v: Vec<f64> = linspace(smax * train, smin * train, n)
        .into_iter()
        .map(|t| {
            let s = t / train;
            let s = match mu {
                Some(m) => flux_time_shift(m, 1.0, s),
                None => shift_fn(s),
            };
            s as f32 as f64
        })
        .collect();
    append_zero(v)
}

/// The named schedulers `samplers sigmas` offers.
pub const SCHEDULERS: &[&str] = &[
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
    "beta57",
    "bong_tangent",
    "polyexponential",
    "laplace",
    "vp",
    "flow_shift",
];

/// A schedule by name over a model's sigmas (`ms`), or over `[sigma_min, sigma_max]` when given.
pub fn by_name(
    name: &str,
    steps: usize,
    ms: &ModelSampling,
    range: Option<(f64, f64)>,
) -> Result<Vec<f64>> {
    if steps == 0 {
        bail!("steps must be at least 1");
    }
    let (lo, hi) = range.unwrap_or((ms.sigma_min(), ms.sigma_max()));
    if !(lo > 0.0 && hi > lo) {
        bail!("need 0 < sigma_min < sigma_max, got {lo} and {hi}");
    }
    Ok(match name {
        "simple" => simple(ms, steps),
        "sgm_uniform" => normal(ms, steps, true),
        "normal" => normal(ms, steps, false),
        "karras" => karras(steps, lo, hi, 7.0),
        "exponential" => exponential(steps, lo, hi),
        "polyexponential" => polyexponential(steps, lo, hi, 1.0),
        "ddim_uniform" => ddim_uniform(ms, steps),
        "beta" => beta(ms, steps, 0.6, 0.6),
        "beta57" => beta(ms, steps, 0.5, 0.7),
        "linear_quadratic" => linear_quadratic(ms, steps, 0.025, None),
        "kl_optimal" => kl_optimal(steps, lo, hi),
        "bong_tangent" => bong_tangent(steps),
        // ComfyUI's laplace gives n sigmas without a final 0 (n - 1 steps); ask for one more to get `steps`.
        "laplace" => laplace(steps + 1, lo, hi, 0.0, 0.5),
        "vp" => vp(steps, 19.9, 0.1, 1e-3),
        "flow_shift" => match ms {
            ModelSampling::Flux { mu, .. } => flow_match(steps, 1.0, Some(*mu)),
            ModelSampling::Flow { shift, .. } => flow_match(steps, *shift, None),
            ModelSampling::Discrete { .. } => {
                bail!("flow_shift is for flow models (--model flux or sd3)")
            }
        },
        _ => bail!(
            "unknown scheduler '{name}'; valid: {}",
            SCHEDULERS.join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn beta_inc_matches_closed_forms() {
        // I_x(1, 1) = x; I_x(2, 1) = x^2; I_x(1/2, 1/2) = (2/pi) asin(sqrt x).
        for x in [0.01, 0.3, 0.5, 0.77, 0.99] {
            assert!((beta_inc(x, 1.0, 1.0) - x).abs() < 1e-13);
            assert!((beta_inc(x, 2.0, 1.0) - x * x).abs() < 1e-13);
            let a = 2.0 / std::f64::consts::PI * x.sqrt().asin();
            assert!((beta_inc(x, 0.5, 0.5) - a).abs() < 1e-12, "{x}");
            let q = beta_inc(x, 0.6, 0.6);
            assert!((beta_ppf(q, 0.6, 0.6) - x).abs() < 1e-12);
        }
    }
    #[test]
    fn sd_table_ends() {
        let ms = ModelSampling::sd();
        // Well-known SD1.x range.
        assert!((ms.sigma_min() - 0.0292).abs() < 1e-4);
        assert!((ms.sigma_max() - 14.6146).abs() < 1e-4);
        for t in [0.0, 10.0, 999.0] {
            assert!((ms.timestep(ms.sigma(t)) - t).abs() < 1e-9);
        }
    }
    #[test]
    fn schedules_are_valid() {
        for m in ["sd15", "sd3", "flux"] {
            let ms = ModelSampling::for_model(m).unwrap();
            for name in SCHEDULERS {
                if *name == "flow_shift" && m == "sd15" {
                    assert!(by_name(name, 10, &ms, None).is_err());
                    continue;
                }
                for steps in [1, 2, 7, 30] {
                    let s = by_name(name, steps, &ms, None).unwrap();
                    crate::samplers::stepper::check_sigmas(&s)
                        .unwrap_or_else(|e| panic!("{name} {m} {steps}: {e} {s:?}"));
                }
            }
        }
        assert!(by_name("nope", 10, &ModelSampling::sd(), None).is_err());
    }
    #[test]
    fn partial_takes_the_tail() {
        let full = |n| Ok(karras(n, 0.1, 10.0, 7.0));
        let p = partial(full, 10, 0.5).unwrap();
        assert_eq!(p.len(), 11);
        assert_eq!(p, karras(20, 0.1, 10.0, 7.0)[10..].to_vec());
        assert!(partial(full, 10, 0.0).is_err());
    }
}
