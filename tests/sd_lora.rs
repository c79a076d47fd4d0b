//! LoRA on the tiny Stable Diffusion 1.5 and SDXL pipelines (tests/golden/sd/lora, scripts/golden/sd_lora.py):
//! final latents against diffusers (`load_lora_weights`, `set_adapters`) for kohya (SD1.5 diffusers names with
//! LoCon convolutions, SDXL SGM/LDM names, `.alpha`), diffusers/PEFT, LyCORIS LoHa/LoKr and two stacked LoRAs,
//! merged at build and switched at run time in one pipeline; modules that match no layer are named.
//!
//! The components are copied as f32 (the committed ones are bf16) so that run-time merges, which store merged
//! weights in each graph weight's own type, are exact as diffusers' f32 merge is.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use trt_diff::backend::BackendChoice;
use trt_diff::manifest::EngineFile;
use trt_diff::onnx::DataType;
use trt_diff::pipelines::engines::{OpenOptions, open_file};
use trt_diff::pipelines::image::{ImagePipeline, ImageRequest};
use trt_diff::pipelines::sd::{SdEngines, SdModel};
use trt_diff::pipelines::sd_build::{Plan, detect_arch, export_aux, export_unet, onnx_path, plan};
use trt_diff::tokenizer::clip::ClipTokenizer;
use trt_diff::weights::lora::{LoraFile, Part};
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

/// `src` (a diffusers component folder) copied to `dst` with every tensor as f32.
fn f32_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap();
        if p.extension().is_some_and(|e| e == "safetensors") {
            let ck = Checkpoint::open(&p).unwrap();
            let data: Vec<(String, Vec<usize>, Vec<u8>)> = ck
                .names()
                .map(|n| {
                    let t = ck.get(n).unwrap();
                    let v: Vec<u8> = t
                        .to_f32()
                        .unwrap()
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect();
                    (n.to_string(), t.shape.clone(), v)
                })
                .collect();
            let views: Vec<(String, safetensors::tensor::TensorView)> = data
                .iter()
                .map(|(n, s, v)| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), v)
                            .unwrap(),
                    )
                })
                .collect();
            safetensors::serialize_to_file(views, None, &dst.join(name)).unwrap();
        } else {
            std::fs::copy(&p, dst.join(name)).unwrap();
        }
    }
}

/// A diffusers-layout folder of the tiny components in f32, with a scheduler config.
fn model_dir(root: &Path, xl: bool) -> PathBuf {
    let m = root.join(if xl { "tiny-sdxl" } else { "tiny-sd" });
    std::fs::create_dir_all(m.join("scheduler")).unwrap();
    std::os::unix::fs::symlink(golden("sd/sd15/vae"), m.join("vae")).unwrap();
    f32_copy(&golden("flux/text_encoder"), &m.join("text_encoder"));
    let unet = if xl { "sd/sdxl/unet" } else { "sd/sd15/unet" };
    f32_copy(&golden(unet), &m.join("unet"));
    if xl {
        f32_copy(
            &golden("sd/sdxl/pipeline_text_encoder_2"),
            &m.join("text_encoder_2"),
        );
    }
    std::fs::write(
        m.join("scheduler/scheduler_config.json"),
        "{\"_class_name\": \"EulerDiscreteScheduler\", \"prediction_type\": \"epsilon\"}",
    )
    .unwrap();
    m
}

fn lora(name: &str) -> LoraFile {
    LoraFile::open(&golden(&format!("sd/lora/{name}.safetensors"))).unwrap()
}

/// Exports the plan's components as `<stem>.*.onnx` (its LoRAs merged) and opens them on ONNX Runtime's CPU
/// backend, with run-time LoRA enabled over those graphs.
fn pipeline(root: &Path, p: &Plan, stem: &str) -> ImagePipeline<SdModel> {
    pipeline_with(root, p, stem, &Default::default())
}

/// `pipeline` with the UNet exported with `unet_opts` (a quantized UNet with a LoRA side path).
fn pipeline_with(
    root: &Path,
    p: &Plan,
    stem: &str,
    unet_opts: &trt_diff::models::unet::UNetExportOptions,
) -> ImagePipeline<SdModel> {
    let f32t = DataType::FLOAT;
    export_aux(p, root, stem, f32t, f32t).unwrap();
    let unet_onnx = onnx_path(root, stem, "unet");
    export_unet(p, unet_opts, &unet_onnx).unwrap();
    let open = |path: &Path| {
        open_file(
            &EngineFile::open(path).unwrap(),
            BackendChoice::Cpu,
            &OpenOptions::default(),
        )
        .unwrap()
    };
    let mut graphs = BTreeMap::new();
    graphs.insert(Part::Denoiser, unet_onnx.clone());
    let mut tokenizers = Vec::new();
    let mut text_encoders = Vec::new();
    for (i, spec) in p.config.text_encoders.iter().enumerate() {
        let mut t = ClipTokenizer::load(&clip_vocab()).unwrap();
        t.pad = spec.pad;
        tokenizers.push(t);
        let g = onnx_path(root, stem, &spec.component);
        text_encoders.push(open(&g));
        graphs.insert(Part::TextEncoder(i), g);
    }
    let mut model = SdModel::new(
        p.config.clone(),
        tokenizers,
        SdEngines {
            text_encoders,
            unet: open(&unet_onnx),
            vae_decoder: open(&onnx_path(root, stem, "vae_decoder")),
            vae_encoder: None,
            tae_decoder: None,
        },
    );
    model.enable_lora(graphs);
    ImagePipeline::new(model)
}

fn want(name: &str) -> Vec<f32> {
    Checkpoint::open(&golden("sd/lora/lora_io.safetensors"))
        .unwrap()
        .get(name)
        .unwrap()
        .to_f32()
        .unwrap()
}

fn initial(xl: bool) -> Vec<f32> {
    Checkpoint::open(&golden("sd/pipeline_io.safetensors"))
        .unwrap()
        .get(if xl {
            "sdxl_initial_latents"
        } else {
            "sd15_initial_latents"
        })
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

fn final_latents(pipe: &mut ImagePipeline<SdModel>, xl: bool) -> Vec<f32> {
    let req = ImageRequest {
        prompt: PROMPT.into(),
        negative_prompt: Some(NEGATIVE.into()),
        steps: Some(4),
        sampler: Some("euler".into()),
        scheduler: Some("normal".into()),
        width: Some(32),
        height: Some(32),
        cfg: if xl { 5.0 } else { 7.5 },
        batch: 1,
        strength: 1.0,
        initial_noise: Some(initial(xl)),
        latents_only: true,
        ..Default::default()
    };
    pipe.generate(&req, &mut |_| Ok(())).unwrap().latents
}

fn check(got: &[f32], golden_name: &str, what: &str) {
    let want = want(golden_name);
    let e = max_rel(got, &want);
    let moved = max_rel(&want, &self::want(&format!("{}_base", &golden_name[..4])));
    println!(
        "{what} {golden_name}: max rel err {e:.2e} (the LoRA moves the latents by {moved:.2e})"
    );
    assert!(e < 1e-4, "{what} {golden_name}: {e}");
}

/// Each set: (golden name, LoRA files at strengths).
fn sets(xl: bool) -> Vec<(&'static str, Vec<(&'static str, f32)>)> {
    if xl {
        vec![
            ("sdxl_kohya", vec![("sdxl_kohya", 0.7)]),
            ("sdxl_peft", vec![("sdxl_peft", 0.7)]),
            (
                "sdxl_stacked",
                vec![("sdxl_peft", 0.7), ("sdxl_kohya", 0.5)],
            ),
        ]
    } else {
        vec![
            ("sd15_kohya", vec![("sd15_kohya", 0.7)]),
            ("sd15_peft", vec![("sd15_peft", 0.7)]),
            ("sd15_loha", vec![("sd15_loha", 0.7)]),
            ("sd15_lokr", vec![("sd15_lokr", 0.7)]),
            (
                "sd15_stacked",
                vec![("sd15_peft", 0.7), ("sd15_kohya", 0.5)],
            ),
        ]
    }
}

fn open_set(set: &[(&str, f32)]) -> Vec<(LoraFile, f32)> {
    set.iter().map(|(f, s)| (lora(f), *s)).collect()
}

fn loras_match_diffusers(xl: bool) {
    let d = tempfile::tempdir().unwrap();
    let model = model_dir(d.path(), xl);
    let arch = detect_arch(&model).unwrap();
    let base = || plan(&model, arch, Some(&clip_vocab())).unwrap();
    // Run time: one pipeline switched through every set, then back to none.
    let mut pipe = pipeline(d.path(), &base(), "run");
    let prefix = if xl { "sdxl" } else { "sd15" };
    check(
        &final_latents(&mut pipe, xl),
        &format!("{prefix}_base"),
        "no LoRA",
    );
    for (name, set) in sets(xl) {
        pipe.set_loras(&open_set(&set)).unwrap();
        check(&final_latents(&mut pipe, xl), name, "run time");
    }
    pipe.set_loras(&[]).unwrap();
    check(
        &final_latents(&mut pipe, xl),
        &format!("{prefix}_base"),
        "run time, none again",
    );
    // Build time: the kohya LoRA (convolutions, alpha, text encoders) and the stacked set merged before export.
    for (name, set) in sets(xl) {
        if !(name.ends_with("kohya") || name.ends_with("stacked")) {
            continue;
        }
        let p = base().with_loras(&open_set(&set)).unwrap();
        let mut merged = pipeline(d.path(), &p, name);
        check(&final_latents(&mut merged, xl), name, "merged");
    }
}

#[test]
fn sd15_loras_of_every_format_match_diffusers_merged_and_at_run_time() {
    loras_match_diffusers(false);
}

#[test]
fn sdxl_kohya_ldm_names_and_peft_loras_match_diffusers_merged_and_at_run_time() {
    loras_match_diffusers(true);
}

#[test]
fn modules_matching_no_layer_are_named() {
    let d = tempfile::tempdir().unwrap();
    let model = model_dir(d.path(), false);
    let p = plan(&model, "sd15", Some(&clip_vocab())).unwrap();
    // An SD1.5 LoRA with one module that is in no SD UNet, and an SDXL LoRA (a second text encoder, other widths).
    let bad = d.path().join("bad.safetensors");
    let down = [0u8; 4 * 2 * 8];
    let up = [0u8; 4 * 8 * 2];
    let mut t = std::collections::HashMap::new();
    for (key, shape, data) in [
        (
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            vec![2, 4],
            &down[..32],
        ),
        (
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
            vec![4, 2],
            &up[..32],
        ),
        (
            "lora_unet_down_blocks_0_attentions_0_not_a_layer.lora_down.weight",
            vec![2, 8],
            &down[..],
        ),
        (
            "lora_unet_down_blocks_0_attentions_0_not_a_layer.lora_up.weight",
            vec![8, 2],
            &up[..],
        ),
    ] {
        t.insert(
            key.to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, data).unwrap(),
        );
    }
    safetensors::serialize_to_file(&t, None, &bad).unwrap();
    let e = match p.with_loras(&[(LoraFile::open(&bad).unwrap(), 1.0)]) {
        Ok(_) => panic!("a LoRA with a module matching no layer was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("bad.safetensors")
            && e.contains("lora_unet_down_blocks_0_attentions_0_not_a_layer")
            && !e.contains("proj_in")
            && e.contains("match no layer"),
        "{e}"
    );
    let p = plan(&model, "sd15", Some(&clip_vocab())).unwrap();
    let e = match p.with_loras(&[(lora("sdxl_kohya"), 1.0)]) {
        Ok(_) => panic!("an SDXL LoRA was accepted by an SD1.5 model"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("sdxl_kohya.safetensors"), "{e}");
    println!("{e}");
}

/// The CLI end to end, as users run it: a LoRA merged by `build --lora` and the same LoRA applied at run time by
/// `generate --lora` on a bundle built without it give the same image; the bundle's ControlNet (`build --controlnet`)
/// steers the image only when `generate --control` gives it an image, and deterministically.
#[test]
fn cli_sd_lora_and_controlnet_end_to_end() {
    let bin = env!("CARGO_BIN_EXE_trt-diff");
    let d = tempfile::tempdir().unwrap();
    let m = model_dir(d.path(), false);
    let vocab = clip_vocab();
    let kohya = format!("{}:0.7", golden("sd/lora/sd15_kohya.safetensors").display());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{args:?}: {err}");
    };
    let build = |name: &str, extra: &[&str]| -> PathBuf {
        let plan = d.path().join(name).join("sd.plan");
        std::fs::create_dir_all(plan.parent().unwrap()).unwrap();
        let mut args = vec![
            "build",
            m.to_str().unwrap(),
            "--arch",
            "sd15",
            "--precision",
            "fp32",
            "--onnx-only",
            "--clip-tokenizer",
            vocab.to_str().unwrap(),
            "--image-px",
            "32,32,64",
            "--no-progress",
            "--out",
            plan.to_str().unwrap(),
        ];
        args.extend(extra);
        run(&args);
        plan
    };
    let merged = build("merged", &["--lora", &kohya]);
    let control_dir = golden("sd/controlnet/sd15");
    let plain = build("plain", &["--controlnet", control_dir.to_str().unwrap()]);
    let generate = |plan: &Path, out: &str, extra: &[&str]| -> Vec<u8> {
        let png = d.path().join(out);
        let mut args = vec![
            "generate",
            "--engine",
            plan.to_str().unwrap(),
            "--prompt",
            PROMPT,
            "--negative-prompt",
            NEGATIVE,
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "3",
            "--seed",
            "7",
            "--backend",
            "cpu",
            "--no-progress",
            "--out",
            png.to_str().unwrap(),
        ];
        args.extend(extra);
        run(&args);
        image::open(&png).unwrap().to_rgb8().into_raw()
    };
    let max_diff = |a: &[u8], b: &[u8]| {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0)
    };
    let built_in = generate(&merged, "merged.png", &[]);
    let at_run_time = generate(&plain, "runtime.png", &["--lora", &kohya]);
    let without = generate(&plain, "without.png", &[]);
    assert!(
        max_diff(&built_in, &at_run_time) <= 1,
        "build --lora and generate --lora differ by {}",
        max_diff(&built_in, &at_run_time)
    );
    assert!(
        max_diff(&built_in, &without) > 1,
        "the LoRA changes nothing"
    );
    let control = golden("sd/controlnet/control.png");
    let c = control.to_str().unwrap();
    let controlled = generate(&plain, "control.png", &["--control", c]);
    let again = generate(&plain, "control2.png", &["--control", c]);
    assert_eq!(
        controlled, again,
        "a controlled generation is deterministic"
    );
    assert!(
        max_diff(&controlled, &without) > 1,
        "the ControlNet changes nothing"
    );
}

#[test]
fn sd15_nvfp4_side_path_takes_loras_without_requantizing() {
    // An NVFP4 UNet with a rank-8 side path beside each quantized linear: zero as built (the plain NVFP4 UNet's
    // latents exactly), LoRAs switched through its A/B weights (convolution and text-encoder parts merged), and
    // back to none; against diffusers' f32 LoRA results, within NVFP4's own error and closer than without them.
    use trt_diff::models::unet::UNetExportOptions;
    use trt_diff::quant::LinearPrecision;
    let d = tempfile::tempdir().unwrap();
    let model = model_dir(d.path(), false);
    let p = plan(&model, detect_arch(&model).unwrap(), Some(&clip_vocab())).unwrap();
    let nvfp4 = |rank: usize| UNetExportOptions {
        quantize: Some(LinearPrecision::Nvfp4),
        lora_rank: rank,
        ..Default::default()
    };
    let plain = final_latents(&mut pipeline_with(d.path(), &p, "plain", &nvfp4(0)), false);
    let mut pipe = pipeline_with(d.path(), &p, "side", &nvfp4(8));
    assert_eq!(max_rel(&final_latents(&mut pipe, false), &plain), 0.0);
    let quant_err = max_rel(&plain, &want("sd15_base"));
    for name in ["sd15_peft", "sd15_kohya"] {
        pipe.set_loras(&open_set(&[(name, 0.7)])).unwrap();
        let got = final_latents(&mut pipe, false);
        let golden = want(name);
        let (err, without) = (max_rel(&got, &golden), max_rel(&plain, &golden));
        println!(
            "NVFP4 + side path, {name}: max rel err {err:.2e} against diffusers' f32 (NVFP4 alone: {quant_err:.2e}; \
             the NVFP4 UNet without the LoRA is {without:.2e} from it)"
        );
        assert!(
            err < 2.0 * quant_err + 0.01 && err < without,
            "{name}: {err}"
        );
    }
    pipe.set_loras(&[]).unwrap();
    assert_eq!(max_rel(&final_latents(&mut pipe, false), &plain), 0.0);
}
