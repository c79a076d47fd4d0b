//! `samplers check`: run a sampler on the analytic Gaussian-data problem and measure its error against the
//! closed-form probability-flow ODE solution, and the empirical order of convergence over step counts.
use super::buffer::Buffer;
use super::model::GaussianData;
use super::noise::{NoNoise, NoiseSource, PhiloxNoise, fill_normal_host};
use super::registry::{self, SamplerOptions};
use super::schedule::{self, ModelSampling};
use super::stepper::sample;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// What to run.
#[derive(Clone, Debug)]
pub struct CheckSpec {
    pub sampler: String,
    pub scheduler: String,
    pub sigma_min: f64,
    pub sigma_max: f64,
    /// Keep the schedule's final 0 (the last step is then the sampler's denoise step).
    pub to_zero: bool,
    /// Flow convention (sigma = t in (0, 1]) instead of VE.
    pub flow: bool,
    pub elements: usize,
    pub seed: u64,
    pub f32: bool,
    pub opts: SamplerOptions,
}
impl Default for CheckSpec {
    fn default() -> Self {
        Self {
            sampler: "euler".into(),
            scheduler: "exponential".into(),
            sigma_min: 0.05,
            sigma_max: 10.0,
            to_zero: false,
            flow: false,
            elements: 64,
            seed: 0,
            f32: false,
            opts: SamplerOptions::default(),
        }
    }
}

/// Result of one run.
#[derive(Clone, Debug)]
pub struct CheckRun {
    pub steps: usize,
    pub max_err: f64,
    pub rms_err: f64,
    pub x: Vec<f64>,
    pub calls: usize,
}

/// The schedule `check` uses: a named scheduler over [sigma_min, sigma_max], final 0 dropped unless asked.
pub fn check_sigmas(spec: &CheckSpec, steps: usize) -> Result<Vec<f64>> {
    let ms = ModelSampling::sd();
    let range = Some((spec.sigma_min, spec.sigma_max));
    if spec.to_zero {
        return schedule::by_name(&spec.scheduler, steps, &ms, range);
    }
    // One more point, then drop the final 0, so there are still `steps` steps ending at sigma_min.
    let mut s = schedule::by_name(&spec.scheduler, steps + 1, &ms, range)?;
    if s.last() == Some(&0.0) {
        s.pop();
    }
    Ok(s)
}

/// Initial sample from the marginal at sigma_max: `mu + sqrt(s^2 + sigma^2) z` (VE) or
/// `(1 - t) mu + sqrt((1-t)^2 s^2 + t^2) z` (flow), z from Philox stream 0 of `seed`.
pub fn initial(data: &GaussianData, sigma: f64, seed: u64) -> Vec<f64> {
    let mut z = vec![0.0f64; data.mu.len()];
    fill_normal_host(&mut z, seed, 0);
    z.iter()
        .zip(data.mu.iter().zip(&data.s))
        .map(|(z, (m, s))| {
            if data.flow {
                let a = 1.0 - sigma;
                a * m + (a * a * s * s + sigma * sigma).sqrt() * z
            } else {
                m + (s * s + sigma * sigma).sqrt() * z
            }
        })
        .collect()
}

/// Run `spec.sampler` for `steps` steps from `init` (or the default initial sample).
pub fn run(spec: &CheckSpec, steps: usize, init: Option<&[f64]>) -> Result<CheckRun> {
    let data = GaussianData::standard(spec.elements, spec.flow);
    let sigmas = check_sigmas(spec, steps)?;
    let x0: Vec<f64> = match init {
        Some(v) => {
            if v.len() != spec.elements {
                bail!(
                    "--init has {} values; the problem has {} elements (set --elements)",
                    v.len(),
                    spec.elements
                );
            }
            v.to_vec()
        }
        None => initial(&data, sigmas[0], spec.seed),
    };
    let exact = data.exact(&x0, sigmas[0], *sigmas.last().expect("non-empty"));
    let info = registry::info(&spec.sampler);
    let mut calls = 0usize;
    let x = if spec.f32 {
        let mut x: Vec<f32> = x0.iter().map(|&v| v as f32).collect();
        go(spec, &data, &mut x, &sigmas, &mut calls, info.as_ref())?;
        x.to_host_f64()?
    } else {
        let mut x = x0.clone();
        go(spec, &data, &mut x, &sigmas, &mut calls, info.as_ref())?;
        x
    };
    let err: Vec<f64> = x.iter().zip(&exact).map(|(a, b)| (a - b).abs()).collect();
    let max_err = err.iter().cloned().fold(0.0, f64::max);
    let rms_err = (err.iter().map(|e| e * e).sum::<f64>() / err.len() as f64).sqrt();
    Ok(CheckRun {
        steps,
        max_err,
        rms_err,
        x,
        calls,
    })
}

fn go<B: Buffer + 'static>(
    spec: &CheckSpec,
    data: &GaussianData,
    x: &mut B,
    sigmas: &[f64],
    calls: &mut usize,
    info: Option<&registry::SamplerInfo>,
) -> Result<()> {
    let mut sampler = registry::build::<B>(&spec.sampler, &spec.opts)?;
    let mut d = data.clone();
    let mut model = |x: &B, s: f64, out: &mut B| -> Result<()> {
        *calls += 1;
        super::model::Denoiser::denoise(&mut d, x, s, out)
    };
    // Stochastic samplers draw noise even at eta = 0 (with a zero coefficient, as k-diffusion does).
    let o = &spec.opts;
    let stochastic = info.is_some_and(|i| i.stochastic)
        || o.noise_mode != super::noise_mode::NoiseMode::None
        || (o.eta_substep != 0.0 && o.noise_mode_substep != super::noise_mode::NoiseMode::None);
    let mut philox = PhiloxNoise::new(spec.seed);
    let mut none = NoNoise;
    let noise: &mut dyn NoiseSource<B> = if stochastic { &mut philox } else { &mut none };
    sample(
        sampler.as_mut(),
        &mut model,
        noise,
        x,
        sigmas,
        &mut |_, _| {},
    )
}

/// Empirical orders between consecutive runs: `log(e_a / e_b) / log(n_b / n_a)`.
pub fn orders(runs: &[CheckRun]) -> Vec<f64> {
    runs.windows(2)
        .map(|w| (w[0].max_err / w[1].max_err).ln() / (w[1].steps as f64 / w[0].steps as f64).ln())
        .collect()
}

/// Read a little-endian f32/f64 .npy file as f64 values.
pub fn read_npy(path: &Path) -> Result<Vec<f64>> {
    let b = std::fs::read(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        bail!("'{}' is not a .npy file", path.display());
    }
    let (hlen, off) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        if b.len() < 12 {
            bail!("'{}' is truncated", path.display());
        }
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    if b.len() < off + hlen {
        bail!("'{}' is truncated", path.display());
    }
    let header = String::from_utf8_lossy(&b[off..off + hlen]);
    if header.contains("'fortran_order': True") {
        bail!(
            "'{}': Fortran-order arrays are not supported",
            path.display()
        );
    }
    let data = &b[off + hlen..];
    if header.contains("'<f8'") {
        Ok(data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    } else if header.contains("'<f4'") {
        Ok(data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
            .collect())
    } else {
        bail!(
            "'{}': only little-endian float32/float64 arrays are supported (header {header})",
            path.display()
        )
    }
}

/// Write values as a 1-D little-endian f64 .npy file.
pub fn write_npy(path: &Path, v: &[f64]) -> Result<()> {
    let mut header = format!(
        "{{'descr': '<f8', 'fortran_order': False, 'shape': ({},), }}",
        v.len()
    );
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    for x in v {
        out.extend(x.to_le_bytes());
    }
    std::fs::write(path, out).with_context(|| format!("cannot write '{}'", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn npy_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.npy");
        let v = vec![1.5, -2.0, 3.25];
        write_npy(&p, &v).unwrap();
        assert_eq!(read_npy(&p).unwrap(), v);
        std::fs::write(&p, b"nope").unwrap();
        assert!(read_npy(&p).is_err());
    }
}
