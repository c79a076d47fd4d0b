//! `trt-diff samplers ...` definitions.
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum SamplersCmd {
    /// Every registered sampler: family, order, stages, model calls per step, stochastic or not.
    List,
    /// Print a schedule, one sigma per line (highest first).
    Sigmas {
        /// simple, sgm_uniform, karras, exponential, ddim_uniform, beta, normal, linear_quadratic,
        /// kl_optimal, beta57, bong_tangent, polyexponential, laplace, vp, flow_shift.
        #[arg(long, default_value = "karras")]
        scheduler: String,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// The model whose sigmas the discrete schedulers use, and the default range: sd15, sdxl, sd3, flux.
        #[arg(long, default_value = "sdxl")]
        model: String,
        #[arg(long)]
        sigma_min: Option<f64>,
        #[arg(long)]
        sigma_max: Option<f64>,
        /// img2img strength in (0, 1]: the last `steps` sigmas of a `steps/denoise`-step schedule.
        #[arg(long, default_value_t = 1.0)]
        denoise: f64,
    },
    /// Run a sampler on the analytic Gaussian-data problem and print its error against the exact solution.
    ///
    /// The data: n independent elements x0_i ~ N(mu_i, s_i^2), mu_i = 0.8 sin(1.7 i),
    /// s_i = 0.3 + 0.25 (1 + cos(0.9 i)). In k-diffusion's VE convention x = x0 + sigma eps the exact
    /// denoiser is D(x, sigma) = mu + s^2/(s^2 + sigma^2) (x - mu), and the probability-flow ODE
    /// dx/dsigma = (x - D)/sigma has the closed-form solution
    /// x(sigma) = mu + (x(sigma0) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma0^2).
    /// With --flow (x_t = (1-t) x0 + t eps, sigma = t): D = mu + (1-t) s^2/V (x - (1-t) mu),
    /// V = (1-t)^2 s^2 + t^2, and x(t) = (1-t) mu + (x(t0) - (1-t0) mu) sqrt(V(t)/V(t0)).
    /// The start is a draw from the marginal at sigma_max (Philox, --seed) unless --init is given. With
    /// several step counts (--steps 8,16,32) it prints the empirical order log(e_a/e_b)/log(n_b/n_a).
    Check(CheckArgs),
}

/// `samplers check`.
#[derive(Args)]
pub struct CheckArgs {
    #[arg(long)]
    pub sampler: String,
    /// Step counts, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10,20,40")]
    pub steps: Vec<usize>,
    #[arg(long, default_value = "exponential")]
    pub scheduler: String,
    #[arg(long, default_value_t = 0.05)]
    pub sigma_min: f64,
    #[arg(long, default_value_t = 10.0)]
    pub sigma_max: f64,
    /// Keep the schedule's final 0 (the last step is then the sampler's denoise step).
    #[arg(long)]
    pub to_zero: bool,
    /// Rectified-flow convention (use a sigma range inside (0, 1]).
    #[arg(long)]
    pub flow: bool,
    #[arg(long, default_value_t = 64)]
    pub elements: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Noise amount of stochastic samplers (0 makes them deterministic).
    #[arg(long, default_value_t = 1.0)]
    pub eta: f64,
    /// RES4LYF SDE noise mode of the single-step exponential samplers (hard, exp, soft, soft-linear,
    /// softer, eps, sinusoidal, lorentzian, vpsde, er4, hard_var; default none).
    #[arg(long)]
    pub noise_mode: Option<String>,
    /// RES4LYF's noise_anchor for the tableaux (0 plain RK; RES4LYF's nodes use 1; implicit tableaux are
    /// stepped as RES4LYF does at any anchor but 0).
    #[arg(long, default_value_t = 0.0)]
    pub noise_anchor: f64,
    /// RES4LYF's implicit refinement: extra model calls that redo each step (and each stage).
    #[arg(long, default_value_t = 0)]
    pub implicit_steps: usize,
    #[arg(long, default_value_t = 0)]
    pub implicit_substeps: usize,
    /// RES4LYF's bongmath (its default, off here): re-derives the step start from each stage, see README.
    #[arg(long)]
    pub bongmath: bool,
    /// Step implicit tableaux as RES4LYF does also at --noise-anchor 0 (other anchors imply it).
    #[arg(long)]
    pub res4lyf_implicit: bool,
    /// RES4LYF's implicit type of the implicit steps / substeps (predictor-corrector, rebound; retro-eta
    /// and bongmath differ from predictor-corrector only with --eta-substep).
    #[arg(long, default_value = "predictor-corrector")]
    pub implicit_type: String,
    #[arg(long, default_value = "predictor-corrector")]
    pub implicit_type_substeps: String,
    /// RES4LYF's per-substep SDE noise of the explicit exponential samplers and tableaux (0: off; noise
    /// after each stage's update, see README), its noise mode (default hard) and s_noise.
    #[arg(long, default_value_t = 0.0)]
    pub eta_substep: f64,
    #[arg(long, default_value = "hard", value_parser = crate::samplers::noise_mode::NoiseMode::parse)]
    pub noise_mode_substep: crate::samplers::noise_mode::NoiseMode,
    #[arg(long, default_value_t = 1.0)]
    pub s_noise_substep: f64,
    /// Step noise (--noise-mode, --eta) in RES4LYF's default form: step to sigma_next, then swap to
    /// sigma_down along the step line (its overshoot 0); also for the explicit tableaux.
    #[arg(long)]
    pub noise_swap: bool,
    /// Run on f32 buffers (default f64, so round-off does not hide the order).
    #[arg(long)]
    pub f32: bool,
    /// Start from this .npy (float32/float64, `elements` values).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Write the final sample of the last run as a float64 .npy.
    #[arg(long)]
    pub dump: Option<PathBuf>,
}
