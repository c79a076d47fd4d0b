//! Streaming export of a full-size FLUX.2 [klein] 9B transformer with NVFP4 quantization, against the disk's plain
//! sequential read + write of the same bytes (issue 17's benchmark: target <= 1.5x, peak RSS <= 2 GB).
//!
//! `cargo bench --bench flux2_export` writes a synthetic diffusers-layout checkpoint (8 double + 24 single blocks of
//! 32 x 128, Qwen3-8B's 3 x 4096 text features: 9.1B parameters, bf16, random values; ~18 GB) under
//! FLUX2_BENCH_DIR (default target/flux2-bench), exports it to ONNX with NVFP4 weights (the family's default policy)
//! and prints wall time and peak RSS of the export beside the time to read the checkpoint and write as many bytes
//! as the export wrote. FLUX2_BENCH_SIZE=4b takes the 4B shape; FLUX2_BENCH_SCALE (e.g. 0.25) scales the block
//! counts for a quick run; FLUX2_BENCH_ROUNDS (default 2) alternates which phase goes first. The checkpoint's pages
//! are dropped from the page cache before each timed phase and both end with `sync`. All files are deleted at the
//! end.
#[path = "common/export.rs"]
mod common;
use common::env;
use std::path::{Path, PathBuf};
use trt_diff::models::flux::FluxPrecision;
use trt_diff::models::flux2::{self, ExportOptions, Flux2Config};
use trt_diff::weights::safetensors_file::Checkpoint;

fn main() {
    let scale: f64 = env("FLUX2_BENCH_SCALE", 1.0);
    let rounds: usize = env::<usize>("FLUX2_BENCH_ROUNDS", 2).max(1);
    let nine = env("FLUX2_BENCH_SIZE", "9b".to_string()) != "4b";
    let dir: PathBuf = std::env::var("FLUX2_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/flux2-bench"));
    let (double, single, heads, joint) = if nine {
        (8.0, 24.0, 32, 3 * 4096)
    } else {
        (5.0, 20.0, 24, 3 * 2560)
    };
    let blocks = |n: f64| ((n * scale).round() as usize).max(1);
    let cfg: Flux2Config = serde_json::from_value(serde_json::json!({
        "num_layers": blocks(double), "num_single_layers": blocks(single), "num_attention_heads": heads,
        "joint_attention_dim": joint
    }))
    .unwrap();
    let params = cfg.param_count();
    println!(
        "FLUX.2 [klein] {} transformer, {} double + {} single blocks, {:.2}B parameters (scale {scale})",
        if nine { "9B" } else { "4B" },
        cfg.num_layers,
        cfg.num_single_layers,
        params as f64 / 1e9
    );
    let export = |ck: &Checkpoint, out: &Path| {
        let opts = ExportOptions {
            precision: FluxPrecision::Nvfp4,
            ..Default::default()
        };
        format!("{:?}", flux2::export(&cfg, ck, &opts, out).unwrap().counts)
    };
    common::run(
        &common::Subject {
            shapes: cfg.tensor_shapes(),
            config: serde_json::to_string(&cfg).unwrap(),
            params,
            export: &export,
        },
        &dir,
        rounds,
    );
}
