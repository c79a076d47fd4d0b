//! `trt-diff run` on the CPU backend: ONNX Runtime on graphs this project writes matches onnx.reference, .npy
//! round trips, plans fall back to their source ONNX without a GPU, and every bad input is a clear error.
use crate::common;
use common::*;
use std::process::Command;
use trt_diff::backend::HostTensor;
use trt_diff::models::mlp::MlpConfig;
use trt_diff::onnx::Dim;
use trt_diff::quant::LinearPrecision;

fn input(shape: &[usize]) -> Vec<f32> {
    (0..shape.iter().product::<usize>())
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
        .collect()
}

fn max_diff(a: &HostTensor, b: &HostTensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let (x, y) = (a.to_f64().unwrap(), b.to_f64().unwrap());
    x.iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max)
}

#[test]
fn onnx_runtime_matches_onnx_reference() {
    for precision in [
        LinearPrecision::F32,
        LinearPrecision::F16,
        LinearPrecision::Fp8,
    ] {
        let d = tempfile::tempdir().unwrap();
        let cfg = MlpConfig {
            precision,
            batch: Dim::Sym("batch".into()),
            ..Default::default()
        };
        let onnx = write_model(d.path(), "m.onnx", &cfg);
        let x = HostTensor::from_f32(&[3, 64], &input(&[3, 64]));
        let x = if precision == LinearPrecision::F16 {
            let v: Vec<u8> = input(&[3, 64])
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            HostTensor {
                dtype: trt_diff::onnx::DataType::FLOAT16,
                shape: vec![3, 64],
                data: v,
            }
        } else {
            x
        };
        let xnpy = d.path().join("x.npy");
        trt_diff::backend::npy::write(&xnpy, &x).unwrap();
        assert_eq!(
            trt_diff::backend::npy::read(&xnpy).unwrap(),
            x,
            ".npy round trip"
        );
        let ours = d.path().join("ours");
        let r = run(
            &[
                "run",
                "--engine",
                s(&onnx),
                "--input",
                &format!("x={}", s(&xnpy)),
                "--out",
                s(&ours),
                "--iterations",
                "3",
            ],
            true,
        );
        assert!(
            r.stdout.contains("ONNX Runtime (CPU)") && r.stdout.contains("median"),
            "{}",
            r.stdout
        );
        let refdir = d.path().join("ref");
        std::fs::create_dir(&refdir).unwrap();
        let out = Command::new(python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/py/reference_outputs.py"
            ))
            .args([s(&onnx), s(&refdir), &format!("x={}", s(&xnpy))])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = trt_diff::backend::npy::read(&ours.join("y.npy")).unwrap();
        let want = trt_diff::backend::npy::read(&refdir.join("y.npy")).unwrap();
        assert_eq!(got.dtype, want.dtype);
        let tol = if precision == LinearPrecision::F16 {
            2e-3
        } else {
            1e-5
        };
        assert!(
            max_diff(&got, &want) <= tol,
            "{precision:?}: {}",
            max_diff(&got, &want)
        );
    }
}

#[test]
fn plan_runs_on_its_source_onnx_without_a_gpu_and_compares() {
    let d = tempfile::tempdir().unwrap();
    let cfg = MlpConfig {
        precision: LinearPrecision::Nvfp4,
        batch: Dim::Sym("batch".into()),
        ..Default::default()
    };
    let onnx = write_model(d.path(), "m.onnx", &cfg);
    let plan = d.path().join("m.plan");
    run(
        &[
            "build",
            s(&onnx),
            "--out",
            s(&plan),
            "--shapes",
            "x=1x64:2x64:8x64",
            "--no-progress",
        ],
        true,
    );
    let xnpy = d.path().join("x.npy");
    trt_diff::backend::npy::write(&xnpy, &HostTensor::from_f32(&[2, 64], &input(&[2, 64])))
        .unwrap();
    let arg = format!("x={}", s(&xnpy));
    let r = run(
        &[
            "run",
            "--engine",
            s(&plan),
            "--input",
            &arg,
            "--backend",
            "cpu",
            "--compare-with",
            "cpu",
        ],
        true,
    );
    assert!(r.stdout.contains("max abs 0.000e0"), "{}", r.stdout);
    if trt_diff::trt::runtime::usable_gpu().is_err() {
        let r = run(&["run", "--engine", s(&plan), "--input", &arg], true);
        assert!(
            r.stderr.contains("running on the CPU backend"),
            "{}",
            r.stderr
        );
        let r = run(
            &[
                "run",
                "--engine",
                s(&plan),
                "--input",
                &arg,
                "--backend",
                "trt",
            ],
            false,
        );
        assert!(r.stderr.contains("use --backend cpu"), "{}", r.stderr);
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let onnx = write_model(d.path(), "m.onnx", &MlpConfig::default());
    let good = d.path().join("x.npy");
    trt_diff::backend::npy::write(&good, &HostTensor::from_f32(&[4, 64], &input(&[4, 64])))
        .unwrap();
    let wrong_shape = d.path().join("shape.npy");
    trt_diff::backend::npy::write(
        &wrong_shape,
        &HostTensor::from_f32(&[4, 65], &input(&[4, 65])),
    )
    .unwrap();
    let wrong_type = d.path().join("i64.npy");
    trt_diff::backend::npy::write(
        &wrong_type,
        &HostTensor {
            dtype: trt_diff::onnx::DataType::INT64,
            shape: vec![4, 64],
            data: vec![0; 4 * 64 * 8],
        },
    )
    .unwrap();
    let junk = d.path().join("junk.npy");
    std::fs::write(&junk, b"not numpy").unwrap();
    let truncated = d.path().join("cut.npy");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    let e = s(&onnx);
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec![format!("y={}", s(&good))],
            vec!["no input 'y'", "x float32 [4, 64]"],
        ),
        (vec![], vec!["input 'x'", "missing"]),
        (
            vec![format!("x={}", s(&wrong_shape))],
            vec!["input 'x'", "[4, 65]"],
        ),
        (
            vec![format!("x={}", s(&wrong_type))],
            vec!["input 'x'", "float32", "int64"],
        ),
        (
            vec![format!("x={}", s(&junk))],
            vec!["junk.npy", "not a usable .npy"],
        ),
        (
            vec![format!("x={}", s(&truncated))],
            vec!["cut.npy", "truncated"],
        ),
        (
            vec![format!("x={}", s(&d.path().join("nope.npy")))],
            vec!["nope.npy", "check the path"],
        ),
        (vec![s(&good).to_string()], vec!["expected NAME=FILE.npy"]),
    ];
    for (inputs, needles) in cases {
        let mut args = vec!["run", "--engine", e];
        for i in &inputs {
            args.extend(["--input", i.as_str()]);
        }
        let r = run(&args, false);
        for n in needles {
            assert!(
                r.stderr.contains(n),
                "{inputs:?}: missing '{n}' in {}",
                r.stderr
            );
        }
    }
    let r = run(
        &[
            "run",
            "--engine",
            e,
            "--input",
            &format!("x={}", s(&good)),
            "--backend",
            "trt",
        ],
        false,
    );
    assert!(r.stderr.contains("needs a TensorRT plan"), "{}", r.stderr);
    // TensorRT-only options on the CPU backend are refused, not silently ignored.
    for opt in [
        vec!["--cuda-graph"],
        vec!["--weight-budget", "64"],
        vec!["--refit", "w.safetensors"],
    ] {
        let good_arg = format!("x={}", s(&good));
        let mut args = vec!["run", "--engine", e, "--input", good_arg.as_str()];
        args.extend(opt.iter().copied());
        let r = run(&args, false);
        assert!(
            r.stderr.contains("apply to TensorRT engines") && r.stderr.contains("m.onnx"),
            "{opt:?}: {}",
            r.stderr
        );
    }
    let r = run(&["run", "--engine", s(&d.path().join("none.plan"))], false);
    assert!(
        r.stderr.contains("none.plan") && r.stderr.contains("no such file"),
        "{}",
        r.stderr
    );
}
