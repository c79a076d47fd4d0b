//! `cargo bench --bench flux_generate`: end-to-end text-to-image on the tiny random FLUX.1-dev of
//! tests/golden/flux (32x32, 4 Euler steps, 512 T5 tokens: tokenize, CLIP, T5, transformer x4, VAE decode, PNG)
//! on the CPU backend (ONNX Runtime). With TRT_DIFF_PEER_PYTHON set to a Python with torch and diffusers, the same
//! run times diffusers' FluxPipeline on the same weights and prompt (scripts/golden/flux_pipeline.py --bench) and
//! prints both. Target: 2x faster.
use std::path::{Path, PathBuf};
use std::time::Instant;
use trt_diff::backend::BackendChoice;
use trt_diff::manifest::EngineFile;
use trt_diff::onnx::DataType;
use trt_diff::pipelines::engines::{OpenOptions, open_file};
use trt_diff::pipelines::flux::{FluxEngines, FluxModel, load_clip_tokenizer};
use trt_diff::pipelines::flux_build::{
    ModelFiles, OnnxPaths, export_aux, export_transformer, plan,
};
use trt_diff::pipelines::image::{ImagePipeline, ImageRequest};

const RUNS: usize = 10;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let golden = root.join("tests/golden/flux");
    let data = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/data"))
        .join("tokenizers");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("flux_generate");
    let _ = std::fs::remove_dir_all(&dir);
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    for (name, src) in [
        ("transformer", golden.join("pipeline/transformer")),
        ("vae", golden.join("pipeline/vae")),
        ("text_encoder", golden.join("text_encoder")),
        ("text_encoder_2", golden.join("text_encoder_2")),
    ] {
        std::os::unix::fs::symlink(src, model.join(name))?;
    }
    let (ct, tt) = (
        data.join("bpe_simple_vocab_16e6.txt.gz"),
        data.join("t5_tokenizer.json"),
    );
    let p = plan(
        ModelFiles::find(&model, Some(&ct), Some(&tt))?,
        "flux-dev",
        None,
    )?;
    let paths = OnnxPaths::new(&dir, None);
    export_aux(&p, &paths, DataType::FLOAT, DataType::FLOAT)?;
    export_transformer(&p, &Default::default(), &paths.transformer)?;
    let open = |path: &Path| {
        open_file(
            &EngineFile::open(path)?,
            BackendChoice::Cpu,
            &OpenOptions::default(),
        )
    };
    let mut pipe = ImagePipeline::new(FluxModel::new(
        p.config.clone(),
        load_clip_tokenizer(&ct, p.config.clip_pad)?,
        trt_diff::tokenizer::t5::T5Tokenizer::load(&tt)?,
        FluxEngines {
            clip: open(&paths.clip)?,
            t5: open(&paths.t5)?,
            transformer: open(&paths.transformer)?,
            vae_decoder: open(&paths.vae_decoder)?,
            vae_encoder: None,
            tae_decoder: None,
            controlnet: None,
        },
    ));
    let req = ImageRequest {
        prompt: "a watercolor painting of a fox in the snow, 4k".into(),
        steps: Some(4),
        width: Some(32),
        height: Some(32),
        guidance: Some(3.5),
        cfg: 1.0,
        batch: 1,
        strength: 1.0,
        ..Default::default()
    };
    let png = dir.join("out.png");
    let mut once = || -> anyhow::Result<f64> {
        let t = Instant::now();
        let r = pipe.generate(&req, &mut |_| Ok(()))?;
        trt_diff::pipelines::image_io::write_png(&png, &r.images[0], 32, 32, &[])?;
        Ok(t.elapsed().as_secs_f64())
    };
    once()?; // warm-up
    let ours = median(
        (0..RUNS)
            .map(|_| once())
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    println!("| implementation | end-to-end generate (median of {RUNS}) |");
    println!("|---|---|");
    println!("| trt-diff (ONNX Runtime CPU) | {:.1} ms |", ours * 1e3);
    if let Ok(py) = std::env::var("TRT_DIFF_PEER_PYTHON") {
        let out = std::process::Command::new(py)
            .arg(root.join("scripts/golden/flux_pipeline.py"))
            .arg(&golden)
            .args(["--bench", &RUNS.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().rev().find(|l| l.starts_with('{'));
        match line.and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            Some(v) => {
                let theirs = v["diffusers_seconds_median"].as_f64().unwrap_or(f64::NAN);
                println!(
                    "| diffusers FluxPipeline (torch CPU, {} threads) | {:.1} ms |",
                    v["torch_threads"],
                    theirs * 1e3
                );
                println!("\nspeed-up: {:.2}x", theirs / ours);
            }
            None => eprintln!(
                "peer failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
        }
    } else {
        println!(
            "\n(set TRT_DIFF_PEER_PYTHON to a Python with torch + diffusers to time diffusers beside it)"
        );
    }
    Ok(())
}
