//! The sampler state abstraction: a [`Sampler`] advances `x` from `sigmas[i]` to `sigmas[i+1]`, keeping what
//! it needs between steps (multistep history, scratch buffers) in itself. All buffer arithmetic goes through
//! [`Buffer::lincomb`], so the same code runs on host and device buffers.
use super::buffer::Buffer;
use super::model::Denoiser;
use super::noise::NoiseSource;
use anyhow::{Result, bail};

/// What a step may use: the model, the noise, and the whole schedule (multistep and LMS look back and ahead).
pub struct Ctx<'a, B> {
    pub model: &'a mut dyn Denoiser<B>,
    pub noise: &'a mut dyn NoiseSource<B>,
    pub sigmas: &'a [f64],
}

impl<B: Buffer> Ctx<'_, B> {
    pub fn denoise(&mut self, x: &B, sigma: f64, out: &mut B) -> Result<()> {
        self.model.denoise(x, sigma, out)
    }
    pub fn noise(&mut self, out: &mut B, sigma: f64, sigma_next: f64) -> Result<()> {
        self.noise.sample(out, sigma, sigma_next)
    }
    /// The guided prediction and the unconditional one (CFG++ samplers); without guidance both are `D`.
    pub fn denoise_uncond(&mut self, x: &B, sigma: f64, out: &mut B, uncond: &mut B) -> Result<()> {
        self.model.denoise_with_uncond(x, sigma, out, uncond)
    }
}

pub trait Sampler<B: Buffer> {
    /// Advance `x` from `cx.sigmas[i]` to `cx.sigmas[i + 1]`.
    fn step(&mut self, cx: &mut Ctx<'_, B>, x: &mut B, i: usize) -> Result<()>;
}

/// Run a sampler over a whole schedule; `on_step(i, x)` sees x after each step.
pub fn sample<B: Buffer>(
    sampler: &mut dyn Sampler<B>,
    model: &mut dyn Denoiser<B>,
    noise: &mut dyn NoiseSource<B>,
    x: &mut B,
    sigmas: &[f64],
    on_step: &mut dyn FnMut(usize, &B),
) -> Result<()> {
    check_sigmas(sigmas)?;
    let mut cx = Ctx {
        model,
        noise,
        sigmas,
    };
    for i in 0..sigmas.len() - 1 {
        sampler.step(&mut cx, x, i)?;
        on_step(i, x);
    }
    Ok(())
}

/// A schedule must be at least two finite, non-negative, non-increasing values.
pub fn check_sigmas(sigmas: &[f64]) -> Result<()> {
    if sigmas.len() < 2 {
        bail!(
            "a schedule needs at least 2 sigmas (1 step), got {}",
            sigmas.len()
        );
    }
    for (k, w) in sigmas.windows(2).enumerate() {
        if !w[0].is_finite() || !w[1].is_finite() || w[1] < 0.0 || w[1] > w[0] {
            bail!(
                "sigmas must be finite, >= 0 and non-increasing; sigmas[{k}] = {}, sigmas[{}] = {}",
                w[0],
                k + 1,
                w[1]
            );
        }
    }
    Ok(())
}

/// Scratch buffers allocated on first use, shaped like `x`.
pub struct Scratch<B> {
    pub bufs: Vec<B>,
}
impl<B> Scratch<B> {
    pub fn new() -> Self {
        Self { bufs: Vec::new() }
    }
}
impl<B: Buffer> Scratch<B> {
    pub fn get(&mut self, n: usize, like: &B) -> Result<&mut [B]> {
        if self.bufs.first().is_some_and(|b| b.len() != like.len()) {
            self.bufs.clear();
        }
        while self.bufs.len() < n {
            self.bufs.push(like.alloc_like()?);
        }
        Ok(&mut self.bufs[..n])
    }
}
impl<B> Default for Scratch<B> {
    fn default() -> Self {
        Self::new()
    }
}

/// k-diffusion's `get_ancestral_step`: the sigma to step down to and the noise to add to land on `sigma_to`.
pub fn ancestral_step(sigma_from: f64, sigma_to: f64, eta: f64) -> (f64, f64) {
    if eta == 0.0 {
        return (sigma_to, 0.0);
    }
    let up = (eta
        * (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt())
    .min(sigma_to);
    let down = (sigma_to * sigma_to - up * up).sqrt();
    (down, up)
}

/// Euler step on the probability-flow ODE: `x += (x - den)/sigma * (sigma_to - sigma)`.
pub fn euler_to<B: Buffer>(x: &mut B, den: &B, sigma: f64, sigma_to: f64) -> Result<()> {
    let r = (sigma_to - sigma) / sigma;
    x.lincomb(1.0 + r, &[(-r, den)])
}
