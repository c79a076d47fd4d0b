//! SD3.5 components against diffusers/transformers (golden files of scripts/golden/sd35.py, tiny random configs)
//! on ONNX Runtime's CPU in f32: the SD3Transformer2DModel graph with MMDiT-X dual attention (medium) and without
//! (large), both with qk RMSNorm, with skipped layers; the text conditioning of StableDiffusion3Pipeline's
//! encode_prompt with and without T5; the 16-channel VAE decoder; quantized exports.
use crate::common;
use common::sd35::tiny_plan;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::backend::{Engine, HostTensor};
use trt_diff::models::flux::FluxPrecision;
use trt_diff::models::sd3::{self, ExportOptions, Sd3Config};
use trt_diff::pipelines::image::ImageModel;
use trt_diff::pipelines::sd3_build::{OnnxPaths, export_aux, open_model};
use trt_diff::weights::safetensors_file::Checkpoint;

/// Largest difference allowed, relative to the largest golden value.
const TOLERANCE: f64 = 1e-4;
const PROMPT: &str = "a watercolor painting of a fox in the snow, 4k";

fn root(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(rel)
}

fn io() -> HashMap<String, HostTensor> {
    golden_tensors(&root("sd35/io.safetensors"))
}

fn config(name: &str) -> Sd3Config {
    let p = root(&format!("sd35/{name}/config.json"));
    Sd3Config::from_json(&std::fs::read_to_string(&p).unwrap(), &p).unwrap()
}

fn run(onnx: &Path, inputs: Vec<(String, HostTensor)>) -> Vec<(String, HostTensor)> {
    let mut e = OrtEngine::open(onnx, &OrtOptions::default()).unwrap();
    e.run(&inputs).unwrap()
}

/// Runs the `name` transformer (golden folder) on the golden inputs with `skip` flags; returns diffusers' error.
fn transformer_err(name: &str, prefix: &str, skip: &[f32], want: &str) -> f64 {
    let d = tempfile::tempdir().unwrap();
    let io = io();
    let cfg = config(name);
    let ck = Checkpoint::open(&root(&format!("sd35/{name}"))).unwrap();
    let onnx = d.path().join("transformer.onnx");
    let layers = sd3::export(&cfg, &ck, &ExportOptions::default(), &onnx).unwrap();
    assert!(layers.counts.values().sum::<usize>() > 0);
    let inputs = vec![
        ("latents".to_string(), io["transformer_latents"].clone()),
        ("timestep".to_string(), io["transformer_timestep"].clone()),
        (
            "encoder_hidden_states".to_string(),
            io[&format!("{prefix}_context")].clone(),
        ),
        (
            "pooled_projections".to_string(),
            io["transformer_pooled"].clone(),
        ),
        (
            "skip_layers".to_string(),
            HostTensor::from_f32(&[skip.len()], skip),
        ),
    ];
    let out = run(&onnx, inputs);
    assert_eq!(out[0].0, "sample");
    max_rel_err(&out[0].1, &io[want])
}

#[test]
fn medium_transformer_with_dual_attention_matches_diffusers() {
    let cfg = config("transformer");
    assert!(cfg.is_medium());
    assert_eq!(cfg.qk_norm.as_deref(), Some("rms_norm"));
    let e = transformer_err("transformer", "medium", &[0.0; 3], "medium_sample");
    eprintln!("medium transformer: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
    // Skip-layer guidance's call: block 1 skipped.
    let e = transformer_err(
        "transformer",
        "medium",
        &[0.0, 1.0, 0.0],
        "medium_skip_sample",
    );
    eprintln!("medium transformer, block 1 skipped: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
}

#[test]
fn large_transformer_matches_diffusers() {
    let cfg = config("transformer_large");
    assert!(!cfg.is_medium());
    let e = transformer_err("transformer_large", "large", &[0.0; 3], "large_sample");
    eprintln!("large transformer: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
}

#[test]
fn quantized_transformers_export_with_the_family_policy() {
    let cfg = config("transformer");
    let ck = Checkpoint::open(&root("sd35/transformer")).unwrap();
    let opts = ExportOptions {
        precision: FluxPrecision::Nvfp4,
        ..Default::default()
    };
    let g = sd3::graph(&cfg, &ck, &opts).unwrap();
    let nodes = &g.graph.as_ref().unwrap().node;
    assert!(nodes.iter().any(|n| n.op_type.contains("FP4")));
    let d = tempfile::tempdir().unwrap();
    let layers = sd3::export(&cfg, &ck, &opts, &d.path().join("nvfp4.onnx")).unwrap();
    // Quantized: q/k/v/out + add_q/k/v (+ to_add_out) and both FFs of the 16-wide blocks: block 0 (dual) has
    // attn2's four more; block 2 (context_pre_only) no to_add_out nor ff_context. Kept: 4 embedder linears, the
    // context embedder, 3 + 3 modulations, norm_out, proj_out.
    let quantized = (7 + 1 + 4 + 4) + (7 + 1 + 4) + (7 + 2);
    assert_eq!(layers.counts.get("nvfp4"), Some(&quantized), "{layers:?}");
    assert_eq!(
        layers.counts.get("kept"),
        Some(&(4 + 1 + 6 + 2)),
        "{layers:?}"
    );
}

fn text_err(transformer: &str, t5: bool, arch: &str, prefix: &str) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_plan(dir.path(), transformer, t5, arch);
    let paths = OnnxPaths::new(dir.path(), None);
    let f32t = trt_diff::onnx::DataType::FLOAT;
    export_aux(&p, &paths, f32t, f32t).unwrap();
    // The transformer is not run: any graph opens in its place.
    let mut m = open_model(
        &p,
        &paths,
        &paths.vae_decoder,
        trt_diff::backend::BackendChoice::Cpu,
    )
    .unwrap();
    let c = m.encode_prompt(PROMPT).unwrap();
    let io = io();
    let want = &io[&format!("{prefix}_prompt_embeds")];
    assert_eq!(c.seq, want.shape[1]);
    let got = HostTensor::from_f32(&want.shape, &c.embeds);
    let pooled = HostTensor::from_f32(&[1, c.pooled.len()], &c.pooled);
    (
        max_rel_err(&got, want),
        max_rel_err(&pooled, &io[&format!("{prefix}_pooled")]),
    )
}

#[test]
fn text_conditioning_matches_diffusers_encode_prompt() {
    // CLIP-L | CLIP-G (16 wide) cut to T5's 8, then 16 T5 rows.
    let (e, ep) = text_err("transformer", true, "sd35-medium", "text_t5");
    eprintln!("prompt_embeds with T5: max rel err {e:.2e}; pooled {ep:.2e}");
    assert!(e < TOLERANCE && ep < TOLERANCE, "{e} {ep}");
    // Without T5: CLIP-L | CLIP-G zero-padded to the transformer's 24, then 16 zero rows.
    let (e, ep) = text_err("transformer_large", false, "sd35-large", "text_clip");
    eprintln!("prompt_embeds without T5: max rel err {e:.2e}; pooled {ep:.2e}");
    assert!(e < TOLERANCE && ep < TOLERANCE, "{e} {ep}");
}

#[test]
fn vae_decoder_matches_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let io = io();
    let ck = Checkpoint::open(&root("flux/pipeline/vae")).unwrap();
    let cfg = trt_diff::models::vae::VaeConfig::from_checkpoint(&ck).unwrap();
    assert_eq!(cfg.latent_channels, 16);
    let g = trt_diff::models::vae::graph(
        &cfg,
        &ck,
        trt_diff::models::vae::VaePart::Decoder,
        trt_diff::onnx::DataType::FLOAT,
    )
    .unwrap();
    let onnx = d.path().join("vae_decoder.onnx");
    trt_diff::onnx::save(g, &onnx, &Default::default()).unwrap();
    let out = run(&onnx, vec![("latent".into(), io["vae_latent"].clone())]);
    let err = max_rel_err(&out[0].1, &io["vae_image"]);
    eprintln!("VAE decoder: max rel err {err:.2e}");
    assert!(err < TOLERANCE, "{err}");
}

/// The single file's MMDiT, renamed to diffusers' names (qkv split, AdaLN halves swapped back), is the folder's
/// transformer tensor for tensor, and its config read off the weights is the folder's config.json; T5's config
/// read off its weights is its config.json.
#[test]
fn single_file_layout_maps_onto_the_diffusers_transformer() {
    let file = Checkpoint::open(&root("sd35/single_file.safetensors")).unwrap();
    let prefix = sd3::original_prefix(&file).unwrap();
    assert_eq!(prefix, "model.diffusion_model.");
    let view = sd3::diffusers_view(&file, &prefix).unwrap();
    let folder = Checkpoint::open(&root("sd35/transformer")).unwrap();
    let names = |ck: &Checkpoint| ck.names().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(names(&view), names(&folder));
    for n in folder.names() {
        let (a, b) = (view.get(n).unwrap(), folder.get(n).unwrap());
        assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "{n}");
        assert_eq!(a.data, b.data, "{n}");
    }
    let cfg_path = root("sd35/transformer/config.json");
    let want =
        Sd3Config::from_json(&std::fs::read_to_string(&cfg_path).unwrap(), &cfg_path).unwrap();
    assert_eq!(Sd3Config::from_checkpoint(&view).unwrap(), want);
    let t5_dir = root("flux/text_encoder_2");
    let t5_want = trt_diff::models::t5::T5Config::from_json(
        &std::fs::read_to_string(t5_dir.join("config.json")).unwrap(),
        16,
    )
    .unwrap();
    let t5_got =
        trt_diff::models::t5::T5Config::from_checkpoint(&Checkpoint::open(&t5_dir).unwrap(), 16)
            .unwrap();
    assert_eq!(t5_got, t5_want);
}

/// The synthetic-checkpoint shape list (the export benchmark's) names every tensor of diffusers' checkpoints with
/// its shape, for both the medium-like (dual attention) and the large-like config.
#[test]
fn tensor_shapes_list_every_diffusers_tensor() {
    for dir in ["sd35/transformer", "sd35/transformer_large"] {
        let cfg_path = root(dir).join("config.json");
        let cfg =
            Sd3Config::from_json(&std::fs::read_to_string(&cfg_path).unwrap(), &cfg_path).unwrap();
        let ck = Checkpoint::open(&root(dir)).unwrap();
        let mut want: Vec<(String, Vec<usize>)> = ck
            .names()
            .map(|n| (n.to_string(), ck.shape(n).unwrap().to_vec()))
            .collect();
        let mut got = cfg.tensor_shapes();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{dir}");
    }
}
