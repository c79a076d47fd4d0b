//! The catalogue: every sampler name that is implemented and tested, with what `samplers list` shows, and
//! the one constructor that maps a name (and options) to a [`Sampler`].
use super::buffer::Buffer;
use super::comfy;
use super::exprk::{EXP_METHODS, ExpMethod, ExpMultistep, ExpRk, ExpSde};
use super::hybrid::{ExpHybrid, HYBRID_METHODS, HybridMethod};
use super::kdiff;
use super::refine::Refine;
use super::rk::Rk;
use super::stepper::Sampler;
use super::tableau::{Kind, Tableau, proven_order};
use super::tableau_data::TABLEAUX;
use anyhow::{Result, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    KDiffusion,
    Explicit,
    DiagImplicit,
    Implicit,
    Exponential,
    Hybrid,
    Multistep,
    ComfyUi,
    Diffusers,
}
impl Family {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::KDiffusion => "k-diffusion",
            Self::Explicit => "explicit RK",
            Self::DiagImplicit => "diag. implicit RK",
            Self::Implicit => "implicit RK",
            Self::Exponential => "exponential RK",
            Self::Hybrid => "hybrid exp. RK",
            Self::Multistep => "multistep",
            Self::ComfyUi => "ComfyUI",
            Self::Diffusers => "diffusers",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SamplerInfo {
    pub name: &'static str,
    pub family: Family,
    /// Order of convergence on the probability-flow ODE (deterministic samplers; 0 = not an ODE solver).
    pub order: usize,
    pub stages: usize,
    /// Model calls per step (steady state, default options).
    pub calls: usize,
    pub stochastic: bool,
}

/// Options that some samplers read; defaults are the reference implementations' defaults.
#[derive(Clone, Debug)]
pub struct SamplerOptions {
    pub eta: f64,
    pub s_noise: f64,
    /// dpmpp_sde's midpoint fraction.
    pub r: f64,
    /// LMS order.
    pub lms_order: usize,
    /// Fixed-point sweeps of implicit RK (None: the tableau's order).
    pub implicit_sweeps: Option<usize>,
    /// gradient_estimation's gamma.
    pub ge_gamma: f64,
    /// SA-Solver's stochastic interval (sigma_hi, sigma_lo): tau = 1 inside, 0 outside. Default: ComfyUI's
    /// `percent_to_sigma(0.2)` and `(0.8)` of the SD 1.x/SDXL table; pipelines should pass their model's.
    pub sa_tau_sigmas: (f64, f64),
    /// RES4LYF SDE noise mode for the single-step exponential samplers (res_*, etdrk*, lawson*, dpmpp_*s,
    /// ddim): `None` keeps them deterministic ODE solvers; otherwise each step lands on the mode's sigma_down
    /// and adds `s_noise * sigma_up` of noise scaled by `eta`.
    pub noise_mode: super::noise_mode::NoiseMode,
    /// Variance-preserving / rectified-flow model (RES4LYF's VARIANCE_PRESERVING) for the noise modes.
    pub noise_vp: bool,
    /// The model's largest sigma, which the noise modes normalize by (1 for flow models).
    pub noise_sigma_max: f64,
    /// RES4LYF's `noise_anchor` for the explicit (linear) tableaux, see [`Rk::anchor`]. Default 0 (plain RK);
    /// RES4LYF's nodes default to 1.0.
    pub noise_anchor: f64,
    /// RES4LYF's implicit refinement (`implicit_steps`, `implicit_substeps`) of the single-step exponential
    /// samplers (without a noise mode) and the explicit tableaux, see [`super::refine`]. Default 0, 0.
    pub implicit_steps: usize,
    pub implicit_substeps: usize,
    /// RES4LYF's bongmath (its default; ours off), see [`super::refine::Bong`]: for the single-step
    /// exponential samplers without a noise mode, the explicit tableaux (which it then steps in RES4LYF's
    /// form) and the implicit tableaux stepped as RES4LYF does; the identity (as in RES4LYF at eta 0) for its
    /// multistep names and the hybrids (except where RES4LYF's iteration diverges, see README).
    pub bongmath: bool,
    /// The model's smallest sigma, below which RES4LYF skips bongmath (with `noise_sigma_max` its range).
    pub bong_sigma_min: f64,
    /// Step the implicit tableaux as RES4LYF does ([`super::implicit`]: its start, model-free newton
    /// iterations and Gauss-Seidel rows) also at noise_anchor 0; any other anchor implies it.
    pub res4lyf_implicit: bool,
    /// RES4LYF's `implicit_type` (of the implicit steps) and `implicit_type_substeps`, see
    /// [`super::refine::ImplicitType`]; explicit methods.
    pub implicit_type: super::refine::ImplicitType,
    pub implicit_type_substeps: super::refine::ImplicitType,
    /// RES4LYF's per-substep SDE noise ([`super::refine::SubNoise`]: `eta_substep`, `noise_mode_sde_substep`,
    /// `s_noise_substep`) for the single-step exponential samplers without a step noise mode, the
    /// explicit tableaux and the implicit tableaux stepped as RES4LYF does. Off at eta_substep 0 (the default; RES4LYF's is 0.5) or mode none; mode default
    /// hard (RES4LYF's); `noise_vp` / `noise_sigma_max` apply as for the step noise.
    pub eta_substep: f64,
    pub noise_mode_substep: super::noise_mode::NoiseMode,
    pub s_noise_substep: f64,
    /// Step noise (`noise_mode`, eta, s_noise) in RES4LYF's default form (its overshoot 0): step to
    /// sigma_next, then swap to sigma_down along the step line and add noise ([`super::refine::Refine::step`]),
    /// for the explicit single-step exponential samplers and the tableaux RES4LYF-stepped; off (default): the
    /// exponential step lands on sigma_down (RES4LYF's overshoot = eta).
    pub noise_swap: bool,
}
impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            eta: 1.0,
            s_noise: 1.0,
            r: 0.5,
            lms_order: 4,
            implicit_sweeps: None,
            ge_gamma: 2.0,
            sa_tau_sigmas: {
                let ms = super::schedule::ModelSampling::sd();
                (ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8))
            },
            noise_mode: super::noise_mode::NoiseMode::None,
            noise_vp: false,
            noise_sigma_max: super::schedule::ModelSampling::sd().sigma_max(),
            noise_anchor: 0.0,
            implicit_steps: 0,
            implicit_substeps: 0,
            bongmath: false,
            bong_sigma_min: super::schedule::ModelSampling::sd().sigma_min(),
            res4lyf_implicit: false,
            implicit_type: Default::default(),
            implicit_type_substeps: Default::default(),
            eta_substep: 0.0,
            noise_mode_substep: super::noise_mode::NoiseMode::Hard,
            s_noise_substep: 1.0,
            noise_swap: false,
        }
    }
}

const KDIFF: &[(&str, usize, usize, usize, bool)] = &[
    // name, order, stages, calls, stochastic
    ("euler", 1, 1, 1, false),
    ("euler_ancestral", 1, 1, 1, true),
    ("heun", 2, 2, 2, false),
    ("dpm_2", 2, 2, 2, false),
    ("dpm_2_ancestral", 1, 2, 2, true),
    ("lms", 2, 1, 1, false), // 4th-order steps, but the Euler start limits the global order to 2
    ("dpmpp_2s_ancestral", 1, 2, 2, true),
    ("dpmpp_sde", 1, 2, 2, true),
    ("dpmpp_2m", 2, 1, 1, false),
    ("dpmpp_2m_sde", 1, 1, 1, true),
    ("dpmpp_2m_sde_heun", 1, 1, 1, true),
    ("dpmpp_3m_sde", 1, 1, 1, true), // eta = 0: order 2 (low-order start)
];
const COMFY: &[(&str, usize, usize, usize, bool)] = &[
    // name, order, stages, calls, stochastic (orders measured on the analytic problem, see
    // tests/samplers_convergence.rs; 0 = not a fixed-step ODE solver)
    ("euler_cfg_pp", 1, 1, 1, false),
    ("euler_ancestral_cfg_pp", 1, 1, 1, true),
    ("heunpp2", 1, 3, 3, false),
    ("dpm_fast", 0, 3, 1, false), // its own step grid; last orders follow nfe mod 3,
    ("dpm_adaptive", 0, 3, 3, false), // tolerance-driven, not step-count-driven,
    ("dpmpp_2s_ancestral_cfg_pp", 1, 2, 2, true),
    ("dpmpp_2m_cfg_pp", 2, 1, 1, false),
    ("ddpm", 1, 1, 1, true),
    ("lcm", 0, 1, 1, true),
    ("ipndm", 2, 1, 1, false),
    ("ipndm_v", 2, 1, 1, false),
    ("deis", 2, 1, 1, false),
    ("res_multistep", 2, 1, 1, false),
    ("res_multistep_cfg_pp", 2, 1, 1, false),
    ("res_multistep_ancestral", 1, 1, 1, true),
    ("res_multistep_ancestral_cfg_pp", 1, 1, 1, true),
    ("gradient_estimation", 1, 1, 1, false),
    ("gradient_estimation_cfg_pp", 1, 1, 1, false),
    ("er_sde", 1, 1, 1, true),
    ("seeds_2", 1, 2, 2, true),
    ("seeds_3", 1, 3, 3, true),
    ("sa_solver", 1, 1, 1, true),
    ("sa_solver_pece", 1, 1, 2, true),
    ("uni_pc", 2, 1, 1, false), // order 3 inside; the order-1 final step limits it,
    ("uni_pc_bh2", 2, 1, 1, false),
];
/// diffusers' flow-match scheduler names: the same steps as k-diffusion's Euler and Heun on a flow schedule
/// (`schedule::flow_match`), proven against diffusers in tests/samplers_golden.rs.
const DIFFUSERS: &[(&str, &str, usize, usize)] = &[
    // name, same stepper as, order, calls
    ("flow_match_euler", "euler", 1, 1),
    ("flow_match_heun", "heun", 2, 2),
];
/// RES4LYF's DEIS multistep names: (name, points, warm-up tableau).
const DEIS: &[(&str, usize, &str)] = &[
    ("deis_2m", 2, "ralston_2s"),
    ("deis_3m", 3, "ralston_3s"),
    ("deis_4m", 4, "ralston_4s"),
];
const MULTISTEP: &[(&str, usize, usize, &str)] = &[
    // name, points used (current + history), order reached, warm-up single-step method
    ("res_2m", 2, 2, "res_2s"),
    ("res_3m", 3, 2, "res_3s"), // RES4LYF's gamma rule is third order only for c3 = 1
    ("dpmpp_3m", 3, 2, "dpmpp_3s"),
    ("abnorsett_2m", 2, 2, "res_2s"),
    ("abnorsett_3m", 3, 3, "res_3s"),
    ("abnorsett_4m", 4, 4, "res_4s_strehmel_weiner"),
];

/// The tableaux we register: all of RES4LYF's whose coefficients meet the order conditions of their order,
/// the few published ones that do not (see `excluded_tableaux`) replaced by their corrections
/// (`tableau_fix`), except "euler" which k-diffusion's Euler covers.
pub fn tableaux() -> Vec<&'static Tableau> {
    static OK: std::sync::OnceLock<Vec<&'static Tableau>> = std::sync::OnceLock::new();
    OK.get_or_init(|| {
        TABLEAUX
            .iter()
            .map(|t| super::tableau_fix::corrected(t.name).unwrap_or(t))
            .filter(|t| t.name != "euler" && proven_order(t, 1e-12) >= t.order)
            .collect()
    })
    .clone()
}
/// RES4LYF tableaux whose published coefficients fail the order conditions (registered corrected, see
/// `tableau_fix::FIXES`).
pub fn excluded_tableaux() -> Vec<&'static str> {
    TABLEAUX
        .iter()
        .filter(|t| proven_order(t, 1e-12) < t.order)
        .map(|t| t.name)
        .collect()
}

/// All registered samplers, in listing order.
pub fn list() -> Vec<SamplerInfo> {
    let mut v = Vec::new();
    for &(name, order, stages, calls, stochastic) in KDIFF {
        v.push(SamplerInfo {
            name,
            family: Family::KDiffusion,
            order,
            stages,
            calls,
            stochastic,
        });
    }
    for &(name, order, stages, calls, stochastic) in COMFY {
        v.push(SamplerInfo {
            name,
            family: Family::ComfyUi,
            order,
            stages,
            calls,
            stochastic,
        });
    }
    for &(name, _, order, calls) in DIFFUSERS {
        v.push(SamplerInfo {
            name,
            family: Family::Diffusers,
            order,
            stages: calls,
            calls,
            stochastic: false,
        });
    }
    for m in EXP_METHODS {
        v.push(SamplerInfo {
            name: m.name,
            family: Family::Exponential,
            order: m.order,
            stages: m.stages,
            calls: m.calls(),
            stochastic: false,
        });
    }
    for m in HYBRID_METHODS {
        v.push(SamplerInfo {
            name: m.name,
            family: Family::Hybrid,
            order: m.order,
            stages: m.stages,
            calls: m.stages,
            stochastic: false,
        });
    }
    for &(name, _, order, _) in MULTISTEP {
        v.push(SamplerInfo {
            name,
            family: Family::Multistep,
            order,
            stages: 1,
            calls: 1,
            stochastic: false,
        });
    }
    for &(name, points, _) in DEIS {
        v.push(SamplerInfo {
            name,
            family: Family::Multistep,
            order: points,
            stages: 1,
            calls: 1,
            stochastic: false,
        });
    }
    for t in tableaux() {
        let family = match t.kind() {
            Kind::Explicit => Family::Explicit,
            Kind::DiagonallyImplicit => Family::DiagImplicit,
            Kind::FullyImplicit => Family::Implicit,
        };
        v.push(SamplerInfo {
            name: t.name,
            family,
            order: t.order,
            stages: t.stages(),
            calls: Rk::<Vec<f32>>::calls(t, t.order),
            stochastic: false,
        });
    }
    v
}

pub fn info(name: &str) -> Option<SamplerInfo> {
    list().into_iter().find(|i| i.name == name)
}

/// The implicit types that differ from predictor-corrector only with substep noise.
fn retro_type(t: super::refine::ImplicitType) -> Option<super::refine::ImplicitType> {
    use super::refine::ImplicitType::*;
    matches!(t, RetroEta | Bongmath).then_some(t)
}

/// Build a sampler by name.
pub fn build<B: Buffer + 'static>(name: &str, o: &SamplerOptions) -> Result<Box<dyn Sampler<B>>> {
    use kdiff::*;
    let refine = Refine {
        full: o.implicit_steps,
        diag: o.implicit_substeps,
        bong: o.bongmath.then_some(super::refine::Bong {
            sigma_min: o.bong_sigma_min,
            sigma_max: o.noise_sigma_max,
        }),
        rebound_full: o.implicit_type == super::refine::ImplicitType::Rebound,
        rebound_diag: o.implicit_type_substeps == super::refine::ImplicitType::Rebound,
        sub: (o.eta_substep != 0.0 && o.noise_mode_substep != super::noise_mode::NoiseMode::None)
            .then_some(super::refine::SubNoise {
                mode: o.noise_mode_substep,
                eta: o.eta_substep,
                s_noise: o.s_noise_substep,
                vp: o.noise_vp,
                sigma_max: o.noise_sigma_max,
            }),
        step: (o.noise_swap && o.noise_mode != super::noise_mode::NoiseMode::None).then_some(
            super::refine::SubNoise {
                mode: o.noise_mode,
                eta: o.eta,
                s_noise: o.s_noise,
                vp: o.noise_vp,
                sigma_max: o.noise_sigma_max,
            },
        ),
        retro_full: retro_type(o.implicit_type),
        retro_diag: retro_type(o.implicit_type_substeps),
    };
    // Step noise in RES4LYF's swap form goes with the RES4LYF-form step (not with our landing on sigma_down).
    let no_landing = o.noise_mode == super::noise_mode::NoiseMode::None || o.noise_swap;
    if refine.sub.is_some() || refine.step.is_some() {
        let ok = match ExpMethod::by_name(name) {
            Some(m) => !m.implicit() && no_landing,
            // Implicit tableaux when stepped as RES4LYF does.
            None => tableaux().iter().any(|t| {
                t.name == name
                    && (t.kind() == Kind::Explicit || o.noise_anchor != 0.0 || o.res4lyf_implicit)
            }),
        };
        if !ok {
            bail!(
                "substep noise (eta_substep {} with noise mode {:?}) and noise_swap apply to RES4LYF's explicit \
                 single-step exponential samplers (res_Ns, etdrk*, lawson*, dpmpp_*s, ddim; a step noise mode \
                 only with noise_swap), its explicit tableaux and its implicit tableaux stepped as RES4LYF does \
                 (noise_anchor != 0 or res4lyf_implicit); not to '{name}' with these options (set eta_substep 0 \
                 and noise_swap off)",
                o.eta_substep,
                o.noise_mode_substep
            );
        }
    }
    let tab = tableaux().into_iter().find(|t| t.name == name);
    // Step noise lands on sigma_down (RES4LYF's default form) only in the exponential samplers; tableaux take it in
    // the swap form; every other sampler has its own noise rule (eta, s_noise). Refused rather than ignored.
    if o.noise_mode != super::noise_mode::NoiseMode::None
        && ExpMethod::by_name(name).is_none()
        && !(tab.is_some() && o.noise_swap)
    {
        bail!(
            "noise mode {:?} does not apply to '{name}': the RES4LYF noise modes drive the single-step exponential \
             samplers (res_Ns, etdrk*, lawson*, dpmpp_*s, ddim) and, with noise_swap on, the Runge-Kutta tableaux; \
             use noise mode none here (its own eta and s_noise set its noise)",
            o.noise_mode
        );
    }
    let implicit = tab.is_some_and(|t| t.kind() != Kind::Explicit);
    // Implicit tableaux: our fixed-point sweeps at noise_anchor 0, RES4LYF's stepping otherwise (or asked).
    let res4lyf_implicit = implicit && (o.noise_anchor != 0.0 || o.res4lyf_implicit);
    if res4lyf_implicit && o.implicit_sweeps.is_some() {
        bail!(
            "'{name}' with noise_anchor {} is stepped as RES4LYF does: set implicit_steps/implicit_substeps \
             instead of implicit_sweeps (our sweeps are the noise_anchor 0 default)",
            o.noise_anchor
        );
    }
    if o.bongmath {
        let exp = ExpMethod::by_name(name);
        let ok = match (exp, tab) {
            (Some(m), _) => !m.implicit() && no_landing,
            (None, Some(t)) => t.kind() == Kind::Explicit || res4lyf_implicit,
            (None, None) => {
                HybridMethod::by_name(name).is_some()
                    || MULTISTEP.iter().any(|m| m.0 == name)
                    || DEIS.iter().any(|m| m.0 == name)
            }
        };
        if !ok {
            bail!(
                "bongmath (RES4LYF's option) applies to RES4LYF's explicit exponential samplers without a noise \
                 mode, its explicit tableaux, its implicit tableaux stepped as RES4LYF does (noise_anchor != 0 \
                 or res4lyf_implicit), its multistep and hybrid names; not to '{name}' with these options"
            );
        }
    }
    if (refine.rebound_full || refine.rebound_diag)
        && (refine.is_none() || (implicit && !res4lyf_implicit))
    {
        bail!(
            "implicit type 'rebound' applies to the implicit steps/substeps of explicit methods and of implicit \
             tableaux stepped as RES4LYF does (set implicit_steps/implicit_substeps); not to '{name}' with \
             these options"
        );
    }
    if !refine.is_none() && ExpMethod::by_name(name).is_some_and(|m| m.implicit()) {
        bail!(
            "implicit_steps/implicit_substeps (RES4LYF's refinement) apply to explicit exponential samplers; \
             '{name}' is implicit (solved by its own sweeps): set them to 0"
        );
    }
    if !refine.is_none() {
        let exp_ode = ExpMethod::by_name(name).is_some() && no_landing;
        let res4lyf_tab = tab.is_some_and(|t| t.kind() == Kind::Explicit) || res4lyf_implicit;
        if !exp_ode && !res4lyf_tab {
            bail!(
                "implicit_steps/implicit_substeps (RES4LYF's refinement) apply to the single-step exponential \
                 samplers without a noise mode, the explicit tableaux and the implicit tableaux stepped as \
                 RES4LYF does (noise_anchor != 0 or res4lyf_implicit); not to '{name}'{}",
                if implicit {
                    " at noise_anchor 0 with our sweeps (use implicit_sweeps, or res4lyf_implicit)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(match name {
        "euler" => Box::new(Euler::default()),
        "euler_ancestral" => Box::new(EulerAncestral::new(o.eta, o.s_noise)),
        "heun" => Box::new(Heun::default()),
        "dpm_2" => Box::new(Dpm2::default()),
        "dpm_2_ancestral" => Box::new(Dpm2Ancestral::new(o.eta, o.s_noise)),
        "lms" => Box::new(Lms::new(o.lms_order)),
        "dpmpp_2s_ancestral" => Box::new(Dpmpp2sAncestral::new(o.eta, o.s_noise)),
        "dpmpp_sde" => Box::new(DpmppSde::new(o.eta, o.s_noise, o.r)),
        "dpmpp_2m" => Box::new(Dpmpp2m::default()),
        "dpmpp_2m_sde" => Box::new(Dpmpp2mSde::new(o.eta, o.s_noise, SolverType::Midpoint)),
        "dpmpp_2m_sde_heun" => Box::new(Dpmpp2mSde::new(o.eta, o.s_noise, SolverType::Heun)),
        "dpmpp_3m_sde" => Box::new(Dpmpp3mSde::new(o.eta, o.s_noise)),
        "flow_match_euler" => Box::new(Euler::default()),
        "flow_match_heun" => Box::new(Heun::default()),
        "euler_cfg_pp" => Box::new(comfy::EulerCfgPp::new(0.0, 0.0)),
        "euler_ancestral_cfg_pp" => Box::new(comfy::EulerCfgPp::new(o.eta, o.s_noise)),
        "heunpp2" => Box::new(comfy::Heunpp2::default()),
        "dpm_fast" => Box::new(comfy::DpmFast::default()),
        "dpm_adaptive" => Box::new(comfy::DpmAdaptive::default()),
        "dpmpp_2s_ancestral_cfg_pp" => {
            Box::new(comfy::Dpmpp2sAncestralCfgPp::new(o.eta, o.s_noise))
        }
        "dpmpp_2m_cfg_pp" => Box::new(comfy::Dpmpp2mCfgPp::default()),
        "ddpm" => Box::new(comfy::Ddpm::default()),
        "lcm" => Box::new(comfy::Lcm::new(o.s_noise)),
        "ipndm" => Box::new(comfy::Ipndm::new(false)),
        "ipndm_v" => Box::new(comfy::Ipndm::new(true)),
        "deis" => Box::new(comfy::Deis::new(3)),
        "res_multistep" => Box::new(comfy::ResMultistep::new(0.0, o.s_noise, false)),
        "res_multistep_cfg_pp" => Box::new(comfy::ResMultistep::new(0.0, o.s_noise, true)),
        "res_multistep_ancestral" => Box::new(comfy::ResMultistep::new(o.eta, o.s_noise, false)),
        "res_multistep_ancestral_cfg_pp" => {
            Box::new(comfy::ResMultistep::new(o.eta, o.s_noise, true))
        }
        "gradient_estimation" => Box::new(comfy::GradientEstimation::new(o.ge_gamma, false)),
        "gradient_estimation_cfg_pp" => Box::new(comfy::GradientEstimation::new(o.ge_gamma, true)),
        "er_sde" => Box::new(comfy::ErSde::new(o.s_noise)),
        "seeds_2" => Box::new(comfy::Seeds::new(2, o.eta, o.s_noise)),
        "seeds_3" => Box::new(comfy::Seeds::new(3, o.eta, o.s_noise)),
        "sa_solver" | "sa_solver_pece" => Box::new(comfy::SaSolver::new(
            o.sa_tau_sigmas.0,
            o.sa_tau_sigmas.1,
            o.s_noise,
            name == "sa_solver_pece",
        )),
        "uni_pc" => Box::new(comfy::UniPc::new(false)),
        "uni_pc_bh2" => Box::new(comfy::UniPc::new(true)),
        _ => {
            if let Some(m) = ExpMethod::by_name(name) {
                let mut s = ExpRk::new(m);
                s.refine = refine;
                let landing = o.noise_mode != super::noise_mode::NoiseMode::None && !o.noise_swap;
                s.sde = landing.then_some(ExpSde {
                    mode: o.noise_mode,
                    eta: o.eta,
                    s_noise: o.s_noise,
                    vp: o.noise_vp,
                    sigma_max: o.noise_sigma_max,
                });
                return Ok(Box::new(s));
            }
            if let Some(m) = HybridMethod::by_name(name) {
                return Ok(Box::new(ExpHybrid::new(m)));
            }
            if let Some(&(n, points, _, warm)) = MULTISTEP.iter().find(|m| m.0 == name) {
                let w = ExpMethod::by_name(warm).expect("warm-up methods are registered");
                return Ok(Box::new(ExpMultistep::new(n, points, w)));
            }
            if let Some(&(_, points, warm)) = DEIS.iter().find(|d| d.0 == name) {
                let w =
                    super::tableau_data::by_name(warm).expect("ralston tableaux are registered");
                return Ok(Box::new(super::rk::DeisMultistep::new(points, w)));
            }
            if let Some(t) = tableaux().into_iter().find(|t| t.name == name) {
                let mut rk = Rk::new(t, o.implicit_sweeps);
                rk.anchor = o.noise_anchor;
                rk.refine = refine;
                rk.res4lyf = res4lyf_implicit;
                return Ok(Box::new(rk));
            }
            let names: Vec<&str> = list().iter().map(|i| i.name).collect();
            bail!("unknown sampler '{name}'; valid: {}", names.join(", "))
        }
    })
}
