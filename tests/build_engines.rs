//! The real TensorRT-RTX builder (CPU-only machine) builds engines from graphs this project writes.
use crate::common;
use common::*;
use trt_diff::manifest::{Manifest, looks_like_plan, sidecar_path};
use trt_diff::models::mlp::MlpConfig;
use trt_diff::onnx::Dim;
use trt_diff::quant::LinearPrecision;
use trt_diff::trt::{BuildOptions, Flavor, TrtChoice, build_engine, compiled_flavors};

fn cfg(precision: LinearPrecision) -> MlpConfig {
    MlpConfig {
        precision,
        ..Default::default()
    }
}

/// Builds `onnx` with extra CLI args and returns the manifest after checking plan, sidecar and leftovers.
fn build(dir: &std::path::Path, onnx: &std::path::Path, plan: &str, extra: &[&str]) -> Manifest {
    let out = dir.join(plan);
    let mut args = vec!["build", s(onnx), "--out", s(&out), "--no-progress"];
    args.extend_from_slice(extra);
    let r = run(&args, true);
    assert!(r.stdout.contains("built"), "{}", r.stdout);
    let bytes = std::fs::read(&out).unwrap();
    assert!(
        looks_like_plan(&bytes[..32]),
        "plan header {:?}",
        &bytes[..8]
    );
    let m = Manifest::read(&sidecar_path(&out)).unwrap();
    assert_eq!(m.plan.as_ref().unwrap().bytes, bytes.len() as u64);
    assert_eq!(
        m.plan.as_ref().unwrap().xxh3_128,
        trt_diff::fsutil::xxh3_file(&out).unwrap()
    );
    assert_eq!(
        m.source.sha256,
        trt_diff::fsutil::sha256_file(onnx).unwrap()
    );
    assert_eq!(m.tensorrt.as_ref().unwrap().flavor, Flavor::Rtx);
    assert_eq!(m.tensorrt.as_ref().unwrap().version, "1.7.1");
    assert!(m.builder.as_ref().unwrap().strongly_typed && m.builder.as_ref().unwrap().layers > 0);
    assert!(
        !outputs_in(dir).iter().any(|n| n.contains(".partial")),
        "leftover temp files"
    );
    // inspect verifies the plan against its manifest.
    let r = run(&["inspect", s(&out)], true);
    assert!(r.stdout.contains("matches manifest"), "{}", r.stdout);
    m
}

fn io<'a>(m: &'a Manifest, name: &str) -> &'a trt_diff::manifest::IoTensor {
    m.io.iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no io {name} in {:?}", m.io))
}

#[test]
fn fp32_engine_and_manifest() {
    let d = tempfile::tempdir().unwrap();
    let onnx = write_model(d.path(), "mlp.onnx", &cfg(LinearPrecision::F32));
    let m = build(d.path(), &onnx, "mlp.plan", &[]);
    let x = io(&m, "x");
    assert_eq!(
        (x.mode.as_str(), x.dtype.as_str(), x.shape.as_slice()),
        ("input", "float32", &[4, 64][..])
    );
    let y = io(&m, "y");
    assert_eq!(
        (y.mode.as_str(), y.dtype.as_str(), y.shape.as_slice()),
        ("output", "float32", &[4, 32][..])
    );
    assert!(x.profile.is_none());
    assert_eq!(
        m.source.external_data.len(),
        1,
        "weights go to external data"
    );
    assert_eq!(m.source.external_data[0].file, "mlp.onnx.data");
}

#[test]
fn fp16_engine() {
    let d = tempfile::tempdir().unwrap();
    let onnx = write_model(d.path(), "mlp16.onnx", &cfg(LinearPrecision::F16));
    let m = build(d.path(), &onnx, "mlp16.plan", &[]);
    assert_eq!(io(&m, "x").dtype, "float16");
    assert_eq!(io(&m, "y").dtype, "float16");
}

#[test]
fn dynamic_input_with_profile() {
    let d = tempfile::tempdir().unwrap();
    let c = MlpConfig {
        batch: Dim::Sym("batch".into()),
        ..Default::default()
    };
    let onnx = write_model(d.path(), "dyn.onnx", &c);
    let m = build(
        d.path(),
        &onnx,
        "dyn.plan",
        &["--shapes", "x=2x64:8x64:32x64"],
    );
    let x = io(&m, "x");
    assert_eq!(x.shape, vec![-1, 64]);
    let p = x.profile.as_ref().unwrap();
    assert_eq!(
        (p.min.clone(), p.opt.clone(), p.max.clone()),
        (vec![2, 64], vec![8, 64], vec![32, 64])
    );
    assert_eq!(io(&m, "y").shape, vec![-1, 32]);
    // Without --shapes a default profile is chosen from the dimension's name.
    let m = build(d.path(), &onnx, "dyn_default.plan", &[]);
    let p = io(&m, "x").profile.clone().unwrap();
    assert_eq!((p.min, p.max), (vec![1, 64], vec![16, 64]));
}

#[test]
fn fp8_qdq_engine() {
    let d = tempfile::tempdir().unwrap();
    let onnx = write_model(d.path(), "fp8.onnx", &cfg(LinearPrecision::Fp8));
    let r = run(&["inspect", s(&onnx)], true);
    assert!(r.stdout.contains("QuantizeLinear"), "{}", r.stdout);
    assert!(r.stdout.contains("float8e4m3fn"), "{}", r.stdout);
    assert!(r.stdout.contains("per-tensor"), "{}", r.stdout);
    let m = build(d.path(), &onnx, "fp8.plan", &[]);
    assert_eq!(io(&m, "x").dtype, "float32");
}

#[test]
fn nvfp4_engine_default_and_blackwell_targets() {
    let d = tempfile::tempdir().unwrap();
    let onnx = write_model(d.path(), "fp4.onnx", &cfg(LinearPrecision::Nvfp4));
    let r = run(&["inspect", s(&onnx)], true);
    for needle in [
        "trt::TRT_FP4DynamicQuantize",
        "float4e2m1",
        "blocked (block 16, axis -1), weight",
        "trt 1",
        "ai.onnx 23",
    ] {
        assert!(
            r.stdout.contains(needle),
            "missing {needle} in\n{}",
            r.stdout
        );
    }
    build(d.path(), &onnx, "fp4.plan", &[]);
    let m = build(
        d.path(),
        &onnx,
        "fp4_sm120.plan",
        &["--targets", "sm120,sm121"],
    );
    assert_eq!(m.tensorrt.as_ref().unwrap().targets, vec!["sm120", "sm121"]);
}

#[test]
fn builder_options_are_recorded() {
    let d = tempfile::tempdir().unwrap();
    let onnx = write_model(d.path(), "opts.onnx", &cfg(LinearPrecision::F32));
    let m = build(
        d.path(),
        &onnx,
        "opts.plan",
        &[
            "--opt-level",
            "2",
            "--workspace",
            "64",
            "--weight-streaming",
            "--trt",
            "rtx",
            "--targets",
            "sm86",
        ],
    );
    assert_eq!(m.builder.as_ref().unwrap().optimization_level, Some(2));
    assert_eq!(m.builder.as_ref().unwrap().workspace_bytes, Some(64 << 20));
    assert!(
        m.builder.as_ref().unwrap().weight_streaming && !m.builder.as_ref().unwrap().refittable
    );
    assert_eq!(m.tensorrt.as_ref().unwrap().targets, vec!["sm86"]);
}

#[test]
fn refit_needs_a_gpu_with_tensorrt_rtx() {
    // TensorRT-RTX compiles refittable engines with CUDA: on a machine without a GPU the build must fail cleanly,
    // say why and leave nothing behind. Where a GPU exists the same build succeeds and records the flag.
    let d = tempfile::tempdir().unwrap();
    let onnx = write_model(d.path(), "refit.onnx", &cfg(LinearPrecision::F32));
    if trt_diff::cuda::query().is_ok_and(|r| !r.gpus.is_empty()) {
        let m = build(d.path(), &onnx, "refit.plan", &["--refit"]);
        assert!(m.builder.as_ref().unwrap().refittable);
        return;
    }
    let r = run(
        &[
            "build",
            s(&onnx),
            "--out",
            s(&d.path().join("refit.plan")),
            "--refit",
        ],
        false,
    );
    assert!(r.stderr.contains("needs a CUDA GPU"), "{}", r.stderr);
    assert!(
        outputs_in(d.path()).is_empty(),
        "{:?}",
        outputs_in(d.path())
    );
}

#[test]
fn timing_cache_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let onnx = write_model(d.path(), "tc.onnx", &cfg(LinearPrecision::F32));
    let cache = d.path().join("build.timing-cache");
    let m = build(d.path(), &onnx, "a.plan", &["--timing-cache", s(&cache)]);
    assert_eq!(
        m.builder.as_ref().unwrap().timing_cache.as_deref(),
        Some(s(&cache))
    );
    let first = std::fs::read(&cache).unwrap();
    assert!(!first.is_empty(), "timing cache saved");
    // The saved cache loads into the next build and is saved again.
    build(d.path(), &onnx, "b.plan", &["--timing-cache", s(&cache)]);
    assert!(!std::fs::read(&cache).unwrap().is_empty());
    // A damaged cache is reported, the build goes on from an empty cache and the file is replaced by a good one.
    std::fs::write(&cache, b"not a timing cache").unwrap();
    let r = run(
        &[
            "build",
            s(&onnx),
            "--out",
            s(&d.path().join("c.plan")),
            "--timing-cache",
            s(&cache),
        ],
        true,
    );
    assert!(r.stderr.contains("could not be read"), "{}", r.stderr);
    assert_eq!(std::fs::read(&cache).unwrap().len(), first.len());
}

#[test]
fn library_api_builds_without_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let onnx = write_model(d.path(), "lib.onnx", &cfg(LinearPrecision::F32));
    let out = d.path().join("lib.plan");
    let o = build_engine(&BuildOptions {
        onnx,
        out: out.clone(),
        trt: TrtChoice::Rtx,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(o.engine, out);
    assert!(o.timings.total >= o.timings.trt_build);
    assert_eq!(o.manifest, Manifest::read(&o.manifest_path).unwrap());
}

#[test]
fn both_flavours_are_compiled_in() {
    // The TensorRT 11 flavour compiles against the TRT-Enterprise-11.4 headers (it cannot run here: no library).
    let flavors = compiled_flavors();
    let find = |f: Flavor| {
        flavors
            .iter()
            .find(|(g, _, _)| *g == f)
            .map(|(_, v, _)| v.clone())
    };
    assert_eq!(find(Flavor::Rtx).as_deref(), Some("1.7.1"));
    assert_eq!(find(Flavor::Trt11).as_deref(), Some("11.4.0"));
    let r = run(&["doctor"], true);
    assert!(
        r.stdout.contains("TensorRT-RTX") && r.stdout.contains("1.7.1 at"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("11.4.0 from"), "{}", r.stdout);
    assert!(r.stdout.contains("ONNX Runtime 1."), "{}", r.stdout);
    let j = run(&["doctor", "--json"], true);
    let v: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    assert_eq!(v["tensorrt"].as_array().unwrap().len(), 2);
}
