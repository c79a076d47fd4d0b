//! Flux ControlNet against diffusers (tests/golden/flux/controlnet, scripts/golden/flux_controlnet.py): a tiny
//! FluxControlNetModel exported by our emitter gives diffusers' block samples, and the tiny transformer (both
//! checkpoint layouts) built to take them gives diffusers' output with them, and its own output with zeros.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::backend::{Engine, HostTensor};
use trt_diff::models::flux::{self, ControlNetGraph, ExportOptions, FluxConfig};
use trt_diff::weights::safetensors_file::Checkpoint;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/flux")
        .join(name)
}

fn io(path: &Path) -> HashMap<String, HostTensor> {
    let ck = Checkpoint::open(path).unwrap();
    ck.names()
        .map(|n| {
            let t = ck.get(n).unwrap();
            (
                n.to_string(),
                HostTensor::from_f32(&t.shape, &t.to_f32().unwrap()),
            )
        })
        .collect()
}

fn rel_err(a: &HostTensor, b: &HostTensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let (a, b) = (a.to_f64().unwrap(), b.to_f64().unwrap());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn run(onnx: &Path, inputs: &HashMap<String, HostTensor>) -> Vec<(String, HostTensor)> {
    let mut e = OrtEngine::open(onnx, &OrtOptions::default()).unwrap();
    let given: Vec<(String, HostTensor)> = e
        .inputs()
        .iter()
        .map(|d| (d.name.clone(), inputs[&d.name].clone()))
        .collect();
    e.run(&given).unwrap()
}

fn axes() -> Vec<usize> {
    FluxConfig::axes_from_diffusers_config(
        &std::fs::read_to_string(golden("flux_dev_config.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn controlnet_and_residuals_match_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let mut inputs = io(&golden("flux_dev_io.safetensors"));
    let want = io(&golden("controlnet/controlnet_io.safetensors"));
    inputs.insert("controlnet_cond".into(), want["controlnet_cond"].clone());
    inputs.insert(
        "conditioning_scale".into(),
        HostTensor::from_f32(&[1], &[0.8]),
    );
    // The ControlNet (config.json beside its weights gives the RoPE axes).
    let ck = Checkpoint::open(&golden("controlnet/model")).unwrap();
    let (cfg, _, _) = FluxConfig::from_checkpoint(&ck).unwrap();
    assert_eq!((cfg.depth, cfg.depth_single), (1, 1));
    let onnx = d.path().join("controlnet.onnx");
    let opts = ExportOptions {
        controlnet: ControlNetGraph::Model,
        ..Default::default()
    };
    flux::export(&cfg, &ck, &opts, &onnx).unwrap();
    let out = run(&onnx, &inputs);
    for (name, got) in &out {
        let err = rel_err(got, &want[name]);
        println!("ControlNet {name}: max rel err {err:.2e}");
        assert!(err < 1e-4, "{name}: {err}");
    }
    assert_eq!(out.len(), 2);
    // The transformer taking the samples, in both layouts; zeros leave it as built.
    for file in ["flux_dev.safetensors", "flux_dev_bfl.safetensors"] {
        let ck = Checkpoint::open(&golden(file)).unwrap();
        let (cfg, _, _) = FluxConfig::from_checkpoint_with_axes(&ck, Some(axes())).unwrap();
        let onnx = d.path().join(format!("{file}.onnx"));
        let opts = ExportOptions {
            controlnet: ControlNetGraph::Residuals {
                double: 1,
                single: 1,
            },
            ..Default::default()
        };
        flux::export(&cfg, &ck, &opts, &onnx).unwrap();
        for name in [
            "controlnet_block_samples",
            "controlnet_single_block_samples",
        ] {
            inputs.insert(name.into(), want[name].clone());
        }
        let err = rel_err(&run(&onnx, &inputs)[0].1, &want["sample"]);
        println!("{file} with ControlNet samples: max rel err {err:.2e}");
        assert!(err < 1e-4, "{file}: {err}");
        for name in [
            "controlnet_block_samples",
            "controlnet_single_block_samples",
        ] {
            let t = &want[name];
            inputs.insert(
                name.into(),
                HostTensor::from_f32(&t.shape, &vec![0.0; t.shape.iter().product()]),
            );
        }
        let err = rel_err(
            &run(&onnx, &inputs)[0].1,
            &want["sample_without_controlnet"],
        );
        assert!(err < 1e-4, "{file} zeros: {err}");
    }
}
