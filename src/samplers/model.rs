//! What samplers call: a denoiser `D(x, sigma)` (k-diffusion convention, the model's estimate of the clean
//! sample), the network parameterizations that produce it, classifier-free guidance, and the analytic
//! Gaussian-data denoiser used to prove the samplers.
use super::buffer::Buffer;
use anyhow::{Result, bail};

/// `out = D(x, sigma)`.
pub trait Denoiser<B: Buffer> {
    fn denoise(&mut self, x: &B, sigma: f64, out: &mut B) -> Result<()>;
    /// For CFG++ samplers: also the unconditional prediction. Models without guidance have none.
    fn denoise_with_uncond(
        &mut self,
        x: &B,
        sigma: f64,
        out: &mut B,
        uncond: &mut B,
    ) -> Result<()> {
        self.denoise(x, sigma, out)?;
        uncond.copy_from(out)
    }
}

/// Closures are denoisers (handy in tests and pipelines).
impl<B: Buffer, F: FnMut(&B, f64, &mut B) -> Result<()>> Denoiser<B> for F {
    fn denoise(&mut self, x: &B, sigma: f64, out: &mut B) -> Result<()> {
        self(x, sigma, out)
    }
}

/// What the network predicts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Prediction {
    /// Noise, VP model (SD 1.x/2.x eps, SDXL): input scaled by `1/sqrt(sigma^2+1)`.
    Eps,
    /// v-prediction (SD 2.x 768-v), sigma_data = 1.
    V,
    /// The clean sample directly.
    X0,
    /// Rectified flow (Flux, SD3): `x_t = (1-t) x0 + t eps`, the network gives `v = eps - x0`, sigma = t.
    Flow,
    /// EDM preconditioning (Karras et al. 2022) with the given sigma_data.
    Edm { sigma_data: f64 },
}

impl Prediction {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "eps" | "epsilon" => Self::Eps,
            "v" | "v_prediction" => Self::V,
            "x0" | "sample" => Self::X0,
            "flow" | "velocity" => Self::Flow,
            "edm" => Self::Edm { sigma_data: 0.5 },
            _ => bail!("unknown prediction '{s}'; valid: eps, v, x0, flow, edm"),
        })
    }
    /// `(c_skip, c_out, c_in)`: `D(x) = c_skip x + c_out F(c_in x, ...)`.
    pub fn scalings(&self, sigma: f64) -> (f64, f64, f64) {
        match *self {
            Self::Eps => (1.0, -sigma, 1.0 / (sigma * sigma + 1.0).sqrt()),
            Self::V => {
                let d = sigma * sigma + 1.0;
                (1.0 / d, -sigma / d.sqrt(), 1.0 / d.sqrt())
            }
            Self::X0 => (0.0, 1.0, 1.0),
            Self::Flow => (1.0, -sigma, 1.0),
            Self::Edm { sigma_data: sd } => {
                let d = sigma * sigma + sd * sd;
                (sd * sd / d, sigma * sd / d.sqrt(), 1.0 / d.sqrt())
            }
        }
    }
}

/// A raw network: `out = F(x_in, sigma)` (the network's own timestep conditioning is its business).
pub trait Network<B> {
    fn forward(&mut self, x_in: &B, sigma: f64, out: &mut B) -> Result<()>;
}

/// Turns a network of a given [`Prediction`] into a [`Denoiser`].
pub struct Parameterized<N, B> {
    pub net: N,
    pub prediction: Prediction,
    scratch: Option<(B, B)>,
}
impl<N, B> Parameterized<N, B> {
    pub fn new(net: N, prediction: Prediction) -> Self {
        Self {
            net,
            prediction,
            scratch: None,
        }
    }
}
impl<B: Buffer, N: Network<B>> Denoiser<B> for Parameterized<N, B> {
    fn denoise(&mut self, x: &B, sigma: f64, out: &mut B) -> Result<()> {
        let (c_skip, c_out, c_in) = self.prediction.scalings(sigma);
        if self.scratch.is_none() {
            self.scratch = Some((x.alloc_like()?, x.alloc_like()?));
        }
        let (xin, f) = self.scratch.as_mut().expect("set above");
        xin.lincomb(0.0, &[(c_in, x)])?;
        self.net.forward(xin, sigma, f)?;
        out.lincomb(0.0, &[(c_skip, x), (c_out, &*f)])
    }
}

/// Classifier-free guidance over two denoisers: `D = u + scale (c - u)`. Gives the unconditional
/// prediction to CFG++ samplers.
pub struct Cfg<C, U, B> {
    pub cond: C,
    pub uncond: U,
    pub scale: f64,
    scratch: Option<(B, B)>,
}
impl<C, U, B> Cfg<C, U, B> {
    pub fn new(cond: C, uncond: U, scale: f64) -> Self {
        Self {
            cond,
            uncond,
            scale,
            scratch: None,
        }
    }
}
impl<B: Buffer, C: Denoiser<B>, U: Denoiser<B>> Denoiser<B> for Cfg<C, U, B> {
    fn denoise(&mut self, x: &B, sigma: f64, out: &mut B) -> Result<()> {
        if self.scratch.is_none() {
            self.scratch = Some((x.alloc_like()?, x.alloc_like()?));
        }
        let (c, u) = self.scratch.as_mut().expect("set above");
        self.cond.denoise(x, sigma, c)?;
        self.uncond.denoise(x, sigma, u)?;
        out.lincomb(0.0, &[(1.0 - self.scale, &*u), (self.scale, &*c)])
    }
    fn denoise_with_uncond(
        &mut self,
        x: &B,
        sigma: f64,
        out: &mut B,
        uncond: &mut B,
    ) -> Result<()> {
        if self.scratch.is_none() {
            self.scratch = Some((x.alloc_like()?, x.alloc_like()?));
        }
        let (c, _) = self.scratch.as_mut().expect("set above");
        self.cond.denoise(x, sigma, c)?;
        self.uncond.denoise(x, sigma, uncond)?;
        out.lincomb(0.0, &[(1.0 - self.scale, &*uncond), (self.scale, &*c)])
    }
}

/// The exact denoiser of Gaussian data: every element independent, `x0_i ~ N(mu_i, s_i^2)`.
///
/// VE (k-diffusion) convention: `x = x0 + sigma eps`, so `D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)`
/// and the probability-flow ODE `dx/dsigma = (x - D)/sigma` has the solution
/// `x(sigma) = mu + (x(sigma0) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma0^2)`.
///
/// Flow convention (`x_t = (1-t) x0 + t eps`, sigma = t): `D = mu + (1-t) s^2 / V (x - (1-t) mu)` with
/// `V = (1-t)^2 s^2 + t^2`, and `x(t) = (1-t) mu + (x(t0) - (1-t0) mu) sqrt(V(t) / V(t0))`.
#[derive(Clone, Debug)]
pub struct GaussianData {
    pub mu: Vec<f64>,
    pub s: Vec<f64>,
    pub flow: bool,
}

impl GaussianData {
    /// The default problem of `samplers check`: `n` elements with means and stds spread over a range.
    pub fn standard(n: usize, flow: bool) -> Self {
        let mu = (0..n).map(|i| 0.8 * ((i as f64) * 1.7).sin()).collect();
        let s = (0..n)
            .map(|i| 0.3 + 0.5 * (0.5 + 0.5 * ((i as f64) * 0.9).cos()))
            .collect();
        Self { mu, s, flow }
    }
    pub fn denoise_f64(&self, x: &[f64], sigma: f64) -> Vec<f64> {
        x.iter()
            .zip(self.mu.iter().zip(&self.s))
            .map(|(&x, (&m, &s))| {
                if self.flow {
                    let a = 1.0 - sigma;
                    let v = a * a * s * s + sigma * sigma;
                    m + a * s * s / v * (x - a * m)
                } else {
                    m + s * s / (s * s + sigma * sigma) * (x - m)
                }
            })
            .collect()
    }
    /// Exact solution of the probability-flow ODE from `x` at `sigma0` to `sigma1`.
    pub fn exact(&self, x: &[f64], sigma0: f64, sigma1: f64) -> Vec<f64> {
        x.iter()
            .zip(self.mu.iter().zip(&self.s))
            .map(|(&x, (&m, &s))| {
                if self.flow {
                    let v = |t: f64| (1.0 - t) * (1.0 - t) * s * s + t * t;
                    (1.0 - sigma1) * m + (x - (1.0 - sigma0) * m) * (v(sigma1) / v(sigma0)).sqrt()
                } else {
                    m + (x - m) * ((s * s + sigma1 * sigma1) / (s * s + sigma0 * sigma0)).sqrt()
                }
            })
            .collect()
    }
}

impl<B: Buffer> Denoiser<B> for GaussianData {
    fn denoise(&mut self, x: &B, sigma: f64, out: &mut B) -> Result<()> {
        let xv = x.to_host_f64()?;
        if xv.len() != self.mu.len() {
            bail!(
                "analytic denoiser has {} elements, got {}",
                self.mu.len(),
                xv.len()
            );
        }
        out.set_from_f64(&self.denoise_f64(&xv, sigma))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A network that predicts exactly what its parameterization asks, from the analytic denoiser: wrapping it
    /// must give back the analytic denoiser.
    struct Exact {
        data: GaussianData,
        p: Prediction,
    }
    impl Network<Vec<f64>> for Exact {
        fn forward(&mut self, x_in: &Vec<f64>, sigma: f64, out: &mut Vec<f64>) -> Result<()> {
            let (c_skip, c_out, c_in) = self.p.scalings(sigma);
            let x: Vec<f64> = x_in.iter().map(|v| v / c_in).collect();
            let d = self.data.denoise_f64(&x, sigma);
            // The target F with D = c_skip x + c_out F.
            *out = x
                .iter()
                .zip(&d)
                .map(|(x, d)| (d - c_skip * x) / c_out)
                .collect();
            // Cross-check the textbook meaning of each target.
            for i in 0..x.len() {
                let f = out[i];
                match self.p {
                    Prediction::Eps => assert!((x[i] - sigma * f - d[i]).abs() < 1e-12),
                    Prediction::Flow => assert!((x[i] - sigma * f - d[i]).abs() < 1e-12),
                    Prediction::X0 => assert!((f - d[i]).abs() < 1e-12),
                    _ => {}
                }
            }
            Ok(())
        }
    }

    #[test]
    fn parameterizations_reconstruct_the_denoiser() {
        for p in [
            Prediction::Eps,
            Prediction::V,
            Prediction::X0,
            Prediction::Flow,
            Prediction::Edm { sigma_data: 0.5 },
        ] {
            let data = GaussianData::standard(9, p == Prediction::Flow);
            let mut m = Parameterized::new(
                Exact {
                    data: data.clone(),
                    p,
                },
                p,
            );
            let x: Vec<f64> = (0..9).map(|i| i as f64 * 0.3 - 1.0).collect();
            let mut out = vec![0.0; 9];
            let sigma = if p == Prediction::Flow { 0.4 } else { 2.5 };
            m.denoise(&x, sigma, &mut out).unwrap();
            let d = data.denoise_f64(&x, sigma);
            for i in 0..9 {
                assert!((out[i] - d[i]).abs() < 1e-12, "{p:?}");
            }
        }
    }

    #[test]
    fn v_prediction_is_alpha_eps_minus_sigma_x0() {
        // In VP terms with alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma alpha: v = alpha eps - sigma_vp x0.
        let sigma: f64 = 1.7;
        let (x0, eps) = (0.6, -1.1);
        let x = x0 + sigma * eps;
        let a = 1.0 / (1.0 + sigma * sigma).sqrt();
        let v = a * eps - sigma * a * x0;
        let (c_skip, c_out, _) = Prediction::V.scalings(sigma);
        assert!((c_skip * x + c_out * v - x0).abs() < 1e-12);
    }

    #[test]
    fn analytic_solution_solves_the_ode() {
        for flow in [false, true] {
            let g = GaussianData::standard(5, flow);
            let x = vec![0.3, -1.2, 2.0, 0.1, -0.4];
            let (s0, s1): (f64, f64) = if flow { (0.9, 0.6) } else { (5.0, 3.0) };
            let y = g.exact(&x, s0, s1);
            // dx/dsigma = (x - D)/sigma at s1, by central differences of the exact solution.
            let e = 1e-5;
            let yp = g.exact(&x, s0, s1 + e);
            let ym = g.exact(&x, s0, s1 - e);
            let d = g.denoise_f64(&y, s1);
            for i in 0..5 {
                let num = (yp[i] - ym[i]) / (2.0 * e);
                assert!((num - (y[i] - d[i]) / s1).abs() < 1e-7, "flow={flow}");
            }
        }
    }

    #[test]
    fn cfg_combines() {
        let mut c = |x: &Vec<f64>, _s: f64, o: &mut Vec<f64>| -> Result<()> {
            *o = x.iter().map(|v| v * 2.0).collect();
            Ok(())
        };
        let mut u = |x: &Vec<f64>, _s: f64, o: &mut Vec<f64>| -> Result<()> {
            *o = x.iter().map(|v| v + 1.0).collect();
            Ok(())
        };
        let mut g = Cfg::new(&mut c, &mut u, 3.0);
        let x = vec![1.0, 2.0];
        let (mut o, mut un) = (vec![0.0; 2], vec![0.0; 2]);
        g.denoise_with_uncond(&x, 1.0, &mut o, &mut un).unwrap();
        assert_eq!(un, vec![2.0, 3.0]);
        assert_eq!(o, vec![2.0 + 3.0 * 0.0, 3.0 + 3.0 * 1.0]);
    }
}
