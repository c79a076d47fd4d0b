//! Flux ControlNet-Union against diffusers (tests/golden/flux/controlnet_union,
//! scripts/golden/flux_controlnet_union.py): the union ControlNet's sample stacks for two modes in one batch, the
//! tiny pipeline with one control and with two controls of different modes (one net, summed), and the command line
//! with its errors.
use crate::common;
use common::*;
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::backend::{Engine, HostTensor};
use trt_diff::onnx::DataType;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/flux")
        .join(name)
}

fn i64_tensor(t: &HostTensor) -> HostTensor {
    HostTensor {
        dtype: DataType::INT64,
        shape: t.shape.clone(),
        data: t
            .to_f64()
            .unwrap()
            .iter()
            .flat_map(|v| (*v as i64).to_le_bytes())
            .collect(),
    }
}

/// A model folder of the tiny pipeline's parts (symlinks).
fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("tiny");
    std::fs::create_dir_all(&m).unwrap();
    for (name, src) in [
        ("transformer", "pipeline/transformer"),
        ("vae", "pipeline/vae"),
        ("text_encoder", "text_encoder"),
        ("text_encoder_2", "text_encoder_2"),
    ] {
        std::os::unix::fs::symlink(golden(src), m.join(name)).unwrap();
    }
    m
}

fn tokenizers() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/tokenizers"
    ))
}

#[test]
fn union_controlnet_matches_diffusers() {
    use trt_diff::pipelines::flux_build::{ModelFiles, export_controlnet, plan};
    let d = tempfile::tempdir().unwrap();
    let m = tiny_model(d.path());
    let shared = tokenizers();
    let files = ModelFiles::find(
        &m,
        Some(&shared.join("bpe_simple_vocab_16e6.txt.gz")),
        Some(&shared.join("t5_tokenizer.json")),
    )
    .unwrap();
    let p = plan(files, "flux-dev", None).unwrap();
    let onnx = d.path().join("union.onnx");
    let (_, cfg, modes) = export_controlnet(
        &p,
        &golden("controlnet_union/model"),
        trt_diff::quant::Precision::Fp32,
        &onnx,
    )
    .unwrap();
    assert_eq!((cfg.depth, cfg.depth_single, modes), (1, 1, 7));
    let want = golden_tensors(&golden("controlnet_union/union_io.safetensors"));
    let mut e = OrtEngine::open(&onnx, &OrtOptions::default()).unwrap();
    let given: Vec<(String, HostTensor)> = e
        .inputs()
        .iter()
        .map(|d| {
            let t = match d.name.as_str() {
                "conditioning_scale" => HostTensor::from_f32(&[1], &[0.8]),
                "controlnet_mode" => i64_tensor(&want["controlnet_mode"]),
                n => want[n].clone(),
            };
            (d.name.clone(), t)
        })
        .collect();
    assert!(given.iter().any(|(n, _)| n == "controlnet_mode"));
    let out = e.run(&given).unwrap();
    assert_eq!(out.len(), 2);
    for (name, got) in &out {
        let err = max_rel_err(got, &want[name]);
        println!("union ControlNet {name}: max rel err {err:.2e}");
        assert!(err < 1e-4, "{name}: {err}");
    }
}

/// The tiny pipeline under diffusers' FluxControlNetPipeline with the union ControlNet: one control (mode 2), and
/// two controls with modes 0 and 4 through a one-net FluxMultiControlNetModel (summed).
#[test]
fn union_pipeline_matches_diffusers() {
    use trt_diff::backend::BackendChoice;
    use trt_diff::manifest::EngineFile;
    use trt_diff::pipelines::engines::{OpenOptions, open_file};
    use trt_diff::pipelines::flux::{FluxEngines, FluxModel, load_clip_tokenizer};
    use trt_diff::pipelines::flux_build::{
        ModelFiles, OnnxPaths, export_aux, export_controlnet, export_transformer, plan,
    };
    use trt_diff::pipelines::image::{ControlImage, ControlMode, ImagePipeline, ImageRequest};
    use trt_diff::weights::safetensors_file::Checkpoint;
    let d = tempfile::tempdir().unwrap();
    let m = tiny_model(d.path());
    let shared = tokenizers();
    let files = ModelFiles::find(
        &m,
        Some(&shared.join("bpe_simple_vocab_16e6.txt.gz")),
        Some(&shared.join("t5_tokenizer.json")),
    )
    .unwrap();
    let mut p = plan(files, "flux-dev", None).unwrap();
    let paths = OnnxPaths::new(d.path(), None);
    let f32t = DataType::FLOAT;
    export_aux(&p, &paths, f32t, f32t).unwrap();
    let cn_onnx = d.path().join("controlnet.onnx");
    let (_, cn_cfg, modes) = export_controlnet(
        &p,
        &golden("controlnet_union/model"),
        trt_diff::quant::Precision::Fp32,
        &cn_onnx,
    )
    .unwrap();
    p.config.controlnet_modes = modes;
    let opts = trt_diff::models::flux::ExportOptions {
        controlnet: trt_diff::models::flux::ControlNetGraph::Residuals {
            double: cn_cfg.depth,
            single: cn_cfg.depth_single,
        },
        ..Default::default()
    };
    export_transformer(&p, &opts, &paths.transformer).unwrap();
    let open = |path: &Path| {
        open_file(
            &EngineFile::open(path).unwrap(),
            BackendChoice::Cpu,
            &OpenOptions::default(),
        )
        .unwrap()
    };
    let mut pipe = ImagePipeline::new(FluxModel::new(
        p.config.clone(),
        load_clip_tokenizer(&p.files.clip_tokenizer, p.config.clip_pad).unwrap(),
        trt_diff::tokenizer::t5::T5Tokenizer::load(&p.files.t5_tokenizer).unwrap(),
        FluxEngines {
            clip: open(&paths.clip),
            t5: open(&paths.t5),
            transformer: open(&paths.transformer),
            vae_decoder: open(&paths.vae_decoder),
            vae_encoder: Some(open(&paths.vae_encoder)),
            tae_decoder: None,
            controlnet: Some(open(&cn_onnx)),
        },
    ));
    let base_io = Checkpoint::open(&golden("pipeline_io.safetensors")).unwrap();
    let want = golden_tensors(&golden("controlnet_union/union_io.safetensors"));
    let control = |image: &str, strength, start, mode: &str| ControlImage {
        image: golden(image),
        strength,
        start,
        end: 1.0,
        preprocess: None,
        mode: Some(mode.parse::<ControlMode>().unwrap()),
    };
    let one = ControlImage {
        end: 0.75,
        ..control("controlnet/control.png", 0.7, 0.0, "depth")
    };
    let req = ImageRequest {
        prompt: "a watercolor painting of a fox in the snow, 4k".into(),
        steps: Some(4),
        width: Some(32),
        height: Some(32),
        guidance: Some(3.5),
        cfg: 1.0,
        batch: 1,
        strength: 1.0,
        latents_only: true,
        initial_noise: Some(base_io.get("initial_latents").unwrap().to_f32().unwrap()),
        controls: vec![one],
        ..Default::default()
    };
    let without = HostTensor::from_f32(
        &[1, 64, 64],
        &base_io.get("final_latents").unwrap().to_f32().unwrap(),
    );
    let two = vec![
        control("controlnet/control.png", 0.6, 0.0, "0"),
        control("controlnet_union/control2.png", 0.5, 0.25, "pose"),
    ];
    for (controls, key) in [
        (req.controls.clone(), "final_latents"),
        (two, "final_latents_multi"),
    ] {
        let out = pipe
            .generate(
                &ImageRequest {
                    controls,
                    ..req.clone()
                },
                &mut |_| Ok(()),
            )
            .unwrap();
        let got = HostTensor::from_f32(&[1, 64, 64], &out.latents);
        let err = max_rel_err(&got, &want[key]);
        let moved = max_rel_err(&without, &want[key]);
        println!(
            "union pipeline {key}: max rel err {err:.2e} (the ControlNet moves them by {moved:.2e})"
        );
        assert!(err < 1e-4, "{key}: {err}");
    }
    // A union ControlNet needs a mode in range.
    let mut e = |controls: Vec<ControlImage>| {
        pipe.generate(
            &ImageRequest {
                controls,
                ..req.clone()
            },
            &mut |_| Ok(()),
        )
        .err()
        .unwrap()
        .to_string()
    };
    let msg = e(vec![ControlImage {
        mode: None,
        ..req.controls[0].clone()
    }]);
    assert!(
        msg.contains("give --control-mode") && msg.contains("canny=0"),
        "{msg}"
    );
    let msg = e(vec![control("controlnet/control.png", 1.0, 0.0, "7")]);
    assert!(
        msg.contains("out of range") && msg.contains("num_mode 7"),
        "{msg}"
    );
    let msg = e(vec![control(
        "controlnet/control.png",
        1.0,
        0.0,
        "scribble",
    )]);
    assert!(msg.contains("not a mode name"), "{msg}");
}

/// `build --controlnet UNION_DIR` (the TensorRT-RTX builder included when its libraries are found) and `generate
/// --control IMAGE --control-mode N` on the CPU backend; a missing, unknown or out-of-range mode is refused.
#[test]
fn build_and_generate_with_union_controlnet_on_the_command_line() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_model(d.path());
    let shared = tokenizers();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let run = |args: &[String], ok: bool| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::common::run(&args, ok).stderr
    };
    let plan = d.path().join("union.plan");
    let args: Vec<String> = [
        "build",
        &s(&m),
        "--arch",
        "flux-dev",
        "--precision",
        "fp32",
        "--out",
        &s(&plan),
        "--clip-tokenizer",
        &s(&shared.join("bpe_simple_vocab_16e6.txt.gz")),
        "--t5-tokenizer",
        &s(&shared.join("t5_tokenizer.json")),
        "--image-px",
        "32,32,32",
        "--controlnet",
        &s(&golden("controlnet_union/model")),
        "--no-progress",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    run(&args, true);
    let manifest = std::fs::read_to_string(d.path().join("union.plan.json")).unwrap();
    assert!(manifest.contains("\"controlnet_modes\": 7"), "{manifest}");
    if plan.exists() {
        // The TensorRT-RTX builder (found in .cache/lib) built the union graph too.
        assert!(d.path().join("union.controlnet.plan").exists());
    }
    let generate = |out: &Path, extra: &[&str], ok: bool| {
        let mut args: Vec<String> = [
            "generate",
            "--engine",
            &s(&plan),
            "--prompt",
            "a fox",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "3",
            "--seed",
            "5",
            "--no-progress",
            "--backend",
            "cpu",
            "--out",
            &s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        args.extend(extra.iter().map(|x| x.to_string()));
        run(&args, ok)
    };
    let control = s(&golden("controlnet/control.png"));
    let (a, b, c) = (
        d.path().join("a.png"),
        d.path().join("b.png"),
        d.path().join("c.png"),
    );
    generate(&a, &["--control", &control, "--control-mode", "2"], true);
    generate(
        &b,
        &["--control", &control, "--control-mode", "depth"],
        true,
    );
    generate(
        &c,
        &["--control", &control, "--control-mode", "canny"],
        true,
    );
    let px = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(px(&a), px(&b), "mode 2 is depth");
    assert_ne!(px(&a), px(&c), "the mode changes the image");
    let e = generate(&a, &["--control", &control], false);
    assert!(
        e.contains("ControlNet-Union (7 modes): give --control-mode"),
        "{e}"
    );
    let e = generate(&a, &["--control", &control, "--control-mode", "9"], false);
    assert!(
        e.contains("out of range") && e.contains("num_mode 7"),
        "{e}"
    );
    let e = generate(&a, &["--control-mode", "1"], false);
    assert!(e.contains("add --control IMAGE"), "{e}");
    let e = generate(
        &a,
        &[
            "--control",
            &control,
            "--control-mode",
            "1",
            "--control-mode",
            "2",
        ],
        false,
    );
    assert!(e.contains("one value or one per --control"), "{e}");
}
