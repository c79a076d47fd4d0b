//! ComfyUI's own samplers against ComfyUI's code (golden file from scripts/golden/samplers_comfyui.py, run on
//! ComfyUI's sampling.py / uni_pc.py in float64): CFG (scale 3) over two analytic Gaussian-data denoisers, so
//! the CFG++ samplers see a real unconditional prediction; noise replayed from the recorded draws.
use crate::common;
use common::samplers::{Replay, golden, vecf};
use trt_diff::samplers::model::{Cfg, Denoiser, GaussianData};
use trt_diff::samplers::noise::{NoNoise, NoiseSource};
use trt_diff::samplers::registry::{self, SamplerOptions};
use trt_diff::samplers::stepper::Ctx;

/// The uncond data of the golden script.
fn uncond(n: usize) -> GaussianData {
    GaussianData {
        mu: (0..n).map(|i| 0.5 * (i as f64 * 1.3).cos()).collect(),
        s: (0..n).map(|i| 0.6 + 0.2 * (i as f64 * 0.7).sin()).collect(),
        flow: false,
    }
}

#[test]
fn comfyui_samplers_match_comfyui() {
    let g = golden("comfyui.json");
    let scale = g["cfg_scale"].as_f64().unwrap();
    let runs = g["runs"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for r in runs {
        let name = r["sampler"].as_str().unwrap();
        seen.insert(name.to_string());
        let sigmas = vecf(&r["sigmas"]);
        let o = &r["options"];
        let mut opts = SamplerOptions {
            eta: o["eta"].as_f64().unwrap_or(1.0),
            s_noise: o["s_noise"].as_f64().unwrap_or(1.0),
            ge_gamma: o["ge_gamma"].as_f64().unwrap_or(2.0),
            ..Default::default()
        };
        if let Some(t) = o.get("sa_tau_sigmas") {
            let t = vecf(t);
            opts.sa_tau_sigmas = (t[0], t[1]);
        }
        let x0 = vecf(&r["x0"]);
        let want = vecf(&r["x"]);
        let n = x0.len();
        let mut model = Cfg::new(GaussianData::standard(n, false), uncond(n), scale);
        let info = registry::info(name).unwrap_or_else(|| panic!("{name} not registered"));
        let mut replay = Replay {
            draws: r["noise"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    (
                        d["sigma"].as_f64().unwrap(),
                        d["sigma_next"].as_f64().unwrap(),
                        vecf(&d["z"]),
                    )
                })
                .collect(),
            next: 0,
        };
        let mut none = NoNoise;
        let noise: &mut dyn NoiseSource<Vec<f64>> = if info.stochastic {
            &mut replay
        } else {
            &mut none
        };
        let mut sampler = registry::build::<Vec<f64>>(name, &opts).unwrap();
        let mut x = x0.clone();
        let mut cx = Ctx {
            model: &mut model as &mut dyn Denoiser<Vec<f64>>,
            noise,
            sigmas: &sigmas,
        };
        for i in 0..sigmas.len() - 1 {
            sampler.step(&mut cx, &mut x, i).unwrap();
        }
        // er_sde's quadrature nodes are float32 in ComfyUI (torch.arange(..., dtype=float32) times a 0-dim
        // float64 stays float32), ours f64.
        let tol = match name {
            "er_sde" => 1e-7,
            // The adaptive controller's accept/reject decisions sit on a sum-of-squares error norm.
            "dpm_adaptive" => 1e-8,
            _ => 1e-12,
        };
        for (k, (a, b)) in x.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{name} {o} ({} steps, last sigma {}): x[{k}] ours {a}, ComfyUI {b}",
                sigmas.len() - 1,
                sigmas.last().unwrap()
            );
        }
        let maxd = x
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let moved = x0
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{name:<32} steps {:>2} draws {:>2} max diff {maxd:.1e} (moved {moved:.2})",
            sigmas.len() - 1,
            replay.draws.len()
        );
        if info.stochastic {
            assert_eq!(replay.next, replay.draws.len(), "{name}: noise draws used");
        }
    }
    assert!(seen.len() >= 25, "{seen:?}");
}
