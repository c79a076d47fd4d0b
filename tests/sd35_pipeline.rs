//! The whole SD3.5 pipeline on a tiny random SD3.5-medium folder (tests/common/sd35.rs, scripts/golden/sd35.py):
//! final latents and image against diffusers' StableDiffusion3Pipeline (same initial latents, 4 steps), with CFG,
//! without (turbo-like), with skip-layer guidance and img2img; the bundle `build` (arch read off the folder) ->
//! `generate` path on ONNX Runtime; build's errors on broken folders; every precision through the TensorRT-RTX
//! builder.
use crate::common;
use common::sd35::{golden, model_dir, tiny_plan};
use common::*;
use trt_diff::backend::BackendChoice;
use trt_diff::pipelines::image::{ImagePipeline, ImageRequest, SkipLayerGuidance};
use trt_diff::pipelines::sd3_build::{OnnxPaths, export_aux, export_transformer, open_model};
use trt_diff::weights::safetensors_file::Checkpoint;

const PROMPT: &str = "a watercolor painting of a fox in the snow, 4k";
const NEGATIVE: &str = "blurry, low quality";
const TOLERANCE: f64 = 1e-4;

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64))
        / scale
}

#[test]
fn final_latents_match_diffusers_sd3_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_plan(dir.path(), "transformer", true, "sd35-medium");
    assert_eq!(
        (
            p.config.vae_scale_factor,
            p.config.latent_channels,
            p.config.shift,
            p.config.scaling_factor,
            p.config.shift_factor
        ),
        (2, 16, 3.0, 1.5305, 0.0609)
    );
    let paths = OnnxPaths::new(dir.path(), None);
    let f32t = trt_diff::onnx::DataType::FLOAT;
    export_aux(&p, &paths, f32t, f32t).unwrap();
    export_transformer(&p, &Default::default(), &paths.transformer).unwrap();
    let model = open_model(&p, &paths, &paths.transformer, BackendChoice::Cpu).unwrap();
    let mut pipe = ImagePipeline::new(model);
    let io = Checkpoint::open(&golden("sd35/io.safetensors")).unwrap();
    let get = |n: &str| io.get(n).unwrap().to_f32().unwrap();
    // diffusers' guidance_scale 4 with NEGATIVE.
    let req = ImageRequest {
        prompt: PROMPT.into(),
        negative_prompt: Some(NEGATIVE.into()),
        cfg: 4.0,
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
    eprintln!("CFG final latents: max rel err {e:.2e}; image: max abs err {img_err:.2e} (of 1.0)");
    assert!(e < TOLERANCE, "{e}");
    assert!(img_err < 1.5 / 255.0, "{img_err}");
    // Skip-layer guidance: block 1 skipped at steps 1 and 2 (start 0.2, end 0.6 of 4).
    let slg = ImageRequest {
        skip_layer_guidance: Some(SkipLayerGuidance {
            layers: vec![1],
            scale: 2.8,
            start: 0.2,
            end: 0.6,
        }),
        latents_only: true,
        ..req.clone()
    };
    let out = pipe.generate(&slg, &mut |_| Ok(())).unwrap();
    let e = max_rel(&out.latents, &get("final_latents_slg"));
    let apart = max_rel(&get("final_latents_slg"), &get("final_latents"));
    eprintln!("SLG final latents: max rel err {e:.2e} (SLG moves them by {apart:.2e})");
    assert!(e < TOLERANCE && apart > 100.0 * TOLERANCE, "{e} {apart}");
    // Without CFG (guidance_scale 1, as large-turbo runs): one transformer call per step.
    let nocfg = ImageRequest {
        negative_prompt: None,
        cfg: 1.0,
        latents_only: true,
        ..req.clone()
    };
    let out = pipe.generate(&nocfg, &mut |_| Ok(())).unwrap();
    let e = max_rel(&out.latents, &get("final_latents_nocfg"));
    eprintln!("no-CFG final latents: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
    // SLG needs CFG, as in diffusers.
    let err = pipe
        .generate(
            &ImageRequest {
                skip_layer_guidance: slg.skip_layer_guidance.clone(),
                ..nocfg.clone()
            },
            &mut |_| Ok(()),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--cfg"), "{err}");
    // img2img: StableDiffusion3Img2ImgPipeline from init.png at strength 0.6 (encoder mode, the same noise).
    let i2i = ImageRequest {
        init_image: Some(golden("sd35/init.png")),
        strength: 0.6,
        initial_noise: Some(get("img2img_noise")),
        latents_only: true,
        ..req
    };
    let mut steps = 0;
    let out = pipe
        .generate(&i2i, &mut |s| {
            steps = s.steps;
            Ok(())
        })
        .unwrap();
    assert_eq!(steps, 3, "4 steps at strength 0.6 run the last 3");
    let e = max_rel(&out.latents, &get("final_latents_img2img"));
    eprintln!("img2img final latents: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
}

fn clip_tok() -> std::path::PathBuf {
    shared_data("tokenizers/bpe_simple_vocab_16e6.txt.gz")
}

fn t5_tok() -> std::path::PathBuf {
    shared_data("tokenizers/t5_tokenizer.json")
}

#[test]
fn build_and_generate_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path(), "transformer", true);
    let plan = dir.path().join("sd35.plan");
    let (ct, tt) = (clip_tok(), t5_tok());
    // No --arch: model_index.json names StableDiffusion3Pipeline, the transformer has dual attention.
    let r = run(
        &[
            "build",
            s(&model),
            "--precision",
            "fp32",
            "--onnx-only",
            "--clip-tokenizer",
            s(&ct),
            "--t5-tokenizer",
            s(&tt),
            "--out",
            s(&plan),
            "--no-progress",
        ],
        true,
    );
    assert!(r.stdout.contains("sd35-medium"), "{}", r.stdout);
    let png = dir.path().join("fox.png");
    let gen_args = |width: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "generate",
            "--engine",
            s(&plan),
            "--prompt",
            PROMPT,
            "--width",
            width,
            "--height",
            "32",
            "--steps",
            "2",
            "--seed",
            "5",
            "--no-progress",
            "--backend",
            "cpu",
            "--out",
            s(&png),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    let args = gen_args("32", &["--batch", "2", "--slg-layers", "1:2.8:0.0:1.0"]);
    let r = run(&args.iter().map(String::as_str).collect::<Vec<_>>(), true);
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
        && t.text.contains("CFG: 4.5")
        && t.text.contains("sd35-medium")));
    // A skip-layer block the transformer does not have, and a size the patches cannot tile, are refused.
    let args = gen_args("32", &["--slg-layers", "7"]);
    let r = run(&args.iter().map(String::as_str).collect::<Vec<_>>(), false);
    assert!(r.stderr.contains("blocks 0 to 2"), "{}", r.stderr);
    let args = gen_args("30", &[]);
    let r = run(&args.iter().map(String::as_str).collect::<Vec<_>>(), false);
    assert!(r.stderr.contains("multiples of 4"), "{}", r.stderr);
    // `export`: one ONNX graph per component.
    let exported = dir.path().join("onnx");
    let r = run(
        &[
            "export",
            s(&model),
            "--arch",
            "sd35-medium",
            "--clip-tokenizer",
            s(&ct),
            "--t5-tokenizer",
            s(&tt),
            "--out",
            s(&exported),
        ],
        true,
    );
    for c in [
        "transformer",
        "clip_l",
        "clip_g",
        "t5",
        "vae_decoder",
        "vae_encoder",
    ] {
        let f = exported.join(format!("{c}.onnx"));
        assert!(f.exists() && r.stdout.contains(s(&f)), "{c}: {}", r.stdout);
    }
}

#[test]
fn broken_folders_are_refused_with_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path(), "transformer", true);
    let out = dir.path().join("x.plan");
    let ct = clip_tok();
    let build = |arch: &str| {
        run(
            &[
                "build",
                s(&model),
                "--arch",
                arch,
                "--clip-tokenizer",
                s(&ct),
                "--onnx-only",
                "--out",
                s(&out),
            ],
            false,
        )
    };
    // T5 present without its tokenizer.
    let r = build("sd35-medium");
    assert!(
        r.stderr.contains("tokenizer_3/tokenizer.json"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
    // The wrong arch for the transformer.
    std::fs::remove_file(model.join("text_encoder_3")).unwrap();
    let r = build("sd35-large");
    assert!(
        r.stderr.contains("dual attention") && r.stderr.contains("sd35-medium"),
        "{}",
        r.stderr
    );
    // A missing component.
    std::fs::remove_file(model.join("text_encoder_2")).unwrap();
    let r = build("sd35-medium");
    assert!(r.stderr.contains("text_encoder_2"), "{}", r.stderr);
    // A transformer config that does not fit the weights.
    std::os::unix::fs::symlink(
        golden("sd/sdxl/pipeline_text_encoder_2"),
        model.join("text_encoder_2"),
    )
    .unwrap();
    let t = model.join("transformer");
    std::fs::remove_file(&t).unwrap();
    std::fs::create_dir(&t).unwrap();
    std::os::unix::fs::symlink(
        golden("sd35/transformer/diffusion_pytorch_model.safetensors"),
        t.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden("sd35/transformer/config.json")).unwrap(),
    )
    .unwrap();
    cfg["joint_attention_dim"] = 24.into();
    std::fs::write(t.join("config.json"), cfg.to_string()).unwrap();
    let r = build("sd35-medium");
    assert!(r.stderr.contains("context_embedder.weight"), "{}", r.stderr);
    // A config without one of its sizes.
    cfg.as_object_mut().unwrap().remove("num_layers");
    std::fs::write(t.join("config.json"), cfg.to_string()).unwrap();
    let r = build("sd35-medium");
    assert!(
        r.stderr.contains("transformer/config.json") && r.stderr.contains("num_layers"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
}

#[test]
fn every_precision_builds_with_tensorrt_rtx() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path(), "transformer", true);
    let (ct, tt) = (clip_tok(), t5_tok());
    for precision in ["fp32", "bf16", "fp8", "nvfp4"] {
        let plan = dir.path().join(precision).join("m.plan");
        // FP8 calibrates through the sampler loop (2 steps with CFG at the profile's 32 px) first; the tiny
        // transformer's position table stops at 40 px.
        let r = run(
            &[
                "build",
                s(&model),
                "--arch",
                "sd35-medium",
                "--precision",
                precision,
                "--clip-tokenizer",
                s(&ct),
                "--t5-tokenizer",
                s(&tt),
                "--image-px",
                "16,32,40",
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
        for c in ["clip_l", "clip_g", "t5", "vae_decoder", "vae_encoder"] {
            assert!(
                plan.with_file_name(format!("m.{c}.plan")).exists(),
                "{precision}: {c}"
            );
        }
    }
    // The calibrated FP8 transformer runs on ONNX Runtime through the same seam.
    let png = dir.path().join("fp8.png");
    let plan = dir.path().join("fp8/m.plan");
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
            "--backend",
            "cpu",
            "--no-progress",
            "--out",
            s(&png),
        ],
        true,
    );
    assert!(r.stdout.contains("wrote"), "{}", r.stdout);
    // Profiles beyond the position table are refused before anything is built.
    let r = run(
        &[
            "build",
            s(&model),
            "--arch",
            "sd35-medium",
            "--clip-tokenizer",
            s(&ct),
            "--t5-tokenizer",
            s(&tt),
            "--image-px",
            "16,32,64",
            "--out",
            s(&dir.path().join("big.plan")),
        ],
        false,
    );
    assert!(r.stderr.contains("pos_embed_max_size 10"), "{}", r.stderr);
}

/// Stability AI's repository layout around the committed single file (scripts/golden/sd35_single_file.py): the
/// MMDiT and VAE in one file, the tiny text encoders beside it in text_encoders/ (links, no copies).
fn single_file_repo(root_dir: &std::path::Path) -> std::path::PathBuf {
    let repo = root_dir.join("sd3.5-tiny");
    std::fs::create_dir_all(repo.join("text_encoders")).unwrap();
    let link =
        |src: &str, dst: &str| std::os::unix::fs::symlink(golden(src), repo.join(dst)).unwrap();
    link("sd35/single_file.safetensors", "sd3.5_medium.safetensors");
    link(
        "flux/text_encoder/model.safetensors",
        "text_encoders/clip_l.safetensors",
    );
    link(
        "sd/sdxl/pipeline_text_encoder_2/model.safetensors",
        "text_encoders/clip_g.safetensors",
    );
    link(
        "flux/text_encoder_2/model.safetensors",
        "text_encoders/t5xxl_fp16.safetensors",
    );
    repo.join("sd3.5_medium.safetensors")
}

#[test]
fn single_file_checkpoint_matches_diffusers_from_single_file() {
    use trt_diff::pipelines::sd3_build::{ModelFiles, plan};
    let dir = tempfile::tempdir().unwrap();
    let file = single_file_repo(dir.path());
    // The tiny encoders' head counts and the VAE's groups are not in the weights: the tiny folder's configs
    // describe them, as diffusers' from_single_file(config=...) takes them.
    let config = model_dir(dir.path(), "transformer", true);
    let files = ModelFiles::find(&file, Some(&clip_tok()), Some(&t5_tok()), Some(&config)).unwrap();
    let mut p = plan(files, "sd35-medium").unwrap();
    p.config.max_sequence_length = 16;
    if let Some(t) = p.t5.as_mut() {
        t.max_len = 16;
    }
    let paths = OnnxPaths::new(dir.path(), None);
    let f32t = trt_diff::onnx::DataType::FLOAT;
    export_aux(&p, &paths, f32t, f32t).unwrap();
    export_transformer(&p, &Default::default(), &paths.transformer).unwrap();
    let model = open_model(&p, &paths, &paths.transformer, BackendChoice::Cpu).unwrap();
    let mut pipe = ImagePipeline::new(model);
    let io = Checkpoint::open(&golden("sd35/io.safetensors")).unwrap();
    let want = Checkpoint::open(&golden("sd35/single_file_io.safetensors")).unwrap();
    let req = ImageRequest {
        prompt: PROMPT.into(),
        negative_prompt: Some(NEGATIVE.into()),
        cfg: 4.0,
        steps: Some(4),
        width: Some(32),
        height: Some(32),
        batch: 1,
        strength: 1.0,
        initial_noise: Some(io.get("initial_latents").unwrap().to_f32().unwrap()),
        ..Default::default()
    };
    let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
    let want = want.get("final_latents").unwrap().to_f32().unwrap();
    let e = max_rel(&out.latents, &want);
    eprintln!("single-file final latents: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
    // CLIP-L's identity projection is what sets the file apart from the folder (its own projection).
    let folder = max_rel(&want, &io.get("final_latents").unwrap().to_f32().unwrap());
    assert!(folder > 100.0 * TOLERANCE, "{folder}");
}

#[test]
fn single_file_builds_from_the_command_line_and_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let file = single_file_repo(dir.path());
    let config = model_dir(dir.path(), "transformer", true);
    let plan = dir.path().join("single.plan");
    let (ct, tt) = (clip_tok(), t5_tok());
    // No --arch: the file's MMDiT-X blocks say medium.
    let r = run(
        &[
            "build",
            s(&file),
            "--config",
            s(&config),
            "--precision",
            "fp32",
            "--onnx-only",
            "--clip-tokenizer",
            s(&ct),
            "--t5-tokenizer",
            s(&tt),
            "--out",
            s(&plan),
            "--no-progress",
        ],
        true,
    );
    assert!(r.stdout.contains("sd35-medium"), "{}", r.stdout);
    assert!(dir.path().join("single.clip_l.onnx").exists());
    // Without the text encoders beside it, the error names them and where they go.
    std::fs::remove_dir_all(dir.path().join("sd3.5-tiny/text_encoders")).unwrap();
    let r = run(
        &[
            "build",
            s(&file),
            "--clip-tokenizer",
            s(&ct),
            "--out",
            s(&dir.path().join("missing.plan")),
        ],
        false,
    );
    assert!(
        r.stderr.contains("CLIP-L") && r.stderr.contains("text_encoders/clip_g.safetensors"),
        "{}",
        r.stderr
    );
    // Without a tokenizer: single files hold none.
    std::fs::create_dir_all(dir.path().join("sd3.5-tiny/text_encoders")).unwrap();
    std::os::unix::fs::symlink(
        golden("flux/text_encoder/model.safetensors"),
        dir.path()
            .join("sd3.5-tiny/text_encoders/clip_l.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        golden("sd/sdxl/pipeline_text_encoder_2/model.safetensors"),
        dir.path()
            .join("sd3.5-tiny/text_encoders/clip_g.safetensors"),
    )
    .unwrap();
    let r = run(
        &["build", s(&file), "--out", s(&dir.path().join("x.plan"))],
        false,
    );
    assert!(r.stderr.contains("--clip-tokenizer"), "{}", r.stderr);
}
