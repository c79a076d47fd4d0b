//! Stable Diffusion models against diffusers/transformers: tiny random UNet2DConditionModel (SD1.5-like and
//! SDXL-like, diffusers folder and single-file CompVis/SGM layout), the 4-channel AutoencoderKL and the CLIP-L /
//! OpenCLIP-bigG text encoders, exported by our emitters and run on ONNX Runtime, compared with the golden
//! outputs of scripts/golden/sd_models.py.
use crate::common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::backend::{Engine, HostTensor};
use trt_diff::models::unet::{self, UNetConfig, UNetExportOptions, UNetLayout};
use trt_diff::onnx::DataType;
use trt_diff::weights::safetensors_file::Checkpoint;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/sd")
        .join(name)
}

/// Golden tensors by name, those starting with `prefix` with the prefix removed.
fn io(file: &str, prefix: &str) -> HashMap<String, HostTensor> {
    let ck = Checkpoint::open(&golden(file)).unwrap();
    ck.names()
        .filter_map(|n| {
            let key = n.strip_prefix(prefix)?;
            // The unprefixed set must not take the prefixed ones too.
            if prefix.is_empty() && n.starts_with("small_") {
                return None;
            }
            let t = ck.get(n).unwrap();
            let host = match t.dtype {
                DataType::INT64 => HostTensor {
                    dtype: DataType::INT64,
                    shape: t.shape.clone(),
                    data: t.data.to_vec(),
                },
                _ => HostTensor::from_f32(&t.shape, &t.to_f32().unwrap()),
            };
            Some((key.to_string(), host))
        })
        .collect()
}

fn run(onnx: &Path, inputs: &HashMap<String, HostTensor>) -> HashMap<String, HostTensor> {
    let mut e = OrtEngine::open(onnx, &OrtOptions::default()).unwrap();
    let given: Vec<(String, HostTensor)> = e
        .inputs()
        .iter()
        .map(|d| (d.name.clone(), inputs[&d.name].clone()))
        .collect();
    e.run(&given).unwrap().into_iter().collect()
}

fn unet_config_json(model: &str) -> String {
    std::fs::read_to_string(golden(&format!("{model}/unet/config.json"))).unwrap()
}

#[test]
fn unet_matches_diffusers_in_both_layouts() {
    let d = tempfile::tempdir().unwrap();
    for model in ["sd15", "sdxl"] {
        let ios = [
            io(&format!("{model}_unet_io.safetensors"), ""),
            io(&format!("{model}_unet_io.safetensors"), "small_"),
        ];
        let folder = Checkpoint::open(&golden(&format!("{model}/unet"))).unwrap();
        let from_folder = UNetConfig::from_checkpoint(&folder).unwrap();
        assert_eq!(from_folder.layout, UNetLayout::Diffusers);
        // The single file has no config.json beside it: the tiny model's 2 GroupNorm groups and head counts come
        // from the diffusers config (real checkpoints use the defaults: 32 groups, SD/SDXL heads).
        let single = Checkpoint::open(&golden(&format!("{model}_single.safetensors"))).unwrap();
        let from_single =
            UNetConfig::from_checkpoint_and_json(&single, Some(&unet_config_json(model))).unwrap();
        assert_eq!(from_single.layout, UNetLayout::Original);
        assert_eq!(from_single.prefix, "model.diffusion_model.");
        let strip = |c: &UNetConfig| UNetConfig {
            layout: UNetLayout::Diffusers,
            prefix: String::new(),
            ..c.clone()
        };
        assert_eq!(strip(&from_single), strip(&from_folder), "{model}");
        assert_eq!(from_folder.added.is_some(), model == "sdxl");
        for (tag, cfg, ck) in [
            ("diffusers", &from_folder, &folder),
            ("single-file", &from_single, &single),
        ] {
            let out = d.path().join(format!("{model}_{tag}.onnx"));
            unet::export(cfg, ck, &UNetExportOptions::default(), &out).unwrap();
            for io in &ios {
                let got = run(&out, io);
                let err = max_rel_err(&got["model_output"], &io["model_output"]);
                println!(
                    "{model} {tag} {:?}: max rel err {err:.2e}",
                    io["model_output"].shape
                );
                assert!(err < 1e-4, "{model} {tag}: {err}");
            }
        }
    }
}

fn save(model: trt_diff::onnx::proto::ModelProto, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    trt_diff::onnx::save(model, &out, &trt_diff::onnx::SaveOptions::default()).unwrap();
    out
}

#[test]
fn vae_matches_diffusers() {
    use trt_diff::models::vae::{self, VaeConfig, VaePart};
    let d = tempfile::tempdir().unwrap();
    let io = io("vae_io.safetensors", "");
    let ck = Checkpoint::open(&golden("sd15/vae")).unwrap();
    let cfg = VaeConfig::from_checkpoint(&ck).unwrap();
    assert_eq!((cfg.latent_channels, cfg.quant_conv), (4, true));
    let dec = vae::graph(&cfg, &ck, VaePart::Decoder, DataType::FLOAT).unwrap();
    let dec = save(dec, d.path(), "dec.onnx");
    let got = run(
        &dec,
        &HashMap::from([("latent".into(), io["latent"].clone())]),
    );
    let err = max_rel_err(&got["image"], &io["decoded"]);
    println!("decoder: max rel err {err:.2e}");
    assert!(err < 1e-4, "{err}");
    let enc = vae::graph(&cfg, &ck, VaePart::Encoder, DataType::FLOAT).unwrap();
    let enc = save(enc, d.path(), "enc.onnx");
    let got = run(
        &enc,
        &HashMap::from([("image".into(), io["image"].clone())]),
    );
    for (ours, theirs) in [("mean", "mean"), ("logvar", "logvar")] {
        let err = max_rel_err(&got[ours], &io[theirs]);
        println!("encoder {ours}: max rel err {err:.2e}");
        assert!(err < 1e-4, "{ours}: {err}");
    }
}

#[test]
fn text_encoders_match_transformers_in_both_layouts() {
    use trt_diff::models::clip::{self, ClipOptions, ClipTextConfig};
    let d = tempfile::tempdir().unwrap();
    let io = io("text_io.safetensors", "");
    let json = |p: &str| std::fs::read_to_string(golden(p)).unwrap();
    let l_cfg = ClipTextConfig::from_json(&json("sd15/text_encoder/config.json")).unwrap();
    let g_cfg = ClipTextConfig::from_json(&json("sdxl/text_encoder_2/config.json")).unwrap();
    let single = golden("sdxl_text_single.safetensors");
    let cases = [
        // (what, checkpoint, scope, config, ids, outputs: ours -> golden)
        (
            "CLIP-L folder",
            golden("sd15/text_encoder"),
            "",
            &l_cfg,
            "input_ids",
            "l_",
        ),
        (
            "CLIP-L single",
            single.clone(),
            "conditioner.embedders.0.",
            &l_cfg,
            "input_ids",
            "l_",
        ),
        (
            "bigG folder",
            golden("sdxl/text_encoder_2"),
            "",
            &g_cfg,
            "input_ids_g",
            "g_",
        ),
        (
            "bigG OpenCLIP single",
            single,
            "conditioner.embedders.1.",
            &g_cfg,
            "input_ids_g",
            "g_",
        ),
    ];
    for (i, (what, path, scope, cfg, ids, golden_prefix)) in cases.into_iter().enumerate() {
        let ck = Checkpoint::open(&path).unwrap();
        // Read off the weights, the tiny models differ from the real ones only in head count (64-wide heads).
        let inferred = ClipTextConfig::from_checkpoint(&ck, scope, 0).unwrap();
        assert_eq!(
            ClipTextConfig {
                num_attention_heads: cfg.num_attention_heads,
                hidden_act: cfg.hidden_act.clone(),
                ..inferred
            },
            *cfg,
            "{what}"
        );
        let bigg = golden_prefix == "g_";
        let opts = ClipOptions {
            scope: scope.into(),
            penultimate: true,
            projection: bigg,
        };
        let onnx = save(
            clip::graph_with(cfg, &ck, DataType::FLOAT, &opts).unwrap(),
            d.path(),
            &format!("{i}.onnx"),
        );
        let got = run(
            &onnx,
            &HashMap::from([("input_ids".into(), io[ids].clone())]),
        );
        let mut pairs = vec![
            ("last_hidden_state", "last_hidden_state"),
            ("penultimate_hidden_state", "penultimate"),
        ];
        pairs.push(if bigg {
            ("text_embeds", "text_embeds")
        } else {
            ("pooler_output", "pooled")
        });
        for (ours, theirs) in pairs {
            let err = max_rel_err(&got[ours], &io[&format!("{golden_prefix}{theirs}")]);
            println!("{what} {ours}: max rel err {err:.2e}");
            assert!(err < 1e-4, "{what} {ours}: {err}");
        }
    }
    // A CLIPTextModel has no projection to give.
    let ck = Checkpoint::open(&golden("sd15/text_encoder")).unwrap();
    let opts = ClipOptions {
        projection: true,
        ..Default::default()
    };
    let e = clip::graph_with(&l_cfg, &ck, DataType::FLOAT, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no text projection"), "{e}");
}

/// FP8 (calibrated on the golden inputs, as the bundle build calibrates through the sampler loop), NVFP4 and f16
/// UNets: CPU emulation within stated bounds of diffusers' f32 output, and TensorRT-RTX builds each.
#[test]
fn quantized_and_half_unets_stay_close_and_build_with_tensorrt() {
    use trt_diff::quant::LinearPrecision;
    use trt_diff::trt::{BuildOptions, TrtChoice, build_engine};
    let d = tempfile::tempdir().unwrap();
    let io = io("sdxl_unet_io.safetensors", "");
    let ck = Checkpoint::open(&golden("sdxl/unet")).unwrap();
    let cfg = UNetConfig::from_checkpoint(&ck).unwrap();
    let calib = d.path().join("calib.onnx");
    let opts = UNetExportOptions {
        calibration: true,
        ..Default::default()
    };
    unet::export(&cfg, &ck, &opts, &calib).unwrap();
    let out: Vec<(String, HostTensor)> = run(&calib, &io).into_iter().collect();
    let mut amax = HashMap::new();
    trt_diff::models::qdq::merge_amax(&mut amax, &out);
    assert!(amax.contains_key("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"));
    assert!(!amax.contains_key("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"));
    // (what, options, bound on max |err| / max |ref|): FP8 E4M3 keeps 3 mantissa bits, NVFP4 (E2M1) 1.
    let cases = [
        (
            "fp8",
            UNetExportOptions {
                quantize: Some(LinearPrecision::Fp8),
                amax: amax.clone(),
                ..Default::default()
            },
            0.05,
        ),
        (
            "nvfp4",
            UNetExportOptions {
                quantize: Some(LinearPrecision::Nvfp4),
                ..Default::default()
            },
            0.15,
        ),
        (
            "fp16",
            UNetExportOptions {
                compute: DataType::FLOAT16,
                ..Default::default()
            },
            2e-2,
        ),
    ];
    for (what, opts, bound) in cases {
        let onnx = d.path().join(format!("{what}.onnx"));
        let report = unet::export(&cfg, &ck, &opts, &onnx).unwrap();
        let got = run(&onnx, &io);
        let err = max_rel_err(&got["model_output"], &io["model_output"]);
        println!(
            "{what}: max rel err vs f32 diffusers {err:.3e}, layers {:?}",
            report.layers
        );
        assert!(err < bound, "{what}: {err}");
        assert!(err > 1e-6, "{what}: no reduced precision happened? {err}");
        if opts.quantize.is_some() {
            assert!(
                report.layers.get(what).copied().unwrap_or(0) > 0,
                "{what}: {:?}",
                report.layers
            );
            // Time embeddings stay high.
            assert!(report.layers["kept"] >= 4, "{:?}", report.layers);
        }
        let plan = d.path().join(format!("{what}.plan"));
        let o = build_engine(&BuildOptions {
            onnx: onnx.clone(),
            out: plan.clone(),
            trt: TrtChoice::Rtx,
            shapes: unet::profile(&cfg, [1, 2, 2], [4, 8, 16], [1, 1, 2]),
            ..Default::default()
        })
        .unwrap();
        assert!(o.manifest.builder.as_ref().unwrap().layers > 0);
        println!(
            "{what}: TensorRT-RTX built {} bytes, {} layers",
            std::fs::metadata(&plan).unwrap().len(),
            o.manifest.builder.as_ref().unwrap().layers
        );
    }
}

/// A single-file SGM checkpoint assembled from the golden pieces (UNet under `model.diffusion_model.`, CLIP-L and
/// OpenCLIP-bigG under `conditioner.embedders.0/1.`, the VAE under `first_stage_model.`): the arch is read off it,
/// the tokenizer is asked for, and components that do not fit together are named.
#[test]
fn single_files_are_recognised_and_checked() {
    use trt_diff::pipelines::sd_build::{detect_arch, plan};
    let d = tempfile::tempdir().unwrap();
    let mut tensors: Vec<(String, trt_diff::weights::safetensors_file::Tensor)> = Vec::new();
    for (file, prefix) in [
        ("sdxl_single.safetensors", ""),
        ("sdxl_text_single.safetensors", ""),
        ("sd15/vae", "first_stage_model."),
    ] {
        let ck = Checkpoint::open(&golden(file)).unwrap();
        for n in ck.names() {
            tensors.push((format!("{prefix}{n}"), ck.get(n).unwrap()));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, t)| {
            let dtype = match t.dtype {
                DataType::BFLOAT16 => safetensors::Dtype::BF16,
                DataType::FLOAT16 => safetensors::Dtype::F16,
                _ => safetensors::Dtype::F32,
            };
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    let file = d.path().join("tiny-sdxl.safetensors");
    safetensors::serialize_to_file(views, None, &file).unwrap();
    assert_eq!(detect_arch(&file).unwrap(), "sdxl");
    let e = plan(&file, "sdxl", None).err().unwrap().to_string();
    assert!(e.contains("--clip-tokenizer"), "{e}");
    let vocab = d.path().join("merges.txt");
    std::fs::write(&vocab, "#version: 0.2\n").unwrap();
    // What the tiny UNet's weights do not hold (4-wide time-id embeddings) needs its config.json beside it.
    let e = plan(&file, "sdxl", Some(&vocab)).err().unwrap().to_string();
    assert!(
        e.contains("give the diffusers config.json beside the weights"),
        "{e}"
    );
    std::fs::copy(
        golden("sdxl/unet/config.json"),
        d.path().join("config.json"),
    )
    .unwrap();
    // The golden text encoders (16 + 12 wide) are not the pair this tiny UNet was made for (16 wide).
    let e = plan(&file, "sdxl", Some(&vocab)).err().unwrap().to_string();
    assert!(
        e.contains("do not fit together") && e.contains("16 + 12"),
        "{e}"
    );
    // A UNet with added embeddings is not SD1.5; a CLIP checkpoint is not a UNet.
    let e = plan(&file, "sd15", Some(&vocab)).err().unwrap().to_string();
    assert!(
        e.contains("added time/text embedding") || e.contains("lacks"),
        "{e}"
    );
    let ck = Checkpoint::open(&golden("sdxl_text_single.safetensors")).unwrap();
    let e = UNetConfig::from_checkpoint(&ck).unwrap_err().to_string();
    assert!(e.contains("not a Stable Diffusion UNet checkpoint"), "{e}");
}

/// The CUDA path's attention fusion on the UNet's self- and cross-attention (`ops::attention`: heads split by
/// Reshape/Transpose, the key transposed from [batch, seq, heads, head_dim]): the fused graph, run on ONNX Runtime's
/// CPU MultiHeadAttention, still matches diffusers.
#[test]
fn fused_unet_attention_keeps_the_results() {
    use trt_diff::onnx::attention_fusion::fuse_attention;
    use trt_diff::onnx::{OnnxFile, SaveOptions, save};
    let d = tempfile::tempdir().unwrap();
    let io = io("sdxl_unet_io.safetensors", "");
    let ck = Checkpoint::open(&golden("sdxl/unet")).unwrap();
    let cfg = UNetConfig::from_checkpoint(&ck).unwrap();
    let out = d.path().join("unet.onnx");
    unet::export(&cfg, &ck, &UNetExportOptions::default(), &out).unwrap();
    let mut model = OnnxFile::load(&out).unwrap().model;
    let softmaxes = |m: &trt_diff::onnx::proto::ModelProto| {
        m.graph
            .iter()
            .flat_map(|g| &g.node)
            .filter(|n| n.op_type == "Softmax")
            .count()
    };
    let before = softmaxes(&model);
    assert!(before >= 2, "{before}");
    assert_eq!(fuse_attention(&mut model).unwrap(), before);
    assert_eq!(softmaxes(&model), 0);
    let fused = d.path().join("fused_unet.onnx");
    save(model, &fused, &SaveOptions::default()).unwrap();
    let got = run(&fused, &io);
    let err = max_rel_err(&got["model_output"], &io["model_output"]);
    println!("fused UNet ({before} attentions): max rel err {err:.2e}");
    assert!(err < 1e-4, "{err}");
}
