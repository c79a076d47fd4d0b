//! `build --precision auto --quality Q` (docs/precision.md) on the tiny Flux (tests/golden/flux) and on
//! stories260K: a loose budget quantizes more layers than a tight one, both hold on the held-out prompts as this
//! test measures them itself (the built graphs on the CPU backend against unquantized ones), `--policy FILE`
//! rebuilds the same graph, and bad policy files are clear errors.
mod common;
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
