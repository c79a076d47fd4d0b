//! RES4LYF's SDE noise modes against RES4LYF's own get_sde_step (golden file from
//! scripts/golden/samplers_res4lyf.py).
use serde_json::Value;
use trt_diff::samplers::noise_mode::{NoiseMode, sde_step};

#[test]
fn noise_modes_match_res4lyf() {
    let p = format!(
        "{}/tests/golden/samplers/res4lyf.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let g: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let cases = g["noise_modes"].as_array().unwrap();
    assert!(cases.len() >= 300);
    let mut modes = std::collections::BTreeSet::new();
    for c in cases {
        let f = |k: &str| c[k].as_f64().unwrap();
        let name = c["mode"].as_str().unwrap();
        modes.insert(name);
        let st = sde_step(
            NoiseMode::parse(name).unwrap(),
            f("sigma"),
            f("sigma_next"),
            f("eta"),
            c["vp"].as_bool().unwrap(),
            f("sigma_max"),
            c["down"].as_bool().unwrap(),
        );
        for (ours, key) in [
            (st.sigma_up, "sigma_up"),
            (st.sigma_down, "sigma_down"),
            (st.alpha_ratio, "alpha_ratio"),
        ] {
            let want = f(key);
            assert!(
                (ours - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "{c}: {key} ours {ours}, RES4LYF {want}"
            );
        }
    }
    assert_eq!(modes.len(), 11);
}

/// The SDE wiring of the exponential samplers: land on the mode's sigma_down, then `alpha_ratio x +
/// s_noise sigma_up z`; eta = 0 in hard mode is the ODE step.
#[test]
fn exponential_sde_step_uses_the_mode_split() {
    use anyhow::Result;
    use trt_diff::samplers::model::{Denoiser, GaussianData};
    use trt_diff::samplers::noise::NoiseSource;
    use trt_diff::samplers::registry::{self, SamplerOptions};
    use trt_diff::samplers::stepper::Ctx;
    struct Fixed(Vec<f64>);
    impl NoiseSource<Vec<f64>> for Fixed {
        fn sample(&mut self, out: &mut Vec<f64>, _: f64, _: f64) -> Result<()> {
            out.copy_from_slice(&self.0);
            Ok(())
        }
    }
    let n = 6;
    let data = GaussianData::standard(n, false);
    let z: Vec<f64> = (0..n).map(|i| (i as f64 * 0.7).sin()).collect();
    let x0: Vec<f64> = (0..n).map(|i| 1.0 + i as f64 * 0.4).collect();
    let sigmas = [3.0, 2.0];
    let run = |mode: &str, eta: f64| -> Vec<f64> {
        let opts = SamplerOptions {
            noise_mode: NoiseMode::parse(mode).unwrap(),
            eta,
            s_noise: 0.9,
            ..Default::default()
        };
        let mut s = registry::build::<Vec<f64>>("ddim", &opts).unwrap();
        let mut model = data.clone();
        let mut noise = Fixed(z.clone());
        let mut cx = Ctx {
            model: &mut model as &mut dyn Denoiser<Vec<f64>>,
            noise: &mut noise,
            sigmas: &sigmas,
        };
        let mut x = x0.clone();
        s.step(&mut cx, &mut x, 0).unwrap();
        x
    };
    let d = data.denoise_f64(&x0, 3.0);
    for (mode, eta) in [
        ("hard", 0.5),
        ("exp", 0.7),
        ("sinusoidal", 0.5),
        ("hard", 0.0),
    ] {
        let smax = SamplerOptions::default().noise_sigma_max;
        let st = sde_step(
            NoiseMode::parse(mode).unwrap(),
            3.0,
            2.0,
            eta,
            false,
            smax,
            false,
        );
        let r = st.sigma_down / 3.0;
        let got = run(mode, eta);
        for i in 0..n {
            // DDIM (= exponential Euler) to sigma_down, then the noise.
            let want = st.alpha_ratio * (r * x0[i] + (1.0 - r) * d[i]) + 0.9 * st.sigma_up * z[i];
            assert!((got[i] - want).abs() < 1e-12, "{mode} eta {eta}");
        }
    }
}
