//! The whole Stable Diffusion pipelines on tiny random components (tests/golden/sd, scripts/golden/sd_pipeline.py):
//! final latents against diffusers' StableDiffusionPipeline (eps and v-prediction, CFG with a negative prompt, a
//! long prompt in 75-token chunks, img2img) and StableDiffusionXLPipeline, same initial latents, Euler, 4 steps.
use crate::common;
use std::path::{Path, PathBuf};
use trt_diff::backend::BackendChoice;
use trt_diff::manifest::EngineFile;
use trt_diff::onnx::DataType;
use trt_diff::pipelines::engines::{OpenOptions, open_file};
use trt_diff::pipelines::image::{ImagePipeline, ImageRequest};
use trt_diff::pipelines::sd::{SdEngines, SdModel, SdPrediction};
use trt_diff::pipelines::sd_build::{detect_arch, export_aux, onnx_path, plan};
use trt_diff::tokenizer::clip::ClipTokenizer;
use trt_diff::weights::safetensors_file::Checkpoint;

const PROMPT: &str = "a watercolor painting of a fox in the snow, 4k";
const NEGATIVE: &str = "blurry, low quality";

fn golden(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(rel)
}

fn clip_vocab() -> PathBuf {
    std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")))
        .join("tokenizers/bpe_simple_vocab_16e6.txt.gz")
}

/// A diffusers-layout folder of the committed tiny components (links), with a scheduler config.
fn model_dir(root: &Path, xl: bool, prediction: &str) -> PathBuf {
    model_dir_with(
        root,
        xl,
        prediction,
        if xl { "sd/sdxl/unet" } else { "sd/sd15/unet" },
    )
}

fn model_dir_with(root: &Path, xl: bool, prediction: &str, unet: &str) -> PathBuf {
    let m = root.join(if xl { "tiny-sdxl" } else { "tiny-sd" });
    std::fs::create_dir_all(m.join("scheduler")).unwrap();
    let mut parts = vec![
        ("vae", golden("sd/sd15/vae")),
        ("text_encoder", golden("flux/text_encoder")),
    ];
    parts.push(("unet", golden(unet)));
    if xl {
        parts.push(("text_encoder_2", golden("sd/sdxl/pipeline_text_encoder_2")));
    }
    for (name, src) in parts {
        std::os::unix::fs::symlink(&src, m.join(name)).unwrap();
    }
    std::fs::write(
        m.join("scheduler/scheduler_config.json"),
        format!(
            "{{\"_class_name\": \"EulerDiscreteScheduler\", \"prediction_type\": \"{prediction}\"}}"
        ),
    )
    .unwrap();
    m
}

/// Exports the folder's components to f32 ONNX and opens them on ONNX Runtime's CPU backend.
fn pipeline(root: &Path, model: &Path) -> ImagePipeline<SdModel> {
    let arch = detect_arch(model).unwrap();
    let p = plan(model, arch, Some(&clip_vocab())).unwrap();
    let f32t = DataType::FLOAT;
    export_aux(&p, root, "sd", f32t, f32t).unwrap();
    let unet_ck = Checkpoint::open(&p.files.unet).unwrap();
    let unet_onnx = onnx_path(root, "sd", "unet");
    trt_diff::models::unet::export(&p.unet, &unet_ck, &Default::default(), &unet_onnx).unwrap();
    let open = |path: &Path| {
        open_file(
            &EngineFile::open(path).unwrap(),
            BackendChoice::Cpu,
            &OpenOptions::default(),
        )
        .unwrap()
    };
    let tokenizers = p
        .config
        .text_encoders
        .iter()
        .map(|spec| {
            let mut t = ClipTokenizer::load(&clip_vocab()).unwrap();
            t.pad = spec.pad;
            t
        })
        .collect();
    let text_encoders = p
        .config
        .text_encoders
        .iter()
        .map(|spec| open(&onnx_path(root, "sd", &spec.component)))
        .collect();
    ImagePipeline::new(SdModel::new(
        p.config.clone(),
        tokenizers,
        SdEngines {
            text_encoders,
            unet: open(&unet_onnx),
            vae_decoder: open(&onnx_path(root, "sd", "vae_decoder")),
            vae_encoder: Some(open(&onnx_path(root, "sd", "vae_encoder"))),
            tae_decoder: None,
        },
    ))
}

fn io(name: &str) -> Vec<f32> {
    Checkpoint::open(&golden("sd/pipeline_io.safetensors"))
        .unwrap()
        .get(name)
        .unwrap()
        .to_f32()
        .unwrap()
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64))
        / scale
}

fn request(prompt: &str, negative: &str, cfg: f32, noise: Vec<f32>) -> ImageRequest {
    ImageRequest {
        prompt: prompt.into(),
        negative_prompt: Some(negative.into()),
        steps: Some(4),
        sampler: Some("euler".into()),
        scheduler: Some("normal".into()),
        width: Some(32),
        height: Some(32),
        cfg,
        batch: 1,
        strength: 1.0,
        initial_noise: Some(noise),
        latents_only: true,
        ..Default::default()
    }
}

fn check(pipe: &mut ImagePipeline<SdModel>, req: &ImageRequest, golden_name: &str) {
    let out = pipe.generate(req, &mut |_| Ok(())).unwrap();
    let e = max_rel(&out.latents, &io(golden_name));
    println!("{golden_name}: max rel err {e:.2e}");
    assert!(e < 1e-4, "{golden_name}: {e}");
}

#[test]
fn sd15_matches_diffusers_eps_v_long_prompts_and_img2img() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path(), false, "epsilon");
    let mut pipe = pipeline(dir.path(), &model);
    assert_eq!(pipe.model.config.arch, "sd15");
    assert_eq!(pipe.model.config.vae_scale_factor, 2);
    let noise = io("sd15_initial_latents");
    check(
        &mut pipe,
        &request(PROMPT, NEGATIVE, 7.5, noise.clone()),
        "sd15_final_latents",
    );
    // Long prompts: 2 chunks of 75 tokens each for the prompt and the negative prompt.
    let long = [
        "a red fox",
        "deep snow",
        "pine forest",
        "golden hour light",
        "watercolor on paper",
        "soft edges",
        "muted palette",
        "winter morning",
        "gentle fog",
        "distant mountains",
    ]
    .repeat(3)
    .join(", ");
    let long_negative = [
        "blurry",
        "low quality",
        "jpeg artifacts",
        "oversaturated",
        "deformed",
    ]
    .repeat(6)
    .join(", ");
    check(
        &mut pipe,
        &request(&long, &long_negative, 7.5, noise.clone()),
        "sd15_final_latents_long",
    );
    // img2img from the decoded image diffusers saved: strength 0.5 runs the last 2 of 4 steps.
    let mut req = request(PROMPT, NEGATIVE, 7.5, io("sd15_img2img_noise"));
    req.init_image = Some(golden("sd/init.png"));
    req.strength = 0.5;
    let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
    let e = max_rel(&out.latents, &io("sd15_final_latents_img2img"));
    println!("sd15 img2img: max rel err {e:.2e}");
    assert_eq!(out.step_seconds.len(), 2);
    // The init image is 8-bit, as diffusers read it: the error stays near the model tolerance.
    assert!(e < 1e-4, "img2img: {e}");
    // Inpainting with the regular UNet: the left half repainted, the right half kept through the latent blend.
    let mut req = request(PROMPT, NEGATIVE, 7.5, io("sd15_img2img_noise"));
    req.init_image = Some(golden("sd/init.png"));
    req.mask = Some(golden("sd/mask.png"));
    req.strength = 0.75;
    let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
    let e = max_rel(&out.latents, &io("sd15_final_latents_inpaint"));
    println!("sd15 inpaint: max rel err {e:.2e}");
    assert!(e < 1e-4, "inpaint: {e}");
    // A 9-channel inpainting UNet: the mask and the masked image's latent as extra input channels.
    let dir9 = tempfile::tempdir().unwrap();
    let model = model_dir_with(dir9.path(), false, "epsilon", "sd/sd15_inpaint/unet");
    let mut pipe9 = pipeline(dir9.path(), &model);
    assert_eq!(pipe9.model.config.unet_in_channels, 9);
    let out = pipe9.generate(&req, &mut |_| Ok(())).unwrap();
    let e = max_rel(&out.latents, &io("sd15_final_latents_inpaint9"));
    println!("sd15 9-channel inpaint: max rel err {e:.2e}");
    assert!(e < 1e-4, "inpaint9: {e}");
    // Without a mask it says what it needs.
    let plain = request(PROMPT, NEGATIVE, 7.5, noise.clone());
    let err = pipe9
        .generate(&plain, &mut |_| Ok(()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("inpainting model") && err.contains("--mask"),
        "{err}"
    );
    // The same weights as a v-prediction model (an SD2.x scheduler config).
    let dir_v = tempfile::tempdir().unwrap();
    let model = model_dir(dir_v.path(), false, "v_prediction");
    let mut pipe = pipeline(dir_v.path(), &model);
    assert_eq!(pipe.model.config.prediction, SdPrediction::V);
    check(
        &mut pipe,
        &request(PROMPT, NEGATIVE, 7.5, noise),
        "sd15_final_latents_v",
    );
}

#[test]
fn sdxl_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path(), true, "epsilon");
    let mut pipe = pipeline(dir.path(), &model);
    assert_eq!(pipe.model.config.arch, "sdxl");
    assert_eq!(pipe.model.config.time_ids, 6);
    let req = request(PROMPT, NEGATIVE, 5.0, io("sdxl_initial_latents"));
    check(&mut pipe, &req, "sdxl_final_latents");
    // Base + refiner handoff at half the steps (the same model as both, as the golden does).
    let base = ImageRequest {
        denoise_end: Some(0.5),
        ..req.clone()
    };
    let half = pipe.generate(&base, &mut |_| Ok(())).unwrap();
    assert_eq!(half.step_seconds.len(), 2);
    let e = max_rel(&half.latents, &io("sdxl_handoff_latents"));
    println!("sdxl handoff latents: max rel err {e:.2e}");
    assert!(e < 1e-4, "handoff: {e}");
    let refine = ImageRequest {
        denoise_start: Some(0.5),
        start_latents: Some(half.latents),
        ..req
    };
    check(&mut pipe, &refine, "sdxl_final_latents_refined");
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `build` (every component through the TensorRT-RTX builder) then `generate` on ONNX Runtime: PNGs with A1111
/// parameters, CFG against the empty prompt by default, img2img with a mask, a refiner handoff, and the errors.
#[test]
fn build_and_generate_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path(), true, "epsilon");
    let plan = dir.path().join("xl.plan");
    common::run(
        &[
            "build",
            &s(&model),
            "--precision",
            "fp32",
            "--out",
            &s(&plan),
            "--clip-tokenizer",
            &s(&clip_vocab()),
            "--image-px",
            "32,32,64",
            "--tae-decoder",
            &s(&golden("sd/tae_decoder.safetensors")),
            "--no-progress",
        ],
        true,
    );
    let bundle = EngineFile::open(&plan).unwrap();
    let Some(trt_diff::manifest::Pipeline::Image(b)) = bundle.pipeline() else {
        panic!("no image bundle");
    };
    // The arch was read off the folder (two text encoders: SDXL).
    assert_eq!(b.arch, "sdxl");
    for c in [
        "unet",
        "text_encoder",
        "text_encoder_2",
        "vae_decoder",
        "vae_encoder",
    ] {
        assert!(b.components.contains_key(c), "{c}");
    }
    let png = dir.path().join("fox.png");
    let gen_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "generate",
            "--engine",
            &s(&plan),
            "--prompt",
            PROMPT,
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
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let go = |extra: &[&str], ok: bool| {
        let args = gen_args(extra);
        let argv: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        common::run(&argv, ok)
    };
    let preview = dir.path().join("preview.png");
    let r = go(&["--out", &s(&png), "--preview", &s(&preview)], true);
    assert!(r.stdout.contains("wrote"), "{}", r.stdout);
    // The tiny TAESD decodes the 16x16 latent 8x.
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&preview).unwrap(),
    ));
    let info = dec.read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (128, 128));
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let info = dec.read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (32, 32));
    let text = &info.info().uncompressed_latin1_text;
    // The recipe's CFG 7 against the empty negative prompt.
    assert!(
        text.iter().any(|t| t.keyword == "parameters"
            && t.text.contains("Steps: 3")
            && t.text.contains("CFG: 7")
            && t.text.contains("Model: sdxl")),
        "{text:?}"
    );
    // img2img with a mask, then a refiner handoff to the same bundle.
    let mask = golden("sd/mask.png");
    go(
        &[
            "--out",
            &s(&dir.path().join("inpaint.png")),
            "--init-image",
            &s(&png),
            "--mask",
            &s(&mask),
            "--strength",
            "0.7",
            "--batch",
            "2",
        ],
        true,
    );
    // A batch of two with CFG: four rows in each UNet run.
    assert!(dir.path().join("inpaint-0.png").exists() && dir.path().join("inpaint-1.png").exists());
    go(
        &[
            "--out",
            &s(&dir.path().join("refined.png")),
            "--refiner",
            &s(&plan),
            "--refiner-start",
            "0.6",
        ],
        true,
    );
    assert!(dir.path().join("refined.png").exists());
    // Errors name the cause and the fix.
    let bad = |extra: &[&str], expect: &str| {
        let r = go(extra, false);
        assert!(r.stderr.contains(expect), "{expect}: {}", r.stderr);
    };
    let out = s(&dir.path().join("x.png"));
    let init = s(&png);
    bad(
        &["--out", &out, "--mask", &s(&mask)],
        "--mask needs --init-image",
    );
    // A mask of another size is resized to the output, as diffusers' mask processor does.
    let args = gen_args(&["--out", &out, "--init-image", &init, "--mask", &s(&mask)]);
    let mut argv: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    argv[6] = "40"; // --width
    common::run(&argv, true);
    bad(
        &["--out", &out, "--init-image", &init, "--strength", "1.5"],
        "must be in (0, 1]",
    );
    bad(
        &[
            "--out",
            &out,
            "--refiner",
            &s(&plan),
            "--refiner-start",
            "1.2",
        ],
        "--refiner-start 1.2 must be in (0, 1)",
    );
    let llm = common::build_stories(dir.path());
    bad(
        &["--out", &out, "--refiner", &s(&llm)],
        "is not an image bundle",
    );
    let args = gen_args(&["--out", &out]);
    let mut argv: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    argv[6] = "33"; // --width: not a multiple of the tiny VAE's factor 2
    let r = common::run(&argv, false);
    assert!(r.stderr.contains("multiples of 2"), "{}", r.stderr);
    // `export`: one ONNX graph per component.
    let exported = dir.path().join("onnx");
    let r = common::run(
        &[
            "export",
            &s(&model),
            "--arch",
            "sdxl",
            "--out",
            &s(&exported),
            "--clip-tokenizer",
            &s(&clip_vocab()),
        ],
        true,
    );
    for c in [
        "unet",
        "text_encoder",
        "text_encoder_2",
        "vae_decoder",
        "vae_encoder",
    ] {
        let f = exported.join(format!("{c}.onnx"));
        assert!(f.exists() && r.stdout.contains(&s(&f)), "{c}: {}", r.stdout);
    }
    // Building as SD1.5 is refused: the UNet has SDXL's added embeddings.
    let r = common::run(
        &[
            "build",
            &s(&model),
            "--arch",
            "sd15",
            "--out",
            &s(&dir.path().join("sd15.plan")),
            "--clip-tokenizer",
            &s(&clip_vocab()),
        ],
        false,
    );
    assert!(
        r.stderr.contains("lacks:") || r.stderr.contains("added time/text embedding"),
        "{}",
        r.stderr
    );
}

/// FP8 (calibrated through the sampler loop) and fp16 SD bundles: TensorRT-RTX builds every component in the
/// recipe's precisions, and the CPU graphs' final latents stay within a stated error of diffusers' f32.
#[test]
fn quantized_and_half_bundles_build_and_stay_close() {
    use trt_diff::pipelines::sd_build::{SdBuildOptions, build_sd};
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path(), false, "epsilon");
    let want = io("sd15_final_latents");
    for (precision, bound) in [("fp8", 5e-2), ("fp16", 1e-2)] {
        let out = dir.path().join(precision).join("sd.plan");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        build_sd(&SdBuildOptions {
            model: model.clone(),
            arch: None,
            precision: trt_diff::quant::Precision::parse(precision).unwrap(),
            clip_tokenizer: Some(clip_vocab()),
            tae_decoder: None,
            image_px: Some([32, 32, 64]),
            calibration_prompts: Some(vec![PROMPT.into(), "a red cube on a table".into()]),
            calibration_steps: Some(2),
            calibration_backend: BackendChoice::Cpu,
            loras: vec![],
            lora_rank: 0,
            controlnet: None,
            smoothquant_alpha: None,
            auto: Default::default(),
            base: trt_diff::trt::BuildOptions {
                out: out.clone(),
                progress: false,
                ..Default::default()
            },
        })
        .unwrap();
        let engine = EngineFile::open(&out).unwrap();
        let Some(trt_diff::manifest::Pipeline::Image(bundle)) = engine.pipeline() else {
            panic!("no image bundle in {}", out.display())
        };
        assert_eq!(
            (bundle.arch.as_str(), bundle.precision.as_str()),
            ("sd15", precision)
        );
        assert!(bundle.components.values().all(|c| c.plan.is_some()));
        let mut pipe = trt_diff::pipelines::sd::open_pipeline(&engine, BackendChoice::Cpu).unwrap();
        let req = request(PROMPT, NEGATIVE, 7.5, io("sd15_initial_latents"));
        let r = pipe.generate(&req, &mut |_| Ok(())).unwrap();
        let e = max_rel(&r.latents, &want);
        println!("{precision} bundle: final latents max rel err {e:.3e} against diffusers f32");
        assert!(e < bound, "{precision}: {e}");
    }
}

/// PSNR (dB) of `got` against `want`, the peak being `want`'s largest magnitude.
fn psnr(got: &[f32], want: &[f32]) -> f64 {
    let peak = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let mse = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum::<f64>()
        / want.len().max(1) as f64;
    10.0 * (peak * peak / mse.max(1e-30)).log10()
}

/// INT8 W8A8 SD bundles (activations calibrated through the sampler loop, per-channel weights, the FP8 policy's
/// exclusions), with SmoothQuant at the recipe's alpha and without it: TensorRT-RTX builds the smoothed INT8
/// UNet, and the final latents stay within a stated PSNR of diffusers' f32; SDXL (ONNX-only, smoothed) too.
#[test]
fn int8_bundles_with_and_without_smoothquant() {
    use trt_diff::pipelines::sd_build::{SdBuildOptions, build_sd};
    let dir = tempfile::tempdir().unwrap();
    let mut found = Vec::new();
    for (name, alpha, onnx_only, xl) in [
        ("smooth", None, false, false),
        ("plain", Some(0.0), true, false),
        ("sdxl smooth", None, true, true),
    ] {
        let (tag, cfg) = if xl { ("sdxl", 5.0) } else { ("sd15", 7.5) };
        let model = model_dir(
            &dir.path().join(format!("{tag}_{}", found.len())),
            xl,
            "epsilon",
        );
        let want = io(&format!("{tag}_final_latents"));
        let out = dir.path().join(name.replace(' ', "_")).join("sd.plan");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        build_sd(&SdBuildOptions {
            model: model.clone(),
            arch: None,
            precision: trt_diff::quant::Precision::Int8,
            clip_tokenizer: Some(clip_vocab()),
            tae_decoder: None,
            image_px: Some([32, 32, 64]),
            calibration_prompts: Some(vec![PROMPT.into(), "a red cube on a table".into()]),
            calibration_steps: Some(2),
            calibration_backend: BackendChoice::Cpu,
            loras: vec![],
            lora_rank: 0,
            controlnet: None,
            smoothquant_alpha: alpha,
            auto: Default::default(),
            base: trt_diff::trt::BuildOptions {
                out: out.clone(),
                progress: false,
                onnx_only,
                ..Default::default()
            },
        })
        .unwrap();
        let engine = EngineFile::open(&out).unwrap();
        let Some(trt_diff::manifest::Pipeline::Image(bundle)) = engine.pipeline() else {
            panic!("no image bundle in {}", out.display())
        };
        assert_eq!(bundle.precision, "int8");
        if !onnx_only {
            assert!(bundle.components.values().all(|c| c.plan.is_some()));
        }
        // The graph holds INT8 weights, and the smoothed one its pre-quantization scales.
        let onnx = out.with_file_name("sd.unet.onnx");
        let m = trt_diff::onnx::OnnxFile::load(&onnx).unwrap();
        let inits: Vec<&str> = m
            .model
            .graph
            .iter()
            .flat_map(|g| &g.initializer)
            .map(|t| t.name.as_str())
            .collect();
        let int8 = inits
            .iter()
            .filter(|n| n.ends_with(".weight_scale"))
            .count();
        let smoothed = inits
            .iter()
            .filter(|n| n.ends_with(".pre_quant_scale"))
            .count();
        assert!(int8 > 0, "no INT8 layers in {}", onnx.display());
        assert_eq!(smoothed, if alpha.is_none() { int8 } else { 0 }, "{name}");
        let mut pipe = trt_diff::pipelines::sd::open_pipeline(&engine, BackendChoice::Cpu).unwrap();
        let req = request(PROMPT, NEGATIVE, cfg, io(&format!("{tag}_initial_latents")));
        let r = pipe.generate(&req, &mut |_| Ok(())).unwrap();
        found.push((name, psnr(&r.latents, &want), max_rel(&r.latents, &want)));
    }
    for (name, p, e) in &found {
        println!(
            "int8 {name}: final latents {p:.2} dB PSNR, max rel err {e:.3e} against diffusers f32"
        );
    }
    let (smooth, plain) = (found[0].1, found[1].1);
    println!(
        "SmoothQuant (alpha 0.5) {} by {:.2} dB on the tiny SD1.5",
        if smooth >= plain { "helps" } else { "hurts" },
        (smooth - plain).abs()
    );
    assert!(
        smooth > 40.0 && plain > 40.0 && found[2].1 > 40.0,
        "{found:?}"
    );
}

/// Samplers and schedulers of the catalogue on the SD (eps) parameterization: stochastic, multistep, CFG++ and
/// LCM samplers over several schedules run to finite latents near the Euler result's scale; sd-turbo-style single
/// steps work.
#[test]
fn catalogue_samplers_run_on_sd() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path(), false, "epsilon");
    let mut pipe = pipeline(dir.path(), &model);
    let noise = io("sd15_initial_latents");
    let euler = io("sd15_final_latents");
    let scale = euler.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (sampler, scheduler, steps) in [
        ("euler_ancestral", "karras", 6),
        ("dpmpp_2m", "normal", 6),
        ("dpmpp_2m_sde", "exponential", 6),
        ("heun", "simple", 3),
        ("dpmpp_2m_cfg_pp", "sgm_uniform", 6),
        ("lcm", "sgm_uniform", 4),
        ("uni_pc", "beta", 6),
        ("euler", "sgm_uniform", 1),
    ] {
        let mut req = request(PROMPT, NEGATIVE, 7.5, noise.clone());
        req.sampler = Some(sampler.into());
        req.scheduler = Some(scheduler.into());
        req.steps = Some(steps);
        let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
        let m = out.latents.iter().fold(0f32, |m, v| m.max(v.abs()));
        println!(
            "{sampler} / {scheduler} / {steps}: max |latent| {m:.2} (Euler 4 steps: {scale:.2})"
        );
        assert!(out.latents.iter().all(|v| v.is_finite()), "{sampler}");
        assert!(m > 0.5 * scale && m < 1.5 * scale, "{sampler}: {m}");
    }
}
