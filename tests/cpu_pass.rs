//! Every quantized pattern evaluates the same in onnx.reference (the original graph, TensorRT's FP4 op given its
//! TensorRT semantics) and in ONNX Runtime after the CPU pass (tests/py/fp4_reference.py), passes the ONNX
//! checker, and builds with the TensorRT-RTX builder.
use crate::common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use trt_diff::models::mlp::MlpConfig;
use trt_diff::models::qdq::{AttentionAmax, attention};
use trt_diff::onnx::cpu_pass::{CpuPassOptions, CpuPassReport, apply};
use trt_diff::onnx::{DataType, Dim, GraphBuilder, OnnxFile, SaveOptions, save};
use trt_diff::quant::LinearPrecision;

/// Inputs with blocks of very different magnitudes and exact zeros exercise scale rounding and saturation.
fn input(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let block = i / 16;
            let v = ((i * 7919) % 101) as f32 / 50.0 - 1.0;
            if block % 4 == 3 {
                0.0
            } else {
                v * 10f32.powi(block as i32 % 3 - 1)
            }
        })
        .collect()
}

fn python_ok(script: &str, args: &[&Path]) -> String {
    let out = Command::new(python())
        .arg(format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs the pass on `original`, compares reference and ORT, checks and builds both graphs.
fn check(
    dir: &Path,
    original: &Path,
    opts: CpuPassOptions,
    feeds: &[(&str, Vec<usize>)],
) -> CpuPassReport {
    let (model, report) = apply(&OnnxFile::load(original).unwrap(), opts).unwrap();
    // Saved in another folder: the result must not depend on the source's external data file names.
    std::fs::create_dir_all(dir.join("passed")).unwrap();
    let passed = dir.join("passed/cpu.onnx");
    save(model, &passed, &SaveOptions::default()).unwrap();
    let summary = trt_diff::onnx::summary::OnnxSummary::of(&OnnxFile::load(&passed).unwrap());
    assert!(
        !summary.op_histogram.keys().any(|k| k.starts_with("trt::")),
        "{:?}",
        summary.op_histogram
    );
    assert!(
        !summary.initializers.contains_key("float4e2m1")
            && !summary.initializers.contains_key("int4")
    );
    let mut args: Vec<PathBuf> = vec![original.into(), passed.clone()];
    for (i, (name, shape)) in feeds.iter().enumerate() {
        let npy = dir.join(format!("in{i}.npy"));
        let mut x = input(shape.iter().product());
        x.rotate_left(i * 5);
        write_npy_f32(&npy, shape, &x);
        args.push(format!("{name}={}", npy.display()).into());
    }
    let refs: Vec<&Path> = args.iter().map(|p| p.as_path()).collect();
    let stdout = python_ok("fp4_reference.py", &refs);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let scale = v["scale"].as_f64().unwrap();
    assert!(scale > 0.0, "{stdout}");
    // Same ops in the same order: equal up to the float rounding of MatMul sums.
    assert!(
        v["ref_vs_passed_ref"].as_f64().unwrap() <= 1e-5 * scale,
        "{stdout}"
    );
    assert!(
        v["ref_vs_ort"].as_f64().unwrap() <= 1e-5 * scale,
        "{stdout}"
    );
    python_ok("check_models.py", &[original, &passed]);
    let plan = dir.join("orig.plan");
    run(
        &[
            "build",
            original.to_str().unwrap(),
            "--out",
            plan.to_str().unwrap(),
            "--no-progress",
        ],
        true,
    );
    report
}

fn mlp(precision: LinearPrecision, opts: CpuPassOptions) -> CpuPassReport {
    let d = tempfile::tempdir().unwrap();
    let cfg = MlpConfig {
        precision,
        batch: Dim::Fixed(5),
        ..Default::default()
    };
    let original = write_model(d.path(), "orig.onnx", &cfg);
    check(d.path(), &original, opts, &[("x", vec![5, 64])])
}

fn counts(r: CpuPassReport) -> (usize, usize) {
    (r.folded, r.emulated_fp4_activations)
}

#[test]
fn nvfp4_runs_on_onnx_runtime_with_tensorrt_numerics() {
    // 3 layers: each folds the weight-scale DQ and the FP4 weight DQ, and emulates one activation quantizer.
    assert_eq!(
        counts(mlp(LinearPrecision::Nvfp4, CpuPassOptions::default())),
        (6, 3)
    );
}

#[test]
fn int4_weight_only_folds() {
    assert_eq!(
        counts(mlp(
            LinearPrecision::Int4 { block: 32 },
            CpuPassOptions::default()
        )),
        (3, 0)
    );
}

#[test]
fn fp8_per_tensor_and_per_channel() {
    assert_eq!(
        counts(mlp(LinearPrecision::Fp8, CpuPassOptions::default())),
        (0, 0)
    );
    assert_eq!(
        counts(mlp(
            LinearPrecision::Fp8,
            CpuPassOptions {
                fold_fp8: true,
                ..Default::default()
            }
        )),
        (3, 0)
    );
    assert_eq!(
        counts(mlp(
            LinearPrecision::Fp8PerChannel,
            CpuPassOptions {
                fold_fp8: true,
                ..Default::default()
            }
        )),
        (3, 0)
    );
}

#[test]
fn fp8_attention_pattern() {
    let d = tempfile::tempdir().unwrap();
    let mut g = GraphBuilder::new("attn", 19);
    let shape = || trt_diff::shape![1, 2, 16, 32];
    let q = g.input("q", DataType::FLOAT, shape()).unwrap();
    let k = g.input("k", DataType::FLOAT, shape()).unwrap();
    let v = g.input("v", DataType::FLOAT, shape()).unwrap();
    let amax = AttentionAmax {
        q: 8.0,
        k: 8.0,
        v: 8.0,
    };
    let y = attention(&mut g, "attn", &q, &k, &v, Some(amax)).unwrap();
    g.output(&y);
    let path = d.path().join("orig.onnx");
    save(g.finish(), &path, &SaveOptions::default()).unwrap();
    let s = trt_diff::onnx::summary::OnnxSummary::of(&OnnxFile::load(&path).unwrap());
    assert_eq!(
        s.op_histogram["QuantizeLinear"], 4,
        "q, k, v and the softmax output"
    );
    let shape = vec![1, 2, 16, 32];
    check(
        d.path(),
        &path,
        CpuPassOptions::default(),
        &[("q", shape.clone()), ("k", shape.clone()), ("v", shape)],
    );
}
