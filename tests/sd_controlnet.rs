//! ControlNet on the tiny Stable Diffusion 1.5 and SDXL pipelines (tests/golden/sd/controlnet,
//! scripts/golden/sd_controlnet.py): final latents against diffusers' StableDiffusionControlNetPipeline and
//! StableDiffusionXLControlNetPipeline (strength 0.7, window [0, 0.75]); without a control the residuals are zero
//! and the UNet gives its plain output.
use std::path::{Path, PathBuf};
use trt_diff::backend::BackendChoice;
use trt_diff::manifest::EngineFile;
use trt_diff::models::unet::{UNetExportOptions, controlnet_residuals};
use trt_diff::onnx::DataType;
use trt_diff::pipelines::engines::{OpenOptions, open_file};
use trt_diff::pipelines::image::{ControlImage, ImagePipeline, ImageRequest};
use trt_diff::pipelines::sd::{SdEngines, SdModel};
use trt_diff::pipelines::sd_build::{
    detect_arch, export_aux, export_controlnet, export_unet, onnx_path, plan,
};
use trt_diff::tokenizer::clip::ClipTokenizer;
use trt_diff::weights::safetensors_file::Checkpoint;

const PROMPT: &str = "a watercolor painting of a fox in the snow, 4k";
const NEGATIVE: &str = "blurry, low quality";

pub(crate) fn golden(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(rel)
}

pub(crate) fn clip_vocab() -> PathBuf {
    std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")))
        .join("tokenizers/bpe_simple_vocab_16e6.txt.gz")
}

pub(crate) fn model_dir(root: &Path, xl: bool) -> PathBuf {
    let m = root.join(if xl { "tiny-sdxl" } else { "tiny-sd" });
    std::fs::create_dir_all(m.join("scheduler")).unwrap();
    let mut parts = vec![
        ("vae", golden("sd/sd15/vae")),
        ("text_encoder", golden("flux/text_encoder")),
        (
            "unet",
            golden(if xl { "sd/sdxl/unet" } else { "sd/sd15/unet" }),
        ),
    ];
    if xl {
        parts.push(("text_encoder_2", golden("sd/sdxl/pipeline_text_encoder_2")));
    }
    for (name, src) in parts {
        std::os::unix::fs::symlink(&src, m.join(name)).unwrap();
    }
    std::fs::write(
        m.join("scheduler/scheduler_config.json"),
        "{\"_class_name\": \"EulerDiscreteScheduler\", \"prediction_type\": \"epsilon\"}",
    )
    .unwrap();
    m
}

/// The tiny pipeline in f32 on ONNX Runtime's CPU backend, its UNet taking the residuals of the ControlNet
/// `controlnet` (a diffusers folder).
pub(crate) fn pipeline(root: &Path, xl: bool, controlnet: &Path) -> ImagePipeline<SdModel> {
    let model = model_dir(root, xl);
    let arch = detect_arch(&model).unwrap();
    let mut p = plan(&model, arch, Some(&clip_vocab())).unwrap();
    let f32t = DataType::FLOAT;
    export_aux(&p, root, "sd", f32t, f32t).unwrap();
    let unet_onnx = onnx_path(root, "sd", "unet");
    let opts = UNetExportOptions {
        controlnet_residuals: true,
        ..Default::default()
    };
    export_unet(&p, &opts, &unet_onnx).unwrap();
    let cn_onnx = onnx_path(root, "sd", "controlnet");
    export_controlnet(&p, controlnet, f32t, &cn_onnx).unwrap();
    p.config.controlnet_levels = controlnet_residuals(&p.unet)
        .iter()
        .map(|r| r.level)
        .collect();
    let open = |path: &Path| {
        open_file(
            &EngineFile::open(path).unwrap(),
            BackendChoice::Cpu,
            &OpenOptions::default(),
        )
        .unwrap()
    };
    let tokenizers = p
        .config
        .text_encoders
        .iter()
        .map(|spec| {
            let mut t = ClipTokenizer::load(&clip_vocab()).unwrap();
            t.pad = spec.pad;
            t
        })
        .collect();
    let text_encoders = p
        .config
        .text_encoders
        .iter()
        .map(|spec| open(&onnx_path(root, "sd", &spec.component)))
        .collect();
    let mut model = SdModel::new(
        p.config.clone(),
        tokenizers,
        SdEngines {
            text_encoders,
            unet: open(&unet_onnx),
            vae_decoder: open(&onnx_path(root, "sd", "vae_decoder")),
            vae_encoder: None,
            tae_decoder: None,
        },
    );
    model.set_controlnet(open(&cn_onnx));
    ImagePipeline::new(model)
}

pub(crate) fn tensor(file: &str, name: &str) -> Vec<f32> {
    Checkpoint::open(&golden(file))
        .unwrap()
        .get(name)
        .unwrap()
        .to_f32()
        .unwrap()
}

pub(crate) fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64))
        / scale
}

pub(crate) fn run(
    pipe: &mut ImagePipeline<SdModel>,
    xl: bool,
    controls: Vec<ControlImage>,
) -> Vec<f32> {
    let prefix = if xl { "sdxl" } else { "sd15" };
    let req = ImageRequest {
        prompt: PROMPT.into(),
        negative_prompt: Some(NEGATIVE.into()),
        steps: Some(4),
        sampler: Some("euler".into()),
        scheduler: Some("normal".into()),
        width: Some(32),
        height: Some(32),
        cfg: if xl { 5.0 } else { 7.5 },
        batch: 1,
        strength: 1.0,
        initial_noise: Some(tensor(
            "sd/pipeline_io.safetensors",
            &format!("{prefix}_initial_latents"),
        )),
        latents_only: true,
        controls,
        ..Default::default()
    };
    pipe.generate(&req, &mut |_| Ok(())).unwrap().latents
}

fn controlnet_matches_diffusers(xl: bool) {
    let d = tempfile::tempdir().unwrap();
    let prefix = if xl { "sdxl" } else { "sd15" };
    let mut pipe = pipeline(d.path(), xl, &golden(&format!("sd/controlnet/{prefix}")));
    let control = ControlImage {
        image: golden("sd/controlnet/control.png"),
        strength: 0.7,
        start: 0.0,
        end: 0.75,
        preprocess: None,
        mode: None,
    };
    let io = "sd/controlnet/controlnet_io.safetensors";
    let want = tensor(io, &format!("{prefix}_controlnet"));
    let got = run(&mut pipe, xl, vec![control]);
    let plain = tensor(
        "sd/pipeline_io.safetensors",
        &format!("{prefix}_final_latents"),
    );
    let e = max_rel(&got, &want);
    println!(
        "{prefix} ControlNet: max rel err {e:.2e} (the ControlNet moves the latents by {:.2e})",
        max_rel(&want, &plain)
    );
    assert!(e < 1e-4, "{prefix}: {e}");
    // No control: zero residuals, diffusers' plain pipeline.
    let e = max_rel(&run(&mut pipe, xl, vec![]), &plain);
    println!("{prefix} without a control: max rel err {e:.2e}");
    assert!(e < 1e-4, "{prefix} without control: {e}");
}

#[test]
fn sd15_controlnet_matches_diffusers() {
    controlnet_matches_diffusers(false);
}

#[test]
fn sdxl_controlnet_matches_diffusers() {
    controlnet_matches_diffusers(true);
}
