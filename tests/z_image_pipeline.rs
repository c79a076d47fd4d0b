//! The whole Z-Image pipeline on a tiny random Z-Image-Turbo folder (tests/golden/z_image,
//! scripts/golden/z_image.py): final latents and image against diffusers' ZImagePipeline (same initial latents,
//! 4 steps of the Turbo scheduler), with CFG and img2img; the bundle `build` (arch read off model_index.json) ->
//! `generate` path on ONNX Runtime; and build's errors on broken folders.
use crate::common;
use common::*;
use std::path::{Path, PathBuf};
use trt_diff::backend::BackendChoice;
use trt_diff::manifest::EngineFile;
use trt_diff::pipelines::engines::{OpenOptions, open_file};
use trt_diff::pipelines::image::{ImagePipeline, ImageRequest};
use trt_diff::pipelines::z_image::{ZImageEngines, ZImageModel};
use trt_diff::pipelines::z_image_build::{
    ModelFiles, OnnxPaths, export_aux, export_transformer, plan,
};
use trt_diff::quant::LinearPrecision;
use trt_diff::weights::safetensors_file::Checkpoint;

const PROMPT: &str = "a watercolor painting of a fox in the snow, 4k";
const TOLERANCE: f64 = 1e-4;

fn golden(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/z_image")
        .join(rel)
}

/// A diffusers-layout Z-Image folder of the committed tiny components (links, no copies; the VAE is the tiny
/// 16-channel AutoencoderKL of the Flux goldens).
fn model_dir(root: &Path) -> PathBuf {
    let m = root.join("tiny-z-image");
    std::fs::create_dir_all(&m).unwrap();
    let vae = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/flux/pipeline/vae");
    for (name, src) in [
        ("transformer", golden("transformer")),
        ("text_encoder", golden("text_encoder")),
        ("tokenizer", golden("tokenizer")),
        ("scheduler", golden("scheduler")),
        ("model_index.json", golden("model_index.json")),
        ("vae", vae),
    ] {
        std::os::unix::fs::symlink(&src, m.join(name)).unwrap();
    }
    m
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64))
        / scale
}

#[test]
fn final_latents_match_diffusers_z_image_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan(
        ModelFiles::find(&model_dir(dir.path())).unwrap(),
        "z-image-turbo",
    )
    .unwrap();
    assert_eq!(
        (
            p.config.vae_scale_factor,
            p.config.latent_channels,
            p.config.shift
        ),
        (2, 16, 3.0)
    );
    let paths = OnnxPaths::new(dir.path(), None);
    let f32t = trt_diff::onnx::DataType::FLOAT;
    export_aux(&p, &paths, LinearPrecision::F32, f32t).unwrap();
    export_transformer(&p, &Default::default(), &paths.transformer).unwrap();
    let open = |path: &Path| {
        open_file(
            &EngineFile::open(path).unwrap(),
            BackendChoice::Cpu,
            &OpenOptions::default(),
        )
        .unwrap()
    };
    let mut pipe = ImagePipeline::new(ZImageModel::new(
        p.config.clone(),
        trt_diff::tokenizer::qwen::QwenTokenizer::load(&p.files.tokenizer).unwrap(),
        ZImageEngines {
            text_encoder: open(&paths.text_encoder),
            transformer: open(&paths.transformer),
            vae_decoder: open(&paths.vae_decoder),
            vae_encoder: Some(open(&paths.vae_encoder)),
        },
    ));
    let io = Checkpoint::open(&golden("io.safetensors")).unwrap();
    let get = |n: &str| io.get(n).unwrap().to_f32().unwrap();
    let req = ImageRequest {
        prompt: PROMPT.into(),
        steps: Some(4),
        width: Some(32),
        height: Some(32),
        batch: 1,
        strength: 1.0,
        initial_noise: Some(get("initial_latents")),
        ..Default::default()
    };
    let mut steps = 0;
    let out = pipe
        .generate(&req, &mut |s| {
            steps = s.step;
            Ok(())
        })
        .unwrap();
    assert_eq!(steps, 4);
    let e = max_rel(&out.latents, &get("final_latents"));
    let img_want = get("image");
    // Ours is RGB8 (HWC); diffusers' is [0, 1] CHW: within one 8-bit step plus the latent error.
    let mut img_err = 0f64;
    for px in 0..32 * 32 {
        for c in 0..3 {
            let a = out.images[0][px * 3 + c] as f64 / 255.0;
            img_err = img_err.max((a - img_want[c * 32 * 32 + px] as f64).abs());
        }
    }
    eprintln!("final latents: max rel err {e:.2e}; image: max abs err {img_err:.2e} (of 1.0)");
    assert!(e < TOLERANCE, "{e}");
    assert!(img_err < 1.5 / 255.0, "{img_err}");
    // CFG: diffusers' guidance_scale 1 with a negative prompt is --cfg 2 here.
    let req = ImageRequest {
        negative_prompt: Some("blurry, low quality".into()),
        cfg: 2.0,
        latents_only: true,
        ..req
    };
    let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
    let e = max_rel(&out.latents, &get("final_latents_cfg"));
    eprintln!("CFG final latents: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
    // img2img: ZImageImg2ImgPipeline from init.png at strength 0.6 (encoder mode, the same noise).
    let req = ImageRequest {
        negative_prompt: None,
        cfg: 1.0,
        init_image: Some(golden("init.png")),
        strength: 0.6,
        initial_noise: Some(get("img2img_noise")),
        ..req
    };
    let mut steps = 0;
    let out = pipe
        .generate(&req, &mut |s| {
            steps = s.steps;
            Ok(())
        })
        .unwrap();
    assert_eq!(steps, 3, "4 steps at strength 0.6 run the last 3");
    let e = max_rel(&out.latents, &get("final_latents_img2img"));
    eprintln!("img2img final latents: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
}

#[test]
fn build_and_generate_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path());
    let plan = dir.path().join("zimage.plan");
    // No --arch: model_index.json names ZImagePipeline.
    let r = run(
        &[
            "build",
            s(&model),
            "--precision",
            "fp32",
            "--onnx-only",
            "--out",
            s(&plan),
            "--no-progress",
        ],
        true,
    );
    assert!(r.stdout.contains("z-image-turbo"), "{}", r.stdout);
    let png = dir.path().join("fox.png");
    let r = run(
        &[
            "generate",
            "--engine",
            s(&plan),
            "--prompt",
            PROMPT,
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "2",
            "--seed",
            "5",
            "--batch",
            "2",
            "--no-progress",
            "--backend",
            "cpu",
            "--out",
            s(&png),
        ],
        true,
    );
    assert!(r.stdout.contains("wrote"), "{}", r.stdout);
    // A batch of two writes fox-0.png and fox-1.png (seeds 5 and 6).
    let first = dir.path().join("fox-0.png");
    assert!(dir.path().join("fox-1.png").exists());
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&first).unwrap(),
    ));
    let info = dec.read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (32, 32));
    let text = &info.info().uncompressed_latin1_text;
    assert!(text.iter().any(|t| t.keyword == "parameters"
        && t.text.contains("Steps: 2")
        && t.text.contains("z-image-turbo")));
    // `export`: one ONNX graph per component.
    let exported = dir.path().join("onnx");
    let r = run(
        &[
            "export",
            s(&model),
            "--arch",
            "z-image-turbo",
            "--out",
            s(&exported),
        ],
        true,
    );
    for c in ["transformer", "text_encoder", "vae_decoder", "vae_encoder"] {
        let f = exported.join(format!("{c}.onnx"));
        assert!(f.exists() && r.stdout.contains(s(&f)), "{c}: {}", r.stdout);
    }
    // Sizes the 2x2 patches of the VAE's latents cannot tile are refused with the fix.
    let r = run(
        &[
            "generate",
            "--engine",
            s(&plan),
            "--prompt",
            PROMPT,
            "--width",
            "30",
            "--height",
            "32",
            "--backend",
            "cpu",
            "--out",
            s(&png),
        ],
        false,
    );
    assert!(r.stderr.contains("multiples of 4"), "{}", r.stderr);
}

#[test]
fn broken_folders_are_refused_with_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path());
    let out = dir.path().join("x.plan");
    // A missing component.
    std::fs::remove_file(model.join("text_encoder")).unwrap();
    let r = run(
        &[
            "build",
            s(&model),
            "--arch",
            "z-image-turbo",
            "--onnx-only",
            "--out",
            s(&out),
        ],
        false,
    );
    assert!(r.stderr.contains("text_encoder"), "{}", r.stderr);
    assert!(!out.exists());
    // A transformer config without one of its keys.
    std::os::unix::fs::symlink(golden("text_encoder"), model.join("text_encoder")).unwrap();
    let t = model.join("transformer");
    std::fs::remove_file(&t).unwrap();
    std::fs::create_dir(&t).unwrap();
    std::os::unix::fs::symlink(
        golden("transformer/diffusion_pytorch_model.safetensors"),
        t.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("transformer/config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("cap_feat_dim");
    std::fs::write(t.join("config.json"), cfg.to_string()).unwrap();
    let r = run(
        &[
            "build",
            s(&model),
            "--arch",
            "z-image-turbo",
            "--onnx-only",
            "--out",
            s(&out),
        ],
        false,
    );
    assert!(
        r.stderr.contains("transformer/config.json") && r.stderr.contains("cap_feat_dim"),
        "{}",
        r.stderr
    );
    // A config that does not fit the weights.
    cfg["cap_feat_dim"] = 24.into();
    std::fs::write(t.join("config.json"), cfg.to_string()).unwrap();
    let r = run(
        &[
            "build",
            s(&model),
            "--arch",
            "z-image-turbo",
            "--onnx-only",
            "--out",
            s(&out),
        ],
        false,
    );
    assert!(r.stderr.contains("cap_embedder.1.weight"), "{}", r.stderr);
}

#[test]
fn every_precision_builds_with_tensorrt_rtx() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path());
    for precision in ["fp32", "bf16", "fp8", "nvfp4"] {
        let plan = dir.path().join(precision).join("z.plan");
        // FP8 calibrates through the sampler loop (2 steps at the profile's 64 px) before its engines are built.
        let r = run(
            &[
                "build",
                s(&model),
                "--arch",
                "z-image-turbo",
                "--precision",
                precision,
                "--image-px",
                "32,64,128",
                "--calibration-steps",
                "2",
                "--no-progress",
                "--out",
                s(&plan),
            ],
            true,
        );
        assert!(
            r.stdout.contains("TensorRT-RTX"),
            "{precision}: {}",
            r.stdout
        );
        for c in ["text_encoder", "vae_decoder", "vae_encoder"] {
            assert!(
                plan.with_file_name(format!("z.{c}.plan")).exists(),
                "{precision}: {c}"
            );
        }
    }
    // The calibrated FP8 transformer runs on ONNX Runtime through the same seam.
    let png = dir.path().join("fp8.png");
    let plan = dir.path().join("fp8/z.plan");
    let r = run(
        &[
            "generate",
            "--engine",
            s(&plan),
            "--prompt",
            PROMPT,
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--backend",
            "cpu",
            "--no-progress",
            "--out",
            s(&png),
        ],
        true,
    );
    assert!(r.stdout.contains("wrote"), "{}", r.stdout);
}
