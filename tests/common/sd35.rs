//! The tiny SD3.5 model folder of the committed goldens (tests/golden/sd35, scripts/golden/sd35.py).
use std::path::{Path, PathBuf};
use trt_diff::pipelines::sd3_build::{ModelFiles, Plan, plan};

pub fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(rel)
}

/// A diffusers-layout SD3 folder of committed tiny components (links, no copies): CLIP-L is Flux's golden
/// CLIPTextModel plus the projection written by sd35.py, CLIP-G SDXL's golden CLIPTextModelWithProjection, T5
/// Flux's golden T5 (`t5: false` leaves it out), the VAE the Flux golden VAE with SD3's config.
pub fn model_dir(root_dir: &Path, transformer: &str, t5: bool) -> PathBuf {
    let m = root_dir.join("tiny-sd35");
    std::fs::create_dir_all(m.join("text_encoder")).unwrap();
    std::fs::create_dir_all(m.join("vae")).unwrap();
    let link = |src: PathBuf, dst: &str| std::os::unix::fs::symlink(src, m.join(dst)).unwrap();
    link(golden(&format!("sd35/{transformer}")), "transformer");
    link(golden("sd35/scheduler"), "scheduler");
    link(golden("sd35/model_index.json"), "model_index.json");
    link(
        golden("sd35/text_encoder/config.json"),
        "text_encoder/config.json",
    );
    link(
        golden("sd35/text_encoder/text_projection.safetensors"),
        "text_encoder/text_projection.safetensors",
    );
    link(
        golden("flux/text_encoder/model.safetensors"),
        "text_encoder/model.safetensors",
    );
    link(golden("sd/sdxl/pipeline_text_encoder_2"), "text_encoder_2");
    if t5 {
        link(golden("flux/text_encoder_2"), "text_encoder_3");
    }
    link(golden("sd35/vae/config.json"), "vae/config.json");
    link(
        golden("flux/pipeline/vae/diffusion_pytorch_model.safetensors"),
        "vae/diffusion_pytorch_model.safetensors",
    );
    m
}

/// The tiny folder's plan with T5 at the golden's 16 tokens.
pub fn tiny_plan(dir: &Path, transformer: &str, t5: bool, arch: &str) -> Plan {
    let clip_tok = super::shared_data("tokenizers/bpe_simple_vocab_16e6.txt.gz");
    let t5_tok = super::shared_data("tokenizers/t5_tokenizer.json");
    let files = ModelFiles::find(
        &model_dir(dir, transformer, t5),
        Some(&clip_tok),
        Some(&t5_tok),
        None,
    )
    .unwrap();
    let mut p = plan(files, arch).unwrap();
    p.config.max_sequence_length = 16;
    if let Some(t) = p.t5.as_mut() {
        t.max_len = 16;
    }
    p
}
