//! `cargo bench --bench sd_generate`: end-to-end text-to-image on the tiny random SDXL of tests/golden/sd (32x32,
//! 4 Euler steps with CFG 5 and a negative prompt: tokenize, CLIP-L + bigG, UNet x8, VAE decode, PNG) on the CPU
//! backend (ONNX Runtime). With TRT_DIFF_PEER_PYTHON set to a Python with torch and diffusers, the same run times
//! diffusers' StableDiffusionXLPipeline on the same weights and prompt (scripts/golden/sd_pipeline.py --bench) and
//! prints both.
use std::path::{Path, PathBuf};
use std::time::Instant;
use trt_diff::backend::BackendChoice;
use trt_diff::manifest::EngineFile;
use trt_diff::onnx::DataType;
use trt_diff::pipelines::engines::{OpenOptions, open_file};
use trt_diff::pipelines::image::{ImagePipeline, ImageRequest};
use trt_diff::pipelines::sd::{SdEngines, SdModel};
use trt_diff::pipelines::sd_build::{export_aux, onnx_path, plan};
use trt_diff::tokenizer::clip::ClipTokenizer;

const RUNS: usize = 10;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let golden = root.join("tests/golden");
    let vocab = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/data"))
        .join("tokenizers/bpe_simple_vocab_16e6.txt.gz");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sd_generate");
    let _ = std::fs::remove_dir_all(&dir);
    let model = dir.join("model");
    std::fs::create_dir_all(model.join("scheduler"))?;
    for (name, src) in [
        ("unet", golden.join("sd/sdxl/unet")),
        ("vae", golden.join("sd/sd15/vae")),
        ("text_encoder", golden.join("flux/text_encoder")),
        (
            "text_encoder_2",
            golden.join("sd/sdxl/pipeline_text_encoder_2"),
        ),
    ] {
        std::os::unix::fs::symlink(src, model.join(name))?;
    }
    std::fs::write(
        model.join("scheduler/scheduler_config.json"),
        r#"{"prediction_type": "epsilon"}"#,
    )?;
    let p = plan(&model, "sdxl", Some(&vocab))?;
    export_aux(&p, &dir, "sd", DataType::FLOAT, DataType::FLOAT)?;
    let unet_onnx = onnx_path(&dir, "sd", "unet");
    let ck = trt_diff::weights::safetensors_file::Checkpoint::open(&p.files.unet)?;
    trt_diff::models::unet::export(&p.unet, &ck, &Default::default(), &unet_onnx)?;
    let open = |path: &Path| {
        open_file(
            &EngineFile::open(path)?,
            BackendChoice::Cpu,
            &OpenOptions::default(),
        )
    };
    let mut tokenizers = Vec::new();
    let mut text_encoders = Vec::new();
    for spec in &p.config.text_encoders {
        let mut t = ClipTokenizer::load(&vocab)?;
        t.pad = spec.pad;
        tokenizers.push(t);
        text_encoders.push(open(&onnx_path(&dir, "sd", &spec.component))?);
    }
    let mut model = Some(SdModel::new(
        p.config.clone(),
        tokenizers,
        SdEngines {
            text_encoders,
            unet: open(&unet_onnx)?,
            vae_decoder: open(&onnx_path(&dir, "sd", "vae_decoder"))?,
            vae_encoder: None,
            tae_decoder: None,
        },
    ));
    let req = ImageRequest {
        prompt: "a watercolor painting of a fox in the snow, 4k".into(),
        negative_prompt: Some("blurry, low quality".into()),
        steps: Some(4),
        sampler: Some("euler".into()),
        scheduler: Some("normal".into()),
        width: Some(32),
        height: Some(32),
        cfg: 5.0,
        batch: 1,
        strength: 1.0,
        ..Default::default()
    };
    let png = dir.join("out.png");
    let mut once = || -> anyhow::Result<f64> {
        let t = Instant::now();
        // As diffusers' pipeline call does, the prompts are encoded every time: a fresh conditioning cache.
        let mut pipe = ImagePipeline::new(model.take().expect("returned after every run"));
        let r = pipe.generate(&req, &mut |_| Ok(()));
        model = Some(pipe.model);
        trt_diff::pipelines::image_io::write_png(&png, &r?.images[0], 32, 32, &[])?;
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
            .arg(root.join("scripts/golden/sd_pipeline.py"))
            .arg(golden.join("sd"))
            .args(["--bench", &RUNS.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().rev().find(|l| l.starts_with('{'));
        match line.and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            Some(v) => {
                let theirs = v["diffusers_seconds_median"].as_f64().unwrap_or(f64::NAN);
                println!(
                    "| diffusers StableDiffusionXLPipeline (torch CPU, {} threads) | {:.1} ms |",
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
