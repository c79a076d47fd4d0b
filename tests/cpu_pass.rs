//! The CPU pass makes NVFP4 (and FP8) graphs runnable by ONNX Runtime with TensorRT's numerics: checked against
//! onnx.reference running the original graph with TensorRT's FP4 op semantics (tests/py/fp4_reference.py).
mod common;
use common::*;
use std::process::Command;
use trt_diff::models::mlp::MlpConfig;
use trt_diff::onnx::cpu_pass::{CpuPassOptions, apply};
use trt_diff::onnx::{OnnxFile, SaveOptions, save};
use trt_diff::quant::qdq::LinearPrecision;

fn check(
    precision: LinearPrecision,
    opts: CpuPassOptions,
    expect_folded: usize,
    expect_emulated: usize,
) {
    let d = tempfile::tempdir().unwrap();
    let cfg = MlpConfig {
        precision,
        batch: trt_diff::onnx::Dim::Fixed(5),
        ..Default::default()
    };
    let original = write_model(d.path(), "orig.onnx", &cfg);
    let (model, report) = apply(&OnnxFile::load(&original).unwrap(), opts).unwrap();
    assert_eq!(
        (report.folded, report.emulated_fp4_activations),
        (expect_folded, expect_emulated)
    );
    let passed = d.path().join("cpu.onnx");
    save(model, &passed, &SaveOptions::default()).unwrap();
    let summary = trt_diff::onnx::summary::OnnxSummary::of(&OnnxFile::load(&passed).unwrap());
    assert!(
        !summary.op_histogram.keys().any(|k| k.starts_with("trt::")),
        "{:?}",
        summary.op_histogram
    );
    assert!(!summary.initializers.contains_key("float4e2m1"));
    // Inputs with blocks of very different magnitudes and exact zeros exercise the scale rounding.
    let x: Vec<f32> = (0..5 * 64)
        .map(|i| {
            let block = i / 16;
            let v = ((i * 7919) % 101) as f32 / 50.0 - 1.0;
            if block % 4 == 3 {
                0.0
            } else {
                v * 10f32.powi(block as i32 % 3 - 1)
            }
        })
        .collect();
    let npy = d.path().join("x.npy");
    write_npy_f32(&npy, &[5, 64], &x);
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/py/fp4_reference.py"
        ))
        .args([&original, &passed, &npy])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let scale = v["scale"].as_f64().unwrap();
    assert!(scale > 0.0);
    // Same ops in the same order: the passed graph reproduces the reference to float rounding of MatMul sums.
    assert!(
        v["ref_vs_passed_ref"].as_f64().unwrap() <= 1e-5 * scale,
        "{stdout}"
    );
    assert!(
        v["ref_vs_ort"].as_f64().unwrap() <= 1e-5 * scale,
        "{stdout}"
    );
    let checked = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/py/check_models.py"
        ))
        .arg(&passed)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[test]
fn nvfp4_graph_runs_on_onnx_runtime_with_tensorrt_numerics() {
    // 3 layers: each folds the weight-scale DQ and the FP4 weight DQ, and emulates one activation quantizer.
    check(LinearPrecision::Nvfp4, CpuPassOptions::default(), 6, 3);
}

#[test]
fn fp8_weights_fold_on_request() {
    check(
        LinearPrecision::Fp8,
        CpuPassOptions { fold_fp8: true },
        3,
        0,
    );
    check(LinearPrecision::Fp8, CpuPassOptions::default(), 0, 0);
}
