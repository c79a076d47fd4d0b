//! Every graph the project writes passes onnx.checker (full check); external data is laid out as documented.
use crate::common;
use common::*;
use std::process::Command;
use trt_diff::models::mlp::MlpConfig;
use trt_diff::onnx::Dim;
use trt_diff::quant::LinearPrecision;

#[test]
fn every_precision_passes_the_onnx_checker() {
    let d = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (i, p) in [
        LinearPrecision::F32,
        LinearPrecision::F16,
        LinearPrecision::Fp8,
        LinearPrecision::Nvfp4,
    ]
    .into_iter()
    .enumerate()
    {
        for batch in [Dim::Fixed(3), Dim::Sym("batch".into())] {
            let cfg = MlpConfig {
                precision: p,
                batch,
                ..Default::default()
            };
            paths.push(write_model(
                d.path(),
                &format!("m{i}_{}.onnx", paths.len()),
                &cfg,
            ));
        }
    }
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/py/check_models.py"
        ))
        .args(&paths)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        paths.len()
    );
}

#[test]
fn external_data_is_aligned_and_complete() {
    let d = tempfile::tempdir().unwrap();
    let cfg = MlpConfig {
        hidden: 1024,
        layers: 2,
        ..Default::default()
    };
    let path = write_model(d.path(), "big.onnx", &cfg);
    let f = trt_diff::onnx::OnnxFile::load(&path).unwrap();
    let g = f.model.graph.as_ref().unwrap();
    let mut total = 0;
    for t in &g.initializer {
        if let Some(r) = trt_diff::onnx::model::external_ref(t) {
            let len = r.length.unwrap();
            let align = if len >= 1 << 20 { 4096 } else { 64 };
            assert_eq!(r.offset % align, 0, "{} at {}", t.name, r.offset);
            total += len;
        }
    }
    assert!(
        total >= cfg.weight_bytes() - 4096,
        "{total} of {}",
        cfg.weight_bytes()
    );
}
