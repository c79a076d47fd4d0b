//! Z-Image components against diffusers/transformers (golden files of scripts/golden/z_image.py, tiny random
//! configs): the ZImageTransformer2DModel graph, the Qwen3 text encoder graph (hidden_states[-2]) with the Qwen
//! tokenizer and chat template, and the 16-channel VAE decoder, on ONNX Runtime's CPU in f32.
use crate::common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::backend::{Engine, HostTensor};
use trt_diff::models::z_image::{self, ExportOptions, ZImageConfig, image_ids, text_ids};
use trt_diff::onnx::DataType;
use trt_diff::quant::LinearPrecision;
use trt_diff::quant::policy::Policy;
use trt_diff::weights::safetensors_file::Checkpoint;

/// Largest difference allowed, relative to the largest golden value.
const TOLERANCE: f64 = 1e-4;

fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/z_image")
        .join(rel)
}

fn io() -> HashMap<String, HostTensor> {
    golden_tensors(&golden("io.safetensors"))
}

fn run(onnx: &Path, inputs: Vec<(String, HostTensor)>) -> Vec<(String, HostTensor)> {
    let mut e = OrtEngine::open(onnx, &OrtOptions::default()).unwrap();
    e.run(&inputs).unwrap()
}

fn f32s(t: &HostTensor) -> Vec<f32> {
    t.to_f64().unwrap().into_iter().map(|v| v as f32).collect()
}

fn config() -> ZImageConfig {
    let p = golden("transformer/config.json");
    ZImageConfig::from_json(&std::fs::read_to_string(&p).unwrap(), &p).unwrap()
}

#[test]
fn transformer_matches_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let io = io();
    let cfg = config();
    assert_eq!((cfg.dim, cfg.n_layers, cfg.n_refiner_layers), (32, 2, 1));
    let ck = Checkpoint::open(&golden("transformer")).unwrap();
    let onnx = d.path().join("transformer.onnx");
    let layers = z_image::export(&cfg, &ck, &ExportOptions::default(), &onnx).unwrap();
    assert!(layers.counts.values().sum::<usize>() > 0);
    // Two images of 6x4 latents (6 tokens padded to 32), captions of 5 tokens (padded to 32).
    let lat = &io["transformer_latents"];
    let cap = &io["transformer_cap_feats"];
    let (h, w) = (lat.shape[2], lat.shape[3]);
    let cap_len = cap.shape[1];
    let inputs = vec![
        ("latents".to_string(), lat.clone()),
        ("timestep".to_string(), io["transformer_timestep"].clone()),
        ("cap_feats".to_string(), cap.clone()),
        (
            "img_ids".to_string(),
            HostTensor::from_f32(&[32, 3], &image_ids(h, w, 32)),
        ),
        (
            "txt_ids".to_string(),
            HostTensor::from_f32(&[32, 3], &text_ids(cap_len)),
        ),
    ];
    let out = run(&onnx, inputs);
    assert_eq!(out[0].0, "sample");
    let e = max_rel_err(&out[0].1, &io["transformer_sample"]);
    eprintln!("transformer: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
}

#[test]
fn quantized_transformers_export_with_the_family_policy() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config();
    let ck = Checkpoint::open(&golden("transformer")).unwrap();
    let opts = ExportOptions {
        precision: trt_diff::models::flux::FluxPrecision::Nvfp4,
        ..Default::default()
    };
    let layers = z_image::export(&cfg, &ck, &opts, &d.path().join("nvfp4.onnx")).unwrap();
    // q/k/v/out, w1 and w3 of the 4 blocks; w2 reads the 85-wide FFN activation, not a whole number of NVFP4's
    // 16-value blocks, so it stays high precision with the embedders (x, caption, 2 timestep), the 3 block
    // modulations, the final modulation and the final linear.
    assert_eq!(layers.counts.get("nvfp4"), Some(&24), "{:?}", layers.counts);
    assert_eq!(
        layers.counts.get("kept"),
        Some(&(4 + 9)),
        "{:?}",
        layers.counts
    );
    let g = z_image::graph(&cfg, &ck, &opts).unwrap();
    let nodes = &g.graph.as_ref().unwrap().node;
    assert!(nodes.iter().any(|n| n.op_type.contains("FP4")));
}

#[test]
fn text_encoder_matches_transformers_hidden_states() {
    let d = tempfile::tempdir().unwrap();
    let io = io();
    // The prompt as ZImagePipeline formats it: the chat template with one user turn and the generation prompt.
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden("tokenizer/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let template = tc["chat_template"].as_str().unwrap();
    let text = trt_diff::pipelines::z_image::format_prompt(
        template,
        "a watercolor painting of a fox in the snow, 4k",
    )
    .unwrap();
    let tok = trt_diff::tokenizer::qwen::QwenTokenizer::load(&golden("tokenizer/tokenizer.json"))
        .unwrap();
    let ids = tok.encode(&text).unwrap();
    let want: Vec<u32> = io["ids"]
        .to_f64()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    assert_eq!(ids, want, "token ids of {text:?}");
    let hf = trt_diff::weights::hf::load(&golden("text_encoder"), Some(512)).unwrap();
    assert_eq!(hf.arch, "qwen3");
    let c = &hf.config;
    let g = trt_diff::models::llama::encoder_graph(
        c,
        &hf.tensors,
        &Policy::uniform(LinearPrecision::F32),
        c.n_layers - 1,
    )
    .unwrap();
    let onnx = d.path().join("text_encoder.onnx");
    trt_diff::onnx::save(g, &onnx, &Default::default()).unwrap();
    let ids_t = trt_diff::pipelines::engines::ids_input("input_ids", &[1, ids.len()], &ids);
    let out = run(&onnx, vec![ids_t]);
    assert_eq!(out[0].0, "hidden_states");
    let got = HostTensor::from_f32(&out[0].1.shape[1..], &f32s(&out[0].1));
    let e = max_rel_err(&got, &io["hidden"]);
    eprintln!("text encoder: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
}

#[test]
fn vae_decoder_matches_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let io = io();
    let vae_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/flux/pipeline/vae");
    let ck = Checkpoint::open(&vae_dir).unwrap();
    let cfg = trt_diff::models::vae::VaeConfig::from_checkpoint(&ck).unwrap();
    assert_eq!(cfg.latent_channels, 16);
    let g = trt_diff::models::vae::graph(
        &cfg,
        &ck,
        trt_diff::models::vae::VaePart::Decoder,
        DataType::FLOAT,
    )
    .unwrap();
    let onnx = d.path().join("vae_decoder.onnx");
    trt_diff::onnx::save(g, &onnx, &Default::default()).unwrap();
    let e = OrtEngine::open(&onnx, &OrtOptions::default()).unwrap();
    let name = e.inputs()[0].name.clone();
    drop(e);
    let out = run(&onnx, vec![(name, io["vae_latent"].clone())]);
    let err = max_rel_err(&out[0].1, &io["vae_image"]);
    eprintln!("VAE decoder: max rel err {err:.2e}");
    assert!(err < TOLERANCE, "{err}");
}
