//! `build --precision auto --quality Q` (docs/precision.md) on the tiny Flux (tests/golden/flux) and on
//! stories260K: a loose budget quantizes more layers than a tight one, both hold on the held-out prompts as this
//! test measures them itself (the built graphs on the CPU backend against unquantized ones), `--policy FILE`
//! rebuilds the same graph, and bad policy files are clear errors.
use crate::common;
use common::*;
use std::path::{Path, PathBuf};
use trt_diff::backend::BackendChoice;
use trt_diff::manifest::EngineFile;
use trt_diff::pipelines::image::ImageRequest;
use trt_diff::quant::auto::{Format, PolicyFile};

fn golden(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/flux")
        .join(rel)
}

/// A diffusers-layout folder of the committed tiny Flux components (links, no copies).
fn flux_dir(root: &Path) -> PathBuf {
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

const CALIBRATION: &str = "a watercolor painting of a fox in the snow, 4k";
const HELDOUT: [&str; 2] = [
    "a blue bird on a branch",
    "a bowl of soup on a wooden table",
];

/// Layers in the lowest-bit format (NVFP4).
fn low_bit(pf: &PolicyFile) -> usize {
    pf.layers.values().filter(|f| **f == Format::Nvfp4).count()
}

/// The worst PSNR over the held-out prompts of bundle `engine` against the unquantized bundle `reference`, as the
/// search renders them (32 px, 2 steps, seed 1000 + i).
fn heldout_psnr(engine: &Path, reference: &Path) -> f64 {
    let render = |e: &Path| -> Vec<Vec<u8>> {
        let ef = EngineFile::open(e).unwrap();
        let mut pipe = trt_diff::pipelines::flux::open_pipeline(&ef, BackendChoice::Cpu).unwrap();
        HELDOUT
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let req = ImageRequest {
                    prompt: p.to_string(),
                    steps: Some(2),
                    seed: 1000 + i as u64,
                    width: Some(32),
                    height: Some(32),
                    batch: 1,
                    cfg: 1.0,
                    strength: 1.0,
                    ..Default::default()
                };
                pipe.generate(&req, &mut |_| Ok(()))
                    .unwrap()
                    .images
                    .remove(0)
            })
            .collect()
    };
    let (a, b) = (render(engine), render(reference));
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let mse = x
                .iter()
                .zip(y)
                .map(|(p, q)| ((*p as f64 - *q as f64) / 255.0).powi(2))
                .sum::<f64>()
                / x.len() as f64;
            -10.0 * mse.max(1e-30).log10()
        })
        .fold(f64::INFINITY, f64::min)
}

fn bytes_of(onnx: &Path) -> Vec<u8> {
    let mut v = std::fs::read(onnx).unwrap();
    v.extend(std::fs::read(onnx.with_extension("onnx.data")).unwrap_or_default());
    v
}

#[test]
fn flux_auto_precision_meets_its_budgets_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let model = flux_dir(dir.path());
    let ct = shared_data("tokenizers/bpe_simple_vocab_16e6.txt.gz");
    let tt = shared_data("tokenizers/t5_tokenizer.json");
    let out = |name: &str| dir.path().join(name).join("flux.plan");
    let build = |name: &str, extra: &[&str], ok: bool| {
        let o = out(name);
        std::fs::create_dir_all(o.parent().unwrap()).unwrap();
        let mut args: Vec<&str> = vec![
            "build",
            s(&model),
            "--arch",
            "flux-dev",
            "--onnx-only",
            "--out",
            s(&o),
            "--clip-tokenizer",
            s(&ct),
            "--t5-tokenizer",
            s(&tt),
            "--image-px",
            "32,32,64",
            "--calibration-prompt",
            CALIBRATION,
            "--calibration-steps",
            "2",
            "--no-progress",
        ];
        for h in HELDOUT {
            args.extend(["--heldout-prompt", h]);
        }
        args.extend(extra);
        run(&args, ok)
    };
    build("ref", &["--precision", "fp32"], true);
    // The full search at a tight budget, then a loose one re-chosen from its measured table.
    let r = build("tight", &["--precision", "auto", "--quality", "50"], true);
    assert!(
        r.stdout.contains("transformer_blocks.0.attn.to_q") && r.stdout.contains("search"),
        "{}",
        r.stdout
    );
    let tight_file = out("tight").with_extension("policy.toml");
    let tight = PolicyFile::read(&tight_file).unwrap();
    assert_eq!(
        tight.measured.len(),
        30 + 30 * 3 - 2,
        "every layer in every format"
    );
    let r = build(
        "loose",
        &["--policy", s(&tight_file), "--quality", "30"],
        true,
    );
    assert!(r.stdout.contains("on held-out prompts"), "{}", r.stdout);
    let loose_file = out("loose").with_extension("policy.toml");
    let loose = PolicyFile::read(&loose_file).unwrap();
    eprintln!(
        "tight: {} nvfp4 layers, {} weight bytes, {:.1} dB; loose: {} nvfp4, {} bytes, {:.1} dB",
        low_bit(&tight),
        tight.bytes().0,
        tight.measured_quality,
        low_bit(&loose),
        loose.bytes().0,
        loose.measured_quality
    );
    assert!(low_bit(&loose) > low_bit(&tight), "{:?}", tight.layers);
    assert!(loose.bytes().0 < tight.bytes().0 && tight.bytes().0 < tight.bytes().1);
    let reference = out("ref").with_extension("plan.json");
    for (name, pf) in [("tight", &tight), ("loose", &loose)] {
        let psnr = heldout_psnr(&out(name).with_extension("plan.json"), &reference);
        eprintln!("{name}: held-out PSNR {psnr:.2} dB (budget {})", pf.quality);
        assert!(psnr >= pf.quality, "{name}: {psnr} < {}", pf.quality);
        assert!(
            (psnr - pf.measured_quality).abs() < 1e-6,
            "{psnr} vs {pf:?}"
        );
    }
    // `--policy FILE` rebuilds the same transformer graph, byte for byte.
    build("again", &["--policy", s(&loose_file)], true);
    let graph = |n: &str| bytes_of(&dir.path().join(n).join("flux.transformer.onnx"));
    assert!(
        graph("again") == graph("loose"),
        "--policy did not round-trip"
    );
    assert_eq!(
        PolicyFile::read(&out("again").with_extension("policy.toml"))
            .unwrap()
            .layers,
        loose.layers
    );
    // Bad policy files: the error names the file, the cause and the fix.
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&loose_file).unwrap();
    for (content, cause) in [
        ("arch = [".to_string(), "not a valid precision policy"),
        (
            text.replacen("= \"nvfp4\"", "= \"int3\"", 1),
            "unknown variant `int3`",
        ),
        (
            text.replacen("[layers]", "[layers]\n\"blocks.9.mlp\" = \"fp8\"", 1),
            "'blocks.9.mlp', which is not a linear layer",
        ),
    ] {
        std::fs::write(&bad, content).unwrap();
        let r = build("bad", &["--policy", s(&bad)], false);
        assert!(
            r.stderr.contains("bad.toml") && r.stderr.contains(cause),
            "{cause}: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains("--precision auto") || r.stderr.contains("fix"),
            "{}",
            r.stderr
        );
    }
    let r = build(
        "bad",
        &["--policy", s(&loose_file), "--targets", "sm86"],
        false,
    );
    assert!(r.stderr.contains("sm86"), "{}", r.stderr);
}

const LLM_HELDOUT: [&str; 2] = [
    "One day, a big dog found a red box in the garden.",
    "The sun was shining and the children were happy.",
];

/// Mean over the held-out prompts and positions of KL(unquantized || built), each position's next-token
/// distribution from a prefill of the prefix up to it through the built decoder graphs (last-position logits).
fn heldout_kl(onnx: &Path, reference: &Path) -> f64 {
    use trt_diff::pipelines::auto_precision::prefill;
    let tok =
        trt_diff::tokenizer::llama2c::Llama2cTokenizer::load(&shared_data("llm/tok512.bin"), 512)
            .unwrap();
    let open = |p: &Path| {
        trt_diff::pipelines::engines::open_file(
            &EngineFile::open(p).unwrap(),
            BackendChoice::Cpu,
            &Default::default(),
        )
        .unwrap()
    };
    let (mut q, mut r) = (open(onnx), open(reference));
    let log_probs = |e: &mut Box<dyn trt_diff::backend::Engine>, ids: &[i64]| -> Vec<f64> {
        let out = prefill(e.as_mut(), ids).unwrap();
        let l = out
            .iter()
            .find(|(n, _)| n == "logits")
            .unwrap()
            .1
            .to_f64()
            .unwrap();
        let m = l.iter().fold(f64::NEG_INFINITY, |a, b| a.max(*b));
        let lse = m + l.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        l.iter().map(|v| v - lse).collect()
    };
    let mut per_prompt = Vec::new();
    for p in LLM_HELDOUT {
        let mut ids = vec![1i64];
        ids.extend(tok.encode(p).iter().map(|&t| t as i64));
        let mut kl = 0.0;
        for t in 1..=ids.len() {
            let (a, b) = (log_probs(&mut r, &ids[..t]), log_probs(&mut q, &ids[..t]));
            kl += a
                .iter()
                .zip(&b)
                .map(|(x, y)| x.exp() * (x - y))
                .sum::<f64>();
        }
        per_prompt.push(kl / ids.len() as f64);
    }
    per_prompt.iter().sum::<f64>() / per_prompt.len() as f64
}

#[test]
fn llm_auto_precision_meets_its_budgets_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let model = shared_data("llm/stories260K.bin");
    let tok = shared_data("llm/tok512.bin");
    let out = |name: &str| dir.path().join(name).join("s.plan");
    let build = |name: &str, extra: &[&str], ok: bool| {
        let o = out(name);
        std::fs::create_dir_all(o.parent().unwrap()).unwrap();
        let mut args: Vec<&str> = vec![
            "build",
            s(&model),
            "--arch",
            "llama2c",
            "--tokenizer",
            s(&tok),
            "--onnx-only",
            "--out",
            s(&o),
            "--no-progress",
            "--calibration-prompt",
            "Once upon a time, there was a little girl named Lily.",
            "--calibration-prompt",
            "Tom and his mom went to the park to play with a ball.",
        ];
        for h in LLM_HELDOUT {
            args.extend(["--heldout-prompt", h]);
        }
        args.extend(extra);
        run(&args, ok)
    };
    build("ref", &["--precision", "fp32"], true);
    let r = build(
        "tight",
        &["--precision", "auto", "--quality", "0.002"],
        true,
    );
    assert!(r.stdout.contains("lm_head"), "{}", r.stdout);
    let tight_file = out("tight").with_extension("policy.toml");
    let tight = PolicyFile::read(&tight_file).unwrap();
    build(
        "loose",
        &["--policy", s(&tight_file), "--quality", "0.05"],
        true,
    );
    let loose_file = out("loose").with_extension("policy.toml");
    let loose = PolicyFile::read(&loose_file).unwrap();
    eprintln!(
        "tight: {} nvfp4 layers, {} weight bytes, KL {:.4}; loose: {} nvfp4, {} bytes, KL {:.4}",
        low_bit(&tight),
        tight.bytes().0,
        tight.measured_quality,
        low_bit(&loose),
        loose.bytes().0,
        loose.measured_quality
    );
    assert!(low_bit(&loose) > low_bit(&tight), "{:?}", tight.layers);
    assert!(loose.bytes().0 < tight.bytes().0 && tight.bytes().0 < tight.bytes().1);
    let reference = dir.path().join("ref/s.onnx");
    for (name, pf) in [("tight", &tight), ("loose", &loose)] {
        let kl = heldout_kl(&dir.path().join(name).join("s.onnx"), &reference);
        eprintln!("{name}: held-out mean KL {kl:.5} (budget {})", pf.quality);
        assert!(kl <= pf.quality, "{name}: {kl} > {}", pf.quality);
        assert!(
            (kl - pf.measured_quality).abs() < 1e-3 * pf.quality,
            "{kl} vs {pf:?}"
        );
    }
    build("again", &["--policy", s(&loose_file)], true);
    let graph = |n: &str| bytes_of(&dir.path().join(n).join("s.onnx"));
    assert!(
        graph("again") == graph("loose"),
        "--policy did not round-trip"
    );
    // A Flux policy is not this model's: its layers are named and the fix given.
    std::fs::write(
        dir.path().join("flux.toml"),
        std::fs::read_to_string(&loose_file)
            .unwrap()
            .replace("\"model.layers.0.mlp.up_proj\"", "\"proj_out\""),
    )
    .unwrap();
    let r = build(
        "bad",
        &["--policy", s(&dir.path().join("flux.toml"))],
        false,
    );
    assert!(
        r.stderr.contains("flux.toml") && r.stderr.contains("'proj_out'"),
        "{}",
        r.stderr
    );
    // Auto without a budget or a policy says what to give.
    let r = build("bad", &["--precision", "auto"], false);
    assert!(r.stderr.contains("--quality"), "{}", r.stderr);
}

/// A diffusers-layout folder of the committed tiny SD1.5 components (links), eps prediction.
fn sd_dir(root: &Path) -> PathBuf {
    let g = |rel: &str| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(rel)
    };
    let m = root.join("tiny-sd");
    std::fs::create_dir_all(m.join("scheduler")).unwrap();
    for (name, src) in [
        ("vae", g("sd/sd15/vae")),
        ("text_encoder", g("flux/text_encoder")),
        ("unet", g("sd/sd15/unet")),
    ] {
        std::os::unix::fs::symlink(&src, m.join(name)).unwrap();
    }
    std::fs::write(
        m.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"}"#,
    )
    .unwrap();
    m
}

/// The SD1.5 UNet on the same search: a sample of its layers (two transformer blocks, as `AutoOptions::layers`
/// allows for large models), the tight budget searched, the loose one re-chosen from its table; both verified
/// by rendering the built bundles against an fp32 one; `--policy` round-trips the UNet graph.
#[test]
fn sd_auto_precision_meets_its_budgets_and_round_trips() {
    use trt_diff::pipelines::auto_precision::AutoOptions;
    use trt_diff::pipelines::sd_build::{SdBuildOptions, build_sd};
    let dir = tempfile::tempdir().unwrap();
    let model = sd_dir(dir.path());
    let out = |name: &str| dir.path().join(name).join("sd.plan");
    let layers = vec![
        "down_blocks.0.attentions.0.*".to_string(),
        "up_blocks.2.attentions.2.*".to_string(),
    ];
    let build = |name: &str, precision: &str, auto: AutoOptions| {
        let o = out(name);
        std::fs::create_dir_all(o.parent().unwrap()).unwrap();
        build_sd(&SdBuildOptions {
            model: model.clone(),
            arch: Some("sd15".into()),
            precision: trt_diff::quant::Precision::parse(precision).unwrap(),
            clip_tokenizer: Some(shared_data("tokenizers/bpe_simple_vocab_16e6.txt.gz")),
            tae_decoder: None,
            image_px: Some([32, 32, 64]),
            calibration_prompts: Some(vec![CALIBRATION.into()]),
            calibration_steps: Some(2),
            calibration_backend: BackendChoice::Cpu,
            loras: vec![],
            lora_rank: 0,
            controlnet: None,
            smoothquant_alpha: None,
            auto: AutoOptions {
                heldout_prompts: HELDOUT.iter().map(|h| h.to_string()).collect(),
                layers: layers.clone(),
                ..auto
            },
            base: trt_diff::trt::BuildOptions {
                out: o,
                progress: false,
                onnx_only: true,
                ..Default::default()
            },
        })
    };
    build("ref", "fp32", AutoOptions::default()).unwrap();
    let tight_opts = AutoOptions {
        quality: Some(60.0),
        ..Default::default()
    };
    build("tight", "auto", tight_opts).unwrap();
    let tight_file = out("tight").with_extension("policy.toml");
    let tight = PolicyFile::read(&tight_file).unwrap();
    assert_eq!(tight.layers.len(), 24, "{:?}", tight.layers.keys());
    let loose_opts = AutoOptions {
        quality: Some(35.0),
        policy: Some(tight_file.clone()),
        ..Default::default()
    };
    build("loose", "auto", loose_opts).unwrap();
    let loose_file = out("loose").with_extension("policy.toml");
    let loose = PolicyFile::read(&loose_file).unwrap();
    let low = |pf: &PolicyFile| pf.layers.values().filter(|f| **f != Format::Keep).count();
    eprintln!(
        "tight: {} quantized ({} nvfp4), {} weight bytes, {:.1} dB; loose: {} quantized ({} nvfp4), {} bytes, \
         {:.1} dB; search {:.1}s",
        low(&tight),
        low_bit(&tight),
        tight.bytes().0,
        tight.measured_quality,
        low(&loose),
        low_bit(&loose),
        loose.bytes().0,
        loose.measured_quality,
        tight.search_seconds
    );
    assert!(low_bit(&loose) > low_bit(&tight), "{:?}", tight.layers);
    assert!(loose.bytes().0 < tight.bytes().0 && tight.bytes().0 < tight.bytes().1);
    let reference = out("ref").with_extension("plan.json");
    for (name, pf) in [("tight", &tight), ("loose", &loose)] {
        let psnr = sd_heldout_psnr(&out(name).with_extension("plan.json"), &reference);
        eprintln!("{name}: held-out PSNR {psnr:.2} dB (budget {})", pf.quality);
        assert!(psnr >= pf.quality, "{name}: {psnr} < {}", pf.quality);
        assert!(
            (psnr - pf.measured_quality).abs() < 1e-6,
            "{psnr} vs {pf:?}"
        );
    }
    let again = AutoOptions {
        policy: Some(loose_file.clone()),
        ..Default::default()
    };
    build("again", "fp32", again).unwrap();
    let graph = |n: &str| bytes_of(&dir.path().join(n).join("sd.unet.onnx"));
    assert!(
        graph("again") == graph("loose"),
        "--policy did not round-trip"
    );
    // A fixed precision with a policy is refused; a layer pattern matching nothing names the model's layers.
    let e = build(
        "bad",
        "fp8",
        AutoOptions {
            policy: Some(loose_file),
            ..Default::default()
        },
    )
    .err()
    .expect("fp8 with --policy is refused");
    assert!(e.to_string().contains("--policy"), "{e}");
    let shapes = [trt_diff::quant::auto::LinearShape {
        layer: "mid_block.attentions.0.proj_in".into(),
        out_features: 8,
        in_features: 8,
    }];
    let none = AutoOptions {
        layers: vec!["no_such_layer*".into()],
        ..Default::default()
    };
    let e = none.candidates(&shapes, None).unwrap_err();
    assert!(
        e.to_string().contains("mid_block.attentions.0.proj_in"),
        "{e}"
    );
}

/// [`heldout_psnr`] for SD bundles.
fn sd_heldout_psnr(engine: &Path, reference: &Path) -> f64 {
    let render = |e: &Path| -> Vec<Vec<u8>> {
        let ef = EngineFile::open(e).unwrap();
        let mut pipe = trt_diff::pipelines::sd::open_pipeline(&ef, BackendChoice::Cpu).unwrap();
        HELDOUT
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let req = ImageRequest {
                    prompt: p.to_string(),
                    steps: Some(2),
                    seed: 1000 + i as u64,
                    width: Some(32),
                    height: Some(32),
                    batch: 1,
                    cfg: 1.0,
                    strength: 1.0,
                    ..Default::default()
                };
                pipe.generate(&req, &mut |_| Ok(()))
                    .unwrap()
                    .images
                    .remove(0)
            })
            .collect()
    };
    psnr_of(&render(engine), &render(reference))
}

fn psnr_of(a: &[Vec<u8>], b: &[Vec<u8>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let mse = x
                .iter()
                .zip(y)
                .map(|(p, q)| ((*p as f64 - *q as f64) / 255.0).powi(2))
                .sum::<f64>()
                / x.len() as f64;
            -10.0 * mse.max(1e-30).log10()
        })
        .fold(f64::INFINITY, f64::min)
}

/// `--precision auto` on the DiT families (SD3.5, Z-Image-Turbo, FLUX.2 [klein]), through `build` as users run it:
/// the search meets its budget on the held-out prompt, `--auto-layers` limits it to a sample of the layers, the
/// policy file rebuilds the identical transformer graph, and the bundle generates.
#[test]
fn dit_families_choose_layers_by_measured_quality() {
    let dir = tempfile::tempdir().unwrap();
    let g = |rel: &str| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(rel)
    };
    let folder = |name: &str, links: &[(&str, PathBuf)]| -> PathBuf {
        let m = dir.path().join(name);
        for (dst, src) in links {
            let d = m.join(dst);
            std::fs::create_dir_all(d.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(src, d).unwrap();
        }
        m
    };
    let zimage = folder(
        "zimage",
        &[
            ("transformer", g("z_image/transformer")),
            ("text_encoder", g("z_image/text_encoder")),
            ("tokenizer", g("z_image/tokenizer")),
            ("scheduler", g("z_image/scheduler")),
            ("model_index.json", g("z_image/model_index.json")),
            ("vae", g("flux/pipeline/vae")),
        ],
    );
    let klein = folder(
        "klein",
        &[
            ("transformer", g("flux2/transformer")),
            ("text_encoder", g("flux2/text_encoder")),
            ("vae", g("flux2/vae")),
            ("scheduler", g("flux2/scheduler")),
            ("model_index.json", g("flux2/model_index.json")),
            ("tokenizer", g("z_image/tokenizer")),
        ],
    );
    let sd35 = folder(
        "sd35",
        &[
            ("transformer", g("sd35/transformer")),
            ("scheduler", g("sd35/scheduler")),
            ("model_index.json", g("sd35/model_index.json")),
            (
                "text_encoder/config.json",
                g("sd35/text_encoder/config.json"),
            ),
            (
                "text_encoder/text_projection.safetensors",
                g("sd35/text_encoder/text_projection.safetensors"),
            ),
            (
                "text_encoder/model.safetensors",
                g("flux/text_encoder/model.safetensors"),
            ),
            ("text_encoder_2", g("sd/sdxl/pipeline_text_encoder_2")),
            ("vae/config.json", g("sd35/vae/config.json")),
            (
                "vae/diffusion_pytorch_model.safetensors",
                g("flux/pipeline/vae/diffusion_pytorch_model.safetensors"),
            ),
        ],
    );
    let ct = shared_data("tokenizers/bpe_simple_vocab_16e6.txt.gz");
    // (folder, family extras, image sizes, the layer sample or "")
    let families: [(&Path, Vec<&str>, &str, &str); 3] = [
        (&zimage, vec![], "32,32,64", ""),
        (&klein, vec![], "32,32,64", "transformer_blocks.*"),
        (&sd35, vec!["--clip-tokenizer", s(&ct)], "16,32,32", ""),
    ];
    for (model, extra, px, sample) in families {
        let name = model.file_name().unwrap().to_string_lossy().to_string();
        let build = |tag: &str, more: &[&str]| {
            let out = dir.path().join(format!("{name}_{tag}")).join("m.plan");
            std::fs::create_dir_all(out.parent().unwrap()).unwrap();
            let mut args = vec![
                "build",
                s(model),
                "--onnx-only",
                "--image-px",
                px,
                "--calibration-prompt",
                CALIBRATION,
                "--calibration-steps",
                "2",
                "--heldout-prompt",
                HELDOUT[0],
                "--no-progress",
                "--out",
                s(&out),
            ];
            args.extend(&extra);
            args.extend(more);
            let r = run(&args, true);
            (out, r.stdout)
        };
        let mut auto = vec!["--precision", "auto", "--quality", "20"];
        if !sample.is_empty() {
            auto.extend(["--auto-layers", sample]);
        }
        let (plan, stdout) = build("auto", &auto);
        assert!(
            stdout.contains("auto precision") && stdout.contains("search"),
            "{name}: {stdout}"
        );
        let policy = plan.with_extension("policy.toml");
        let pf = PolicyFile::read(&policy).unwrap();
        assert!(
            pf.measured_quality >= 20.0,
            "{name}: {}",
            pf.measured_quality
        );
        assert!(
            pf.layers.values().any(|f| *f != Format::Keep),
            "{name}: {:?}",
            pf.layers
        );
        if !sample.is_empty() {
            let glob = glob::Pattern::new(sample).unwrap();
            assert!(
                pf.measured.iter().all(|m| glob.matches(&m.layer)),
                "{name}: {:?}",
                pf.measured
            );
        }
        let (replan, _) = build("policy", &["--policy", s(&policy)]);
        let transformer = |p: &Path| bytes_of(&p.with_file_name("m.transformer.onnx"));
        assert!(
            transformer(&plan) == transformer(&replan),
            "{name}: --policy rebuilt another graph"
        );
        let png = plan.with_file_name("out.png");
        let r = run(
            &[
                "generate",
                "--engine",
                s(&plan),
                "--prompt",
                HELDOUT[1],
                "--width",
                "32",
                "--height",
                "32",
                "--steps",
                "2",
                "--no-progress",
                "--backend",
                "cpu",
                "--out",
                s(&png),
            ],
            true,
        );
        assert!(
            r.stdout.contains("wrote") && png.exists(),
            "{name}: {}",
            r.stdout
        );
    }
}
