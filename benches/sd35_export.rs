//! Streaming export of a full-size SD3.5 large transformer (MMDiT, 38 blocks of 38 x 64, qk RMSNorm: 8.1B
//! parameters) with NVFP4 quantization, against the disk's plain sequential read + write of the same bytes
//! (issue 17's benchmark: target <= 1.5x, peak RSS <= 2 GB).
//!
//! `cargo bench --bench sd35_export` writes a synthetic diffusers-layout checkpoint (bf16, random values; ~16 GB)
//! under SD35_BENCH_DIR (default target/sd35-bench), exports it to ONNX with NVFP4 weights (the family's default
//! policy) and prints wall time, CPU time and peak RSS of the export beside the plain copy. SD35_BENCH_SIZE=medium
//! takes SD3.5 medium's shape (24 blocks of 24 x 64, MMDiT-X in blocks 0-12); SD35_BENCH_SCALE (e.g. 0.25) scales
//! the block count for a quick run; SD35_BENCH_ROUNDS (default 2) alternates which phase goes first. All files are
//! deleted at the end.
#[path = "common/export.rs"]
mod common;
use common::env;
use std::path::{Path, PathBuf};
use trt_diff::models::flux::FluxPrecision;
use trt_diff::models::sd3::{self, ExportOptions, Sd3Config};
use trt_diff::weights::safetensors_file::Checkpoint;

fn main() {
    let scale: f64 = env("SD35_BENCH_SCALE", 1.0);
    let rounds: usize = env::<usize>("SD35_BENCH_ROUNDS", 2).max(1);
    let medium = env("SD35_BENCH_SIZE", "large".to_string()) == "medium";
    let dir: PathBuf = std::env::var("SD35_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sd35-bench"));
    // diffusers' configs of stabilityai/stable-diffusion-3.5-large and -medium.
    let (layers, pos, dual): (f64, usize, usize) = if medium {
        (24.0, 384, 13)
    } else {
        (38.0, 192, 0)
    };
    let layers = ((layers * scale).round() as usize).max(2);
    let heads = if medium { 24 } else { 38 };
    let cfg: Sd3Config = serde_json::from_value(serde_json::json!({
        "num_layers": layers, "attention_head_dim": 64, "num_attention_heads": heads,
        "joint_attention_dim": 4096, "caption_projection_dim": 64 * heads, "pooled_projection_dim": 2048,
        "out_channels": 16, "pos_embed_max_size": pos, "qk_norm": "rms_norm",
        "dual_attention_layers": (0..dual.min(layers)).collect::<Vec<_>>()
    }))
    .unwrap();
    let shapes = cfg.tensor_shapes();
    let params: u64 = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    println!(
        "SD3.5 {} transformer, {layers} blocks of {heads} x 64, {:.2}B parameters (scale {scale})",
        if medium { "medium" } else { "large" },
        params as f64 / 1e9
    );
    let export = |ck: &Checkpoint, out: &Path| {
        let opts = ExportOptions {
            precision: FluxPrecision::Nvfp4,
            ..Default::default()
        };
        format!("{:?}", sd3::export(&cfg, ck, &opts, out).unwrap().counts)
    };
    common::run(
        &common::Subject {
            shapes,
            config: serde_json::to_string(&cfg).unwrap(),
            params,
            export: &export,
        },
        &dir,
        rounds,
    );
}
