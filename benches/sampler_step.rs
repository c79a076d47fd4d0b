//! Per-step sampler overhead (everything but the model call) on the CPU for a Flux 1024x1024 latent
//! (16x128x128 f32), printed as a table. With TRT_DIFF_PEER_PYTHON set to a Python that has torch and
//! k-diffusion (see scripts/bench/samplers_kdiffusion_overhead.py), k-diffusion's numbers for the same work are printed beside.
//!
//!     cargo bench --bench sampler_step
use std::collections::HashMap;
use std::time::Instant;
use trt_diff::samplers::noise::PhiloxNoise;
use trt_diff::samplers::registry::{self, SamplerOptions};
use trt_diff::samplers::schedule;
use trt_diff::samplers::stepper::sample;

const SAMPLERS: &[&str] = &[
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "lms",
    "dpmpp_2s_ancestral",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "res_2s",
    "res_3s",
    "res_2m",
    "abnorsett_3m",
    "rk4_4s",
    "res_multistep",
    "ipndm",
    "deis",
    "uni_pc",
    "er_sde",
    "res_5s",
];

fn peer() -> Option<(usize, HashMap<String, f64>)> {
    let py = std::env::var("TRT_DIFF_PEER_PYTHON").ok()?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/bench/samplers_kdiffusion_overhead.py"
    );
    let out = std::process::Command::new(py)
        .arg(script)
        .arg("--json")
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "peer script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last()?).ok()?;
    let threads = v["threads"].as_u64()? as usize;
    let m = v["ms_per_step"]
        .as_object()?
        .iter()
        .filter_map(|(k, x)| Some((k.clone(), x.as_f64()?)))
        .collect();
    Some((threads, m))
}

fn main() {
    let n = 16 * 128 * 128;
    let steps = 20;
    let sigmas = schedule::karras(steps, 0.03, 14.6, 7.0);
    let mut x0 = vec![0.0f32; n];
    trt_diff::samplers::buffer::Buffer::fill_normal(&mut x0, 1, 0).expect("host fill");
    let peer = peer();
    // More runs find the quiet moments of a shared machine (TRT_DIFF_BENCH_RUNS, default 4).
    let runs: usize = std::env::var("TRT_DIFF_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
        .max(1);
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    println!(
        "per-step overhead, 16x128x128 f32 latent, {steps} Karras steps, identity model, best of {runs}"
    );
    println!("trt-diff: host buffers, up to {threads} threads");
    if let Some((t, _)) = &peer {
        println!("k-diffusion: torch CPU, {t} threads");
    }
    println!(
        "{:<22} {:>6} {:>14} {:>16}",
        "sampler", "calls", "trt-diff ms", "k-diffusion ms"
    );
    for name in SAMPLERS {
        let info = registry::info(name).expect("registered");
        let mut best = f64::INFINITY;
        for _ in 0..runs {
            let mut s =
                registry::build::<Vec<f32>>(name, &SamplerOptions::default()).expect("build");
            let mut x = x0.clone();
            // Identity model: denoised = x (a copy, like k-diffusion's `lambda x, s: x` costs nothing more).
            let mut model = |x: &Vec<f32>, _s: f64, out: &mut Vec<f32>| -> anyhow::Result<()> {
                out.copy_from_slice(x);
                Ok(())
            };
            let mut noise = PhiloxNoise::new(3);
            let t = Instant::now();
            sample(
                s.as_mut(),
                &mut model,
                &mut noise,
                &mut x,
                &sigmas,
                &mut |_, _| {},
            )
            .expect("sample");
            best = best.min(t.elapsed().as_secs_f64() * 1e3 / steps as f64);
        }
        let p = peer
            .as_ref()
            .and_then(|(_, m)| m.get(*name))
            .map_or("-".to_string(), |v| format!("{v:.3}"));
        println!("{:<22} {:>6} {:>14.3} {:>16}", name, info.calls, best, p);
    }
    // The noise alone: one draw of Philox normals for the whole latent (what each stochastic step adds).
    let mut z = vec![0.0f32; n];
    let mut best = f64::INFINITY;
    for k in 0..20 * runs as u64 {
        let t = Instant::now();
        trt_diff::samplers::noise::fill_normal_host(&mut z, 3, k);
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "{:<22} {:>6} {:>14.3} {:>16}",
        "(noise draw alone)", 0, best, "-"
    );
}
