//! Flux ControlNet against diffusers (tests/golden/flux/controlnet, scripts/golden/flux_controlnet.py): a tiny
//! FluxControlNetModel exported by our emitter gives diffusers' block samples, and the tiny transformer (both
//! checkpoint layouts) built to take them gives diffusers' output with them, and its own output with zeros.
use crate::common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::backend::{Engine, HostTensor};
use trt_diff::models::flux::{self, ControlNetGraph, ExportOptions, FluxConfig};
use trt_diff::weights::safetensors_file::Checkpoint;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/flux")
        .join(name)
}

fn run(onnx: &Path, inputs: &HashMap<String, HostTensor>) -> Vec<(String, HostTensor)> {
    let mut e = OrtEngine::open(onnx, &OrtOptions::default()).unwrap();
    let given: Vec<(String, HostTensor)> = e
        .inputs()
        .iter()
        .map(|d| (d.name.clone(), inputs[&d.name].clone()))
        .collect();
    e.run(&given).unwrap()
}

fn axes() -> Vec<usize> {
    FluxConfig::axes_from_diffusers_config(
        &std::fs::read_to_string(golden("flux_dev_config.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn controlnet_and_residuals_match_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let mut inputs = golden_tensors(&golden("flux_dev_io.safetensors"));
    let want = golden_tensors(&golden("controlnet/controlnet_io.safetensors"));
    inputs.insert("controlnet_cond".into(), want["controlnet_cond"].clone());
    inputs.insert(
        "conditioning_scale".into(),
        HostTensor::from_f32(&[1], &[0.8]),
    );
    // The ControlNet (config.json beside its weights gives the RoPE axes).
    let ck = Checkpoint::open(&golden("controlnet/model")).unwrap();
    let (cfg, _, _) = FluxConfig::from_checkpoint(&ck).unwrap();
    assert_eq!((cfg.depth, cfg.depth_single), (1, 1));
    let onnx = d.path().join("controlnet.onnx");
    let opts = ExportOptions {
        controlnet: ControlNetGraph::Model,
        ..Default::default()
    };
    flux::export(&cfg, &ck, &opts, &onnx).unwrap();
    let out = run(&onnx, &inputs);
    for (name, got) in &out {
        let err = max_rel_err(got, &want[name]);
        println!("ControlNet {name}: max rel err {err:.2e}");
        assert!(err < 1e-4, "{name}: {err}");
    }
    assert_eq!(out.len(), 2);
    // The transformer taking the samples, in both layouts; zeros leave it as built.
    for file in ["flux_dev.safetensors", "flux_dev_bfl.safetensors"] {
        let ck = Checkpoint::open(&golden(file)).unwrap();
        let (cfg, _, _) = FluxConfig::from_checkpoint_with_axes(&ck, Some(axes())).unwrap();
        let onnx = d.path().join(format!("{file}.onnx"));
        let opts = ExportOptions {
            controlnet: ControlNetGraph::Residuals {
                double: 1,
                single: 1,
            },
            ..Default::default()
        };
        flux::export(&cfg, &ck, &opts, &onnx).unwrap();
        for name in [
            "controlnet_block_samples",
            "controlnet_single_block_samples",
        ] {
            inputs.insert(name.into(), want[name].clone());
        }
        let err = max_rel_err(&run(&onnx, &inputs)[0].1, &want["sample"]);
        println!("{file} with ControlNet samples: max rel err {err:.2e}");
        assert!(err < 1e-4, "{file}: {err}");
        for name in [
            "controlnet_block_samples",
            "controlnet_single_block_samples",
        ] {
            let t = &want[name];
            inputs.insert(
                name.into(),
                HostTensor::from_f32(&t.shape, &vec![0.0; t.shape.iter().product()]),
            );
        }
        let err = max_rel_err(
            &run(&onnx, &inputs)[0].1,
            &want["sample_without_controlnet"],
        );
        assert!(err < 1e-4, "{file} zeros: {err}");
    }
}

/// The whole tiny pipeline under diffusers' FluxControlNetPipeline: control image (VAE mean), strength 0.7,
/// window [0, 0.75] of 4 steps.
#[test]
fn controlnet_pipeline_matches_diffusers() {
    use trt_diff::backend::BackendChoice;
    use trt_diff::manifest::EngineFile;
    use trt_diff::pipelines::engines::{OpenOptions, open_file};
    use trt_diff::pipelines::flux::{FluxEngines, FluxModel, load_clip_tokenizer};
    use trt_diff::pipelines::flux_build::{
        ModelFiles, OnnxPaths, export_aux, export_transformer, plan,
    };
    use trt_diff::pipelines::image::{ControlImage, ImagePipeline, ImageRequest};
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("tiny");
    std::fs::create_dir_all(&m).unwrap();
    for (name, src) in [
        ("transformer", "pipeline/transformer"),
        ("vae", "pipeline/vae"),
        ("text_encoder", "text_encoder"),
        ("text_encoder_2", "text_encoder_2"),
    ] {
        std::os::unix::fs::symlink(golden(src), m.join(name)).unwrap();
    }
    let shared = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/tokenizers"
    ));
    let files = ModelFiles::find(
        &m,
        Some(&shared.join("bpe_simple_vocab_16e6.txt.gz")),
        Some(&shared.join("t5_tokenizer.json")),
    )
    .unwrap();
    let p = plan(files, "flux-dev", None).unwrap();
    let paths = OnnxPaths::new(d.path(), None);
    let f32t = trt_diff::onnx::DataType::FLOAT;
    export_aux(&p, &paths, f32t, f32t).unwrap();
    let cn_ck = Checkpoint::open(&golden("controlnet/pipeline_model")).unwrap();
    let (cn_cfg, _, _) = FluxConfig::from_checkpoint(&cn_ck).unwrap();
    let cn_onnx = d.path().join("controlnet.onnx");
    let opts = ExportOptions {
        controlnet: ControlNetGraph::Model,
        ..Default::default()
    };
    flux::export(&cn_cfg, &cn_ck, &opts, &cn_onnx).unwrap();
    let opts = ExportOptions {
        controlnet: ControlNetGraph::Residuals {
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
    let want = golden_tensors(&golden("controlnet/controlnet_io.safetensors"));
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
        controls: vec![ControlImage {
            image: golden("controlnet/control.png"),
            strength: 0.7,
            start: 0.0,
            end: 0.75,
            preprocess: None,
            mode: None,
        }],
        ..Default::default()
    };
    let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
    let got = HostTensor::from_f32(&[1, 64, 64], &out.latents);
    let err = max_rel_err(&got, &want["final_latents"]);
    let without = base_io.get("final_latents").unwrap().to_f32().unwrap();
    let moved = max_rel_err(
        &HostTensor::from_f32(&[1, 64, 64], &without),
        &want["final_latents"],
    );
    println!(
        "ControlNet pipeline: final latents max rel err {err:.2e} (the ControlNet moves them by {moved:.2e})"
    );
    assert!(err < 1e-3, "{err}");
    // Without controls the same engines give the plain pipeline's latents (zero residuals).
    let plain = pipe
        .generate(
            &ImageRequest {
                controls: vec![],
                ..req
            },
            &mut |_| Ok(()),
        )
        .unwrap();
    let err = max_rel_err(
        &HostTensor::from_f32(&[1, 64, 64], &plain.latents),
        &HostTensor::from_f32(&[1, 64, 64], &without),
    );
    assert!(err < 1e-3, "without controls: {err}");
}

/// `build --controlnet` and `generate --control` through the command line (CPU backend): the bundle gets the
/// ControlNet engine, the control changes the image, canny preprocessing runs, and bad options are refused.
#[test]
fn build_and_generate_with_controlnet_on_the_command_line() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("tiny");
    std::fs::create_dir_all(&m).unwrap();
    for (name, src) in [
        ("transformer", "pipeline/transformer"),
        ("vae", "pipeline/vae"),
        ("text_encoder", "text_encoder"),
        ("text_encoder_2", "text_encoder_2"),
    ] {
        std::os::unix::fs::symlink(golden(src), m.join(name)).unwrap();
    }
    let shared = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/tokenizers"
    ));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let bin = env!("CARGO_BIN_EXE_trt-diff");
    let run = |args: &[String], ok: bool| {
        let o = std::process::Command::new(bin).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.success(), ok, "{args:?}\n{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let plan = d.path().join("cn.plan");
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
        &s(&golden("controlnet/pipeline_model")),
        "--no-progress",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    run(&args, true);
    let manifest = std::fs::read_to_string(d.path().join("cn.plan.json")).unwrap();
    assert!(manifest.contains("\"controlnet\""), "{manifest}");
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
    generate(&a, &[], true);
    generate(
        &b,
        &[
            "--control",
            &control,
            "--control-strength",
            "0.7",
            "--control-end",
            "0.75",
        ],
        true,
    );
    generate(
        &c,
        &["--control", &control, "--control-preprocess", "canny"],
        true,
    );
    let px = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    let diff = |x: &[u8], y: &[u8]| x.iter().zip(y).map(|(p, q)| p.abs_diff(*q)).max().unwrap();
    assert!(diff(&px(&a), &px(&b)) > 5);
    assert!(diff(&px(&b), &px(&c)) > 0);
    let e = generate(
        &a,
        &[
            "--control",
            &control,
            "--control-strength",
            "0.5",
            "--control-strength",
            "0.6",
        ],
        false,
    );
    assert!(e.contains("one value or one per --control"), "{e}");
    let e = generate(
        &a,
        &[
            "--control",
            &control,
            "--control-start",
            "0.8",
            "--control-end",
            "0.2",
        ],
        false,
    );
    assert!(e.contains("0 <= start < end <= 1"), "{e}");
    let e = generate(&a, &["--control", &control, "--control-mode", "0"], false);
    assert!(e.contains("not a ControlNet-Union"), "{e}");
}

/// FLUX.1 Canny/Depth-style transformers (128 input channels: latents | control latents) under diffusers'
/// FluxControlPipeline on the tiny pipeline; without a control image the run is refused with the way out.
#[test]
fn channel_concatenated_control_variant_matches_diffusers() {
    use trt_diff::backend::BackendChoice;
    use trt_diff::manifest::EngineFile;
    use trt_diff::pipelines::engines::{OpenOptions, open_file};
    use trt_diff::pipelines::flux::{FluxEngines, FluxModel, load_clip_tokenizer};
    use trt_diff::pipelines::flux_build::{
        ModelFiles, OnnxPaths, export_aux, export_transformer, plan,
    };
    use trt_diff::pipelines::image::{ControlImage, ImagePipeline, ImageRequest};
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("tiny-canny");
    std::fs::create_dir_all(&m).unwrap();
    for (name, src) in [
        ("transformer", "control_variant/transformer"),
        ("vae", "pipeline/vae"),
        ("text_encoder", "text_encoder"),
        ("text_encoder_2", "text_encoder_2"),
    ] {
        std::os::unix::fs::symlink(golden(src), m.join(name)).unwrap();
    }
    let shared = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/tokenizers"
    ));
    let files = ModelFiles::find(
        &m,
        Some(&shared.join("bpe_simple_vocab_16e6.txt.gz")),
        Some(&shared.join("t5_tokenizer.json")),
    )
    .unwrap();
    let p = plan(files, "flux-dev", None).unwrap();
    assert_eq!(p.config.control_channels, 64);
    let paths = OnnxPaths::new(d.path(), None);
    let f32t = trt_diff::onnx::DataType::FLOAT;
    export_aux(&p, &paths, f32t, f32t).unwrap();
    export_transformer(&p, &Default::default(), &paths.transformer).unwrap();
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
            controlnet: None,
        },
    ));
    let base_io = Checkpoint::open(&golden("pipeline_io.safetensors")).unwrap();
    let want = golden_tensors(&golden("control_variant/control_io.safetensors"));
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
        controls: vec![ControlImage {
            image: golden("controlnet/control.png"),
            strength: 1.0,
            start: 0.0,
            end: 1.0,
            preprocess: None,
            mode: None,
        }],
        ..Default::default()
    };
    let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
    let err = max_rel_err(
        &HostTensor::from_f32(&[1, 64, 64], &out.latents),
        &want["final_latents"],
    );
    println!("FLUX.1 Canny-style variant: final latents max rel err {err:.2e}");
    assert!(err < 1e-3, "{err}");
    let e = pipe
        .generate(
            &ImageRequest {
                controls: vec![],
                ..req
            },
            &mut |_| Ok(()),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--control IMAGE"), "{e}");
}

/// FLUX.1 Fill-style transformer (latents | masked-image latents | folded mask) under diffusers' FluxFillPipeline:
/// init.png repainted where the mask is white, strength 1.
#[test]
fn fill_inpainting_matches_diffusers() {
    use trt_diff::backend::BackendChoice;
    use trt_diff::manifest::EngineFile;
    use trt_diff::pipelines::engines::{OpenOptions, open_file};
    use trt_diff::pipelines::flux::{FluxEngines, FluxModel, load_clip_tokenizer};
    use trt_diff::pipelines::flux_build::{
        ModelFiles, OnnxPaths, export_aux, export_transformer, plan,
    };
    use trt_diff::pipelines::image::{ImagePipeline, ImageRequest};
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("tiny-fill");
    std::fs::create_dir_all(&m).unwrap();
    for (name, src) in [
        ("transformer", "fill/transformer"),
        ("vae", "pipeline/vae"),
        ("text_encoder", "text_encoder"),
        ("text_encoder_2", "text_encoder_2"),
    ] {
        std::os::unix::fs::symlink(golden(src), m.join(name)).unwrap();
    }
    let shared = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/tokenizers"
    ));
    let files = ModelFiles::find(
        &m,
        Some(&shared.join("bpe_simple_vocab_16e6.txt.gz")),
        Some(&shared.join("t5_tokenizer.json")),
    )
    .unwrap();
    let p = plan(files, "flux-dev", None).unwrap();
    assert_eq!((p.config.fill_channels, p.config.control_channels), (80, 0));
    let paths = OnnxPaths::new(d.path(), None);
    let f32t = trt_diff::onnx::DataType::FLOAT;
    export_aux(&p, &paths, f32t, f32t).unwrap();
    export_transformer(&p, &Default::default(), &paths.transformer).unwrap();
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
            controlnet: None,
        },
    ));
    let base_io = Checkpoint::open(&golden("pipeline_io.safetensors")).unwrap();
    let want = golden_tensors(&golden("fill/fill_io.safetensors"));
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
        init_image: Some(golden("init.png")),
        mask: Some(golden("fill/mask.png")),
        ..Default::default()
    };
    let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
    let err = max_rel_err(
        &HostTensor::from_f32(&[1, 64, 64], &out.latents),
        &want["final_latents"],
    );
    println!("FLUX.1 Fill-style inpainting: final latents max rel err {err:.2e}");
    assert!(err < 1e-3, "{err}");
    let e = pipe
        .generate(
            &ImageRequest {
                mask: None,
                ..req.clone()
            },
            &mut |_| Ok(()),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--mask"), "{e}");
    let e = pipe
        .generate(
            &ImageRequest {
                init_image: None,
                ..req
            },
            &mut |_| Ok(()),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--mask needs --init-image"), "{e}");
}
