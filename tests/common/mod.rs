//! Helpers shared by the integration tests: the built binary, scratch folders and small models.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use trt_diff::models::mlp::MlpConfig;
use trt_diff::onnx::{SaveOptions, save};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trt-diff"))
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

fn to_run(o: Output) -> Run {
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs trt-diff with `args`; panics with its output if the exit status is not `expect_ok`.
pub fn run(args: &[&str], expect_ok: bool) -> Run {
    run_env(args, &[], expect_ok)
}

pub fn run_env(args: &[&str], env: &[(&str, &str)], expect_ok: bool) -> Run {
    let mut c = bin();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let r = to_run(c.output().expect("trt-diff runs"));
    assert_eq!(
        r.code == 0,
        expect_ok,
        "trt-diff {args:?} exited {}\nstdout:\n{}\nstderr:\n{}",
        r.code,
        r.stdout,
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    r
}

pub fn write_model(dir: &Path, name: &str, cfg: &MlpConfig) -> PathBuf {
    let path = dir.join(name);
    save(cfg.graph().unwrap(), &path, &SaveOptions::default()).unwrap();
    path
}

/// A file of the shared data (`../shared/data` beside the checkout, or `TRT_DIFF_SHARED_DATA`).
pub fn shared_data(rel: &str) -> PathBuf {
    std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")))
        .join(rel)
}

/// stories260K (llama2.c) built into `dir/stories.plan`.
pub fn build_stories(dir: &Path) -> PathBuf {
    let plan = dir.join("stories.plan");
    run(
        &[
            "build",
            s(&shared_data("llm/stories260K.bin")),
            "--arch",
            "llama2c",
            "--tokenizer",
            s(&shared_data("llm/tok512.bin")),
            "--out",
            s(&plan),
            "--no-progress",
        ],
        true,
    );
    plan
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Files in `dir` whose names look like leftovers of an interrupted write, or plans/manifests.
pub fn outputs_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial") || n.ends_with(".plan") || n.ends_with(".json"))
        .collect()
}

/// Python of the set-up venv (onnx, onnxruntime, ml-dtypes, numpy).
pub fn python() -> PathBuf {
    let p = trt_diff::fsutil::cache_dir().join("venv/bin/python");
    assert!(p.exists(), "{} missing: run scripts/setup.sh", p.display());
    p
}

/// Writes a little-endian f32 array as .npy (format 1.0).
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(path, out).unwrap();
}
pub mod http;
pub mod samplers;
pub mod sd35;

/// A golden safetensors file's tensors as f32 host tensors, by name.
pub fn golden_tensors(
    path: &Path,
) -> std::collections::HashMap<String, trt_diff::backend::HostTensor> {
    let ck = trt_diff::weights::safetensors_file::Checkpoint::open(path).unwrap();
    ck.names()
        .map(|n| {
            let t = ck.get(n).unwrap();
            (
                n.to_string(),
                trt_diff::backend::HostTensor::from_f32(&t.shape, &t.to_f32().unwrap()),
            )
        })
        .collect()
}

/// max |a - b| / max |b|.
pub fn max_rel_err(a: &trt_diff::backend::HostTensor, b: &trt_diff::backend::HostTensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let (a, b) = (a.to_f64().unwrap(), b.to_f64().unwrap());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}
