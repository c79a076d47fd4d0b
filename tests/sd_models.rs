//! Stable Diffusion models against diffusers/transformers: tiny random UNet2DConditionModel (SD1.5-like and
//! SDXL-like, diffusers folder and single-file CompVis/SGM layout), the 4-channel AutoencoderKL and the CLIP-L /
//! OpenCLIP-bigG text encoders, exported by our emitters and run on ONNX Runtime, compared with the golden
//! outputs of scripts/golden/sd_models.py.
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

/// max |a - b| / max |b|.
fn rel_err(a: &HostTensor, b: &HostTensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let (a, b) = (a.to_f64().unwrap(), b.to_f64().unwrap());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
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
                let err = rel_err(&got["model_output"], &io["model_output"]);
                println!(
                    "{model} {tag} {:?}: max rel err {err:.2e}",
                    io["model_output"].shape
                );
                assert!(err < 1e-4, "{model} {tag}: {err}");
            }
        }
    }
}
