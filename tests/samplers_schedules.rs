//! The schedulers against ComfyUI's and RES4LYF's own scheduler code (golden file from
//! scripts/golden/samplers_schedules.py). ComfyUI keeps its sigma table and results in float32, we compute
//! in f64, hence the 2e-6 relative tolerance; anything structural (length, a wrong index) fails outright.
use crate::common;
use common::samplers::{golden, vecf};
use trt_diff::samplers::schedule::{self, ModelSampling};

#[test]
fn schedulers_match_comfyui_and_res4lyf() {
    let g = golden("schedules.json");
    let ms = ModelSampling::sd();
    // Our SD table against ComfyUI's float32 one.
    let rel = |a: f64, b: f64| (a - b).abs() <= 2e-6 * b.abs().max(1e-6);
    assert!(rel(ms.sigma_min(), g["sd_sigma_min"].as_f64().unwrap()));
    assert!(rel(ms.sigma_max(), g["sd_sigma_max"].as_f64().unwrap()));
    let mut names = std::collections::BTreeSet::new();
    for c in g["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        names.insert(name);
        let steps = c["steps"].as_u64().unwrap() as usize;
        let want = vecf(&c["sigmas"]);
        let ours = match name {
            "kl_optimal" => schedule::kl_optimal(
                steps,
                c["sigma_min"].as_f64().unwrap(),
                c["sigma_max"].as_f64().unwrap(),
            ),
            "laplace" => schedule::laplace(
                steps,
                c["sigma_min"].as_f64().unwrap(),
                c["sigma_max"].as_f64().unwrap(),
                0.0,
                0.5,
            ),
            "bong_tangent" => schedule::bong_tangent(steps),
            "normal_partial" => schedule::partial(
                |n| schedule::by_name("normal", n, &ms, None),
                steps,
                c["denoise"].as_f64().unwrap(),
            )
            .unwrap(),
            _ => schedule::by_name(name, steps, &ms, None).unwrap(),
        };
        assert_eq!(
            ours.len(),
            want.len(),
            "{name} {steps}: ours {ours:?}, reference {want:?}"
        );
        for (k, (a, b)) in ours.iter().zip(&want).enumerate() {
            assert!(
                rel(*a, *b) || (a - b).abs() < 1e-7,
                "{name} {steps} [{k}]: ours {a}, reference {b}"
            );
        }
    }
    assert_eq!(names.len(), 11, "{names:?}");
    for c in g["flux_mu"].as_array().unwrap() {
        let n = c["image_seq_len"].as_f64().unwrap();
        let want = c["mu"].as_f64().unwrap();
        assert!((schedule::flux_mu(n) - want).abs() < 1e-12, "flux_mu({n})");
    }
}
