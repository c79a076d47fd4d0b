//! Every deterministic sampler reaches its claimed order on the analytic Gaussian-data problem, whose
//! probability-flow ODE has a closed-form solution (see `trt-diff samplers check --help`).
use trt_diff::samplers::check::{CheckSpec, run};
use trt_diff::samplers::refine::ImplicitType;
use trt_diff::samplers::registry::{self, SamplerOptions};

const NS: &[usize] = &[
    2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
];

/// Slope log2(e(n)/e(2n)) for the largest n whose errors are still asymptotic (e(n) < 1e-2) and above
/// f64 round-off (e(2n) > 1e-9).
fn slope(spec: &CheckSpec) -> (usize, f64, f64, f64) {
    let err = |n| run(spec, n, None).unwrap().max_err;
    let mut best = None;
    // A method with a large error constant (kraaijevanger_spijker_2s: e(512) = 1.6e-2) is asymptotic only
    // later: its last pair with e(n) < 5e-2 is the fallback.
    let mut late = None;
    for &n in NS {
        if !NS.contains(&(2 * n)) {
            break;
        }
        let (a, b) = (err(n), err(2 * n));
        if a < 5e-2 {
            late = Some((n, a, b, (a / b).log2()));
        }
        // Take the pair even when e(2n) already sits at round-off: that only underestimates the slope.
        if a < 1e-2 && (best.is_none() || b >= 1e-9) {
            best = Some((n, a, b, (a / b).log2()));
        }
        if b < 1e-9 {
            break;
        }
    }
    best.or(late)
        .unwrap_or_else(|| panic!("{}: no asymptotic pair of step counts", spec.sampler))
}

fn check_family(flow: bool, filter: impl Fn(&registry::SamplerInfo) -> bool) {
    let mut failures = vec![];
    for info in registry::list()
        .into_iter()
        .filter(|i| !i.stochastic && i.order > 0 && filter(i))
    {
        let mut spec = CheckSpec {
            sampler: info.name.into(),
            opts: SamplerOptions {
                eta: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        if flow {
            spec.flow = true;
            spec.sigma_max = 0.98;
            spec.sigma_min = 0.02;
        }
        let (n, a, b, p) = slope(&spec);
        // Very high orders hit round-off before their slope shows; 6 is what f64 can resolve here.
        let want = info.order.min(6) as f64 - 0.3;
        eprintln!(
            "{:<32} order {:>2}: e({n})={a:.2e} e({})={b:.2e} slope {p:.2}",
            info.name,
            info.order,
            2 * n
        );
        if p < want {
            failures.push(format!("{} slope {p:.2} < {want}", info.name));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn deterministic_samplers_reach_their_order_ve() {
    check_family(false, |i| i.calls <= 40);
}

#[test]
fn expensive_implicit_samplers_reach_their_order_ve() {
    check_family(false, |i| i.calls > 40);
}

#[test]
fn samplers_reach_their_order_flow() {
    let some = [
        "euler",
        "heun",
        "dpmpp_2m",
        "res_2s",
        "res_3s",
        "res_4s_krogstad",
        "rk4_4s",
        "gauss-legendre_2s",
        "res_2m",
        "abnorsett_3m",
        "lms",
    ];
    check_family(true, |i| some.contains(&i.name));
}

/// Stochastic samplers with eta = 0 are deterministic ODE solvers of their nominal order.
#[test]
fn ancestral_samplers_with_eta_zero() {
    for (name, order) in [
        ("euler_ancestral", 1.0),
        ("dpm_2_ancestral", 2.0),
        ("dpmpp_2s_ancestral", 2.0),
        ("dpmpp_sde", 2.0),
        ("dpmpp_2m_sde", 2.0),
        ("dpmpp_2m_sde_heun", 2.0),
        ("dpmpp_3m_sde", 2.0),
        ("euler_ancestral_cfg_pp", 1.0),
        ("dpmpp_2s_ancestral_cfg_pp", 2.0),
        ("res_multistep_ancestral", 2.0),
        ("res_multistep_ancestral_cfg_pp", 2.0),
        ("seeds_2", 2.0),
        ("seeds_3", 3.0),
    ] {
        let spec = CheckSpec {
            sampler: name.into(),
            opts: SamplerOptions {
                eta: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let (_, _, _, p) = slope(&spec);
        eprintln!("{name} eta=0 slope {p:.2}");
        assert!(p > order - 0.3, "{name}: slope {p}");
    }
}

/// RES4LYF's default noise_anchor 1 (stage derivatives anchored at x_0 and sigma) caps linear RK at order 2:
/// rk4_4s's slope falls from 4 to 2 (the runs themselves equal RES4LYF's, tests/samplers_golden.rs).
#[test]
fn noise_anchor_one_caps_linear_rk_at_order_two() {
    let slope_at = |anchor: f64| {
        let spec = CheckSpec {
            sampler: "rk4_4s".into(),
            opts: SamplerOptions {
                noise_anchor: anchor,
                ..Default::default()
            },
            ..Default::default()
        };
        let (a, b) = (
            run(&spec, 64, None).unwrap(),
            run(&spec, 128, None).unwrap(),
        );
        (a.max_err / b.max_err).log2()
    };
    let (p0, p1) = (slope_at(0.0), slope_at(1.0));
    assert!(p0 > 3.7, "anchor 0 slope {p0}");
    assert!((1.8..2.3).contains(&p1), "anchor 1 slope {p1}");
}

/// RES4LYF's implicit steps/substeps (values proven by the golden runs in tests/samplers_golden.rs) cost the
/// refined methods their order on the ODE; options that do not apply are refused by name.
#[test]
fn implicit_refinement_orders_and_errors() {
    let slope = |name: &str, full: usize, diag: usize| {
        let spec = CheckSpec {
            sampler: name.into(),
            opts: SamplerOptions {
                implicit_steps: full,
                implicit_substeps: diag,
                ..Default::default()
            },
            ..Default::default()
        };
        let (a, b) = (
            run(&spec, 256, None).unwrap(),
            run(&spec, 512, None).unwrap(),
        );
        (a.max_err / b.max_err).log2()
    };
    // Measured: the redo evaluates stage 0 at x_next, sigma_next but weights it as the stage at c = 0, an
    // O(h) change of that stage; only where its weight is O(h) itself (res_2s's b1 = phi_1 - 2 phi_2) does the
    // order survive. The substeps likewise shift each stage to the next node: first order.
    for (name, full, diag, want) in [
        ("res_2s", 1, 0, 2.0),
        ("res_2s", 0, 1, 1.0),
        ("res_3s", 1, 1, 1.0),
        ("heun_2s", 1, 0, 1.0),
        ("rk4_4s", 1, 0, 1.0),
        ("rk4_4s", 0, 1, 1.0),
    ] {
        let p = slope(name, full, diag);
        assert!(
            (p - want).abs() < 0.3,
            "{name} {full}/{diag}: slope {p}, expected {want}"
        );
    }
    // RES4LYF's implicit type "rebound" (values proven in tests/samplers_golden.rs) keeps order 2 where
    // predictor-corrector loses it (the redo's first stage is evaluated at x_next moved back to sigma), except
    // with both steps and substeps (measured: rk4_4s 1/1 is first order).
    let rebound = ImplicitType::Rebound;
    for (name, full, diag, want) in [
        ("res_2s", 1, 0, 2.0),
        ("res_3s", 0, 1, 2.0),
        ("heun_2s", 1, 0, 2.0),
        ("rk4_4s", 0, 1, 2.0),
        ("rk4_4s", 1, 1, 1.0),
    ] {
        let spec = CheckSpec {
            sampler: name.into(),
            opts: SamplerOptions {
                implicit_steps: full,
                implicit_substeps: diag,
                implicit_type: rebound,
                implicit_type_substeps: rebound,
                ..Default::default()
            },
            ..Default::default()
        };
        let (a, b) = (
            run(&spec, 256, None).unwrap(),
            run(&spec, 512, None).unwrap(),
        );
        let p = (a.max_err / b.max_err).log2();
        assert!(
            (p - want).abs() < 0.3,
            "{name} {full}/{diag} rebound: slope {p}"
        );
    }
    let o = SamplerOptions {
        implicit_type: rebound,
        ..Default::default()
    };
    let err = registry::build::<Vec<f64>>("res_2s", &o)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rebound"), "{err}");
    for (name, why) in [
        ("gauss-legendre_2s", "implicit_sweeps"),
        ("euler", "not to 'euler'"),
        ("res_2m", "not to 'res_2m'"),
    ] {
        let o = SamplerOptions {
            implicit_steps: 1,
            ..Default::default()
        };
        let err = registry::build::<Vec<f64>>(name, &o)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(why), "{err}");
    }
    let o = SamplerOptions {
        implicit_substeps: 1,
        noise_mode: trt_diff::samplers::noise_mode::NoiseMode::Hard,
        ..Default::default()
    };
    assert!(registry::build::<Vec<f64>>("res_2s", &o).is_err());
    // A noise mode on a multistep or hybrid sampler is refused rather than ignored: see samplers_golden.rs.
}

/// Implicit tableaux stepped as RES4LYF does (noise_anchor 1; values proven in tests/samplers_golden.rs): the
/// anchored stages give order 2 whatever the tableau's own order and the number of sweeps.
#[test]
fn res4lyf_implicit_stepping_orders() {
    let slope = |name: &str, full: usize| {
        let spec = CheckSpec {
            sampler: name.into(),
            opts: SamplerOptions {
                noise_anchor: 1.0,
                implicit_steps: full,
                ..Default::default()
            },
            ..Default::default()
        };
        let (a, b) = (
            run(&spec, 128, None).unwrap(),
            run(&spec, 256, None).unwrap(),
        );
        (a.max_err / b.max_err).log2()
    };
    for (name, full) in [
        ("gauss-legendre_2s", 0),
        ("gauss-legendre_2s", 3),
        ("radau_iia_3s", 0),
        ("radau_iia_3s", 3),
        ("lobatto_iiia_3s", 0),
        ("lobatto_iiic_3s", 3),
        ("crouzeix_2s", 0),
    ] {
        let p = slope(name, full);
        assert!(
            (1.7..2.3).contains(&p),
            "{name} implicit_steps {full}: slope {p}"
        );
    }
}

/// RES4LYF's stepping of implicit tableaux at other anchors (its model-free newton iterations; values proven
/// in tests/samplers_golden.rs): at anchor 0 one pass is order 2, and its implicit steps recover the tableau's
/// own order (Gauss 2s: 4, Radau IIA 3s: 5 with 3 steps); any anchor > 0 keeps order 2. Our sweeps stay the
/// anchor-0 default, and `implicit_sweeps` is refused where RES4LYF's stepping is used.
#[test]
fn res4lyf_implicit_stepping_at_other_anchors() {
    let slope = |name: &str, anchor: f64, full: usize, n: usize| {
        let spec = CheckSpec {
            sampler: name.into(),
            opts: SamplerOptions {
                noise_anchor: anchor,
                implicit_steps: full,
                res4lyf_implicit: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let (a, b) = (
            run(&spec, n, None).unwrap(),
            run(&spec, 2 * n, None).unwrap(),
        );
        (a.max_err / b.max_err).log2()
    };
    for (name, anchor, full, n, want) in [
        ("gauss-legendre_2s", 0.0, 0, 128, 2.0),
        ("gauss-legendre_2s", 0.0, 3, 128, 4.0),
        ("radau_iia_3s", 0.0, 3, 32, 5.0),
        ("lobatto_iiia_3s", 0.0, 0, 128, 2.0),
        ("gauss-legendre_2s", 0.5, 0, 128, 2.0),
        ("radau_iia_3s", 0.5, 3, 128, 2.0),
    ] {
        let p = slope(name, anchor, full, n);
        assert!(
            (p - want).abs() < 0.3,
            "{name} anchor {anchor} implicit_steps {full}: slope {p}, expected {want}"
        );
    }
    let o = SamplerOptions {
        noise_anchor: 0.5,
        implicit_sweeps: Some(3),
        ..Default::default()
    };
    let err = registry::build::<Vec<f64>>("gauss-legendre_2s", &o)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("stepped as RES4LYF does"), "{err}");
}

/// RES4LYF's substep noise at eta_substep 0 (or mode none) is off: `samplers check` reproduces the
/// deterministic runs bit for bit, whatever the mode, the refinement or bongmath; at eta_substep > 0 it draws
/// noise and the result moves; f32 buffers run the same code (within f32 round-off of the f64 run).
#[test]
fn substep_noise_off_at_eta_zero() {
    use trt_diff::samplers::noise_mode::NoiseMode;
    let cases: &[(&str, f64, usize, usize, bool)] = &[
        ("res_2s", 0.0, 0, 0, false),
        ("res_3s", 0.0, 1, 1, false),
        ("dpmpp_2s", 0.0, 0, 0, true),
        ("heun_2s", 0.0, 0, 0, false),
        ("heun_2s", 1.0, 1, 0, true),
        ("rk4_4s", 1.0, 0, 1, false),
        ("ralston_3s", 0.0, 0, 0, false),
    ];
    for &(name, anchor, full, diag, bongmath) in cases {
        let spec = |eta_substep: f64, mode: &str, f32: bool| CheckSpec {
            sampler: name.into(),
            elements: 48,
            f32,
            opts: SamplerOptions {
                noise_anchor: anchor,
                implicit_steps: full,
                implicit_substeps: diag,
                bongmath,
                eta_substep,
                noise_mode_substep: NoiseMode::parse(mode).unwrap(),
                ..Default::default()
            },
            ..Default::default()
        };
        let base = run(&spec(0.0, "hard", false), 12, None).unwrap();
        for mode in ["hard", "exp", "soft", "sinusoidal", "er4"] {
            let r = run(&spec(0.0, mode, false), 12, None).unwrap();
            assert_eq!(
                r.x, base.x,
                "{name} {mode}: eta_substep 0 must be deterministic"
            );
            assert_eq!(r.calls, base.calls);
        }
        let off = run(&spec(0.7, "none", false), 12, None).unwrap();
        assert_eq!(off.x, base.x, "{name}: mode none");
        let noisy = run(&spec(0.5, "hard", false), 12, None).unwrap();
        let moved = noisy
            .x
            .iter()
            .zip(&base.x)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(moved > 1e-3, "{name}: substep noise moved x by {moved}");
        assert_eq!(noisy.calls, base.calls, "{name}: no extra model calls");
        let f32 = run(&spec(0.5, "hard", true), 12, None).unwrap();
        for (a, b) in f32.x.iter().zip(&noisy.x) {
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{name} f32: {a} vs {b}"
            );
        }
    }
}

/// Substep noise is an SDE: it must still sample the data. Starting from the marginal at sigma_max, the
/// final samples z-scored by the marginal at sigma_min, `(x - mu) / sqrt(s^2 + sigma_min^2)`, have mean 0 and
/// variance 1 over 8192 elements (standard errors 0.011, 0.016) at 384 Karras steps for the modes whose noise
/// per substep vanishes with the step (exp, eps), with RES4LYF's swap-form step noise too. RES4LYF's "hard"
/// mode (sigma_up = eta sigma_next on every substep, however small) is no consistent discretization: each
/// substep swaps a fixed fraction of x for noise around the denoised estimate, whose variance is too small, so
/// the variance stays ~0.88 at eta 0.5 however many steps (pinned; the golden runs show it is RES4LYF's).
#[test]
fn substep_noise_samples_the_data() {
    use trt_diff::samplers::model::GaussianData;
    use trt_diff::samplers::noise_mode::NoiseMode;
    let n = 8192;
    let data = GaussianData::standard(n, false);
    let stats = |name: &str, mode: &str, eta: f64, swap: bool, steps: usize| {
        let spec = CheckSpec {
            sampler: name.into(),
            elements: n,
            scheduler: "karras".into(),
            sigma_max: 14.6,
            sigma_min: 0.05,
            seed: 3,
            opts: SamplerOptions {
                eta_substep: eta,
                noise_mode_substep: NoiseMode::parse(mode).unwrap(),
                noise_swap: swap,
                noise_mode: if swap {
                    NoiseMode::Exp
                } else {
                    NoiseMode::None
                },
                eta: 0.5,
                noise_anchor: if swap { 1.0 } else { 0.0 },
                ..Default::default()
            },
            ..Default::default()
        };
        let x = run(&spec, steps, None).unwrap().x;
        let z: Vec<f64> = x
            .iter()
            .zip(data.mu.iter().zip(&data.s))
            .map(|(x, (m, s))| (x - m) / (s * s + 0.05f64.powi(2)).sqrt())
            .collect();
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        (mean, var)
    };
    for (name, mode, swap) in [
        ("res_3s", "exp", false),
        ("rk4_4s", "exp", false),
        ("rk4_4s", "eps", false),
        ("heun_2s", "exp", true),
    ] {
        let (mean, var) = stats(name, mode, 0.8, swap, 384);
        assert!(mean.abs() < 0.04, "{name} {mode}: mean {mean}");
        assert!((var - 1.0).abs() < 0.06, "{name} {mode}: variance {var}");
    }
    for steps in [96, 384] {
        let (mean, var) = stats("res_2s", "hard", 0.5, false, steps);
        assert!(mean.abs() < 0.04, "hard: mean {mean}");
        assert!(
            var > 0.84 && var < 0.92,
            "hard, {steps} steps: variance {var}"
        );
    }
}
