//! `--engine X` is opened once into an `EngineFile`: the files its manifest names stay inside the engine's folder,
//! the plan and the source ONNX must be the ones the manifest records, and `--backend` choices that cannot run
//! here are refused with the reason. A real plan (TensorRT-RTX's builder) whose manifest and files are then
//! tampered with, as a hostile or damaged download would be.
use crate::common;
use common::*;
use std::path::Path;
use trt_diff::backend::{DeviceTensor, Engine, HostTensor};
use trt_diff::models::mlp::MlpConfig;
use trt_diff::onnx::Dim;

fn input(shape: &[usize]) -> Vec<f32> {
    (0..shape.iter().product::<usize>())
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
        .collect()
}

/// A plan, its manifest and its source ONNX in `dir`, and an input for it.
fn plan_in(dir: &Path) -> (std::path::PathBuf, String) {
    let cfg = MlpConfig {
        batch: Dim::Sym("batch".into()),
        ..Default::default()
    };
    let onnx = write_model(dir, "m.onnx", &cfg);
    let plan = dir.join("m.plan");
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
    let x = dir.join("x.npy");
    trt_diff::backend::npy::write(&x, &HostTensor::from_f32(&[2, 64], &input(&[2, 64]))).unwrap();
    (plan, format!("x={}", s(&x)))
}

fn run_cpu(plan: &Path, arg: &str, extra: &[&str], ok: bool) -> Run {
    let mut args = vec![
        "run",
        "--engine",
        s(plan),
        "--input",
        arg,
        "--backend",
        "cpu",
    ];
    args.extend_from_slice(extra);
    run(&args, ok)
}

fn edit_manifest(plan: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = trt_diff::manifest::sidecar_path(plan);
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
}

#[test]
fn manifest_paths_stay_in_the_engine_folder() {
    let d = tempfile::tempdir().unwrap();
    let (plan, arg) = plan_in(d.path());
    // The manifest names its source by a name relative to the plan's folder.
    let m = trt_diff::manifest::EngineFile::open(&plan).unwrap();
    assert_eq!(m.manifest.as_ref().unwrap().source.onnx, "m.onnx");
    run_cpu(&plan, &arg, &[], true);
    for hostile in ["/etc/passwd", "../m.onnx", "sub/../../m.onnx"] {
        edit_manifest(&plan, |m| m["source"]["onnx"] = hostile.into());
        let r = run_cpu(&plan, &arg, &[], false);
        assert!(
            r.stderr.contains("outside the engine's folder") && r.stderr.contains(hostile),
            "{hostile}: {}",
            r.stderr
        );
        assert_eq!(r.code, 1, "a user error");
    }
    // A link inside the folder that leads out is refused too, unless the user trusts the manifest.
    let outside = tempfile::tempdir().unwrap();
    let moved = outside.path().join("m.onnx");
    std::fs::rename(d.path().join("m.onnx"), &moved).unwrap();
    std::os::unix::fs::symlink(&moved, d.path().join("link.onnx")).unwrap();
    edit_manifest(&plan, |m| m["source"]["onnx"] = "link.onnx".into());
    let r = run_cpu(&plan, &arg, &[], false);
    assert!(r.stderr.contains("is a link to"), "{}", r.stderr);
    run_cpu(&plan, &arg, &["--allow-external-paths"], true);
}

#[test]
fn changed_sources_and_damaged_plans_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (plan, arg) = plan_in(d.path());
    // The source ONNX was replaced after the build.
    let onnx = d.path().join("m.onnx");
    let original = std::fs::read(&onnx).unwrap();
    let mut changed = original.clone();
    changed.push(0);
    std::fs::write(&onnx, &changed).unwrap();
    let r = run_cpu(&plan, &arg, &[], false);
    assert!(r.stderr.contains("changed after the build"), "{}", r.stderr);
    std::fs::write(&onnx, &original).unwrap();
    run_cpu(&plan, &arg, &[], true);
    // A truncated or emptied plan is refused before anything runs, on any backend.
    let bytes = std::fs::read(&plan).unwrap();
    std::fs::write(&plan, &bytes[..bytes.len() / 2]).unwrap();
    let r = run_cpu(&plan, &arg, &[], false);
    assert!(
        r.stderr.contains("truncated") || r.stderr.contains("not a TensorRT plan"),
        "{}",
        r.stderr
    );
    std::fs::write(&plan, b"").unwrap();
    let r = run_cpu(&plan, &arg, &[], false);
    assert!(r.stderr.contains("not a TensorRT plan"), "{}", r.stderr);
}

#[test]
fn gpu_backends_that_cannot_run_here_say_why() {
    if trt_diff::cuda::query().is_ok_and(|r| !r.gpus.is_empty()) {
        return; // with a GPU, `--backend cuda` may well run
    }
    let d = tempfile::tempdir().unwrap();
    let (plan, arg) = plan_in(d.path());
    let r = run(
        &[
            "run",
            "--engine",
            s(&plan),
            "--input",
            &arg,
            "--backend",
            "cuda",
        ],
        false,
    );
    assert!(
        r.stderr.contains("--backend cuda cannot run here") && r.stderr.contains("driver"),
        "{}",
        r.stderr
    );
    // The CPU engine has no device path: a clear error, not a crash.
    let onnx = d.path().join("m.onnx");
    let mut e =
        trt_diff::backend::ort_backend::OrtEngine::open(&onnx, &Default::default()).unwrap();
    let t = DeviceTensor {
        ptr: 0,
        dtype: trt_diff::onnx::DataType::FLOAT,
        shape: vec![2, 64],
    };
    let err = e.run_device(&[("x", t)], &[], &[]).unwrap_err().to_string();
    assert!(err.contains("--backend cuda"), "{err}");
}

/// `build --onnx-only` writes the manifest and the graphs but no plan (for GPUs without TensorRT, through ONNX
/// Runtime): `--engine` takes the manifest or the plan's name, the outputs equal the plan bundle's on the CPU
/// backend, and what needs a plan says so.
#[test]
fn onnx_only_bundles_run_without_a_plan() {
    let d = tempfile::tempdir().unwrap();
    let (plan, arg) = plan_in(d.path());
    // The manifest must sit beside its graph.
    let args = |out: &Path| {
        [
            "build",
            s(&d.path().join("m.onnx")),
            "--out",
            s(out),
            "--shapes",
            "x=1x64:2x64:8x64",
            "--onnx-only",
            "--no-progress",
        ]
        .map(String::from)
    };
    let elsewhere = args(&d.path().join("sub/m.plan"));
    let r = run(
        &elsewhere.iter().map(String::as_str).collect::<Vec<_>>(),
        false,
    );
    assert!(r.stderr.contains("must sit in the folder"), "{}", r.stderr);
    let out = d.path().join("only.plan");
    let r = run(
        &args(&out).iter().map(String::as_str).collect::<Vec<_>>(),
        true,
    );
    assert!(r.stdout.contains("ONNX only"), "{}", r.stdout);
    assert!(!out.exists(), "no plan is written");
    let manifest = trt_diff::manifest::sidecar_path(&out);
    let m = trt_diff::manifest::Manifest::read(&manifest).unwrap();
    assert!(m.plan.is_none() && m.tensorrt.is_none());
    let x = m.io.iter().find(|t| t.name == "x").unwrap();
    assert_eq!(x.profile.as_ref().unwrap().to_string(), "1x64:2x64:8x64");
    let reference = d.path().join("ref");
    run_cpu(&plan, &arg, &["--out", s(&reference)], true);
    for engine in [&manifest, &out] {
        let got = d.path().join("got");
        run_cpu(engine, &arg, &["--out", s(&got)], true);
        let a = std::fs::read(reference.join("y.npy")).unwrap();
        let b = std::fs::read(got.join("y.npy")).unwrap();
        assert_eq!(a, b, "y differs from the plan bundle's");
    }
    let r = run(&["inspect", s(&manifest)], true);
    assert!(r.stdout.contains("ONNX-only bundle"), "{}", r.stdout);
    let r = run(
        &[
            "run",
            "--engine",
            s(&manifest),
            "--input",
            &arg,
            "--backend",
            "trt",
        ],
        false,
    );
    assert!(r.stderr.contains("ONNX-only bundle"), "{}", r.stderr);
    // A plan's manifest named directly opens its plan; a plan deleted from beside its manifest is reported.
    run_cpu(&trt_diff::manifest::sidecar_path(&plan), &arg, &[], true);
    std::fs::remove_file(&plan).unwrap();
    let r = run_cpu(&plan, &arg, &[], false);
    assert!(r.stderr.contains("deleted or moved"), "{}", r.stderr);
}

/// `--engine MODEL.gguf` runs the file as it is: its ONNX-only bundle is built once into the model cache, reused
/// by later runs, and built again when the file changes; the text equals a bundle built by hand.
#[test]
fn gguf_files_run_directly_through_the_model_cache() {
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("stories.gguf");
    run(
        &[
            "convert",
            "llama2c",
            s(&shared_data("llm/stories260K.bin")),
            "--tokenizer",
            s(&shared_data("llm/tok512.bin")),
            "--out",
            s(&gguf),
        ],
        true,
    );
    let cache = d.path().join("cache");
    let env = [("TRT_DIFF_MODEL_CACHE", s(&cache))];
    let generate = |engine: &Path| {
        run_env(
            &[
                "generate",
                "--engine",
                s(engine),
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "30",
                "--backend",
                "cpu",
            ],
            &env,
            true,
        )
    };
    let first = generate(&gguf);
    assert!(
        first
            .stderr
            .contains("building the ONNX Runtime bundle once"),
        "{}",
        first.stderr
    );
    let again = generate(&gguf);
    assert!(again.stderr.contains("built before"), "{}", again.stderr);
    assert_eq!(first.stdout, again.stdout);
    let entries = || std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(entries(), 1, "one cache entry, no leftovers");
    // The same file built by hand gives the same text.
    let out = d.path().join("byhand.plan");
    run(
        &[
            "build",
            s(&gguf),
            "--precision",
            "fp16",
            "--onnx-only",
            "--out",
            s(&out),
            "--no-progress",
        ],
        true,
    );
    assert_eq!(
        generate(&d.path().join("byhand.plan.json")).stdout,
        first.stdout
    );
    // A changed file (a new modification time) is built again.
    let f = std::fs::File::options().write(true).open(&gguf).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    let rebuilt = generate(&gguf);
    assert!(rebuilt.stderr.contains("building"), "{}", rebuilt.stderr);
    assert_eq!(entries(), 2);
}

/// `--engine HF_FOLDER` runs a Hugging Face folder as it is, with its own tokenizer.json (no GGUF vocabulary):
/// built once into the model cache and reused; `build` of the folder without --tokenizer writes the same
/// vocabulary, whose ids are Hugging Face tokenizers' (tests/llm_tokenizers.rs).
#[test]
fn hf_folders_run_directly_with_their_own_tokenizer() {
    let d = tempfile::tempdir().unwrap();
    // A tiny Qwen3 (the Z-Image golden text encoder, tied embeddings) with its Qwen tokenizer, named as people
    // name such folders (dots included).
    let model = d.path().join("Qwen3-0.5B-tiny.v1");
    std::fs::create_dir_all(&model).unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/z_image");
    for f in ["text_encoder/config.json", "text_encoder/model.safetensors"] {
        std::fs::copy(
            golden.join(f),
            model.join(Path::new(f).file_name().unwrap()),
        )
        .unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(golden.join("tokenizer").join(f), model.join(f)).unwrap();
    }
    let cache = d.path().join("cache");
    let env = [("TRT_DIFF_MODEL_CACHE", s(&cache))];
    let generate = |engine: &Path| {
        run_env(
            &[
                "generate",
                "--engine",
                s(engine),
                "--prompt",
                "<|im_start|>user\nhello<|im_end|>",
                "--max-tokens",
                "12",
                "--ignore-eos",
                "--backend",
                "cpu",
            ],
            &env,
            true,
        )
    };
    let first = generate(&model);
    assert!(
        first
            .stderr
            .contains("building the ONNX Runtime bundle once"),
        "{}",
        first.stderr
    );
    assert!(
        first.stderr.contains("generated: 12 tokens"),
        "{}",
        first.stderr
    );
    let again = generate(&model);
    assert!(again.stderr.contains("built before"), "{}", again.stderr);
    assert_eq!(first.stdout, again.stdout);
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(
        entry.join("Qwen3-0.5B-tiny.v1.plan.json").exists(),
        "{}",
        entry.display()
    );
    // Built by hand without --tokenizer: the same text.
    let out = d.path().join("byhand.plan");
    run(
        &[
            "build",
            s(&model),
            "--precision",
            "fp16",
            "--onnx-only",
            "--out",
            s(&out),
            "--no-progress",
        ],
        true,
    );
    assert_eq!(
        generate(&d.path().join("byhand.plan.json")).stdout,
        first.stdout
    );
    // Without tokenizer.json the error says what to give.
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let r = run(
        &[
            "build",
            s(&model),
            "--onnx-only",
            "--out",
            s(&out),
            "--no-progress",
        ],
        false,
    );
    assert!(r.stderr.contains("--tokenizer FILE.gguf"), "{}", r.stderr);
}
