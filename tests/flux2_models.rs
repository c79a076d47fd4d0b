//! FLUX.2 [klein] components against diffusers/transformers (golden files of scripts/golden/flux2_klein.py, tiny
//! random configs): the Flux2Transformer2DModel graph, the Qwen3 text encoder graph (hidden states 9, 18, 27
//! stacked, prompts padded) with the Qwen tokenizer and chat template, the 32-channel AutoencoderKLFlux2 decoder and
//! encoder, on ONNX Runtime's CPU in f32; and taef2 previews of FLUX.2 latents (the real taef2 and its test vectors).
use crate::common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::backend::{Engine, HostTensor};
use trt_diff::models::flux2::{self, ExportOptions, Flux2Config};
use trt_diff::onnx::DataType;
use trt_diff::pipelines::flux2::{Flux2PipelineConfig, from_vae_latent, preview};
use trt_diff::pipelines::flux2_build::{ModelFiles, plan, text_encoder_graph};
use trt_diff::quant::LinearPrecision;
use trt_diff::weights::safetensors_file::Checkpoint;

/// Largest difference allowed, relative to the largest golden value.
const TOLERANCE: f64 = 1e-4;
const PROMPT: &str = "a watercolor painting of a fox in the snow, 4k";

fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/flux2")
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

fn config() -> Flux2Config {
    let p = golden("transformer/config.json");
    Flux2Config::from_json(&std::fs::read_to_string(&p).unwrap(), &p).unwrap()
}

/// A diffusers-layout FLUX.2 [klein] folder of the committed tiny components (the tokenizer is Z-Image's).
fn model_dir(root: &Path) -> PathBuf {
    let m = root.join("tiny-flux2-klein");
    std::fs::create_dir_all(&m).unwrap();
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/z_image/tokenizer");
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

#[test]
fn transformer_matches_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let io = io();
    let cfg = config();
    assert_eq!(
        (cfg.dim(), cfg.num_layers, cfg.num_single_layers),
        (32, 2, 2)
    );
    let ck = Checkpoint::open(&golden("transformer")).unwrap();
    let onnx = d.path().join("transformer.onnx");
    flux2::export(&cfg, &ck, &ExportOptions::default(), &onnx).unwrap();
    // The graph's positions are the pipeline's.
    let (h, w) = (3, 2);
    assert_eq!(
        f32s(&io["transformer_img_ids"]),
        flux2::image_ids(h, w),
        "image positions"
    );
    assert_eq!(f32s(&io["transformer_txt_ids"]), flux2::text_ids(5));
    let inputs = [
        "hidden_states",
        "encoder_hidden_states",
        "timestep",
        "img_ids",
        "txt_ids",
    ]
    .iter()
    .map(|n| (n.to_string(), io[&format!("transformer_{n}")].clone()))
    .collect();
    let out = run(&onnx, inputs);
    assert_eq!(out[0].0, "sample");
    let e = max_rel_err(&out[0].1, &io["transformer_sample"]);
    eprintln!("transformer: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
}

#[test]
fn quantized_transformers_export_with_the_family_policy() {
    let cfg = config();
    let ck = Checkpoint::open(&golden("transformer")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let opts = ExportOptions {
        precision: trt_diff::models::flux::FluxPrecision::Nvfp4,
        ..Default::default()
    };
    let onnx = d.path().join("nvfp4.onnx");
    let layers = flux2::export(&cfg, &ck, &opts, &onnx).unwrap();
    // One pass on the golden inputs: NVFP4 (E2M1, one mantissa bit) against diffusers' f32 output.
    let io = io();
    let inputs = [
        "hidden_states",
        "encoder_hidden_states",
        "timestep",
        "img_ids",
        "txt_ids",
    ]
    .iter()
    .map(|n| (n.to_string(), io[&format!("transformer_{n}")].clone()))
    .collect();
    let out = run(&onnx, inputs);
    let err = max_rel_err(&out[0].1, &io["transformer_sample"]);
    eprintln!("NVFP4 transformer: max rel err {err:.2e} against diffusers' f32");
    // An independent PyTorch simulation of ModelOpt's NVFP4 on this tiny random model moves the pass by 0.60 of
    // its largest value (tests/flux2_pipeline.rs, NVFP4_BOUND): quantized, and of that order.
    assert!(err > 1e-2 && err < 0.8, "{err}");
    let g = flux2::graph(&cfg, &ck, &opts).unwrap();
    let nodes = &g.graph.as_ref().unwrap().node;
    assert!(nodes.iter().any(|n| n.op_type.contains("FP4")));
    // Per double block q/k/v/out, add_q/k/v, to_add_out and the 4 feed-forward linears (12); per single block the
    // fused projection and to_out (2): 2 x 12 + 2 x 2 quantized. Kept: x/context embedders, 2 timestep linears, 3
    // modulations, norm_out, proj_out.
    assert_eq!(layers.counts.get("nvfp4"), Some(&28), "{layers:?}");
    assert_eq!(layers.counts.get("kept"), Some(&9), "{layers:?}");
}

#[test]
fn text_encoder_matches_transformers_hidden_states() {
    let d = tempfile::tempdir().unwrap();
    let io = io();
    let model = model_dir(d.path());
    let mut p = plan(ModelFiles::find(&model).unwrap(), "flux2-klein-4b").unwrap();
    assert_eq!(p.config.text_layers, vec![9, 18, 27]);
    assert_eq!(p.config.pad_token_id, 0, "<|endoftext|>");
    // The golden pads to 56 tokens (the pipeline's max_sequence_length).
    let want_ids: Vec<u32> = f32s(&io["text_ids"]).iter().map(|&v| v as u32).collect();
    p.config.max_sequence_length = want_ids.len();
    let text = trt_diff::pipelines::flux2::format_prompt(&p.config.chat_template, PROMPT).unwrap();
    assert!(text.ends_with("<think>\n\n</think>\n\n"), "{text:?}");
    let tok = trt_diff::tokenizer::qwen::QwenTokenizer::load(&p.files.tokenizer).unwrap();
    let mut ids = tok.encode(&text).unwrap();
    let n = ids.len();
    ids.resize(want_ids.len(), p.config.pad_token_id);
    assert_eq!(ids, want_ids, "token ids of {text:?}");
    let mask: Vec<u32> = (0..ids.len()).map(|i| (i < n) as u32).collect();
    assert_eq!(
        mask,
        f32s(&io["text_mask"])
            .iter()
            .map(|&v| v as u32)
            .collect::<Vec<_>>()
    );
    let onnx = d.path().join("text_encoder.onnx");
    let g = text_encoder_graph(&p, LinearPrecision::F32).unwrap();
    trt_diff::onnx::save(g, &onnx, &Default::default()).unwrap();
    let ids_in =
        |name: &str, v: &[u32]| trt_diff::pipelines::engines::ids_input(name, &[1, v.len()], v);
    let out = run(
        &onnx,
        vec![ids_in("input_ids", &ids), ids_in("attention_mask", &mask)],
    );
    assert_eq!(out[0].0, "hidden_states");
    assert_eq!(out[0].1.shape, vec![1, ids.len(), 48]);
    let got = HostTensor::from_f32(&out[0].1.shape[1..], &f32s(&out[0].1));
    // Every row, the padding tokens' included (the transformer attends to them).
    let e = max_rel_err(&got, &io["text_hidden"]);
    eprintln!("text encoder: max rel err {e:.2e}");
    assert!(e < TOLERANCE, "{e}");
}

#[test]
fn vae_matches_diffusers_autoencoderkl_flux2() {
    let d = tempfile::tempdir().unwrap();
    let io = io();
    let ck = Checkpoint::open(&golden("vae")).unwrap();
    let cfg = trt_diff::models::vae::VaeConfig::from_checkpoint(&ck).unwrap();
    assert_eq!((cfg.latent_channels, cfg.quant_conv), (32, true));
    for (part, input, want) in [
        (
            trt_diff::models::vae::VaePart::Decoder,
            "vae_latent",
            "vae_image",
        ),
        (
            trt_diff::models::vae::VaePart::Encoder,
            "vae_input",
            "vae_mean",
        ),
    ] {
        let g = trt_diff::models::vae::graph(&cfg, &ck, part, DataType::FLOAT).unwrap();
        let onnx = d.path().join(format!("{part:?}.onnx"));
        trt_diff::onnx::save(g, &onnx, &Default::default()).unwrap();
        let e = OrtEngine::open(&onnx, &OrtOptions::default()).unwrap();
        let name = e.inputs()[0].name.clone();
        drop(e);
        let out = run(&onnx, vec![(name, io[input].clone())]);
        let err = max_rel_err(&out[0].1, &io[want]);
        eprintln!("VAE {part:?}: max rel err {err:.2e}");
        assert!(err < TOLERANCE, "{part:?}: {err}");
    }
    // The bundle records the batch-norm statistics the pipeline normalizes with.
    let p = plan(
        ModelFiles::find(&model_dir(d.path())).unwrap(),
        "flux2-klein-4b",
    )
    .unwrap();
    let mean = f32s(&io["bn_mean"]);
    let var = f32s(&io["bn_var"]);
    for k in 0..128 {
        assert!((p.config.bn_mean[k] - mean[k]).abs() < 1e-6);
        assert!((p.config.bn_std[k] - (var[k] + 1e-4).sqrt()).abs() < 1e-6);
    }
}

#[test]
fn taef2_previews_flux2_latents() {
    let data = shared_data("taef2");
    let npy = |n: &str| trt_diff::backend::npy::read(&data.join(n)).unwrap();
    let latent = npy("testvec_latent_1x32x16x16.npy");
    let decoded = npy("testvec_decoded_1x3x128x128.npy");
    let d = tempfile::tempdir().unwrap();
    let onnx = trt_diff::models::taesd::export_file(
        &data.join("taef2_decoder.safetensors"),
        trt_diff::models::taesd::TaeKind::Decoder,
        d.path(),
    )
    .unwrap();
    let mut tae: Box<dyn Engine> =
        Box::new(OrtEngine::open(&onnx, &OrtOptions::default()).unwrap());
    // Sampler latents as the pipeline holds them: the raw latent patchified and normalized by the VAE's batch-norm
    // statistics (arbitrary ones here); the preview must undo both before taef2.
    let c = Flux2PipelineConfig {
        latent_channels: 32,
        bn_mean: (0..128).map(|k| (k as f32 * 0.37).sin()).collect(),
        bn_std: (0..128).map(|k| 0.5 + (k % 7) as f32 * 0.25).collect(),
        ..tiny_config()
    };
    let x = from_vae_latent(&f32s(&latent), &c, 1, 8, 8);
    let (rgb, w, h) = preview(tae.as_mut(), &c, &x, 8, 8).unwrap();
    assert_eq!((w, h), (128, 128));
    let want = f32s(&decoded);
    let mut err = 0f64;
    for px in 0..w * h {
        for ch in 0..3 {
            let v = want[ch * w * h + px].clamp(0.0, 1.0) as f64;
            err = err.max((rgb[px * 3 + ch] as f64 / 255.0 - v).abs());
        }
    }
    eprintln!("taef2 preview: max abs err {err:.2e} (of 1.0)");
    assert!(err < 1.0 / 255.0, "{err}");
}

fn tiny_config() -> Flux2PipelineConfig {
    let d = tempfile::tempdir().unwrap();
    plan(
        ModelFiles::find(&model_dir(d.path())).unwrap(),
        "flux2-klein-4b",
    )
    .unwrap()
    .config
}
