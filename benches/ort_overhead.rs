//! `cargo bench --bench ort_overhead`: the cost of trt-diff's `Engine` layer over a bare ONNX Runtime session,
//! on an MLP sized to take about 1 ms per run on the CPU. Both run the same file with the same session options;
//! the bare side feeds a pre-built `ort` tensor, ours starts from a `HostTensor` and returns `HostTensor`s
//! (input checks, conversions, output copies). Target: under 2%.
use std::time::Instant;
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::backend::{Engine, HostTensor};
use trt_diff::models::mlp::MlpConfig;
use trt_diff::onnx::{Dim, save};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ort_overhead");
    std::fs::create_dir_all(&dir)?;
    let onnx = dir.join("mlp.onnx");
    let cfg = MlpConfig {
        input: 256,
        hidden: 1024,
        output: 256,
        layers: 4,
        batch: Dim::Fixed(32),
        ..Default::default()
    };
    save(cfg.graph()?, &onnx, &Default::default())?;
    let x: Vec<f32> = (0..32 * 256).map(|i| (i % 17) as f32 / 17.0).collect();
    let host = HostTensor::from_f32(&[32, 256], &x);
    let mut ours = OrtEngine::open(
        &onnx,
        &OrtOptions {
            threads: 1,
            ..Default::default()
        },
    )?;
    // The bare peer: same library, same options, no trt-diff code on the path.
    let env = trt_diff::backend::ort_backend::environment()?;
    let mut bare = ort::session::Session::builder(env)?
        .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_intra_threads(1)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .commit_from_file(&onnx)?;
    let input = ort::value::Tensor::from_array((vec![32i64, 256], x.clone()))?;
    let rounds = 7;
    let iters = 200;
    let (mut t_ours, mut t_bare) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        // Interleaved rounds so drift on a shared machine hits both sides alike.
        let t = Instant::now();
        for _ in 0..iters {
            let out = bare.run(ort::inputs!["x" => &input])?;
            std::hint::black_box(out["y"].try_extract_tensor::<f32>()?.1[0]);
        }
        t_bare.push(t.elapsed().as_secs_f64() * 1e3 / iters as f64);
        let t = Instant::now();
        for _ in 0..iters {
            let out = ours.run(&[("x".to_string(), host.clone())])?;
            std::hint::black_box(out[0].1.data[0]);
        }
        t_ours.push(t.elapsed().as_secs_f64() * 1e3 / iters as f64);
    }
    let (b, o) = (median(t_bare), median(t_ours));
    println!("| path | median ms per run ({rounds} rounds of {iters}) |\n|---|---|");
    println!("| bare ONNX Runtime session | {b:.4} |");
    println!("| trt-diff Engine (HostTensor in/out) | {o:.4} |");
    println!("overhead: {:.2}%", 100.0 * (o - b) / b);
    Ok(())
}
