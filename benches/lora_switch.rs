//! `cargo bench --bench lora_switch`: LoRA at run time.
//! 1. Time to switch the LoRA set between two images on the CPU backend (ONNX Runtime) for the tiny random
//!    FLUX.1-dev transformer of tests/golden/flux: merging the deltas into the built weights and re-creating the
//!    session (`Engine::set_weights`), against its peer, re-exporting the graph with the LoRA merged and opening it
//!    (what a rebuild costs at the least), in the same run.
//! 2. The modelled cost per step of the FP8/NVFP4 side path at FLUX.1-dev size (1024x1024: 4096 image and 512
//!    text tokens), in FLOPs against the quantized GEMMs it sits beside, per rank.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use trt_diff::backend::Engine;
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::models::flux::{self, ExportOptions, FluxConfig};
use trt_diff::pipelines::lora::{
    RuntimeLora, checkpoint_shapes, flux_book, merge_into_checkpoint, resolve_for,
};
use trt_diff::quant::LinearPrecision;
use trt_diff::weights::lora::{LoraFile, Part};
use trt_diff::weights::safetensors_file::Checkpoint;

const RUNS: usize = 10;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/flux");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lora_switch");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let axes = FluxConfig::axes_from_diffusers_config(&std::fs::read_to_string(
        golden.join("flux_dev_config.json"),
    )?)?;
    let ck_path = golden.join("flux_dev.safetensors");
    let sets: Vec<Vec<(LoraFile, f32)>> = vec![
        vec![(LoraFile::open(&golden.join("lora/peft.safetensors"))?, 0.7)],
        vec![
            (LoraFile::open(&golden.join("lora/peft.safetensors"))?, 0.7),
            (LoraFile::open(&golden.join("lora/kohya.safetensors"))?, 0.5),
        ],
        vec![],
    ];
    let export = |loras: &[(LoraFile, f32)], out: &std::path::Path| -> anyhow::Result<()> {
        let mut ck = Checkpoint::open(&ck_path)?;
        let shapes = checkpoint_shapes(&ck);
        let r = resolve_for(loras, &[(Part::Denoiser, &shapes)], flux_book)?;
        merge_into_checkpoint(&mut ck, Part::Denoiser, &r)?;
        let (cfg, _, _) = FluxConfig::from_checkpoint_with_axes(&ck, Some(axes.clone()))?;
        flux::export(&cfg, &ck, &ExportOptions::default(), out)?;
        Ok(())
    };
    let base = dir.join("base.onnx");
    export(&[], &base)?;
    let mut engine = OrtEngine::open(&base, &OrtOptions::default())?;
    let mut rt = RuntimeLora::new(BTreeMap::from([(Part::Denoiser, base.clone())]), flux_book);
    let (mut switch, mut rebuild) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let set = &sets[i % sets.len()];
        let t = Instant::now();
        let pending = rt.weights_for(set)?;
        for w in pending.by_part.values() {
            engine.set_weights(w)?;
        }
        rt.commit(pending);
        switch.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let out = dir.join(format!("rebuilt{i}.onnx"));
        export(set, &out)?;
        drop(OrtEngine::open(&out, &OrtOptions::default())?);
        rebuild.push(t.elapsed().as_secs_f64());
    }
    println!(
        "LoRA switch on the CPU backend, tiny FLUX.1-dev transformer ({RUNS} switches, median)"
    );
    println!("| way | seconds |");
    println!("|---|---|");
    println!(
        "| run time: merge + set_weights (session re-created) | {:.4} |",
        median(switch)
    );
    println!("| peer: re-export merged + open | {:.4} |", median(rebuild));
    println!();
    let cfg = FluxConfig::dev();
    println!(
        "Side path per step at FLUX.1-dev size, 1024x1024 (4096 image + 512 text tokens), batch 1"
    );
    println!("| precision | rank | quantized GEMM TFLOP | side path TFLOP | side / base |");
    println!("|---|---|---|---|---|");
    for (name, p) in [
        ("fp8", LinearPrecision::Fp8),
        ("nvfp4", LinearPrecision::Nvfp4),
    ] {
        let policy = flux::default_policy(p);
        for rank in [16, 32, 64, 128] {
            let (base, side) = flux::lora::side_path_cost(&cfg, &policy, 4096, 512, rank);
            println!(
                "| {name} | {rank} | {:.1} | {:.2} | {:.1}% |",
                base as f64 / 1e12,
                side as f64 / 1e12,
                100.0 * side as f64 / base as f64
            );
        }
    }
    Ok(())
}
