//! The whole Flux pipeline on a tiny random FLUX.1-dev (tests/golden/flux, scripts/golden/flux_pipeline.py):
//! final latents and image against diffusers' FluxPipeline (same initial latents, flow-match Euler, 4 steps), the
//! bundle `build` -> `generate` path end to end on ONNX Runtime, and generate's errors.
use crate::common;
use common::*;
use std::path::{Path, PathBuf};
use trt_diff::backend::BackendChoice;
use trt_diff::manifest::EngineFile;
use trt_diff::pipelines::engines::{OpenOptions, open_file};
use trt_diff::pipelines::flux::{FluxEngines, FluxModel, load_clip_tokenizer};
use trt_diff::pipelines::flux_build::{
    ModelFiles, OnnxPaths, export_aux, export_transformer, plan,
};
use trt_diff::pipelines::image::{ImagePipeline, ImageRequest};
use trt_diff::weights::safetensors_file::Checkpoint;

const PROMPT: &str = "a watercolor painting of a fox in the snow, 4k";

fn golden(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/flux")
        .join(rel)
}

fn shared(rel: &str) -> PathBuf {
    std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")))
        .join(rel)
}

/// A diffusers-layout model folder of the committed tiny components (links, no copies).
fn model_dir(root: &Path) -> PathBuf {
    let m = root.join("tiny-flux-dev");
    std::fs::create_dir_all(&m).unwrap();
    for (name, src) in [
        ("transformer", golden("pipeline/transformer")),
        ("vae", golden("pipeline/vae")),
        ("text_encoder", golden("text_encoder")),
        ("text_encoder_2", golden("text_encoder_2")),
    ] {
        std::os::unix::fs::symlink(&src, m.join(name)).unwrap();
    }
    m
}

fn toks() -> (PathBuf, PathBuf) {
    (
        shared("tokenizers/bpe_simple_vocab_16e6.txt.gz"),
        shared("tokenizers/t5_tokenizer.json"),
    )
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
fn final_latents_match_diffusers_flux_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let (ct, tt) = toks();
    let files = ModelFiles::find(&model_dir(dir.path()), Some(&ct), Some(&tt)).unwrap();
    let p = plan(files, "flux-dev", None).unwrap();
    assert_eq!(
        (p.config.vae_scale_factor, p.config.latent_channels),
        (2, 16)
    );
    let paths = OnnxPaths::new(dir.path(), None);
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
        load_clip_tokenizer(&ct, p.config.clip_pad).unwrap(),
        trt_diff::tokenizer::t5::T5Tokenizer::load(&tt).unwrap(),
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
    let io = Checkpoint::open(&golden("pipeline_io.safetensors")).unwrap();
    let init = io.get("initial_latents").unwrap().to_f32().unwrap();
    let req = ImageRequest {
        prompt: PROMPT.into(),
        steps: Some(4),
        width: Some(32),
        height: Some(32),
        guidance: Some(3.5),
        cfg: 1.0,
        batch: 1,
        strength: 1.0,
        initial_noise: Some(init),
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
    let want = io.get("final_latents").unwrap().to_f32().unwrap();
    let e = max_rel(&out.latents, &want);
    let img_want = io.get("image").unwrap().to_f32().unwrap();
    // Ours is RGB8 (HWC); diffusers' is [0, 1] CHW: within one 8-bit step plus the latent error.
    let mut img_err = 0f64;
    for p in 0..32 * 32 {
        for c in 0..3 {
            let a = out.images[0][p * 3 + c] as f64 / 255.0;
            let b = img_want[c * 32 * 32 + p] as f64;
            img_err = img_err.max((a - b).abs());
        }
    }
    eprintln!("final latents: max rel err {e:.2e}; image: max abs err {img_err:.2e} (of 1.0)");
    assert!(e < 1e-3, "{e}");
    assert!(img_err < 3.0 / 255.0, "{img_err}");
    // True CFG: diffusers' `negative_prompt` + `true_cfg_scale=2.0`.
    let req = ImageRequest {
        negative_prompt: Some("blurry, low quality".into()),
        cfg: 2.0,
        latents_only: true,
        ..req
    };
    let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
    let want = io.get("final_latents_true_cfg").unwrap().to_f32().unwrap();
    let e = max_rel(&out.latents, &want);
    eprintln!("true CFG final latents: max rel err {e:.2e}");
    assert!(e < 1e-3, "{e}");
    // img2img: diffusers' FluxImg2ImgPipeline from init.png at strength 0.6 (encoder mode, the same noise).
    let req = ImageRequest {
        negative_prompt: None,
        cfg: 1.0,
        init_image: Some(golden("init.png")),
        strength: 0.6,
        initial_noise: Some(io.get("img2img_noise").unwrap().to_f32().unwrap()),
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
    let want = io.get("final_latents_img2img").unwrap().to_f32().unwrap();
    let e = max_rel(&out.latents, &want);
    eprintln!("img2img final latents: max rel err {e:.2e}");
    assert!(e < 1e-3, "{e}");
}

#[test]
fn build_and_generate_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (ct, tt) = toks();
    let model = model_dir(dir.path());
    let plan = dir.path().join("flux.plan");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    run(
        &[
            "build",
            &s(&model),
            "--arch",
            "flux-dev",
            "--precision",
            "fp32",
            "--out",
            &s(&plan),
            "--clip-tokenizer",
            &s(&ct),
            "--t5-tokenizer",
            &s(&tt),
            "--image-px",
            "32,32,64",
            "--tae-decoder",
            &s(&golden("pipeline/tae_decoder.safetensors")),
            "--no-progress",
        ],
        true,
    );
    // `export`: one ONNX graph per component.
    let exported = dir.path().join("onnx");
    let r = run(
        &[
            "export",
            &s(&model),
            "--arch",
            "flux-dev",
            "--out",
            &s(&exported),
            "--clip-tokenizer",
            &s(&ct),
            "--t5-tokenizer",
            &s(&tt),
        ],
        true,
    );
    for c in ["transformer", "clip", "t5", "vae_decoder", "vae_encoder"] {
        let f = exported.join(format!("{c}.onnx"));
        assert!(f.exists() && r.stdout.contains(&s(&f)), "{c}: {}", r.stdout);
    }
    // The tiny transformer has a guidance embedding: building it as schnell is refused.
    let r = run(
        &[
            "build",
            &s(&model),
            "--arch",
            "flux-schnell",
            "--out",
            &s(&dir.path().join("schnell.plan")),
            "--clip-tokenizer",
            &s(&ct),
            "--t5-tokenizer",
            &s(&tt),
        ],
        false,
    );
    assert!(r.stderr.contains("use --arch flux-dev"), "{}", r.stderr);
    let png = dir.path().join("fox.png");
    let gen_args = |extra: &[&str]| {
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
    let preview = dir.path().join("preview.png");
    let args = gen_args(&["--out", &s(&png), "--preview", &s(&preview)]);
    let argv: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    let r = run(&argv, true);
    assert!(r.stdout.contains("wrote"), "{}", r.stdout);
    // The tiny TAE decodes the 16x16 latent 8x.
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&preview).unwrap(),
    ));
    let info = dec.read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (128, 128));
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let info = dec.read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (32, 32));
    let text = &info.info().uncompressed_latin1_text;
    assert!(text.iter().any(|t| t.keyword == "parameters"
        && t.text.contains("Steps: 3")
        && t.text.contains("Seed: 5")));
    // Batch of two, img2img from the first image, a stochastic sampler.
    let args = gen_args(&[
        "--out",
        &s(&dir.path().join("b.png")),
        "--batch",
        "2",
        "--init-image",
        &s(&png),
        "--strength",
        "0.7",
        "--sampler",
        "euler_ancestral",
        "--negative-prompt",
        "blurry",
        "--cfg",
        "2",
    ]);
    let argv: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    run(&argv, true);
    assert!(dir.path().join("b-0.png").exists() && dir.path().join("b-1.png").exists());
    // Errors: size, prompt length, missing component.
    let bad = |extra: &[&str], expect: &str| {
        let args = gen_args(extra);
        let argv: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        let r = run(&argv, false);
        assert!(r.stderr.contains(expect), "{}", r.stderr);
    };
    let args = gen_args(&["--out", &s(&png)]);
    let mut argv: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    argv[6] = "40"; // --width
    let r = run(&argv, false);
    assert!(r.stderr.contains("multiples of 16"), "{}", r.stderr);
    let long = "fox ".repeat(600);
    let args = gen_args(&["--out", &s(&png)]);
    let mut argv: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    argv[4] = &long;
    let r = run(&argv, false);
    assert!(
        r.stderr.contains("over this bundle's limit of 512"),
        "{}",
        r.stderr
    );
    bad(
        &["--out", &s(&png), "--cfg", "4"],
        "needs --negative-prompt",
    );
    bad(&[], "--out FILE.png is needed");
    for f in ["flux.vae_decoder.plan", "flux.vae_decoder.onnx"] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    bad(&["--out", &s(&png)], "component vae_decoder");
}

/// FP8 (calibrated through the sampler loop) and NVFP4 bundles: TensorRT-RTX builds every engine, and the CPU
/// emulation of the quantized transformer ends within a stated error of diffusers' f32 final latents. A bf16
/// ONNX-only bundle (no TensorRT) runs on the CPU too, its graph widened to f32 on the bf16 weights: diffusers'
/// reference computes in f32 on the same bf16-rounded weights, so it matches to f32 round-off.
#[test]
fn quantized_bundles_build_and_stay_close() {
    use trt_diff::manifest::Pipeline;
    use trt_diff::pipelines::flux_build::{FluxBuildOptions, build_flux};
    let dir = tempfile::tempdir().unwrap();
    let (ct, tt) = toks();
    let model = model_dir(dir.path());
    let io = Checkpoint::open(&golden("pipeline_io.safetensors")).unwrap();
    let init = io.get("initial_latents").unwrap().to_f32().unwrap();
    let want = io.get("final_latents").unwrap().to_f32().unwrap();
    for (precision, bound) in [("bf16", 2e-4), ("fp8", 2e-2), ("nvfp4", 5e-2)] {
        let out = dir.path().join(precision).join("flux.plan");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let o = FluxBuildOptions {
            model: model.clone(),
            arch: "flux-dev".into(),
            precision: trt_diff::quant::Precision::parse(precision).unwrap(),
            clip_tokenizer: Some(ct.clone()),
            t5_tokenizer: Some(tt.clone()),
            tae_decoder: None,
            controlnet: None,
            t5_max_len: None,
            image_px: Some([32, 32, 64]),
            calibration_prompts: Some(vec![PROMPT.into(), "a red cube on a table".into()]),
            calibration_steps: Some(2),
            calibration_backend: BackendChoice::Cpu,
            loras: Vec::new(),
            lora_rank: 0,
            auto: Default::default(),
            base: trt_diff::trt::BuildOptions {
                out: out.clone(),
                progress: false,
                onnx_only: precision == "bf16",
                ..Default::default()
            },
        };
        let built = build_flux(&o).unwrap();
        let engine = EngineFile::open(&built.engine).unwrap();
        let Some(Pipeline::Image(bundle)) = engine.pipeline() else {
            panic!("no image bundle in {}", out.display())
        };
        assert_eq!(bundle.precision, precision);
        let mut pipe =
            trt_diff::pipelines::flux::open_pipeline(&engine, BackendChoice::Cpu).unwrap();
        let req = ImageRequest {
            prompt: PROMPT.into(),
            steps: Some(4),
            width: Some(32),
            height: Some(32),
            cfg: 1.0,
            batch: 1,
            strength: 1.0,
            initial_noise: Some(init.clone()),
            latents_only: true,
            ..Default::default()
        };
        let r = pipe.generate(&req, &mut |_| Ok(())).unwrap();
        let e = max_rel(&r.latents, &want);
        eprintln!("{precision}: final latents max rel err {e:.3e} against diffusers f32");
        assert!(e < bound, "{precision}: {e}");
    }
}

/// The default "flux" schedule equals diffusers' FluxPipeline + FlowMatchEulerDiscreteScheduler for dev (dynamic
/// shift) and schnell (none), golden from scripts/golden/flux_sigmas.py.
#[test]
fn flux_schedule_matches_diffusers() {
    let text = std::fs::read_to_string(golden("sigmas.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 8);
    for c in cases {
        let arch = c["arch"].as_str().unwrap();
        let cfg = trt_diff::pipelines::flux::FluxPipelineConfig::for_arch(arch).unwrap();
        let steps = c["steps"].as_u64().unwrap() as usize;
        let tokens = c["tokens"].as_u64().unwrap() as usize;
        let got = trt_diff::pipelines::flux::flux_sigmas(&cfg, "flux", steps, tokens).unwrap();
        let want: Vec<f64> = c["sigmas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() < 1e-6,
                "{arch} {steps} {tokens}: {got:?} vs {want:?}"
            );
        }
    }
    // Other schedulers by name; unknown ones are clear errors.
    let cfg = trt_diff::pipelines::flux::FluxPipelineConfig::for_arch("flux-dev").unwrap();
    assert_eq!(
        trt_diff::pipelines::flux::flux_sigmas(&cfg, "karras", 10, 4096)
            .unwrap()
            .len(),
        11
    );
    let e = trt_diff::pipelines::flux::flux_sigmas(&cfg, "nope", 10, 4096).unwrap_err();
    assert!(e.to_string().contains("unknown scheduler"), "{e}");
}
