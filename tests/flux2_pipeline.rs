//! The whole FLUX.2 [klein] pipeline on a tiny random folder (tests/golden/flux2, scripts/golden/flux2_klein.py):
//! final latents and image against diffusers' Flux2KleinPipeline (same initial latents, 4 distilled steps), the
//! base model with CFG, img2img from an encoded image; the bundle `build` (arch read off model_index.json, taef2
//! previews) -> `generate` path on ONNX Runtime; build's errors on broken folders; every precision built with the
//! TensorRT-RTX builder.
use crate::common;
use common::*;
use std::path::{Path, PathBuf};
use trt_diff::backend::BackendChoice;
use trt_diff::manifest::EngineFile;
use trt_diff::pipelines::engines::{OpenOptions, open_file};
use trt_diff::pipelines::flux2::{Flux2Engines, Flux2Model, to_vae_latent};
use trt_diff::pipelines::flux2_build::{
    ModelFiles, OnnxPaths, export_aux, export_transformer, plan,
};
use trt_diff::pipelines::image::{ImagePipeline, ImageRequest};
use trt_diff::quant::LinearPrecision;
use trt_diff::weights::safetensors_file::Checkpoint;

const PROMPT: &str = "a watercolor painting of a fox in the snow, 4k";
const TOLERANCE: f64 = 1e-4;
/// Largest relative error of quantized final latents against f32 ones. This tiny random transformer is far more
/// sensitive than a trained one: an independent PyTorch simulation of ModelOpt's NVFP4 (E2M1 values, E4M3 block
/// scales of 16) moves one transformer pass by 0.60 of its largest value (ours: 0.57), and quantizing the first
/// block's `to_q` alone by 0.15.
const FP8_BOUND: f64 = 0.15;
const NVFP4_BOUND: f64 = 0.5;
/// The golden pipeline's max_sequence_length.
const TEXT_LEN: usize = 64;

fn golden(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/flux2")
        .join(rel)
}

/// A diffusers-layout FLUX.2 [klein] folder of the committed tiny components (links, no copies; the tokenizer is
/// Z-Image's tiny Qwen2 BPE one).
fn model_dir(root: &Path) -> PathBuf {
    let m = root.join("tiny-flux2-klein");
    std::fs::create_dir_all(&m).unwrap();
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/z_image/tokenizer");
    for (name, src) in [
        ("transformer", golden("transformer")),
        ("text_encoder", golden("text_encoder")),
        ("vae", golden("vae")),
        ("scheduler", golden("scheduler")),
        ("model_index.json", golden("model_index.json")),
        ("tokenizer", tok),
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
fn final_latents_match_diffusers_flux2_klein_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = plan(
        ModelFiles::find(&model_dir(dir.path())).unwrap(),
        "flux2-klein-4b",
    )
    .unwrap();
    assert_eq!(
        (
            p.config.vae_scale_factor,
            p.config.latent_channels,
            p.config.distilled,
            p.config.default_steps
        ),
        (2, 32, true, 4)
    );
    p.config.max_sequence_length = TEXT_LEN;
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
    let model = |config| {
        Flux2Model::new(
            config,
            trt_diff::tokenizer::qwen::QwenTokenizer::load(&p.files.tokenizer).unwrap(),
            Flux2Engines {
                text_encoder: open(&paths.text_encoder),
                transformer: open(&paths.transformer),
                vae_decoder: open(&paths.vae_decoder),
                vae_encoder: Some(open(&paths.vae_encoder)),
                tae_decoder: None,
            },
        )
    };
    let mut pipe = ImagePipeline::new(model(p.config.clone()));
    let io = Checkpoint::open(&golden("io.safetensors")).unwrap();
    let get = |n: &str| io.get(n).unwrap().to_f32().unwrap();
    let req = ImageRequest {
        prompt: PROMPT.into(),
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
    assert_eq!(steps, 4, "the distilled default");
    // diffusers returns the de-normalized, unpatchified latents.
    let raw = |x: &[f32]| to_vae_latent(x, &p.config, 1, 8, 8);
    let e = max_rel(&raw(&out.latents), &get("final_latents"));
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
    // img2img: the generated image encoded (mode), noised to the 2nd of 4 sigmas (strength 0.75), 3 steps.
    let req_i2i = ImageRequest {
        init_image: Some(golden("init.png")),
        strength: 0.75,
        initial_noise: Some(get("img2img_noise")),
        latents_only: true,
        steps: Some(4),
        ..req.clone()
    };
    let mut steps = 0;
    let out = pipe
        .generate(&req_i2i, &mut |s| {
            steps = s.steps;
            Ok(())
        })
        .unwrap();
    assert_eq!(steps, 3, "4 steps at strength 0.75 run the last 3");
    let e = max_rel(&raw(&out.latents), &get("final_latents_img2img"));
    eprintln!("img2img final latents: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
    // Editing: reference.png (64x64) as diffusers' `image=`, its 256 tokens beside the 64 latent tokens.
    let control = |strength| trt_diff::pipelines::image::ControlImage {
        image: golden("reference.png"),
        strength,
        start: 0.0,
        end: 1.0,
        preprocess: None,
        mode: None,
    };
    let req_ref = ImageRequest {
        controls: vec![control(1.0)],
        latents_only: true,
        ..req.clone()
    };
    let out = pipe.generate(&req_ref, &mut |_| Ok(())).unwrap();
    let e = max_rel(&raw(&out.latents), &get("final_latents_reference"));
    eprintln!("reference-image final latents: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
    // The reference moves the result (the comparison above could not pass without it).
    let moved = max_rel(&get("final_latents_reference"), &get("final_latents"));
    assert!(moved > 1e-2, "{moved}");
    let err = pipe
        .generate(
            &ImageRequest {
                controls: vec![control(0.5)],
                ..req_ref.clone()
            },
            &mut |_| Ok(()),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--control-strength"), "{err}");
    // The base model: 4 steps of CFG 4 against the empty prompt (the base default), no negative prompt given.
    let mut base = p.config.clone();
    base.distilled = false;
    base.default_cfg = 4.0;
    let mut pipe = ImagePipeline::new(model(base));
    let req = ImageRequest {
        steps: Some(4),
        latents_only: true,
        ..req
    };
    let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
    let e = max_rel(&raw(&out.latents), &get("final_latents_cfg"));
    eprintln!("CFG final latents: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
    // Quantized transformers (the family's policy, ONNX Runtime emulating the FP8/NVFP4 GEMMs) against diffusers'
    // f32 latents of the distilled run. FP8 is calibrated as `build` does: the calibration graph's activation
    // maxima through the same sampler loop.
    let req = ImageRequest { steps: None, ..req };
    let calib = dir.path().join("calibration.transformer.onnx");
    let opts = trt_diff::models::flux2::ExportOptions {
        calibration: true,
        ..Default::default()
    };
    export_transformer(&p, &opts, &calib).unwrap();
    let mut m = model(p.config.clone());
    m.engines.transformer = open(&calib);
    m.amax = Some(Default::default());
    let mut pipe = ImagePipeline::new(m);
    pipe.generate(&req, &mut |_| Ok(())).unwrap();
    let amax = pipe.model.amax.take().unwrap();
    // One range per linear input: 37 linears, q/k/v and add_q/k/v of the 2 double blocks read 2 activations.
    assert_eq!(amax.len(), 37 - 2 * 4);
    for (precision, bound) in [
        (trt_diff::models::flux::FluxPrecision::Fp8, FP8_BOUND),
        (trt_diff::models::flux::FluxPrecision::Nvfp4, NVFP4_BOUND),
    ] {
        let onnx = dir.path().join(format!("{precision:?}.transformer.onnx"));
        let opts = trt_diff::models::flux2::ExportOptions {
            precision,
            amax: amax.clone(),
            ..Default::default()
        };
        export_transformer(&p, &opts, &onnx).unwrap();
        let mut m = model(p.config.clone());
        m.engines.transformer = open(&onnx);
        let mut pipe = ImagePipeline::new(m);
        let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
        let e = max_rel(&raw(&out.latents), &get("final_latents"));
        eprintln!("{precision:?} final latents: max rel err {e:.2e} against diffusers' f32");
        assert!(e > 1e-4 && e < bound, "{precision:?}: {e}");
    }
}

#[test]
fn build_and_generate_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path());
    let plan = dir.path().join("klein.plan");
    let taef2 = shared_data("taef2/taef2_decoder.safetensors");
    // No --arch: model_index.json names Flux2KleinPipeline, the text encoder's width the size.
    let r = run(
        &[
            "build",
            s(&model),
            "--precision",
            "fp32",
            "--onnx-only",
            "--tae-decoder",
            s(&taef2),
            "--out",
            s(&plan),
            "--no-progress",
        ],
        true,
    );
    assert!(r.stdout.contains("flux2-klein-4b"), "{}", r.stdout);
    let png = dir.path().join("fox.png");
    let preview = dir.path().join("preview.png");
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
            "--preview",
            s(&preview),
            "--no-progress",
            "--backend",
            "cpu",
            "--out",
            s(&png),
        ],
        true,
    );
    assert!(r.stdout.contains("wrote"), "{}", r.stdout);
    // A batch of two writes fox-0.png and fox-1.png (seeds 5 and 6); taef2 drew the previews (8x the latent).
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
        && t.text.contains("flux2-klein-4b")));
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&preview).unwrap(),
    ));
    let info = dec.read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (128, 128));
    // `export`: one ONNX graph per component.
    let exported = dir.path().join("onnx");
    let r = run(
        &[
            "export",
            s(&model),
            "--arch",
            "flux2-klein-9b",
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
    let build = |expect_ok| {
        run(
            &[
                "build",
                s(&model),
                "--arch",
                "flux2-klein-4b",
                "--onnx-only",
                "--out",
                s(&out),
            ],
            expect_ok,
        )
    };
    // A missing component.
    std::fs::remove_file(model.join("text_encoder")).unwrap();
    let r = build(false);
    assert!(r.stderr.contains("text_encoder"), "{}", r.stderr);
    assert!(!out.exists());
    std::os::unix::fs::symlink(golden("text_encoder"), model.join("text_encoder")).unwrap();
    // A VAE without its batch-norm statistics (a FLUX.1 / SD AutoencoderKL).
    let v = model.join("vae");
    std::fs::remove_file(&v).unwrap();
    std::os::unix::fs::symlink(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/flux/pipeline/vae"),
        &v,
    )
    .unwrap();
    let r = build(false);
    assert!(r.stderr.contains("latent channels"), "{}", r.stderr);
    std::fs::remove_file(&v).unwrap();
    std::os::unix::fs::symlink(golden("vae"), &v).unwrap();
    // A transformer config that does not fit the weights.
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
    cfg["num_single_layers"] = 3.into();
    std::fs::write(t.join("config.json"), cfg.to_string()).unwrap();
    let r = build(false);
    assert!(
        r.stderr.contains("single_transformer_blocks") && r.stderr.contains("transformer"),
        "{}",
        r.stderr
    );
    // Not valid JSON.
    std::fs::write(t.join("config.json"), "{").unwrap();
    let r = build(false);
    assert!(
        r.stderr.contains("transformer/config.json") && r.stderr.contains("not valid JSON"),
        "{}",
        r.stderr
    );
}

#[test]
fn every_precision_builds_with_tensorrt_rtx() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path());
    let taef2 = shared_data("taef2/taef2_decoder.safetensors");
    for precision in ["fp32", "bf16", "fp8", "nvfp4"] {
        let plan = dir.path().join(precision).join("k.plan");
        // taef2 is the same f32 graph in every precision: built once.
        let tae: &[&str] = if precision == "fp32" {
            &["--tae-decoder", s(&taef2)]
        } else {
            &[]
        };
        // FP8 calibrates through the sampler loop (2 steps at the profile's 64 px) before its engines are built.
        let r = run(
            &[
                &[
                    "build",
                    s(&model),
                    "--arch",
                    "flux2-klein-4b",
                    "--precision",
                    precision,
                    "--image-px",
                    "32,64,128",
                    "--calibration-steps",
                    "2",
                    "--calibration-prompt",
                    PROMPT,
                    "--no-progress",
                    "--out",
                    s(&plan),
                ],
                tae,
            ]
            .concat(),
            true,
        );
        assert!(
            r.stdout.contains("TensorRT-RTX"),
            "{precision}: {}",
            r.stdout
        );
        for c in ["text_encoder", "vae_decoder", "vae_encoder", "tae_decoder"] {
            assert_eq!(
                plan.with_file_name(format!("k.{c}.plan")).exists(),
                c != "tae_decoder" || !tae.is_empty(),
                "{precision}: {c}"
            );
        }
    }
    // The calibrated FP8 transformer runs on ONNX Runtime through the same seam.
    let png = dir.path().join("fp8.png");
    let plan = dir.path().join("fp8/k.plan");
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

/// The tiny folder with Black Forest Labs' transformer file at its root instead of transformer/
/// (scripts/golden/flux2_bfl.py), as their repositories ship it.
fn bfl_model_dir(root: &Path) -> PathBuf {
    let m = model_dir(root);
    std::fs::remove_file(m.join("transformer")).unwrap();
    std::os::unix::fs::symlink(
        golden("flux_2_bfl.safetensors"),
        m.join("flux-2-klein-tiny.safetensors"),
    )
    .unwrap();
    m
}

/// BFL's layout renamed to diffusers' is the folder's transformer tensor for tensor, its config read off the
/// weights is transformer/config.json, and the exported transformer graph is byte-identical to the folder's.
#[test]
fn bfl_transformer_file_equals_the_diffusers_folder() {
    use trt_diff::models::flux2::{self as fm, Flux2Config};
    let file = Checkpoint::open(&golden("flux_2_bfl.safetensors")).unwrap();
    let prefix = fm::bfl_prefix(&file).unwrap();
    let view = fm::diffusers_view(&file, &prefix).unwrap();
    let folder = Checkpoint::open(&golden("transformer")).unwrap();
    let names = |ck: &Checkpoint| ck.names().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(names(&view), names(&folder));
    for n in folder.names() {
        let (a, b) = (view.get(n).unwrap(), folder.get(n).unwrap());
        assert_eq!(
            (a.dtype, &a.shape, &a.data),
            (b.dtype, &b.shape, &b.data),
            "{n}"
        );
    }
    let cfg = golden("transformer/config.json");
    let want = Flux2Config::from_json(&std::fs::read_to_string(&cfg).unwrap(), &cfg).unwrap();
    assert_eq!(Flux2Config::from_checkpoint(&view).unwrap(), want);

    let dir = tempfile::tempdir().unwrap();
    let export = |model: PathBuf, out: &str| -> Vec<u8> {
        let p = plan(ModelFiles::find(&model).unwrap(), "flux2-klein-4b").unwrap();
        let path = dir.path().join(out);
        export_transformer(&p, &Default::default(), &path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend(std::fs::read(dir.path().join(format!("{out}.data"))).unwrap_or_default());
        bytes
    };
    let a = export(model_dir(&dir.path().join("a")), "folder.onnx");
    let b = export(bfl_model_dir(&dir.path().join("b")), "folder.onnx");
    assert!(a == b, "the BFL file's export differs from the folder's");
    // A file of another layout under that name is refused with the reason.
    let m = dir.path().join("b/tiny-flux2-klein");
    std::fs::remove_file(m.join("flux-2-klein-tiny.safetensors")).unwrap();
    std::os::unix::fs::symlink(
        golden("vae/diffusion_pytorch_model.safetensors"),
        m.join("flux-2-klein-tiny.safetensors"),
    )
    .unwrap();
    let e = plan(ModelFiles::find(&m).unwrap(), "flux2-klein-4b")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("not a Black Forest Labs FLUX.2 transformer"),
        "{e}"
    );
}
